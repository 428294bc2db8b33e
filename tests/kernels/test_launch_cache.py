"""The fused kernel's launch path: the autotuner runs on a launch key's first call only; later calls launch the
tile it chose as a fixed configuration (no GPU needed: the launches are recorded, not run)."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
triton = pytest.importorskip("triton")

from moecompress.kernels import triton_dequant as td  # noqa: E402


class FakeTuner:
    """Stands in for ``triton.autotune``'s object: a launch benchmarks (adds a cache entry) when ``tunes``."""

    def __init__(self, choice, tunes=True):
        self.cache, self.choice, self.tunes = {}, choice, tunes

    def launched(self, values):
        if self.tunes:
            self.cache[(values["N"], values["K"], len(self.cache))] = self.choice


@pytest.fixture
def launches(monkeypatch):
    seen = []

    def fake_launch(kernel, grid, *args, **kwargs):
        if isinstance(kernel, FakeTuner):
            kernel.launched(kwargs)
        seen.append((kernel, grid, kwargs))

    monkeypatch.setattr(td, "_launch", fake_launch)
    monkeypatch.setattr(td, "_TUNED_CONFIGS", {})
    return seen


def _values(N=96, K=256, M=1, dtype=torch.float16):
    x = torch.randn(M, K, dtype=dtype)
    data = torch.zeros(1, N, K // 8, dtype=torch.int32)
    scale = torch.ones(1, N, K // 128, dtype=torch.float16)
    out = torch.full((M, N), 7.0, dtype=dtype)
    geo = td.geometry(4, False, False)
    return td.mm_arguments(x, data, scale, None, out, out, out, M=M, N=N, K=K, W=K // 8, G=K // 128, x_div=1,
                           stride_e=(0, 0), geo=geo, grouped=False)


def test_tuned_once_then_fixed(launches):
    choice = triton.Config({"BLOCK_M": 1, "BLOCK_N": 32, "BLOCK_K": 128, "SPLIT_K": 2}, num_warps=8, num_stages=2)
    tuner = FakeTuner(choice)
    v = _values()
    td._mm(v, None, tuner, lambda meta: 1)
    assert launches[-1][0] is tuner
    v = _values()
    td._mm(v, None, tuner, lambda meta: 1)
    kernel, grid, kwargs = launches[-1]
    assert kernel is td._packed_mm_kernel
    assert grid == (1, 3, 2)  # 96 rows / 32, split K in two
    assert (kwargs["BLOCK_N"], kwargs["BLOCK_K"], kwargs["SPLIT_K"], kwargs["num_warps"], kwargs["num_stages"]) == \
        (32, 128, 2, 8, 2)
    assert bool((v["out_ptr"] == 0).all())  # split-K programs add into a zeroed output, as the tuner's pre-hook does
    # another shape or activation dtype is another key: tuned again
    td._mm(_values(N=160), None, tuner, lambda meta: 1)
    assert launches[-1][0] is tuner
    td._mm(_values(dtype=torch.bfloat16), None, tuner, lambda meta: 1)
    assert launches[-1][0] is tuner
    assert len(launches) == 4


def test_untuned_launches_keep_the_tuner(launches):
    """A launch that did not benchmark (e.g. one configuration left after pruning) fixes nothing."""
    tuner = FakeTuner(None, tunes=False)
    for _ in range(3):
        td._mm(_values(), None, tuner, lambda meta: 1)
    assert all(k is tuner for k, _, _ in launches)


def test_grouped_keeps_block_m(launches):
    choice = triton.Config({"BLOCK_N": 64, "BLOCK_K": 128, "SPLIT_K": 1}, num_warps=4, num_stages=3)
    tuner = FakeTuner(choice)
    for _ in range(2):
        td._mm(_values(), None, tuner, lambda meta: 5, BLOCK_M=16)
    kernel, grid, kwargs = launches[-1]
    assert kernel is td._packed_mm_kernel and kwargs["BLOCK_M"] == 16 and grid == (5, 2, 1)
