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
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    from moecompress.io.model import DEMO_MODEL
    ap.add_argument("--model", type=Path, default=DEMO_MODEL)
    ap.add_argument("--only", choices=["experts", "linears"], required=True, help="what keeps the trellis code")
    ap.add_argument("--calib-seed", type=int, default=0)
    ap.add_argument("--peer-from", type=Path, default=None)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    import quantize_demo

    import moecompress.stages.quantize as sq

    original = sq.plan_of

    def one_kind(cfg):
        plan, meta = original(cfg)
        scalar, _ = original(cfg.model_copy(update={"codec": "auto"}))
        if args.only == "experts":
            return dataclasses.replace(plan, linears=scalar.linears), meta
        return dataclasses.replace(plan, experts=scalar.experts), meta

    sq.plan_of = one_kind
    sys.argv = ["quantize_demo.py", "--model", str(args.model), "--schemes", "w3a16", "--methods", "all + trellis",
                "--calib-seed", str(args.calib_seed), "--out", str(args.out),
                *(["--peer-from", str(args.peer_from)] if args.peer_from else ["--no-peer"])]
    quantize_demo.main()
    res = json.loads(args.out.read_text())
    res["note"] = (f"trellis on the {'routed experts' if args.only == 'experts' else 'non-expert linears'} only, "
                   "the rest scalar int3 (benchmarks/trellis_targets.py)")
    args.out.write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
