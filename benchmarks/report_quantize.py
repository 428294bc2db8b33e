#!/usr/bin/env python
"""Render benchmarks/results/quantize_demo.json and router_align_demo.json as the Markdown tables of
docs/BENCHMARKS.md (ablation, side by side with llm-compressor, W4A4 gap closed, router alignment).

Usage::

    python benchmarks/report_quantize.py > /tmp/quantize_tables.md
"""

from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
PEER = "llm-compressor GPTQ"


def pct(x: float) -> str:
    return f"{(x - 1) * 100:+.2f}"


def cell(d: dict) -> str:
    lo, hi = d["ci95"]
    return f"{pct(d['ppl_ratio'])} ({pct(lo)}, {pct(hi)})"


def ablation(runs: list[dict], tasks: list[str]) -> None:
    print("| scheme | method | " + " | ".join(tasks) + " | routing agreement, worst layer | seconds |")
    print("|---|---|" + "---|" * len(tasks) + "---|---|")
    for row in runs:
        if row["method"] == PEER:
            continue
        cells = " | ".join(cell(row["tasks"][t]) for t in tasks)
        print(f"| {row['scheme'].upper()} | {row['method']} | {cells} | {min(row['routing_topk_agreement']):.1%} "
              f"| {row['seconds']} |")


def peers(runs: list[dict], tasks: list[str]) -> None:
    print("| scheme | tool | " + " | ".join(tasks) + " | routing agreement, worst layer | seconds |")
    print("|---|---|" + "---|" * len(tasks) + "---|---|")
    for scheme in ("w4a16", "w3a16", "w2a16"):
        for row in runs:
            if row["scheme"] == scheme and row["method"] in ("all (default)", PEER):
                tool = "llm-compressor 0.14 GPTQ" if row["method"] == PEER else "moecompress (default)"
                cells = " | ".join(cell(row["tasks"][t]) for t in tasks)
                print(f"| {scheme.upper()} | {tool} | {cells} | {min(row['routing_topk_agreement']):.1%} "
                      f"| {row['seconds']} |")


def gap_closed(runs: list[dict], tasks: list[str]) -> None:
    for scheme in ("w4a4", "w3a4"):
        by = {r["method"]: r for r in runs if r["scheme"] == scheme}
        rtn, best = by["RTN"], by["all (default)"]
        per = {t: 1 - (best["tasks"][t]["ppl_ratio"] - 1) / (rtn["tasks"][t]["ppl_ratio"] - 1) for t in tasks}
        mean_rtn = sum(rtn["tasks"][t]["ppl_ratio"] - 1 for t in tasks) / len(tasks)
        mean_best = sum(best["tasks"][t]["ppl_ratio"] - 1 for t in tasks) / len(tasks)
        print(f"- {scheme.upper()}: mean gap RTN {mean_rtn:+.2%} -> all components {mean_best:+.2%}, "
              f"{1 - mean_best / mean_rtn:.0%} of the gap closed; per task "
              + ", ".join(f"{t} {v:.0%}" for t, v in per.items()))


def router(path: Path) -> None:
    rows = json.loads(path.read_text())["rows"]
    print("| router bits | layer | divergence: min-max | EAQuant loss | ours | top-2 agreement: min-max "
          "| EAQuant loss | ours |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        d = " | ".join(f"{r[n]['divergence']:.2e}" for n in ("plain", "eaquant", "ours"))
        a = " | ".join(f"{r[n]['agreement']:.2%}" for n in ("plain", "eaquant", "ours"))
        print(f"| {r['bits']} | {r['layer']} | {d} | {a} |")


def lowbit(path: Path) -> None:
    """The low-bit ablation (issue 12) and the paired comparison with llm-compressor."""
    r = json.loads(path.read_text())
    tasks = list(r["base_ppl"])
    print("| scheme | method | " + " | ".join(tasks) + " | routing agreement, worst layer | seconds |")
    print("|---|---|" + "---|" * len(tasks) + "---|---|")
    for row in r["runs"]:
        cells = " | ".join(cell(row["tasks"][t]) for t in tasks)
        name = "llm-compressor 0.14 GPTQ" if row["method"] == PEER else row["method"]
        print(f"| {row['scheme'].upper()} | {name} | {cells} | {min(row['routing_topk_agreement']):.1%} "
              f"| {row['seconds']} |")
    print("\nPaired, ours (all, default) minus llm-compressor per held-out window: perplexity ratio in % with its 95 % "
          "interval; then each tool's gap to the original and ours as a share of theirs (target: at most 0.5).\n")
    print("| scheme | " + " | ".join(tasks) + " |")
    print("|---|" + "---|" * len(tasks))
    for scheme, per in r.get("paired", {}).items():
        cells = []
        for t in tasks:
            d = per[t]
            share = "n/a" if d["gap_ratio"] is None else f"{d['gap_ratio']:.2f}x"
            cells.append(f"{cell(d)}; {d['gap_ours']:+.2%} vs {d['gap_theirs']:+.2%} = {share}")
        print(f"| {scheme.upper()} | " + " | ".join(cells) + " |")


def main() -> None:
    for name, title in (("quantize_lowbit_stop22.json", "Low-bit experts (issue 12), stop 22"),
                        ("quantize_lowbit_stop21.json", "Low-bit experts (issue 12), stop 21"),
                        ("quantize_lowbit_stop20.json", "Low-bit experts (issue 12), stop 20"),
                        ("quantize_lowbit.json", "Low-bit experts (issue 12), stop 19")):
        if (RESULTS / name).exists():
            print(f"### {title}\n")
            lowbit(RESULTS / name)
            print()
    r = json.loads((RESULTS / "quantize_demo.json").read_text())
    tasks = list(r["base_ppl"])
    print("### Ablation\n")
    ablation(r["runs"], tasks)
    print("\n### Side by side with llm-compressor\n")
    peers(r["runs"], tasks)
    print("\n### W4A4 / W3A4 gap closed\n")
    gap_closed(r["runs"], tasks)
    if (RESULTS / "router_align_demo.json").exists():
        print("\n### Router alignment\n")
        router(RESULTS / "router_align_demo.json")


if __name__ == "__main__":
    main()
