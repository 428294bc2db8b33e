#!/usr/bin/env python
"""The clip search's floor at W2 with fractional zeros (stop 28): the default (0.8) against 0.7 and 0.9, three
trained models x three calibration seeds, each against llm-compressor's GPTQ on the same windows. Prints per run
the summed perplexity gap over the five tasks (points) and the cells where our gap is at most half of theirs.

Inputs: ``benchmarks/results/fraczero/quantize_w2_{model}_s{seed}.json`` (the default and llm-compressor) and
``benchmarks/results/stop28/clip_floor_{model}_s{seed}.json`` (the two floors; commands in docs/BENCHMARKS.md).

Usage::

    python benchmarks/clip_floor_report.py --out benchmarks/results/stop28/clip_floor_report.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

RES = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
ROWS = {"0.8 (default)": "all (default)", "0.7": "all + clip floor 0.7", "0.9": "all + clip floor 0.9"}


def _gaps(results: dict, method: str) -> dict[str, float]:
    row = next(r for r in results["runs"] if r["scheme"] == "w2a16" and r["method"] == method)
    return {t: 100 * (v["ppl_ratio"] - 1) for t, v in row["tasks"].items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    report, totals = [], {k: 0 for k in ROWS}
    for model in ("demo", "moe2", "qwen3"):
        for seed in (0, 1, 2):
            base = json.loads((RES / "fraczero" / f"quantize_w2_{model}_s{seed}.json").read_text())
            sweep = json.loads((RES / "stop28" / f"clip_floor_{model}_s{seed}.json").read_text())
            peer = _gaps(base, "llm-compressor GPTQ")
            entry = {"model": model, "seed": seed, "llm-compressor": round(sum(peer.values()), 2)}
            for floor, method in ROWS.items():
                g = _gaps(base if floor.endswith("(default)") else sweep, method)
                half = sum(g[t] <= peer[t] / 2 for t in g)
                totals[floor] += half
                entry[floor] = {"summed_gap": round(sum(g.values()), 2), "half_gap_cells": half}
            report.append(entry)
            print(f"{model:6s} seed {seed}: " + " | ".join(
                f"{f} {entry[f]['summed_gap']:.2f} ({entry[f]['half_gap_cells']}/5)" for f in ROWS)
                + f" | llm-compressor {entry['llm-compressor']:.2f}")
    print("half-gap cells of 45: " + ", ".join(f"{f} {n}" for f, n in totals.items()))
    if args.out is not None:
        args.out.write_text(json.dumps({"runs": report, "half_gap_cells": totals}, indent=1) + "\n")


if __name__ == "__main__":
    main()
