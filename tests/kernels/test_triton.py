"""Triton kernels against the torch reference, at small and odd shapes. On a machine without a GPU they
run under TRITON_INTERPRET=1 (set here, before the kernel module is imported)."""

import os

import pytest
import torch

if not torch.cuda.is_available():  # conftest sets it first; kept for running this file on its own
    os.environ.setdefault("TRITON_INTERPRET", "1")
triton = pytest.importorskip("triton")

from moecompress.formats.codecs import CODECS, encode  # noqa: E402
from moecompress.kernels import reference  # noqa: E402
from moecompress.kernels import triton_dequant as td  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CASES = [("int8", True), ("int4", False), ("int3", False), ("int2", False), ("ternary2", True), ("ternary-b3", True)]


def _weight(codec, symmetric, E=3, O=37, C=80, group=16, seed=0):
    c = CODECS.get(codec)
    g = torch.Generator().manual_seed(seed)
    top = 2 if c.ternary else 2 ** c.bits - 1
    codes = torch.randint(0, top + 1, (E, O, C), generator=g)
    scale = (torch.rand(E, O, C // group, generator=g) * 0.1 + 0.01).half().float()
    if c.ternary:
        zero = torch.ones_like(scale)
    elif symmetric:
        zero = torch.full_like(scale, float(2 ** (c.bits - 1)))
    else:
        zero = torch.randint(0, top + 1, scale.shape, generator=g).float()
    t = encode(codec, codes.to(torch.uint8), scale, zero, symmetric)
    data = (t["trits"] if c.base3 else t["packed"]).to(DEVICE)
    return c, reference.dequantize(codes, scale, zero), data, t["scale"].to(DEVICE), \
        None if "zero" not in t else t["zero"].to(DEVICE)


@pytest.mark.parametrize("codec,symmetric", CASES)
def test_dequant_is_exact(codec, symmetric):
    c, ref, data, scale, zero = _weight(codec, symmetric)
    out = td.dequantize(c.bits, c.ternary, c.base3, data, scale, zero, 80)
    assert torch.equal(out.cpu(), ref)


@pytest.mark.parametrize("codec,symmetric", CASES)
def test_fused_matmul(codec, symmetric):
    c, ref, data, scale, zero = _weight(codec, symmetric, E=1, O=45, C=96, group=32)
    x = torch.randn(19, 96, generator=torch.Generator().manual_seed(1))
    out = td.packed_matmul(x.to(DEVICE), c.bits, c.ternary, c.base3, data, scale, zero, 96)
    torch.testing.assert_close(out.cpu(), x @ ref[0].T, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("codec,symmetric", CASES)
def test_grouped_moe_matmul_one_launch(codec, symmetric):
    c, ref, data, scale, zero = _weight(codec, symmetric, E=4, O=33, C=64, group=16)
    g = torch.Generator().manual_seed(2)
    rows = torch.randint(0, 4, (27,), generator=g)
    rows[rows == 2] = 3  # an expert with no rows
    x = torch.randn(27, 64, generator=g)
    out = td.grouped_experts_matmul(x.to(DEVICE), rows.to(DEVICE), c.bits, c.ternary, c.base3, data, scale, zero, 64)
    expected = torch.stack([x[t] @ ref[rows[t]].T for t in range(27)])
    torch.testing.assert_close(out.cpu(), expected, atol=1e-4, rtol=1e-4)


def test_blocks_below_16_are_refused():
    c, ref, data, scale, zero = _weight("int4", False, E=1)
    with pytest.raises(ValueError, match="at least 16"):
        td.packed_matmul(torch.randn(2, 80), 4, False, False, data, scale, zero, 80, block=(8, 16, 16))
