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
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    from moecompress.io.model import DEMO_MODEL
    ap.add_argument("--model", type=Path, default=DEMO_MODEL)
    ap.add_argument("--min-gain", type=float, default=0.0)
    ap.add_argument("--rounds", type=int, default=None, help="trellis GPTQ rounds (default: the codec's, 2)")
    ap.add_argument("--calib-seed", type=int, default=0)
    ap.add_argument("--peer-from", type=Path, default=None)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    import quantize_demo

    import moecompress.runtime.layer_quant as lq
    from moecompress.algorithms.trellis import trellis_rounds

    lq.trellis_rounds = functools.partial(trellis_rounds, min_gain=args.min_gain)
    if args.rounds is not None:
        quantize_demo.ROWS.append(("all + trellis", {"codec": "trellis", "gptq_rounds": args.rounds}))
        quantize_demo.ROWS.remove(("all + trellis", {"codec": "trellis"}))
    sys.argv = ["quantize_demo.py", "--model", str(args.model), "--schemes", "w3a16", "--methods", "all + trellis",
                "--calib-seed", str(args.calib_seed), "--out", str(args.out),
                *(["--peer-from", str(args.peer_from)] if args.peer_from else ["--no-peer"])]
    quantize_demo.main()
    res = json.loads(args.out.read_text())
    res["note"] = (f"trellis codec with min_gain={args.min_gain} rounds={args.rounds or 'default'} "
                   "(benchmarks/trellis_rounds.py)")
    args.out.write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
