#!/usr/bin/env python
"""Mixed widths (`--linear-bits 4`, `--layer-bits 0:4`) against the uniform default and llm-compressor, from
`quantize_demo.py` result files measured on the same held-out windows (one model, one calibration seed): per scheme
and task each row's perplexity gap, and window-by-window paired differences (95 % intervals) of a row against
another, with the ratio of their gaps.

Usage::

    python benchmarks/mixed_width_report.py --files A.json B.json ... --out benchmarks/results/mixed_demo.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from quantize_demo import PEER, paired  # noqa: E402

MIXED = "all + linears 4-bit"
COMPARE = [  # (row, against)
    (MIXED, "all (default)"),
    (MIXED, f"{PEER} + linears 4-bit"),
    (MIXED, PEER),
    (f"{PEER} + linears 4-bit", PEER),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--files", type=Path, nargs="+", required=True)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    parts = [json.loads(f.read_text()) for f in args.files]
    first = parts[0]
    if any(p["base_window_nll"] != first["base_window_nll"] or p["calibration"] != first["calibration"]
           for p in parts[1:]):
        raise SystemExit("the files were measured on other windows or calibration seeds")
    tasks = list(first["eval_windows"])
    owners = torch.cat([torch.full((n,), i) for i, n in enumerate(first["eval_windows"].values())])
    base = torch.tensor(first["base_window_nll"])
    rows: dict[tuple[str, str], dict] = {}
    for p in parts:  # later files win
        for r in p["runs"]:
            rows[r["scheme"], r["method"]] = r
    out = {"model": first.get("model"), "calibration": first["calibration"], "gaps": {}, "paired": {}}
    for scheme in sorted({s for s, _ in rows}):
        out["gaps"][scheme] = {m: {"code_bits": r.get("code_bits"),
                                   "gap_pct": {t: round((v["ppl_ratio"] - 1) * 100, 3) for t, v in r["tasks"].items()}}
                               for (s, m), r in rows.items() if s == scheme}
        for a, b in COMPARE:
            ra, rb = rows.get((scheme, a)), rows.get((scheme, b))
            if ra is None or rb is None or "window_nll" not in ra or "window_nll" not in rb:
                continue
            got = paired(torch.tensor(ra["window_nll"]), torch.tensor(rb["window_nll"]), base, owners, tasks)
            out["paired"].setdefault(scheme, {})[f"{a} vs {b}"] = got
            print(f"{scheme} {a} vs {b}:")
            for t, v in got.items():
                ratio = "-" if v["gap_ratio"] is None else f"{v['gap_ratio']:.2f}"
                print(f"  {t:<13} {(v['ppl_ratio'] - 1) * 100:+.2f} ({(v['ci95'][0] - 1) * 100:+.2f}, "
                      f"{(v['ci95'][1] - 1) * 100:+.2f})  gaps {v['gap_ours'] * 100:+.2f} / {v['gap_theirs'] * 100:+.2f}"
                      f"  ratio {ratio}")
    for scheme, by in out["gaps"].items():
        for m, g in by.items():
            print(f"{scheme} {m:<40} bits {g['code_bits']}  " + " ".join(f"{x:+.2f}" for x in g["gap_pct"].values()))
    if args.out is not None:
        args.out.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
