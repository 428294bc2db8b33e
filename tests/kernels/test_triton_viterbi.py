"""The trellis quantizer's search on Triton (moecompress/kernels/triton_viterbi.py) against the torch search
(`algorithms.trellis.tailbite`): the same least costs, circular paths, for small and the shipped trellises. Under
TRITON_INTERPRET=1 without a GPU (conftest), compiled on one."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
triton = pytest.importorskip("triton")

from moecompress.algorithms.trellis import tailbite, trellis_table  # noqa: E402
from moecompress.kernels import triton_viterbi as tv  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _cost(t, w, table, st):
    return (w * (t - table[st]) ** 2).sum(1)


@pytest.mark.parametrize("L,k,n,N", [(4, 2, 8, 5), (6, 2, 16, 3), (10, 3, 64, 3), (10, 2, 64, 2), (10, 4, 64, 2)])
def test_same_least_cost_circular_paths_as_torch(L, k, n, N):
    g = torch.Generator().manual_seed(L * 10 + k)
    table = trellis_table(10, k)[:1 << L].sort().values if L < 10 else trellis_table(10, k)
    t = torch.randn(N, n, generator=g) + 4
    w = torch.rand(N, n, generator=g) * (torch.rand(N, n, generator=g) > 0.1)  # some padding weights 0
    got = tv.tailbite_triton(t.to(DEVICE), w.to(DEVICE), table.to(DEVICE), L, k).cpu()
    ref = tailbite(t, w, table, L, k)
    lo = (1 << (L - k)) - 1
    assert torch.equal(got[:, 1:] >> k, got[:, :-1] & lo) and torch.equal(got[:, 0] >> k, got[:, -1] & lo)
    torch.testing.assert_close(_cost(t, w, table, got), _cost(t, w, table, ref), rtol=1e-5, atol=1e-6)


def test_the_quantizer_uses_it_when_asked(monkeypatch):
    """``MOECOMPRESS_KERNELS=triton``: `tailbite` itself goes through the kernel (on a GPU it does by default)."""
    import moecompress.kernels.triton_viterbi as mod

    calls = []
    real = mod.tailbite_triton
    monkeypatch.setattr(mod, "tailbite_triton", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setenv("MOECOMPRESS_KERNELS", "triton")
    t, w = torch.randn(2, 8) + 4, torch.ones(2, 8)
    table = trellis_table(10, 2)[:16].sort().values
    tailbite(t, w, table, 4, 2)
    assert calls
