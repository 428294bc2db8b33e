#!/usr/bin/env python
"""Memory and time of the layer-streaming executor on synthetic Mixtral-shaped checkpoints (issue 10).

Writes synthetic bf16 checkpoints with ``scripts/make_synthetic_moe.py`` (random weights: memory and speed only,
never quality), runs real ``moecompress`` commands on them in fresh processes, and records each command's peak
resident memory (``/usr/bin/time``'s maximum RSS) and wall time next to one decoder layer's bf16 bytes:

* flat in depth: 4 and 16 layers (hidden 2048, intermediate 5632, 8 experts, top-2): ``profile``, ``quantize``
  (GPTQ W4A16) and ``eval``; the 16-layer peak should be within +10 % of the 4-layer peak;
* larger than the machine (``--big``): 48 layers (about 28 GB of bf16, more than this machine's RAM):
  ``profile``, ``quantize --method rtn`` (W4A16) and ``eval --samples 4``, each at most 4 GB peak; the packed
  output then loads (``moecompress inspect`` and a streamed ``eval``);
* processes (``--procs``): the 16-layer GPTQ with ``torchrun --nproc-per-node 2`` against 1 process;
* the demo model: wall time of ``moecompress quantize`` (default settings).

Usage::

    python benchmarks/scale.py --workdir /work/bench --out benchmarks/results/scale.json [--big] [--procs]

Everything lands in ``--workdir`` (several GB; ``--big`` about 40 GB) and is kept for re-runs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

SHAPE = dict(hidden=2048, intermediate=5632, experts=8, top_k=2)
CALIB = ["--tasks", "prose,code", "--samples", "4", "--seq-len", "256"]  # 2,048 calibration tokens
# The larger-than-RAM RTN quantize: round-to-nearest needs no statistics, the windows only carry the routing-agreement
# probe through the layers; 512 tokens keep its bf16 CPU forward (no AVX-512 here) from dominating the wall time.
RTN_CALIB = ["--tasks", "prose,code", "--samples", "1", "--seq-len", "256"]


def layer_bytes(hidden: int, intermediate: int, experts: int, heads: int = 16, kv_heads: int = 4) -> int:
    """bf16 bytes of one Mixtral decoder layer (attention, router, experts, norms)."""
    head_dim = hidden // heads
    attn = hidden * hidden * 2 + hidden * kv_heads * head_dim * 2
    return 2 * (attn + experts * 3 * hidden * intermediate + experts * hidden + 2 * hidden)


def synthetic(workdir: Path, layers: int, shape: dict | None = None) -> Path:
    from make_synthetic_moe import write_synthetic_moe

    shape = shape or SHAPE
    tag = "" if shape == SHAPE else f"-h{shape['hidden']}"
    out = workdir / f"mixtral{tag}-{layers}L"
    if not (out / "config.json").is_file():
        write_synthetic_moe(out, model_type="mixtral", layers=layers, **shape, seed=0)
    return out


def measure(args: list[str], log: Path, env: dict | None = None) -> dict:
    """Run ``args`` in a fresh process; its peak RSS (bytes) and wall time (s)."""
    done = log.with_suffix(".json")  # a step that completed is not run again (resumable; delete to rerun)
    if done.is_file():
        return json.loads(done.read_text())
    stats = log.with_suffix(".time")
    cmd = ["/usr/bin/time", "-f", "%M %e", "-o", str(stats), *args]
    t0 = time.time()
    with open(log, "w") as f:
        r = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
    wall = time.time() - t0
    rss_kb, elapsed = stats.read_text().split()[-2:]
    row = {"command": " ".join(args), "exit": r.returncode, "peak_rss_bytes": int(rss_kb) * 1024,
           "seconds": float(elapsed), "wall_seconds": round(wall, 1), "log": str(log)}
    if r.returncode == 0:
        done.write_text(json.dumps(row) + "\n")
    return row


def moecompress(*args: str) -> list[str]:
    return [sys.executable, "-m", "moecompress", *args]


def run_depth(workdir: Path, results: dict, shape: dict | None = None, gptq: bool = True) -> None:
    shape = shape or SHAPE
    rows = {}
    for layers in (4, 16):
        model = synthetic(workdir, layers, shape)
        out = workdir / f"out{model.name.removeprefix('mixtral')}"
        out.mkdir(exist_ok=True)
        rows[layers] = {
            "profile": measure(moecompress("profile", str(model), *CALIB, "-o", str(out / "profile")),
                               out / "profile.log"),
            "eval": measure(moecompress("eval", str(model), "--no-baseline", "--tasks", "prose,code", "--samples", "4"),
                            out / "eval.log"),
        }
        if not gptq:
            continue
        rows[layers].update({
            # GPTQ W4A16 with min-max group ranges: the clip search (bounded working set) would add about 4
            # CPU-minutes per full-width layer here without changing what is held per layer
            "quantize_gptq_w4a16": measure(moecompress("quantize", str(model), "--no-clip-search", *CALIB,
                                                       "-o", str(out / "q")),
                                           out / "quantize.log"),
        })
    one = layer_bytes(**{k: shape[k] for k in ("hidden", "intermediate", "experts")})
    key = "depth" if shape == SHAPE else f"depth_hidden{shape['hidden']}"
    results[key] = {"shape": shape, "layer_bf16_bytes": one, "runs": rows,
                        "ratio_16_over_4": {c: rows[16][c]["peak_rss_bytes"] / rows[4][c]["peak_rss_bytes"]
                                            for c in rows[4]}}


def run_big(workdir: Path, results: dict, layers: int = 48) -> None:
    model = synthetic(workdir, layers)
    out = workdir / f"out-{layers}L"
    out.mkdir(exist_ok=True)
    size = sum(f.stat().st_size for f in model.glob("*.safetensors"))
    rows = {
        "profile": measure(moecompress("profile", str(model), *CALIB, "-o", str(out / "profile")), out / "p.log"),
        # min-max RTN: the MSE clip search (bounded working set: 16,384 rows at a time) costs about 4 CPU-minutes
        # per layer at this width on this machine's cores, hours for 48 layers
        "quantize_rtn_w4a16": measure(moecompress("quantize", str(model), "--method", "rtn", "--no-clip-search",
                                                  *RTN_CALIB,
                                                  "-o", str(out / "q")), out / "q.log"),
        "eval": measure(moecompress("eval", str(model), "--no-baseline", "--samples", "4"), out / "e.log"),
        "inspect_packed": measure(moecompress("inspect", str(out / "q")), out / "i.log"),
        # the packed output loads and runs: one window of one task through all of its layers
        "eval_packed": measure(moecompress("eval", str(out / "q"), "--no-baseline", "--tasks", "prose",
                                           "--samples", "1"), out / "ep.log"),
    }
    results["larger_than_ram"] = {"layers": layers, "checkpoint_bytes": size,
                                  "machine_ram_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
                                  "runs": rows}


def procs_key(hidden: int | None, layers: int) -> str:
    """The results key of a processes run: ``processes[_hidden<H>][_<N>L]``."""
    return "processes" + ("" if hidden is None else f"_hidden{hidden}") + ("" if layers == 16 else f"_{layers}L")


def run_procs(workdir: Path, results: dict, shape: dict | None = None, layers: int = 16) -> None:
    model = synthetic(workdir, layers, shape)
    out = workdir / f"out-procs{model.name.removeprefix('mixtral')}"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    one = measure(moecompress("quantize", str(model), *CALIB, "-o", str(out / "one")), out / "one.log")
    two = measure([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "moecompress",
                   "quantize", str(model), *CALIB, "-o", str(out / "two")], out / "two.log")
    same = subprocess.run(["diff", "-r", "-q", "-x", "moecompress.json", str(out / "one"), str(out / "two")],
                          capture_output=True).returncode == 0
    key = procs_key(None if shape is None else shape["hidden"], layers)
    results[key] = {"shape": shape or SHAPE, "layers": layers, "one": one, "two": two, "identical_output": same,
                    "speedup": one["wall_seconds"] / two["wall_seconds"]}


def run_demo(workdir: Path, results: dict, before: Path | None = None) -> None:
    """``moecompress quantize`` (defaults) on the demo model; with ``before`` (a checkout of the pre-streaming
    code) the same command run from that checkout right after, on the same machine."""
    out = workdir / "demo-q"
    shutil.rmtree(out, ignore_errors=True)
    results["demo_quantize"] = measure(moecompress("quantize", "-o", str(out)), workdir / "demo-q.log")
    if before is not None:
        old = workdir / "demo-q-before"
        shutil.rmtree(old, ignore_errors=True)
        results["demo_quantize_before"] = measure(
            ["bash", "-c", f"cd {before} && {sys.executable} -m moecompress quantize -o {old}"],
            workdir / "demo-q-before.log")
        results["demo_quantize_before"]["code"] = subprocess.run(
            ["git", "-C", str(before), "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, default=Path("/work/bench"))
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "scale.json")
    ap.add_argument("--big", action="store_true", help="also the larger-than-RAM model (about 40 GB of disk)")
    ap.add_argument("--procs", action="store_true", help="also 2 processes vs 1 (torchrun, gloo on CPU)")
    ap.add_argument("--only", choices=["depth", "big", "procs", "demo"], action="append")
    ap.add_argument("--before", type=Path, help="a checkout of the code to compare the demo quantize time with")
    ap.add_argument("--no-gptq", action="store_true", help="depth runs: profile and eval only (GPTQ at full width "
                    "takes tens of minutes per layer on a 2-core CPU)")
    ap.add_argument("--hidden", type=int, help="depth and procs runs at this width instead (intermediate 2.75x): a "
                    "quicker check on a slow machine")
    ap.add_argument("--procs-layers", type=int, default=16, help="layers of the model the procs run quantizes")
    a = ap.parse_args()
    a.workdir.mkdir(parents=True, exist_ok=True)
    results: dict = json.loads(a.out.read_text()) if a.out.is_file() else {}  # parts run separately accumulate
    results.update({"machine": {"cpus": os.cpu_count(), "platform": platform.platform()}, "shape": SHAPE})
    todo = a.only or ["demo", "depth"] + (["big"] if a.big else []) + (["procs"] if a.procs else [])
    shape = None if a.hidden is None else {**SHAPE, "hidden": a.hidden, "intermediate": a.hidden * 11 // 4}
    for what in todo:
        if what == "demo":
            run_demo(a.workdir, results, a.before)
        elif what == "depth":
            run_depth(a.workdir, results, shape, gptq=not a.no_gptq)
        elif what == "procs":
            run_procs(a.workdir, results, shape, a.procs_layers)
        else:
            run_big(a.workdir, results)
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(results, indent=1) + "\n")
        print(json.dumps({what: results.get({"big": "larger_than_ram",
                                               "procs": procs_key(None if shape is None else a.hidden,
                                                                  a.procs_layers),
                                               "demo": "demo_quantize"}.get(what, what))}, indent=1))


if __name__ == "__main__":
    main()
