#!/usr/bin/env python
"""Profile the demo model on every bundled task: per-layer routing divergence between tasks, and throughput.

Runs the same code path as ``moecompress profile`` (the pipeline with one ``profile`` stage) ``--repeats``
times and reports the median tokens/s (calibration tokens through all 4 layers, including the routed-only
expert statistics), plus the Jensen-Shannon divergence (bits) between the tasks' expert-usage distributions.

Usage::

    python benchmarks/profile_demo.py            # writes benchmarks/results/profile_demo.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import torch

from moecompress.algorithms.expert_scores import js_divergence
from moecompress.formats.profile import Profile
from moecompress.pipeline import run
from moecompress.recipe import validate_recipe

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "profile_demo.json")
    args = ap.parse_args()
    torch.set_num_threads(2)
    recipe = validate_recipe({"calibration": {"samples": args.samples, "seq_len": args.seq_len},
                              "stages": [{"stage": "profile"}]})
    speeds, prof = [], None
    with tempfile.TemporaryDirectory() as d:
        for i in range(args.repeats):
            res = run(recipe, output=Path(d) / f"p{i}")
            speeds.append(res.report["stages"][0]["result"]["tokens_per_second"])
            prof = Profile.load(Path(d) / f"p{i}")
    layers = prof.model["moe_layers"]
    shares = {t: prof.stats[t]["count"] / prof.stats[t]["count"].sum(-1, keepdim=True) for t in prof.tasks}
    pairs = {}
    for a in prof.tasks:
        for b in prof.tasks:
            if a < b:
                pairs[f"{a} vs {b}"] = [round(float(v), 4) for v in js_divergence(shares[a], shares[b])]
    mean = [round(sum(v[j] for v in pairs.values()) / len(pairs), 4) for j in range(len(layers))]
    result = {"samples_per_task": args.samples, "seq_len": args.seq_len, "tokens": sum(prof.tokens.values()),
              "tokens_per_second_runs": speeds, "tokens_per_second_median": statistics.median(speeds),
              "js_divergence_bits": pairs, "js_divergence_mean_per_layer": mean,
              "super_experts": prof.summary["super_experts"]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"{result['tokens']:,} tokens, median {result['tokens_per_second_median']:,.0f} tok/s over {speeds}")
    print("\n| task pair | " + " | ".join(f"layer {i}" for i in layers) + " | mean |")
    print("|---|" + "---|" * (len(layers) + 1))
    for name, v in pairs.items():
        print(f"| {name} | " + " | ".join(f"{x:.3f}" for x in v) + f" | {sum(v) / len(v):.3f} |")
    print("| **mean over pairs** | " + " | ".join(f"**{x:.3f}**" for x in mean) + f" | **{sum(mean) / len(mean):.3f}** |")


if __name__ == "__main__":
    main()
