#!/usr/bin/env python
"""The torch trellis search's speed on the CPU (`algorithms.trellis.tailbite`, 10-bit states, 3 bits): seconds
per GPTQ column at the row counts of real layers, on one thread (GPTQ's column loop runs on one), for chunks of
sequences of several sizes (`trellis.CHUNK`), and the cost per weight and pass that the quantize stage's CPU
warning uses (`stages.quantize.TRELLIS_CPU_SECONDS_PER_WEIGHT`). Every chunk size gives the same states.

    python benchmarks/trellis_search_speed.py --out benchmarks/results/stop36/trellis_search_speed.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import moecompress.algorithms.trellis as trellis  # noqa: E402

# sequences of 64 rows per column: 8 experts' gate|up and down at the demo's width (256) and at width 1024 /
# 2816 (the synthetic model of docs/BENCHMARKS.md), and Mixtral-8x7B's gate|up (8 x 28672 rows)
ROWS = {"demo gate|up (8 x 512)": 64, "demo down (8 x 256)": 32, "syn1024 gate|up (8 x 5632)": 704,
        "syn1024 down (8 x 1024)": 128, "mixtral gate|up (8 x 28672)": 3584}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--chunks", default="256,128,64,32")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    table = trellis.trellis_table(trellis.STATE_BITS, 3)
    rows = []
    for name, n in ROWS.items():
        g = torch.Generator().manual_seed(n)
        t = torch.randn(n, trellis.SEQ, generator=g) + 4
        w = torch.rand(n, trellis.SEQ, generator=g)
        ref = None
        for chunk in (int(c) for c in args.chunks.split(",")):
            trellis.CHUNK = chunk
            times = []
            for _ in range(args.reps if n < 1000 else 1):
                t0 = time.perf_counter()
                got = trellis.tailbite(t, w, table, trellis.STATE_BITS, 3)
                times.append(time.perf_counter() - t0)
            ref = got if ref is None else ref
            s = statistics.median(times)
            rows.append({"rows": name, "sequences": n, "chunk": chunk, "seconds_per_column": s,
                         "seconds_per_weight": s / (n * trellis.SEQ), "same_states": bool(torch.equal(got, ref))})
            print(f"{name:30s} chunk {chunk:4d}: {s * 1e3:8.1f} ms per column, "
                  f"{s / (n * trellis.SEQ) * 1e6:.2f} us per weight", flush=True)
    report = {"threads": 1, "torch": torch.__version__, "rows": rows}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
