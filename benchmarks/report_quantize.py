#!/usr/bin/env python
"""Render benchmarks/results/quantize_demo.json as the Markdown tables of docs/BENCHMARKS.md.

Usage::

    python benchmarks/report_quantize.py > /tmp/quantize_tables.md
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def pct(x: float) -> str:
    return f"{(x - 1) * 100:+.2f}"


def main() -> None:
    path = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "benchmarks" / "results" / "quantize_demo.json"
    r = json.loads(path.read_text())
    tasks = list(r["base_ppl"])
    runs = r["runs"]
    print("| scheme | method | " + " | ".join(tasks) + " | min routing top-k agreement | seconds |")
    print("|---|---|" + "---|" * len(tasks) + "---|---|")
    for row in runs:
        cells = []
        for t in tasks:
            d = row["tasks"][t]
            lo, hi = d["ci95"]
            cells.append(f"{pct(d['ppl_ratio'])} ({pct(lo)}, {pct(hi)})")
        agree = min(row["routing_topk_agreement"])
        print(f"| {row['scheme'].upper()} | {row['method']} | " + " | ".join(cells) + f" | {agree:.1%} | {row['seconds']} |")


if __name__ == "__main__":
    main()
