#!/usr/bin/env python
"""The ablation table of one `quantize_demo.py` run as Markdown: every row (each technique alone on plain GPTQ,
the default, the default without each technique, RTN) against the original, against llm-compressor and against
the default, window by window on the same held-out windows.

Columns per task: our perplexity gap in % with its 95 % interval against the original, and the ratio of our gap
to llm-compressor's (the issue's half-gap rule is met where the ratio is at most 0.5 and the paired interval of
ours over theirs is below zero: marked *). Then the gaps summed over the tasks, the half-gap cells, the tasks
whose paired interval against the default is below / above zero, the worst layer's routing agreement (top-k
sets on the held-out windows) and the quantize stage's seconds (one run; the alternating-round ratios are
`quantize_walltime.py`'s). The JSON written with ``--out`` keeps every figure.

Usage::

    python benchmarks/ablation_table.py --scheme w2a16 --run benchmarks/results/stop40/ablation_w2_demo_s0.json \\
        --out benchmarks/results/stop40/ablation_w2_table.json > /tmp/w2.md
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quantize_demo import PAIRED, PEER, paired, result_row  # noqa: E402
from rows_report import report  # noqa: E402


def _pct(x: float) -> str:
    return f"{(x - 1) * 100:+.2f}"


def table(res: dict, scheme: str) -> tuple[list[str], dict]:
    """The Markdown lines and the figures for every row of ``scheme`` in ``res`` (the default first compared)."""
    methods = [r["method"] for r in res["runs"] if r["scheme"] == scheme and "window_nll" in r and r["method"] != PEER]
    rows = [m for m in dict.fromkeys(methods) if m != PAIRED]
    figures = report(res, rows, scheme)
    tasks = list(res["eval_windows"])
    head = "| row | " + " | ".join(tasks) + " | summed gap | half-gap cells | vs default below / above | " \
        "routing, worst layer | seconds |"
    lines = [head, "|---|" + "---|" * (len(tasks) + 5)]
    for name in [PAIRED, *rows]:
        r, f = result_row(res, name, scheme), figures[name]
        cells = []
        for t in tasks:
            c, g = f["tasks"][t], r["tasks"][t]
            lo, hi = g["ci95"]
            ratio = "-" if c["ratio"] is None else f"{c['ratio']:.2f}{'*' if c['met'] else ''}"
            cells.append(f"{_pct(g['ppl_ratio'])} ({_pct(lo)}, {_pct(hi)}); {ratio}")
        vs = "-" if name == PAIRED else f"{f['below_reference']} / {f['above_reference']}"
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {100 * f['summed_gap']:.2f} | {f['cells_met']} | {vs} | "
                     f"{min(r['routing_topk_agreement']):.1%} | {r['seconds']} |")
    peer = result_row(res, PEER, scheme)
    lines.append(f"| {PEER} | " + " | ".join(
        f"{_pct(peer['tasks'][t]['ppl_ratio'])} ({_pct(peer['tasks'][t]['ci95'][0])}, "
        f"{_pct(peer['tasks'][t]['ci95'][1])})" for t in tasks)
        + f" | {100 * sum(peer['tasks'][t]['ppl_ratio'] - 1 for t in tasks):.2f} | | | "
          f"{min(peer['routing_topk_agreement']):.1%} | {peer['seconds']} |")
    # the default against llm-compressor, window by window
    owners = torch.cat([torch.full((n,), i) for i, n in enumerate(res["eval_windows"].values())])
    base = torch.tensor(res["base_window_nll"])
    p = paired(torch.tensor(result_row(res, PAIRED, scheme)["window_nll"]), torch.tensor(peer["window_nll"]), base,
               owners, tasks)
    lines.append("")
    lines.append(f"{PAIRED} over {PEER}, per window (% with its 95 % interval): " + "; ".join(
        f"{t} {_pct(p[t]['ppl_ratio'])} ({_pct(p[t]['ci95'][0])}, {_pct(p[t]['ci95'][1])})" for t in tasks) + ".")
    return lines, {"rows": figures, "default_over_peer": p}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, required=True, help="a quantize_demo.py result with llm-compressor's rows")
    ap.add_argument("--scheme", default="w2a16")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    res = json.loads(args.run.read_text())
    lines, figures = table(res, args.scheme)
    print("\n".join(lines))
    if args.out is not None:
        args.out.write_text(json.dumps({"run": str(args.run), "scheme": args.scheme, **figures}, indent=1) + "\n")


if __name__ == "__main__":
    main()
