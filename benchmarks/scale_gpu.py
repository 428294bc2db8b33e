#!/usr/bin/env python
"""GPTQ W4A16 at Mixtral-8x7B width on GPUs: seconds per decoder layer and peak GPU memory (issue 10).

Writes a synthetic 2-layer checkpoint at Mixtral-8x7B's width (hidden 4096, intermediate 14336, 8 experts,
top-2; random bf16 weights, about 3.5 GB), then runs ``moecompress quantize --device cuda`` on it in one process
and, when the machine has 2 GPUs or more, with ``torchrun --nproc-per-node 2`` (one GPU per process), and
reads each run's report (``moecompress.json``: stage seconds, peak GPU memory, peak host RSS). A CPU run of
the same command (``--cpu``) gives the CPU/GPU agreement of the packed codes.

Usage (one command, on a GPU machine)::

    python benchmarks/scale_gpu.py --workdir /tmp/bench-gpu --out benchmarks/results/scale_gpu.json

Without a GPU it stops with one line.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
WIDTH = dict(hidden=4096, intermediate=14336, experts=8, top_k=2, heads=32, kv_heads=8)


def quantize(model: Path, out: Path, procs: int, device: str, samples: int) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    args = ["quantize", str(model), "--scheme", "w4a16", "--device", device, "--samples", str(samples),
            "--seq-len", "512", "-o", str(out)]
    head = [sys.executable, "-m", "moecompress"] if procs == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(procs),
        "-m", "moecompress"]
    t0 = time.time()
    r = subprocess.run([*head, *args], capture_output=True, text=True)
    wall = time.time() - t0
    if r.returncode != 0:
        return {"procs": procs, "device": device, "error": (r.stderr or r.stdout)[-2000:]}
    report = json.loads((out / "moecompress.json").read_text())
    stage = report["stages"][0]
    layers = json.loads((model / "config.json").read_text())["num_hidden_layers"]
    return {"procs": procs, "device": device, "wall_seconds": round(wall, 1), "stage_seconds": stage["seconds"],
            "seconds_per_layer": round(stage["seconds"] / layers, 2), "peak_gpu_bytes": report.get("peak_gpu_bytes"),
            "peak_rss_bytes": report.get("peak_rss_bytes"), "output": str(out)}


def same_codes(a: Path, b: Path) -> dict:
    """Share of identical packed expert words between two packed outputs (CPU vs GPU)."""
    from safetensors import safe_open

    def tensors(d):
        out = {}
        for f in d.glob("model*.safetensors"):
            with safe_open(str(f), "pt") as h:
                out.update({k: h.get_tensor(k) for k in h.keys() if k.endswith("_packed")})
        return out

    ta, tb = tensors(a), tensors(b)
    same = sum(int((ta[k] == tb[k]).sum()) for k in ta if k in tb)
    total = sum(ta[k].numel() for k in ta)
    return {"identical_words": same, "words": total, "share": same / max(1, total)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/bench-gpu"))
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "scale_gpu.json")
    ap.add_argument("--samples", type=int, default=16, help="calibration windows per task (512 tokens each)")
    ap.add_argument("--cpu", action="store_true", help="also run on the CPU and compare the codes (slow)")
    a = ap.parse_args()
    import torch

    if not torch.cuda.is_available():
        sys.exit("error: no GPU visible to torch: run this on a GPU machine (nvidia-smi should list one)")
    from make_synthetic_moe import write_synthetic_moe

    model = a.workdir / "mixtral-8x7b-width-2L"
    if not (model / "config.json").is_file():
        write_synthetic_moe(model, model_type="mixtral", layers=2, seed=0, **WIDTH)
    gpus = torch.cuda.device_count()
    res = {"gpu": torch.cuda.get_device_name(0), "gpus": gpus, "torch": torch.__version__, "width": WIDTH,
           "runs": [quantize(model, a.workdir / "q1", 1, "cuda", a.samples)]}
    if gpus >= 2:
        res["runs"].append(quantize(model, a.workdir / "q2", 2, "cuda", a.samples))
        if "error" not in res["runs"][1]:
            res["two_gpus_identical_codes"] = same_codes(a.workdir / "q1", a.workdir / "q2")
    if a.cpu:
        res["runs"].append(quantize(model, a.workdir / "qcpu", 1, "cpu", a.samples))
        res["cpu_vs_gpu_codes"] = same_codes(a.workdir / "q1", a.workdir / "qcpu")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
