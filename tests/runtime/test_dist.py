"""Expert parallelism under torchrun: the split of experts, and 2 gloo processes writing the same bytes as 1."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from moecompress.errors import MoecompressError
from moecompress.runtime.dist import Dist

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("n,world", [(8, 1), (8, 2), (8, 3), (7, 4), (128, 5)])
def test_every_expert_belongs_to_exactly_one_rank(n, world):
    owned = [e for r in range(world) for e in range(*Dist(r, world).bounds(n))]
    assert owned == list(range(n))
    sizes = [len(Dist(r, world).experts(n)) for r in range(world)]
    assert max(sizes) - min(sizes) <= 1


def test_more_ranks_than_experts_is_one_line():
    with pytest.raises(MoecompressError, match="9 processes for 8 experts"):
        Dist(0, 9).check(8)


def _run(args, out, procs):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}  # same BLAS reductions in every process
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    head = [sys.executable, "-m", "moecompress"] if procs == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(procs),
        "-m", "moecompress"]
    r = subprocess.run([*head, *args, "-o", str(out)], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return out


def _untimed(obj):
    if isinstance(obj, dict):
        return {k: _untimed(v) for k, v in obj.items() if k not in ("seconds", "tokens_per_second")}
    return [_untimed(v) for v in obj] if isinstance(obj, list) else obj


def _files(d: Path) -> dict[str, object]:
    """Tensor files byte for byte, JSON files without their timings."""
    return {p.name: p.read_bytes() if p.suffix == ".safetensors" else _untimed(json.loads(p.read_text()))
            for p in sorted(d.iterdir()) if p.suffix in (".safetensors", ".json") and p.name != "moecompress.json"}


@pytest.mark.slow
@pytest.mark.parametrize("command", [
    ["profile", "tiny:mixtral", "--tasks", "prose,code", "--samples", "2", "--seq-len", "32"],
    # GPTQ with calibration balance (reserve and near-miss top-ups), smoothing, aligned 8-bit router
    ["quantize", "tiny:mixtral", "--scheme", "w4a8", "--router-bits", "8", "--tasks", "prose,code", "--samples", "4",
     "--seq-len", "32"],
    ["quantize", "tiny:deepseek_v3", "--scheme", "w4a16", "--group-size", "8", "--fake-quant", "--tasks", "math", "--samples", "4",
     "--seq-len", "32"],
    ["ternary", "tiny:qwen3_moe", "--group-size", "8", "--tasks", "prose", "--samples", "4", "--seq-len", "32"],
    # W3's sequential pairing with both vocabulary priors: each rank smooths its own experts' Hessians
    ["quantize", "tiny:mixtral", "--scheme", "w3a16", "--group-size", "8", "--expert-prior", "0.3", "--tasks",
     "prose", "--samples", "4", "--seq-len", "32"],
    # W2's default a chunk of 3 experts at a time: each rank's chunks of its own experts, gathered once
    ["quantize", "tiny:qwen3_moe", "--scheme", "w2a16", "--group-size", "8", "--expert-chunk", "3", "--tasks",
     "prose", "--samples", "4", "--seq-len", "32"],
    # the trellis code: int16 states gathered across ranks
    ["quantize", "tiny:olmoe", "--scheme", "w3a16", "--group-size", "8", "--codec", "trellis", "--tasks", "prose",
     "--samples", "4", "--seq-len", "32"],
])
def test_two_gloo_processes_write_the_bytes_of_one(command, tmp_path):
    one = _files(_run(command, tmp_path / "one", 1))
    two = _files(_run(command, tmp_path / "two", 2))
    assert one.keys() == two.keys() and one == two
