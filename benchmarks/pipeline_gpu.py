#!/usr/bin/env python
"""Every CLI stage on a GPU against the same command on the CPU (bundled demo model): exit codes, seconds, and
whether the outputs agree. The first run to make when a GPU is lent (CI has none; the device-discipline tests
only emulate one).

Per command: ``moecompress <command> ... --device cuda`` and ``--device cpu`` in fresh output directories, then
a check of the two outputs: profile scores (relative difference), the experts pruning keeps (equal sets),
the quantized codes (share of equal bytes: float reductions differ between devices, so a few codes at 2 bits
may flip); then eval and generate on the GPU's packed W2 checkpoint. ``--gpu cpu`` dry-runs it on the CPU.

Usage (one command, on a GPU machine)::

    python benchmarks/pipeline_gpu.py --workdir /tmp/pipe-gpu --out benchmarks/results/pipeline_gpu.json

Without a GPU (and without ``--gpu cpu``) it stops with one line.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from safetensors.torch import load_file


def _run(args: list[str]) -> dict:
    t0 = time.time()
    r = subprocess.run([sys.executable, "-m", "moecompress", *args], capture_output=True, text=True)
    tail = (r.stdout + r.stderr).strip().splitlines()[-3:]
    return {"exit": r.returncode, "seconds": round(time.time() - t0, 1), "tail": tail}


def _tensors(d: Path) -> dict:
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _profile_diff(a: Path, b: Path) -> float:
    ta, tb = _tensors(a), _tensors(b)
    worst = 0.0
    for k in ta:
        if ta[k].is_floating_point():
            x, y = ta[k].double(), tb[k].double()
            worst = max(worst, float((x - y).abs().max() / y.abs().max().clamp(min=1e-12)))
    return worst


def _kept(d: Path) -> dict:
    return json.loads((d / "moecompress.json").read_text()).get("kept_experts")


def _code_agreement(a: Path, b: Path) -> float:
    ta, tb = _tensors(a), _tensors(b)
    keys = [k for k in ta if not ta[k].is_floating_point() and k in tb]
    same = sum(int((ta[k] == tb[k]).sum()) for k in keys)
    total = sum(ta[k].numel() for k in keys)
    return same / max(total, 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/pipe-gpu"))
    ap.add_argument("--gpu", default="cuda", help="the device under test (cpu: a dry run of the script)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    import torch

    if args.gpu.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("pipeline_gpu: no GPU here (torch sees none); run it on a GPU machine, or --gpu cpu")
    w = args.workdir
    shutil.rmtree(w, ignore_errors=True)
    w.mkdir(parents=True)
    commands = {
        "profile": (["profile"], _profile_diff),
        "prune": (["prune", "-p", "{cpu_profile}", "--task", "math", "--keep-ratio", "0.5"],
                  lambda a, b: _kept(a) == _kept(b)),
        "quantize_w4a16": (["quantize", "--scheme", "w4a16"], _code_agreement),
        "quantize_w2a16": (["quantize", "--scheme", "w2a16"], _code_agreement),
        "ternary": (["ternary", "--method", "gptq"], _code_agreement),
    }
    rows = {}
    for name, (cmd, compare) in commands.items():
        row = {}
        for side, dev in (("cpu", "cpu"), ("gpu", args.gpu)):
            cmd_dev = [c.replace("{cpu_profile}", str(w / "profile-cpu")) for c in cmd]
            row[side] = _run([*cmd_dev, "--device", dev, "-o", str(w / f"{name}-{side}")])
        if row["cpu"]["exit"] == 0 and row["gpu"]["exit"] == 0:
            row["agreement"] = compare(w / f"{name}-cpu", w / f"{name}-gpu")
        rows[name] = row
        print(name, {k: (v["exit"], v["seconds"]) if isinstance(v, dict) else v for k, v in row.items()})
    # the packed W2 checkpoint evaluated and sampled on the device under test
    q = w / "quantize_w2a16-gpu"
    for name, cmd in {"eval_w2": ["eval", str(q), "--samples", "16"],
                      "generate_w2": ["generate", str(q), "--prompt", "The cat"]}.items():
        rows[name] = {"gpu": _run([*cmd, "--device", args.gpu])}
        print(name, rows[name]["gpu"]["exit"], rows[name]["gpu"]["seconds"])
    report = {"device": torch.cuda.get_device_name(0) if args.gpu.startswith("cuda") else "cpu", "runs": rows}
    if args.out is not None:
        args.out.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
