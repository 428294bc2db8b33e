"""Triton kernels against the torch reference, at small and odd shapes. On a machine without a GPU they run
under TRITON_INTERPRET=1 (set here, before the kernel module is imported); on a GPU, compiled.

Tolerances (stated once, used below), relative to the largest reference output ``ref_max``:

* dequantization: exact (bit-for-bit against `reference.dequantize`);
* fp16 activations: ``rtol = atol / ref_max = 2e-3``: the tensor-core path rounds each weight to fp16 exactly
  as the reference's fp16 weights (``(q - z) * s`` rounded once), the output is rounded to fp16 (2^-11) and
  only the accumulation order differs (fp32);
* bf16 activations: ``4e-3`` on the same scale (one bf16 rounding of the output, 2^-9);
* float32 activations: ``1e-4`` (interpreter: exact fp32 dots; a GPU uses tf32 tensor cores, see
  benchmarks/kernels_gpu.py for the GPU tolerance).
The reference is ``x.float() @ W.T`` with ``W`` the exact float32 dequantized weight and ``x`` as given.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():  # conftest sets it first; kept for running this file on its own
    os.environ.setdefault("TRITON_INTERPRET", "1")
triton = pytest.importorskip("triton")

from moecompress.formats.codecs import CODECS, encode  # noqa: E402
from moecompress.kernels import dispatch, reference, routing  # noqa: E402
from moecompress.kernels import triton_dequant as td  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CASES = [("int8", True), ("int8", False), ("int4", True), ("int4", False), ("int3", False), ("int3", True),
         ("int2", False), ("ternary2", True), ("ternary-b3", True), ("int4-fz", False), ("int3-fz", False),
         ("int2-fz", False)]
IDS = [f"{c}-{'sym' if s else 'asym'}" for c, s in CASES]
TOL = {torch.float16: 2e-3, torch.bfloat16: 4e-3, torch.float32: 1e-4}


def _weight(codec, symmetric, E=3, O=37, C=80, group=16, seed=0):
    """Random codes packed with the codec; returns (codec, exact float32 weights [E, O, C], data, scale, zero)."""
    c = CODECS.get(codec)
    g = torch.Generator().manual_seed(seed)
    top = 2 if c.ternary else 2 ** c.bits - 1
    codes = torch.randint(0, top + 1, (E, O, C), generator=g)
    G = max(1, C // group) if group > 0 else 1
    scale = (torch.rand(E, O, G, generator=g) * 0.1 + 0.01).half().float()
    if c.ternary:
        zero = torch.ones_like(scale)
    elif symmetric:
        zero = torch.full_like(scale, float(2 ** (c.bits - 1)))
    elif c.zero_frac:  # fractional zeros: every storable value
        zero = torch.randint(0, 256, scale.shape, generator=g).float() / 2 ** c.zero_frac
    else:
        zero = torch.randint(0, top + 1, scale.shape, generator=g).float()
    t = encode(codec, codes.to(torch.uint8), scale, zero, symmetric)
    data = (t["trits"] if c.base3 else t["packed"]).to(DEVICE)
    return c, reference.dequantize(codes, scale, zero), data, t["scale"].to(DEVICE), \
        None if "zero" not in t else t["zero"].to(DEVICE)


def _close(out, ref, dtype):
    tol = TOL[dtype] * float(ref.abs().max())
    torch.testing.assert_close(out.float().cpu(), ref, atol=tol, rtol=TOL[dtype])


@pytest.mark.parametrize("codec,symmetric", CASES, ids=IDS)
@pytest.mark.parametrize("C,group", [(80, 16), (256, 128), (96, 0)], ids=["g16", "g128", "one-group"])
def test_dequant_is_exact(codec, symmetric, C, group):
    c, ref, data, scale, zero = _weight(codec, symmetric, C=C, group=group)
    out = td.dequantize(c.bits, c.ternary, c.base3, data, scale, zero, C, zero_frac=c.zero_frac)
    assert torch.equal(out.cpu(), ref)
    assert torch.equal(td.dequantize(c.bits, c.ternary, c.base3, data, scale, zero, C, torch.float16,
                                     zero_frac=c.zero_frac).cpu(), ref.half())


# (M, config): the GEMV (split-K too), the tensor-core path at decode and prefill sizes, split-K dots
PATHS = [(1, None), (3, dict(BLOCK_M=1, BLOCK_N=32, BLOCK_K=128, SPLIT_K=3)), (19, None),
         (2, dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=128, SPLIT_K=2))]


@pytest.mark.parametrize("codec,symmetric", CASES, ids=IDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_fused_matmul(codec, symmetric, dtype):
    c, ref, data, scale, zero = _weight(codec, symmetric, E=1, O=45, C=224, group=32)
    g = torch.Generator().manual_seed(1)
    for M, config in PATHS:
        x = torch.randn(M, 224, generator=g).to(dtype)
        out = td.packed_matmul(x.to(DEVICE), c.bits, c.ternary, c.base3, data, scale, zero, 224, config=config,
                               zero_frac=c.zero_frac)
        assert out.shape == (M, 45)
        _close(out, x.float() @ ref[0].T, dtype)


@pytest.mark.parametrize("codec,symmetric", [("int4", False), ("int3", False), ("ternary-b3", True)])
def test_fused_matmul_float32_and_straddling_groups(codec, symmetric):
    """Groups of 20 (not a multiple of 8 codes per word / 5 trits per byte: units straddle groups)."""
    c, ref, data, scale, zero = _weight(codec, symmetric, E=1, O=21, C=160, group=20)
    x = torch.randn(2, 160, generator=torch.Generator().manual_seed(3))
    for config in (dict(BLOCK_M=1, BLOCK_N=16, BLOCK_K=64, SPLIT_K=1), dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=64,
                                                                            SPLIT_K=1)):
        out = td.packed_matmul(x.to(DEVICE), c.bits, c.ternary, c.base3, data, scale, zero, 160, config=config)
        _close(out, x @ ref[0].T, torch.float32)


def _rows(T, K, E, seed, skip=()):
    """Top-k routing of T tokens over E experts (distinct experts per token), experts in ``skip`` unused."""
    g = torch.Generator().manual_seed(seed)
    allowed = torch.tensor([e for e in range(E) if e not in skip])
    idx = torch.stack([allowed[torch.randperm(len(allowed), generator=g)[:K]] for _ in range(T)])
    return idx  # [T, K]


@pytest.mark.parametrize("codec,symmetric", CASES, ids=IDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_grouped_moe_matmul_one_launch(codec, symmetric, dtype):
    """Uneven expert loads with an expert that gets no rows; T = 1 (GEMV routing) and T = 9 (sorted blocks of
    16); gate/up-style (one x row per token, ``x_div = top_k``) and down-style (one row per slot)."""
    E, O, C, K = 5, 33, 64, 2
    c, ref, data, scale, zero = _weight(codec, symmetric, E=E, O=O, C=C, group=16)
    g = torch.Generator().manual_seed(2)
    for T in (1, 9):
        idx = _rows(T, K, E, seed=T, skip=(2,))
        route = td.moe_align(idx.reshape(-1).to(DEVICE), E)
        assert route.block_m == (1 if T == 1 else 16)
        x = torch.randn(T, C, generator=g).to(dtype)
        out = td.grouped_matmul(x.to(DEVICE), route, K, c.bits, c.ternary, c.base3, data, scale, zero, C,
                                zero_frac=c.zero_frac)
        rows_expert = idx.reshape(-1)
        expected = torch.stack([x[r // K].float() @ ref[rows_expert[r]].T for r in range(T * K)])
        _close(out, expected, dtype)
        xs = torch.randn(T * K, C, generator=g).to(dtype)
        out = td.grouped_matmul(xs.to(DEVICE), route, 1, c.bits, c.ternary, c.base3, data, scale, zero, C,
                                zero_frac=c.zero_frac)
        _close(out, torch.stack([xs[r].float() @ ref[rows_expert[r]].T for r in range(T * K)]), dtype)


@pytest.mark.parametrize("config", [dict(BLOCK_N=16, BLOCK_K=64, SPLIT_K=2), dict(BLOCK_N=32, BLOCK_K=128, SPLIT_K=1)])
@pytest.mark.parametrize("block_m", [1, 16, 32])
def test_grouped_block_sizes_and_split_k(block_m, config):
    c, ref, data, scale, zero = _weight("int4", False, E=6, O=20, C=96, group=32)
    T = 5 if block_m == 1 else 23
    idx = _rows(T, 3, 6, seed=5, skip=(0, 4))
    route = td.moe_align(idx.reshape(-1).to(DEVICE), 6, block_m=block_m)
    x = torch.randn(T, 96, generator=torch.Generator().manual_seed(6)).half()
    out = td.grouped_matmul(x.to(DEVICE), route, 3, c.bits, c.ternary, c.base3, data, scale, zero, 96, config=config)
    rows_expert = idx.reshape(-1)
    _close(out, torch.stack([x[r // 3].float() @ ref[rows_expert[r]].T for r in range(3 * T)]), torch.float16)


@pytest.mark.parametrize("R,E,block_m", [(1, 8, 16), (7, 3, 16), (40, 8, 16), (37, 128, 16), (300, 256, 64),
                                         (64, 4, 32)])
def test_moe_align_matches_the_torch_routing(R, E, block_m):
    """The one-program Triton alignment equals the torch one: same sorted rows, padding and block experts."""
    g = torch.Generator().manual_seed(R)
    rows_expert = torch.randint(0, E, (R,), generator=g)
    rows_expert[rows_expert == 1] = 0  # an expert with no rows
    a = td.moe_align(rows_expert.to(DEVICE), E, block_m=block_m)
    b = routing.torch_route(rows_expert, E, block_m=block_m)
    assert a.num_blocks == b.num_blocks == routing.max_blocks(R, E, block_m)
    assert torch.equal(a.sorted_rows.cpu().long(), b.sorted_rows)
    assert torch.equal(a.block_expert.cpu().long(), b.block_expert)
    used = b.block_expert >= 0
    # every row appears exactly once, in its expert's blocks, in order
    rows = b.sorted_rows.view(-1, block_m)[used]
    real = rows[rows < R]
    assert torch.equal(real.sort().values, torch.arange(R))
    assert torch.equal(rows_expert[rows.clamp(max=R - 1)][rows < R],
                       b.block_expert[used][:, None].expand_as(rows)[rows < R])


def test_dispatch_grouped_backends_agree():
    """`dispatch.grouped_linear` on both backends (each with its own routing) gives the same rows."""
    c, ref, data, scale, zero = _weight("ternary-b3", True, E=4, O=24, C=80, group=16)
    idx = _rows(6, 2, 4, seed=9, skip=(3,)).reshape(-1)
    x = torch.randn(6, 80, generator=torch.Generator().manual_seed(4)).half()
    outs = []
    for backend in ("torch", "triton"):
        route = dispatch.moe_route(idx.to(DEVICE), 4, backend)
        outs.append(dispatch.grouped_linear(x.to(DEVICE), route, c.bits, c.ternary, c.base3, data, scale, zero, 80,
                                            backend=backend, x_div=2).float().cpu())
    _close(outs[1], outs[0], torch.float16)


def test_blocks_below_16_are_refused():
    c, ref, data, scale, zero = _weight("int4", False, E=1)
    with pytest.raises(ValueError, match="at least 16"):
        td.packed_matmul(torch.randn(2, 80).to(DEVICE), 4, False, False, data, scale, zero, 80,
                         config=dict(BLOCK_M=8, BLOCK_N=16, BLOCK_K=16, SPLIT_K=1))
