#!/usr/bin/env python
"""Wall time of the `quantize` stage on the demo model: plain GPTQ against the defaults (and any other rows of
`quantize_demo.ROWS`), alternating the methods for ``--reps`` rounds so that a change of machine load hits them
alike, each run in this process on a freshly loaded model (calibration 32 windows x 256 tokens per task, as in
`quantize_demo.py`). Prints and writes each method's times, median and range, and each round's ratio to the first
method. No perplexity: `quantize_demo.py` measures quality.

Usage::

    python benchmarks/quantize_walltime.py --scheme w2a16 --methods "GPTQ,all (default)" --reps 3 \\
        --out benchmarks/results/quantize_walltime.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from quantize_demo import ROWS  # noqa: E402

from moecompress.context import Context  # noqa: E402
from moecompress.recipe import CalibrationConfig  # noqa: E402
from moecompress.runtime.source import load_model  # noqa: E402
from moecompress.stages import STAGES  # noqa: E402
from moecompress.stages.quantize import QuantizeConfig  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scheme", default="w2a16")
    ap.add_argument("--methods", default="GPTQ,all (default)", help="comma-separated rows of quantize_demo.ROWS")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--model", default=None, help="a checkpoint directory (default: the bundled demo)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    rows = dict(ROWS)
    names = args.methods.split(",")
    unknown = [n for n in names if n not in rows]
    if unknown:
        raise SystemExit(f"unknown methods {unknown}; choose from {list(rows)}")
    times: dict[str, list[float]] = {n: [] for n in names}
    for rep in range(args.reps):
        for name in names:
            ctx = Context(load_model(args.model), CalibrationConfig(samples=args.samples, seq_len=256), None)
            t0 = time.perf_counter()
            STAGES.get("quantize").run(ctx, QuantizeConfig(scheme=args.scheme, **rows[name]))
            times[name].append(round(time.perf_counter() - t0, 2))
            print(f"round {rep + 1}: {name}: {times[name][-1]} s", flush=True)
    first = names[0]
    out = {"model": args.model or "demo", "scheme": args.scheme, "reps": args.reps, "methods": {}}
    for n in names:
        ratios = [round(a / b, 2) for a, b in zip(times[n], times[first])]
        out["methods"][n] = {"seconds": times[n], "median": statistics.median(times[n]),
                             "range": [min(times[n]), max(times[n])], f"ratio_to_{first}": ratios}
        print(f"{n}: median {statistics.median(times[n])} s, range {min(times[n])}-{max(times[n])} s, "
              f"per-round ratio to {first}: {ratios}")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
