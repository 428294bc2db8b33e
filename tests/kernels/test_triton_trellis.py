"""The fused trellis decoder (moecompress/kernels/triton_trellis.py) against the torch reference
(`reference.trellis_dequantize`): plain products at batch 1..16 and above, and the grouped MoE form for every routing
block size, at 2, 3 and 4 bits, with one group per row, groups spanning kernel blocks and groups inside them, and
a padded last sequence. Under TRITON_INTERPRET=1 without a GPU (conftest), compiled on one. Tolerance as
tests/kernels/test_triton_dict.py."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
triton = pytest.importorskip("triton")

from moecompress.algorithms.gptq import gptq_quantize  # noqa: E402
from moecompress.algorithms.trellis import TrellisGrid, row_order  # noqa: E402
from moecompress.formats.codecs import encode  # noqa: E402
from moecompress.kernels import dispatch, reference  # noqa: E402
from moecompress.kernels import triton_trellis as tt  # noqa: E402
from moecompress.kernels.triton_dequant import moe_align  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 4e-3}


def _weight(E, O, C, G, bits, seed=0):
    """A trellis weight (encoded on the device) and its dense reference ``[E, O, C]``."""
    W = torch.randn(E, O, C, generator=torch.Generator().manual_seed(seed))
    grid = TrellisGrid(bits, group_size=C // G if G > 1 else -1)
    res = gptq_quantize(W, torch.zeros(E, C, C), grid)
    enc = encode(f"trellis{bits}", res.codes, res.scales, res.zeros, False, order=row_order(O), table=grid.table())
    args = tuple(enc[k].to(DEVICE) for k in ("stream", "order", "table", "scale", "zero"))
    return args, reference.trellis_dequantize(*(a.cpu() for a in args), bits, 5)


def _close(out, ref, dtype=torch.float32):
    tol = TOL[dtype] * float(ref.abs().max())
    torch.testing.assert_close(out.float().cpu(), ref, atol=tol, rtol=TOL[dtype])


@pytest.mark.parametrize("shape", [(100, 80, 5, 3), (64, 64, 1, 3), (70, 64, 2, 2), (128, 48, 3, 4)],
                         ids=["groups-inside-blocks-padded", "one-group", "groups-of-blocks-padded", "int4-odd-groups"])
@pytest.mark.parametrize("M", [1, 3, 16, 21])
def test_plain_product_equals_reference(shape, M):
    O, C, G, bits = shape
    args, W = _weight(1, O, C, G, bits, seed=M)
    x = torch.randn(M, C, generator=torch.Generator().manual_seed(M))
    out = tt.trellis_matmul(x.to(DEVICE), *args, bits, 5)
    assert out.shape == (M, O)
    _close(out, x @ W[0].T)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_activations(dtype):
    args, W = _weight(1, 64, 64, 2, 3)
    x = torch.randn(2, 64).to(dtype)
    out = dispatch.trellis_linear(x.to(DEVICE), *args, 3, 5, backend="triton")
    assert out.dtype == dtype
    _close(out, x.float() @ W[0].T, dtype)


@pytest.mark.parametrize("T,K,bm", [(1, 2, 1), (3, 2, 1), (3, 2, 16), (20, 2, 16), (40, 2, 64)])
def test_grouped_equals_reference(T, K, bm):
    E, O, C = 4, 72, 64
    args, W = _weight(E, O, C, 2, 3, seed=T)
    g = torch.Generator().manual_seed(T)
    idx = torch.randint(0, E, (T * K,), generator=g)
    x = torch.randn(T, C, generator=g)
    route = moe_align(idx.to(DEVICE), E, bm)
    out = tt.grouped_trellis_matmul(x.to(DEVICE), route, K, *args, 3, 5)
    _close(out, torch.einsum("rc,roc->ro", x[torch.arange(T * K) // K], W[idx]))


def test_torch_grouped_path_equals_reference():
    E, O, C = 5, 64, 32
    args, W = _weight(E, O, C, 1, 3)
    idx = torch.tensor([4, 0, 4, 2, 2, 2])
    x = torch.randn(3, C)
    route = dispatch.moe_route(idx.to(DEVICE), E, "torch")
    out = dispatch.trellis_grouped_linear(x.to(DEVICE), route, *args, 3, 5, C, backend="torch", x_div=2)
    _close(out, torch.einsum("rc,roc->ro", x[torch.arange(6) // 2], W[idx]))
