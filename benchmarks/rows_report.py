#!/usr/bin/env python
"""Rows of `quantize_demo.py` runs against a reference row (default: the run's own "all (default)") and
llm-compressor, window by window.

Each ``--run FILE`` is one `quantize_demo.py` result (one model and calibration seed, llm-compressor's rows read
with ``--peer-from``) holding the reference row and every ``--row``; ``--run FILE:REF`` reads the reference row
from another result of the same model, seed and windows (checked), e.g. an earlier stop's run of the same row.
Per run, row and task: the gap, the ratio to llm-compressor's gap, whether the cell meets the issue's half-gap
rule (gap at most half of theirs and the paired 95 % interval below 1), and the paired 95 % interval of the row
over the reference. Totals per row: the summed gap, the cells met, the cells with the interval over the reference
below / above zero, and the quantize seconds, per model and over every run.

Usage::

    python benchmarks/rows_report.py --scheme w2a16 --row "all with 2 GPTQ rounds" \\
        --run benchmarks/results/stop37/rounds_w2_demo_s0.json ... --out benchmarks/results/stop37/rounds_report.json
    python benchmarks/rows_report.py --scheme w3a16 --row "all + trellis" --reference-row "all + trellis" \\
        --run benchmarks/results/stop37/trellis_rounds0_demo_s0.json:benchmarks/results/stop36/rounds1_s0.json ...
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quantize_demo import PAIRED, PEER, meets_half_gap, paired, result_row  # noqa: E402


def report(res: dict, rows: list[str], scheme: str, ref_res: dict | None = None,
           ref_row: str = PAIRED) -> dict:
    """``{row: {"tasks": {task: ...}, "summed_gap", "cells_met", "below_reference", "above_reference",
    "seconds"}}`` for the reference row (``ref_row`` of ``ref_res``, default ``res``; keyed "reference: ROW")
    and ``rows`` of one run (the keys say "reference")."""
    ref_res = res if ref_res is None else ref_res
    if ref_res["base_window_nll"] != res["base_window_nll"]:
        raise SystemExit("the run and its reference were not evaluated on the same windows of the same model")
    tasks = list(res["eval_windows"])
    owners = torch.cat([torch.full((n,), i) for i, n in enumerate(res["eval_windows"].values())])
    base = torch.tensor(res["base_window_nll"])
    ref_key = ref_row if ref_res is res else f"reference: {ref_row}"
    ref = torch.tensor(result_row(ref_res, ref_row, scheme)["window_nll"])
    peer = torch.tensor(result_row(res, PEER, scheme)["window_nll"])
    out = {}
    for name in [ref_key, *rows]:
        r = result_row(ref_res, ref_row, scheme) if name == ref_key else result_row(res, name, scheme)
        nll = torch.tensor(r["window_nll"])
        vs_peer, vs_reference = paired(nll, peer, base, owners, tasks), paired(nll, ref, base, owners, tasks)
        cells = {t: {"gap": vs_peer[t]["gap_ours"], "gap_peer": vs_peer[t]["gap_theirs"],
                     "ratio": vs_peer[t]["gap_ratio"], "met": meets_half_gap(vs_peer[t]),
                     "over_reference": [vs_reference[t]["ppl_ratio"], *vs_reference[t]["ci95"]]} for t in tasks}
        out[name] = {"tasks": cells, "summed_gap": sum(c["gap"] for c in cells.values()),
                     "cells_met": sum(c["met"] for c in cells.values()),
                     "below_reference": sum(c["over_reference"][2] < 1 for c in cells.values()),
                     "above_reference": sum(c["over_reference"][1] > 1 for c in cells.values()),
                     "seconds": r.get("seconds")}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", action="append", required=True,
                    help="a quantize_demo.py result, or RESULT:REFERENCE_RESULT (repeatable)")
    ap.add_argument("--row", action="append", required=True, help="a row compared with the reference (repeatable)")
    ap.add_argument("--reference-row", default=PAIRED)
    ap.add_argument("--scheme", default="w2a16")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    runs, totals = {}, {}
    for spec in args.run:
        path, _, ref_path = spec.partition(":")
        path = Path(path)
        res = json.loads(path.read_text())
        ref = json.loads(Path(ref_path).read_text()) if ref_path else None
        rep = runs[path.name] = report(res, args.row, args.scheme, ref, args.reference_row)
        print(f"{path.name} ({res.get('model')}, seed {res['calibration']['seed']})")
        for name, r in rep.items():
            cells = " ".join(f"{100 * c['gap']:+.2f}({'-' if c['ratio'] is None else format(c['ratio'], '.2f')}"
                             f"{'*' if c['met'] else ''})" for c in r["tasks"].values())  # no ratio: theirs <= 0
            print(f"  {name[:36]:36s} sum {100 * r['summed_gap']:5.2f} met {r['cells_met']} below/above reference "
                  f"{r['below_reference']}/{r['above_reference']} {r['seconds']} s | {cells}")
            for group in (res.get("model"), "all"):  # per model, and over every run
                t = totals.setdefault(group, {}).setdefault(name, {
                    "summed_gap": 0.0, "cells_met": 0, "cells": 0, "below_reference": 0, "above_reference": 0,
                    "seconds": 0.0})
                t["summed_gap"] += r["summed_gap"]
                t["cells"] += len(r["tasks"])
                for k in ("cells_met", "below_reference", "above_reference"):
                    t[k] += r[k]
                t["seconds"] += r["seconds"] or 0.0
    for group, rows in totals.items():
        print(f"totals: {group}")
        for name, t in rows.items():
            print(f"  {name[:36]:36s} summed gap {100 * t['summed_gap']:.2f} points, {t['cells_met']} of {t['cells']} "
                  f"cells met, interval vs reference below/above zero {t['below_reference']}/{t['above_reference']}, "
                  f"{t['seconds']:.1f} s")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"scheme": args.scheme, "runs": runs, "totals": totals}, indent=1) + "\n")


if __name__ == "__main__":
    main()
