"""The fused ternary-dict decoder (moecompress/kernels/triton_dict.py) against the torch reference
(`reference.dict_dequantize`): plain products at batch 1..16 and above, and the grouped MoE form for every routing
block size, with one scale pair per row (QMoE's grid) and with group scales, one- and two-level. Under
TRITON_INTERPRET=1 without a GPU (conftest), compiled on one. Tolerance: float32 accumulation in another order,
``1e-5`` of the largest output (fp16 / bf16 activations: the output rounding, as tests/kernels/test_triton.py)."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
triton = pytest.importorskip("triton")

from moecompress.formats.codecs import encode  # noqa: E402
from moecompress.formats.dictcode import dict_table  # noqa: E402
from moecompress.kernels import dispatch, reference  # noqa: E402
from moecompress.kernels import triton_dict as tdict  # noqa: E402
from moecompress.kernels.triton_dequant import moe_align  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 4e-3}


def _weight(E, O, C, G, two_level, p0=0.85, seed=0):
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(E, O, C, generator=g)
    t = torch.where(u < p0, 0, torch.where(u < (1 + p0) / 2, -1, 1))
    s = torch.rand(E, O, G, generator=g) * 0.1 + 0.01
    neg = torch.rand(E, O, G, generator=g) * 0.1 + 0.01 if two_level else None
    enc = {k: v.to(DEVICE) for k, v in encode("ternary-dict", (t + 1).to(torch.uint8), s, torch.ones_like(s),
                                               not two_level, neg).items()}
    args = (enc["codewords"], enc["row_index"], dict_table(enc["dict"]), enc["scale"], enc.get("scale_neg"))
    W = reference.dict_dequantize(*args, C).cpu()
    return args, W


def _close(out, ref, dtype=torch.float32):
    tol = TOL[dtype] * float(ref.abs().max())
    torch.testing.assert_close(out.float().cpu(), ref, atol=tol, rtol=TOL[dtype])


@pytest.mark.parametrize("shape", [(37, 80, 1, True), (45, 29, 1, False), (33, 64, 4, True), (16, 56, 2, False)],
                         ids=["qmoe-grid", "odd-columns", "groups-two-level", "groups"])
@pytest.mark.parametrize("M", [1, 3, 16, 21])
def test_plain_product_equals_reference(shape, M):
    O, C, G, two = shape
    args, W = _weight(1, O, C, G, two, seed=M)
    x = torch.randn(M, C, generator=torch.Generator().manual_seed(M))
    out = tdict.dict_matmul(x.to(DEVICE), *args, C)
    assert out.shape == (M, O)
    _close(out, x @ W[0].T)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_activations(dtype):
    args, W = _weight(1, 24, 48, 1, True)
    x = torch.randn(2, 48).to(dtype)
    out = dispatch.dict_linear(x.to(DEVICE), *args, 48, backend="triton")
    assert out.dtype == dtype
    _close(out, x.float() @ W[0].T, dtype)


@pytest.mark.parametrize("G,two", [(1, True), (3, False)])
@pytest.mark.parametrize("T,K,bm", [(1, 2, 1), (3, 2, 1), (3, 2, 16), (20, 2, 16), (40, 2, 64)])
def test_grouped_equals_reference(G, two, T, K, bm):
    E, O, C = 4, 24, 48
    args, W = _weight(E, O, C, G, two, seed=T)
    g = torch.Generator().manual_seed(T)
    idx = torch.randint(0, E, (T * K,), generator=g)
    x = torch.randn(T, C, generator=g)
    route = moe_align(idx.to(DEVICE), E, bm)
    out = tdict.grouped_dict_matmul(x.to(DEVICE), route, K, *args, C)
    _close(out, torch.einsum("rc,roc->ro", x[torch.arange(T * K) // K], W[idx]))


def test_torch_grouped_path_equals_reference():
    """The CPU path (`dispatch.dict_grouped_linear` on a torch route) decodes only the routed experts' rows."""
    E, O, C = 5, 12, 40
    args, W = _weight(E, O, C, 1, True)
    idx = torch.tensor([4, 0, 4, 2, 2, 2])
    x = torch.randn(3, C)
    route = dispatch.moe_route(idx.to(DEVICE), E, "torch")
    out = dispatch.dict_grouped_linear(x.to(DEVICE), route, *args, C, backend="torch", x_div=2)
    _close(out, torch.einsum("rc,roc->ro", x[torch.arange(6) // 2], W[idx]))
