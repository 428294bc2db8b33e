#!/usr/bin/env python
"""Peak memory of `moecompress quantize` with the routed experts a chunk at a time (``--expert-chunk``), on a
synthetic checkpoint whose experts' Hessians dominate a layer: 64 experts at hidden 2048 (one float32
``[E, H, H]`` tensor is 1.07 GB; DeepSeek-V3's is 53 GB), 2 layers, expert width 128, top-2. Random weights:
memory, time and bytes only, never quality.

Each configuration runs in a fresh process under ``/usr/bin/time`` (`scale.measure`); the JSON has its peak
RSS, seconds and the md5 of the written ``model.safetensors``, so chunked and unchunked runs can be checked to
write the same bytes.

Usage::

    python benchmarks/expert_chunks.py --workdir /work/bench --out benchmarks/results/stop45/expert_chunks.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "scripts"))

from scale import measure, moecompress  # noqa: E402

SHAPE = dict(layers=2, hidden=2048, intermediate=128, experts=64, top_k=2)
RUNS = {  # name: quantize arguments
    "w3a16 (all experts at once)": ["--scheme", "w3a16", "--expert-chunk", "64"],
    "w3a16 --expert-chunk 8": ["--scheme", "w3a16", "--expert-chunk", "8"],
    "w4a16 (all experts at once)": ["--scheme", "w4a16", "--expert-chunk", "64"],
    "w4a16 --expert-chunk 8": ["--scheme", "w4a16", "--expert-chunk", "8"],
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, required=True)
    ap.add_argument("--runs", default=",".join(RUNS), help="comma-separated names of RUNS")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    from make_synthetic_moe import write_synthetic_moe

    model = args.workdir / "wide64"
    if not (model / "config.json").is_file():
        write_synthetic_moe(model, model_type="mixtral", seed=0, **SHAPE)
    results = {"model": str(model), "shape": SHAPE, "runs": {}}
    for i, name in enumerate(args.runs.split(",")):
        out = args.workdir / f"expert-chunks-{i}"
        shutil.rmtree(out, ignore_errors=True)
        log = args.workdir / f"expert-chunks-{i}.log"
        log.with_suffix(".json").unlink(missing_ok=True)
        row = measure(moecompress("quantize", str(model), *RUNS[name], "-o", str(out)), log)
        if row["exit"] == 0:
            row["md5"] = hashlib.md5((out / "model.safetensors").read_bytes()).hexdigest()
        results["runs"][name] = row
        print(f"{name:32s} peak {row['peak_rss_bytes'] / 2**30:.2f} GiB  {row['seconds']:.0f} s  {row.get('md5', '')}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
