#!/usr/bin/env python
"""Markdown tables for docs/BENCHMARKS.md from benchmarks/results/ternary_dict_storage.json and
ternary_dict_demo.json (written by benchmarks/ternary_dict_demo.py).

    python benchmarks/report_ternary_dict.py
"""

from __future__ import annotations

import json
from pathlib import Path

RES = Path(__file__).resolve().parent / "results"


def storage() -> None:
    f = RES / "ternary_dict_storage.json"
    if not f.exists():
        return
    d = json.loads(f.read_text())["storage"]
    for name, s in d.items():
        print(f"\n{name}: {s['weights']:,} routed-expert weights, shapes {s['shapes']}\n")
        print("| threshold (x max) | zero fraction | ternary-dict bits/weight | ternary-b3 bits/weight | dict / b3 |")
        print("|---|---|---|---|---|")
        for p in s["points"]:
            print(f"| {p['threshold']} | {p['zero_fraction']:.1%} | {p['bits_ternary-dict']:.3f} | "
                  f"{p['bits_ternary-b3']:.3f} | {p['bits_ternary-dict'] / p['bits_ternary-b3']:.2f} |")


def quality() -> None:
    f = RES / "ternary_dict_demo.json"
    if not f.exists():
        return
    q = json.loads(f.read_text())["quality"]
    tasks = list(q["base_ppl"])
    print(f"\ncalibration {q['calibration']}, held-out windows {q['eval_windows']}\n")
    print("| configuration | expert codecs | routed-expert bits/weight | zeros | "
          + " | ".join(tasks) + " |")
    print("|---|---|---|---|" + "---|" * len(tasks))
    print("| bf16 (original) | - | 16 | - | " + " | ".join(f"{q['base_ppl'][t]:.2f}" for t in tasks) + " |")
    for r in sorted(q.get("runs", []), key=lambda r: r["expert_bits_per_weight"] or 16):
        cells = []
        for t in tasks:
            lo, hi = r["tasks"][t]["ci95"]
            cells.append(f"{r['ppl'][t]:.2f} (x{r['tasks'][t]['ppl_ratio']:.3f}, {lo:.3f}-{hi:.3f})")
        z = "-" if r.get("zero_fraction") is None else f"{r['zero_fraction']:.1%}"
        print(f"| {r['config']} | {'/'.join(r['codecs'])} | {r['expert_bits_per_weight']:.3f} | {z} | "
              + " | ".join(cells) + " |")


if __name__ == "__main__":
    storage()
    quality()
