#!/usr/bin/env python
"""Trellis runs against our scalar W3 default and llm-compressor, window by window: the codec's row "all + trellis"
(`quantize_demo.py --methods "all + trellis"`, stop 35) or a proxy run (`trellis_proxy.py --e2e`, stop 34).

Each ``--run TRELLIS.json:SCALAR.json`` pairs a trellis run with a scalar-default run of the same model and
calibration seed (the same held-out windows; checked through the base model's per-window NLLs); llm-compressor's
row is read from the trellis file (its ``--peer-from`` rows; without one, the trellis against the scalar default
alone). Per task: the gaps, the ratio of our gap to
llm-compressor's, the paired 95 % interval of trellis over llm-compressor and of trellis over the scalar default,
and whether the cell meets the issue's W3 rule (gap at most half of theirs and the interval below 1).

Usage::

    python benchmarks/trellis_report.py --run benchmarks/results/stop34/trellis_e2e_L10r2_s0.json:\\
benchmarks/results/stop32/quantize_demo_s0.json ... --out benchmarks/results/stop34/trellis_report.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quantize_demo import PEER, meets_half_gap, paired, result_row  # noqa: E402


def _trellis_row(res: dict) -> dict:
    """The codec's row ("all + trellis", `quantize_demo.py`), else a proxy run's patched "all (default)"."""
    named = [r for r in res["runs"] if r["method"] == "all + trellis" and "window_nll" in r]
    return named[-1] if named else result_row(res, "all (default)", "w3a16")


def report(trellis: dict, scalar: dict) -> dict:
    if trellis["base_window_nll"] != scalar["base_window_nll"]:
        raise SystemExit("the trellis and scalar runs were not evaluated on the same windows of the same model")
    tasks = list(trellis["eval_windows"])
    owners = torch.cat([torch.full((n,), i) for i, n in enumerate(trellis["eval_windows"].values())])
    base = torch.tensor(trellis["base_window_nll"])
    tr = torch.tensor(_trellis_row(trellis)["window_nll"])
    sc = torch.tensor(result_row(scalar, "all (default)", "w3a16")["window_nll"])
    has_peer = any(r["method"] == PEER and r["scheme"] == "w3a16" for r in trellis["runs"])
    if not has_peer:  # no llm-compressor run on this model: the trellis against the scalar default only
        vs_scalar = paired(tr, sc, base, owners, tasks)
        return {t: {"gap_trellis": r["gap_ours"], "gap_scalar": r["gap_theirs"],
                    "trellis_over_scalar": [r["ppl_ratio"], *r["ci95"]]} for t, r in vs_scalar.items()}
    peer = torch.tensor(result_row(trellis, PEER, "w3a16")["window_nll"])
    vs_peer, vs_scalar, scalar_vs_peer = (paired(a, b, base, owners, tasks) for a, b in ((tr, peer), (tr, sc),
                                                                                      (sc, peer)))
    out = {}
    for t in tasks:
        p, s, q = vs_peer[t], vs_scalar[t], scalar_vs_peer[t]
        out[t] = {"gap_trellis": p["gap_ours"], "gap_scalar": s["gap_theirs"], "gap_peer": p["gap_theirs"],
                  "ratio_trellis": p["gap_ratio"], "ratio_scalar": q["gap_ratio"],
                  "trellis_over_peer": [p["ppl_ratio"], *p["ci95"]],
                  "trellis_over_scalar": [s["ppl_ratio"], *s["ci95"]],
                  "met_trellis": meets_half_gap(p), "met_scalar": meets_half_gap(q)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", action="append", required=True, help="TRELLIS.json:SCALAR.json (repeatable)")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    result = {}
    for spec in args.run:
        t_path, s_path = spec.split(":")
        rep = report(json.loads(Path(t_path).read_text()), json.loads(Path(s_path).read_text()))
        result[Path(t_path).name] = rep
        print(Path(t_path).name)
        for t, r in rep.items():
            o, lo, hi = r["trellis_over_scalar"]
            peer = (f"peer {100 * r['gap_peer']:+.2f} | ratio {r['ratio_trellis']:.2f} (scalar "
                    f"{r['ratio_scalar']:.2f}) | " if "gap_peer" in r else "")
            met = f" | met {r['met_trellis']} (scalar {r['met_scalar']})" if "met_trellis" in r else ""
            print(f"  {t:13s} gaps trellis {100 * r['gap_trellis']:+.2f} scalar {100 * r['gap_scalar']:+.2f} {peer}"
                  f"trellis/scalar {100 * (o - 1):+.2f} ({100 * (lo - 1):+.2f}, {100 * (hi - 1):+.2f}){met}")
        if all("met_trellis" in r for r in rep.values()):
            result[Path(t_path).name]["cells_met"] = {"trellis": sum(r["met_trellis"] for r in rep.values()),
                                                      "scalar": sum(r["met_scalar"] for r in rep.values())}
    args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
