#!/usr/bin/env python
"""The shipped trellis codec (`quantize --codec trellis`) with its rounds' early stop changed: `quantize_demo.py`'s
"all + trellis" W3 row, with `trellis.trellis_rounds` called with ``--min-gain`` (shipped: 0.005, a round that
lowers the error by less than 0.5 % ends them; 0 runs every round, as stop 34's proxy did) and ``--rounds``.

Usage::

    python benchmarks/trellis_rounds.py --min-gain 0 --calib-seed 0 \\
        --peer-from benchmarks/results/quantize_lowbit_stop23.json --out benchmarks/results/stop35/rounds_g0_s0.json
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))


def main() -> None:
    import quantize_demo

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--min-gain", type=float, default=0.0)
    ap.add_argument("--rounds", type=int, default=None, help="trellis GPTQ rounds (default: the codec's, 1)")
    quantize_demo.row_arguments(ap)
    args = ap.parse_args()

    import moecompress.runtime.layer_quant as lq
    from moecompress.algorithms.trellis import trellis_rounds

    lq.trellis_rounds = functools.partial(trellis_rounds, min_gain=args.min_gain)
    if args.rounds is not None:
        quantize_demo.ROWS.append(("all + trellis", {"codec": "trellis", "gptq_rounds": args.rounds}))
        quantize_demo.ROWS.remove(("all + trellis", {"codec": "trellis"}))
    rounds = "default" if args.rounds is None else args.rounds
    quantize_demo.run_rows("all + trellis", args.model, "w3a16", args.calib_seed, args.out, args.peer_from,
                           note=f"trellis codec with min_gain={args.min_gain} rounds={rounds} "
                           "(benchmarks/trellis_rounds.py)")


if __name__ == "__main__":
    main()
