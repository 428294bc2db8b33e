#!/usr/bin/env python
"""Where the `quantize` stage's time goes on the demo model: each calibration pass (by the line of
`runtime/quantize_run.py` that runs it) and each algorithm, in seconds summed over the layers, for one or more
rows of `quantize_demo.ROWS`. Wraps the functions with timers (nested ones overlap: the experts' total holds
their pairing passes and GPTQ). One run per method; `quantize_walltime.py` gives the alternating totals.

Usage::

    python benchmarks/quantize_phases.py --scheme w2a16 --methods "GPTQ,all (default)" \\
        --out benchmarks/results/quantize_phases.json
"""

from __future__ import annotations

import argparse
import collections
import functools
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from quantize_demo import ROWS  # noqa: E402

import moecompress.runtime.executor as executor  # noqa: E402
import moecompress.runtime.layer_quant as layer_quant  # noqa: E402
import moecompress.runtime.layer_passes as layer_passes  # noqa: E402
import moecompress.runtime.paired as paired  # noqa: E402
import moecompress.runtime.quantize_run as quantize_run  # noqa: E402
from moecompress.context import Context  # noqa: E402
from moecompress.recipe import CalibrationConfig  # noqa: E402
from moecompress.runtime.source import load_model  # noqa: E402
from moecompress.stages import STAGES  # noqa: E402
from moecompress.stages.quantize import QuantizeConfig  # noqa: E402

PASSES = "calibration pass"
FP = "original layer (fp stream, probe)"
TIMED = [(executor.LayerStream, "run_layer", PASSES), (quantize_run, "forward_layer", FP), (layer_passes, "forward_layer", FP),
         (quantize_run, "quantize_linears", "linears (all steps)"), (quantize_run, "quantize_experts",
                                                                      "experts (all steps, their pairing passes)"),
         (paired, "_accumulate_pairs", "experts' pair products"), (layer_quant, "gptq_quantize", "GPTQ"),
         (layer_quant, "refit_groups", "scale/zero refit"), (layer_quant, "alternate", "GPTQ rounds (with refits)"),
         (layer_quant, "refine_codes", "code sweeps")]


def _timed(seconds: dict, counts: dict, fn, label: str):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        key = label
        if label == PASSES:  # which pass: the caller's file and line (quantize_run.py, layer_passes.py)
            frame = sys._getframe(1)
            key = f"{label} ({Path(frame.f_code.co_filename).name}:{frame.f_lineno})"
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            seconds[key] += time.perf_counter() - t0
            counts[key] += 1
    return wrapper


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scheme", default="w2a16")
    ap.add_argument("--methods", default="GPTQ,all (default)", help="comma-separated rows of quantize_demo.ROWS")
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--model", default=None, help="a model directory (default: the demo model), loaded in memory")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    rows = dict(ROWS)
    out = {"scheme": args.scheme, "methods": {}}
    for name in args.methods.split(","):
        if name not in rows:
            raise SystemExit(f"unknown method {name!r}; choose from {list(rows)}")
        seconds: dict[str, float] = collections.defaultdict(float)
        counts: dict[str, int] = collections.Counter()
        saved = [(owner, attr, getattr(owner, attr)) for owner, attr, _ in TIMED]
        for owner, attr, label in TIMED:
            setattr(owner, attr, _timed(seconds, counts, getattr(owner, attr), label))
        try:
            ctx = Context(load_model(args.model), CalibrationConfig(samples=args.samples, seq_len=256), None)
            t0 = time.perf_counter()
            STAGES.get("quantize").run(ctx, QuantizeConfig(scheme=args.scheme, **rows[name]))
            total = time.perf_counter() - t0
        finally:
            for owner, attr, fn in saved:
                setattr(owner, attr, fn)
        parts = {k: {"seconds": round(v, 2), "calls": counts[k]}
                 for k, v in sorted(seconds.items(), key=lambda x: -x[1])}
        out["methods"][name] = {"total_seconds": round(total, 2), "parts": parts}
        print(f"{name}: {total:.2f} s")
        for k, v in parts.items():
            print(f"  {k:<55} {v['seconds']:6.2f} s  ({v['calls']} calls)")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
