#!/usr/bin/env python
"""The experts' pair products (`runtime.paired.collect_pairs`) at several group sizes: the W2 default's
`quantize` stage run with ``paired.GROUP_TOKENS`` set to each value in turn (0: one call at a time), alternating
for ``--reps`` rounds, each on a freshly loaded model; prints and writes the stage's wall time and the time spent
in `_accumulate_pairs` per run. Calibration 32 windows x 256 tokens per task, as in `quantize_demo.py`.

Usage::

    python benchmarks/pair_groups.py --groups 0,1024,2048,8192 --reps 3 --out benchmarks/results/stop47/pair_groups_demo.json
    python benchmarks/pair_groups.py --model /work/bench/fine64t --groups 0,1024,2048 --reps 2 --out ...
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from quantize_demo import ROWS  # noqa: E402

import moecompress.runtime.paired as paired  # noqa: E402
from moecompress.context import Context  # noqa: E402
from moecompress.recipe import CalibrationConfig  # noqa: E402
from moecompress.runtime.source import load_model  # noqa: E402
from moecompress.stages import STAGES  # noqa: E402
from moecompress.stages.quantize import QuantizeConfig  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="a checkpoint directory (default: the bundled demo)")
    ap.add_argument("--scheme", default="w2a16")
    ap.add_argument("--groups", default="0,1024,2048", help="comma-separated GROUP_TOKENS values")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    real = paired._accumulate_pairs
    spent = [0.0]

    def timed(*a, **k):
        t0 = time.perf_counter()
        try:
            return real(*a, **k)
        finally:
            spent[0] += time.perf_counter() - t0
    paired._accumulate_pairs = timed
    saved = paired.GROUP_TOKENS
    runs: dict[str, list[dict[str, float]]] = {}
    try:
        for rep in range(args.reps):
            for g in args.groups.split(","):
                paired.GROUP_TOKENS = int(g)
                ctx = Context(load_model(args.model), CalibrationConfig(samples=32, seq_len=256), None)
                spent[0] = 0.0
                t0 = time.perf_counter()
                STAGES.get("quantize").run(ctx, QuantizeConfig(scheme=args.scheme, **dict(ROWS)["all (default)"]))
                run = {"wall": round(time.perf_counter() - t0, 2), "pairs": round(spent[0], 2)}
                runs.setdefault(g, []).append(run)
                print(f"round {rep + 1}: GROUP_TOKENS {g}: stage {run['wall']} s, pair products {run['pairs']} s",
                      flush=True)
    finally:
        paired._accumulate_pairs, paired.GROUP_TOKENS = real, saved
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"model": args.model or "demo", "scheme": args.scheme, "runs": runs},
                                       indent=1) + "\n")


if __name__ == "__main__":
    main()
