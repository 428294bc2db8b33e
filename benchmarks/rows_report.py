#!/usr/bin/env python
"""Rows of `quantize_demo.py` runs against the run's own "all (default)" row and llm-compressor, window by window.

Each ``--run FILE`` is one `quantize_demo.py` result (one model and calibration seed, llm-compressor's rows read
with ``--peer-from``) holding the default row and every ``--row``. Per run, row and task: the gap, the ratio to
llm-compressor's gap, whether the cell meets the issue's half-gap rule (gap at most half of theirs and the paired
95 % interval below 1), and the paired 95 % interval of the row over the default. Totals per row: the summed
gap, the cells met, the cells with the interval over the default below / above zero, and the quantize seconds.

Usage::

    python benchmarks/rows_report.py --scheme w2a16 --row "all with 2 GPTQ rounds" \\
        --run benchmarks/results/stop37/rounds_w2_demo_s0.json ... --out benchmarks/results/stop37/rounds_report.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quantize_demo import PAIRED, PEER, paired  # noqa: E402


def _row(res: dict, method: str, scheme: str) -> dict:
    rows = [r for r in res["runs"] if r["scheme"] == scheme and r["method"] == method and "window_nll" in r]
    if not rows:
        raise SystemExit(f"no {scheme} row {method!r} with per-window NLLs in {res.get('model')}")
    return rows[-1]


def _met(p: dict) -> bool:
    return p["gap_ratio"] is not None and p["gap_ratio"] <= 0.5 and p["ci95"][1] < 1


def report(res: dict, rows: list[str], scheme: str) -> dict:
    """``{row: {"tasks": {task: ...}, "summed_gap", "cells_met", "below_default", "above_default",
    "seconds"}}`` for the default row and ``rows`` of one run."""
    tasks = list(res["eval_windows"])
    owners = torch.cat([torch.full((n,), i) for i, n in enumerate(res["eval_windows"].values())])
    base = torch.tensor(res["base_window_nll"])
    default = _row(res, PAIRED, scheme)
    ref = torch.tensor(default["window_nll"])
    peer = torch.tensor(_row(res, PEER, scheme)["window_nll"])
    out = {}
    for name in [PAIRED, *rows]:
        r = _row(res, name, scheme)
        nll = torch.tensor(r["window_nll"])
        vs_peer, vs_default = paired(nll, peer, base, owners, tasks), paired(nll, ref, base, owners, tasks)
        cells = {t: {"gap": vs_peer[t]["gap_ours"], "gap_peer": vs_peer[t]["gap_theirs"],
                     "ratio": vs_peer[t]["gap_ratio"], "met": _met(vs_peer[t]),
                     "over_default": [vs_default[t]["ppl_ratio"], *vs_default[t]["ci95"]]} for t in tasks}
        out[name] = {"tasks": cells, "summed_gap": sum(c["gap"] for c in cells.values()),
                     "cells_met": sum(c["met"] for c in cells.values()),
                     "below_default": sum(c["over_default"][2] < 1 for c in cells.values()),
                     "above_default": sum(c["over_default"][1] > 1 for c in cells.values()),
                     "seconds": r.get("seconds")}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", action="append", required=True, type=Path, help="a quantize_demo.py result (repeatable)")
    ap.add_argument("--row", action="append", required=True, help="a row compared with the default (repeatable)")
    ap.add_argument("--scheme", default="w2a16")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    runs, totals = {}, {}
    for path in args.run:
        res = json.loads(path.read_text())
        rep = runs[path.name] = report(res, args.row, args.scheme)
        print(f"{path.name} ({res.get('model')}, seed {res['calibration']['seed']})")
        for name, r in rep.items():
            cells = " ".join(f"{100 * c['gap']:+.2f}({c['ratio']:.2f}{'*' if c['met'] else ''})"
                             for c in r["tasks"].values())
            print(f"  {name:24s} sum {100 * r['summed_gap']:5.2f} met {r['cells_met']} below/above default "
                  f"{r['below_default']}/{r['above_default']} {r['seconds']} s | {cells}")
            t = totals.setdefault(name, {"summed_gap": 0.0, "cells_met": 0, "cells": 0, "below_default": 0,
                                         "above_default": 0, "seconds": 0.0})
            t["summed_gap"] += r["summed_gap"]
            t["cells"] += len(r["tasks"])
            for k in ("cells_met", "below_default", "above_default"):
                t[k] += r[k]
            t["seconds"] += r["seconds"] or 0.0
    print("totals")
    for name, t in totals.items():
        print(f"  {name:24s} summed gap {100 * t['summed_gap']:.2f} points, {t['cells_met']} of {t['cells']} cells "
              f"met, interval vs default below/above zero {t['below_default']}/{t['above_default']}, "
              f"{t['seconds']:.1f} s")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"scheme": args.scheme, "runs": runs, "totals": totals}, indent=1) + "\n")


if __name__ == "__main__":
    main()
