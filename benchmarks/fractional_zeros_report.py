#!/usr/bin/env python
"""Fractional zero points at W2 (stop 27): the new default against llm-compressor (same calibration windows per
seed) and against the previous default (integer zeros, `benchmarks/results/refit32/`, same windows), paired per
held-out window with 95 % intervals; counts the half-gap cells and the intervals below zero.

Inputs: ``benchmarks/results/fraczero/quantize_w2_{model}_s{seed}.json`` (``quantize_demo.py`` runs of the default
row with llm-compressor's rows of that seed, commands in docs/BENCHMARKS.md).

Usage::

    python benchmarks/fractional_zeros_report.py --out benchmarks/results/fraczero/report.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from quantize_demo import PAIRED, PEER, paired  # noqa: E402

RES = ROOT / "benchmarks" / "results"
# the previous default (integer zeros) on the same windows, where measured with the current code
OLD = {("demo", 0): "refit32/quantize_demo.json", ("moe2", 0): "refit32/quantize_moe2.json",
       ("moe2", 1): "refit32/quantize_moe2_s1.json", ("moe2", 2): "refit32/quantize_moe2_s2.json",
       ("qwen3", 0): "refit32/quantize_qwen3.json", ("qwen3", 1): "refit32/quantize_qwen3_s1.json",
       ("qwen3", 2): "refit32/quantize_qwen3_s2.json"}


def _row(results: dict, method: str) -> torch.Tensor:
    return torch.tensor(next(r for r in results["runs"] if r["scheme"] == "w2a16" and r["method"] == method)
                        ["window_nll"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    out, counts = {}, {"cells": 0, "half_gap": 0, "below_zero": 0, "vs_old_cells": 0, "vs_old_better": 0,
                       "vs_old_below_zero": 0, "vs_old_above_zero": 0}
    for model in ("demo", "moe2", "qwen3"):
        for seed in (0, 1, 2):
            new = json.loads((RES / "fraczero" / f"quantize_w2_{model}_s{seed}.json").read_text())
            tasks = list(new["eval_windows"])
            owners = torch.cat([torch.full((n,), i) for i, n in enumerate(new["eval_windows"].values())])
            base = torch.tensor(new["base_window_nll"])
            ours = _row(new, PAIRED)
            entry = {"vs_llmcompressor": paired(ours, _row(new, PEER), base, owners, tasks)}
            for v in entry["vs_llmcompressor"].values():
                counts["cells"] += 1
                counts["half_gap"] += v["gap_ratio"] is not None and v["gap_ratio"] <= 0.5
                counts["below_zero"] += v["ci95"][1] < 1
            if (model, seed) in OLD:
                old = json.loads((RES / OLD[model, seed]).read_text())
                if old["base_window_nll"] != new["base_window_nll"]:
                    raise SystemExit(f"{OLD[model, seed]} was evaluated on other windows")
                entry["vs_integer_zeros"] = paired(ours, _row(old, PAIRED), base, owners, tasks)
                for v in entry["vs_integer_zeros"].values():
                    counts["vs_old_cells"] += 1
                    counts["vs_old_better"] += v["ppl_ratio"] < 1
                    counts["vs_old_below_zero"] += v["ci95"][1] < 1
                    counts["vs_old_above_zero"] += v["ci95"][0] > 1
            out[f"{model}_s{seed}"] = entry
            line = " | ".join(f"{t} {100 * v['gap_ours']:+.2f} vs {100 * v['gap_theirs']:+.2f} "
                              f"({v['gap_ratio']:.2f}x; {100 * (v['ppl_ratio'] - 1):+.2f} "
                              f"[{100 * (v['ci95'][0] - 1):+.2f}, {100 * (v['ci95'][1] - 1):+.2f}])"
                              for t, v in entry["vs_llmcompressor"].items())
            print(f"{model} seed {seed}: {line}")
            if "vs_integer_zeros" in entry:
                print("   vs integer zeros: " + " | ".join(
                    f"{t} {100 * (v['ppl_ratio'] - 1):+.2f} [{100 * (v['ci95'][0] - 1):+.2f}, "
                    f"{100 * (v['ci95'][1] - 1):+.2f}]" for t, v in entry["vs_integer_zeros"].items()))
    print(json.dumps(counts))
    if args.out:
        args.out.write_text(json.dumps({"counts": counts, "runs": out}, indent=1) + "\n")


if __name__ == "__main__":
    main()
