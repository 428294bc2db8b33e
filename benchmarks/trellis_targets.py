#!/usr/bin/env python
"""The trellis code on one kind of weight only: `quantize_demo.py`'s "all + trellis" W3 row with either the
attention (and every other non-expert linear; ``--only experts``) or the routed experts (``--only linears``)
quantized as the scalar default does (`int3`, the same options), to see where the trellis gains and loses per
task. `stages.quantize.plan_of` is wrapped: the other kind's options are the ``codec: auto`` plan's.

Usage::

    python benchmarks/trellis_targets.py --only experts --calib-seed 0 \\
        --peer-from benchmarks/results/quantize_lowbit_stop23.json --out benchmarks/results/stop36/experts_s0.json
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))


def main() -> None:
    import quantize_demo

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=["experts", "linears"], required=True, help="what keeps the trellis code")
    quantize_demo.row_arguments(ap)
    args = ap.parse_args()

    import moecompress.stages.quantize as sq

    original = sq.plan_of

    def one_kind(cfg):
        plan, meta = original(cfg)
        scalar, _ = original(cfg.model_copy(update={"codec": "auto"}))
        if args.only == "experts":
            return dataclasses.replace(plan, linears=scalar.linears), meta
        return dataclasses.replace(plan, experts=scalar.experts), meta

    sq.plan_of = one_kind
    kind = "routed experts" if args.only == "experts" else "non-expert linears"
    quantize_demo.run_rows("all + trellis", args.model, "w3a16", args.calib_seed, args.out, args.peer_from,
                           note=f"trellis on the {kind} only, the rest scalar int3 (benchmarks/trellis_targets.py)")


if __name__ == "__main__":
    main()
