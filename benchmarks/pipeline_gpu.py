#!/usr/bin/env python
"""Every CLI stage on a GPU against the same command on the CPU (bundled demo model): exit codes, seconds, and
whether the outputs agree. The first run to make when a GPU is lent (CI has none; the device-discipline tests
only emulate one).

Per command: ``moecompress <command> ... --device cuda`` and ``--device cpu`` in fresh output directories, then
a check of the two outputs: profile scores (relative difference), the experts pruning keeps (equal sets),
the quantized codes (share of equal bytes: float reductions differ between devices, so a few codes at 2 bits
may flip); then eval and generate on the GPU's packed W2 checkpoint. ``--gpu cpu`` dry-runs it on the CPU.
It also runs plain GPTQ at W2 (`PLAIN_GPTQ`'s flags) and reports the W2 default's seconds over plain GPTQ's on
each device (issue 12's wall-time target: at most 2x), from each run's own ``seconds`` in moecompress.json;
likewise W3 with ``--codec trellis`` (its search on Triton on a GPU) over plain GPTQ at W3.
``--model DIR`` runs it all on another checkpoint, e.g. one at a real model's width from
``scripts/make_synthetic_moe.py`` (where GPTQ's own cost, not the calibration passes, dominates).

Usage (one command, on a GPU machine)::

    python benchmarks/pipeline_gpu.py --workdir /tmp/pipe-gpu --out benchmarks/results/pipeline_gpu.json
    python scripts/make_synthetic_moe.py /tmp/syn1024 --layers 2 --hidden 1024 --intermediate 2816
    python benchmarks/pipeline_gpu.py --model /tmp/syn1024 --workdir /tmp/pipe-gpu-1024 \
        --out benchmarks/results/pipeline_gpu_h1024.json

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


def _run(args: list[str], out: Path | None = None) -> dict:
    t0 = time.time()
    r = subprocess.run([sys.executable, "-m", "moecompress", *args], capture_output=True, text=True)
    tail = (r.stdout + r.stderr).strip().splitlines()[-3:]
    row = {"exit": r.returncode, "seconds": round(time.time() - t0, 1), "tail": tail}
    side = None if out is None else out / "moecompress.json"
    if side is not None and side.is_file():  # the run's own seconds: without the interpreter's start
        row["run_seconds"] = json.loads(side.read_text()).get("seconds")
    return row


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


PLAIN_GPTQ = ["--no-refit", "--gptq-rounds", "0", "--code-sweeps", "0", "--no-sequential", "--no-balance",
              "--rare-experts", "rtn", "--integer-zeros"]


def _ratios(rows: dict, num: str = "quantize_w2a16", den: str = "quantize_w2a16_plain_gptq") -> dict:
    """``num``'s run seconds over ``den``'s, per device (issue 12's target: at most 2)."""
    out = {}
    for side in ("cpu", "gpu"):
        a = rows.get(num, {}).get(side, {}).get("run_seconds")
        b = rows.get(den, {}).get(side, {}).get("run_seconds")
        if a and b:
            out[side] = round(a / b, 2)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/pipe-gpu"))
    ap.add_argument("--gpu", default="cuda", help="the device under test (cpu: a dry run of the script)")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--model", default=None, help="a model directory instead of the bundled demo (e.g. one from "
                    "scripts/make_synthetic_moe.py at a real model's width)")
    ap.add_argument("--only", default=None, help="comma-separated commands to run (default: all), e.g. "
                    "quantize_w2a16,quantize_w2a16_plain_gptq")
    ap.add_argument("--sides", default="cpu,gpu", help="cpu,gpu (default) or one of them")
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
        # issue 12's wall-time target: the default against plain GPTQ, on each device
        "quantize_w2a16_plain_gptq": (["quantize", "--scheme", "w2a16", *PLAIN_GPTQ], _code_agreement),
        "ternary": (["ternary", "--method", "gptq"], _code_agreement),
        # the trellis code (`--codec trellis`) against plain GPTQ at the same width
        "quantize_w3a16_trellis": (["quantize", "--scheme", "w3a16", "--codec", "trellis"], _code_agreement),
        "quantize_w3a16_plain_gptq": (["quantize", "--scheme", "w3a16", *PLAIN_GPTQ], _code_agreement),
    }
    if args.only:
        commands = {k: v for k, v in commands.items() if k in args.only.split(",")}
    sides = [(side, dev) for side, dev in (("cpu", "cpu"), ("gpu", args.gpu)) if side in args.sides.split(",")]
    rows = {}
    for name, (cmd, compare) in commands.items():
        row = {}
        for side, dev in sides:
            cmd_dev = [c.replace("{cpu_profile}", str(w / "profile-cpu")) for c in cmd]
            model = [args.model] if args.model else []
            out = w / f"{name}-{side}"
            row[side] = _run([cmd_dev[0], *model, *cmd_dev[1:], "--device", dev, "-o", str(out)], out)
        if len(row) == 2 and row["cpu"]["exit"] == 0 and row["gpu"]["exit"] == 0:
            row["agreement"] = compare(w / f"{name}-cpu", w / f"{name}-gpu")
        rows[name] = row
        print(name, {k: (v["exit"], v["seconds"]) if isinstance(v, dict) else v for k, v in row.items()})
        if args.out is not None:  # partial results survive a timeout
            args.out.write_text(json.dumps({"partial": True, "runs": rows}, indent=1) + "\n")
    # the packed W2 checkpoint evaluated and sampled on the device under test
    q = w / "quantize_w2a16-gpu"
    for name, cmd in ({"eval_w2": ["eval", str(q), "--samples", "16"],
                       "generate_w2": ["generate", str(q), "--prompt", "The cat"]} if q.is_dir() else {}).items():
        rows[name] = {"gpu": _run([*cmd, "--device", args.gpu])}
        print(name, rows[name]["gpu"]["exit"], rows[name]["gpu"]["seconds"])
    report = {"device": torch.cuda.get_device_name(0) if args.gpu.startswith("cuda") else "cpu",
              "model": args.model or "demo", "w2_default_over_plain_gptq": _ratios(rows),
              "w3_trellis_over_plain_gptq": _ratios(rows, "quantize_w3a16_trellis", "quantize_w3a16_plain_gptq"),
              "runs": rows}
    print("W2 default / plain GPTQ (run seconds):", report["w2_default_over_plain_gptq"])
    print("W3 trellis / plain GPTQ (run seconds):", report["w3_trellis_over_plain_gptq"])
    if args.out is not None:
        args.out.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
