"""Quantization math invariants: GPTQ <= RTN on the same Hessian, identity Hessian = RTN, grids, smoothing,
router alignment."""

import pytest
import torch

from moecompress.algorithms.gptq import gptq_factor, gptq_quantize, proxy_loss
from moecompress.algorithms.quant_grid import QuantGrid, fake_quant_tokens, rtn_quantize
from moecompress.algorithms.router_align import align_router, topk_kl
from moecompress.algorithms.smooth import aggregate_scales, down_outlier_scales, smooth_scales
from moecompress.testing import DeviceMix

GRIDS = [QuantGrid(4, 32), QuantGrid(3, -1, symmetric=True), QuantGrid(2, 16), QuantGrid(8, 64, clip_search=False),
         QuantGrid(2, 16, zero_frac=6), QuantGrid(3, 32, clip_search=False, zero_frac=5)]


def _problem(seed, E=3, O=24, C=64, T=200):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(E, O, C, generator=g) * 0.1
    X = torch.randn(E, T, C, generator=g) * (torch.rand(C, generator=g) * 4)
    return W, torch.einsum("etc,etd->ecd", X, X)


@pytest.mark.parametrize("grid", GRIDS, ids=str)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gptq_error_at_most_rtn_error(grid, seed):
    W, H = _problem(seed)
    rtn = rtn_quantize(W, grid)
    for act_order in (True, False):
        gptq = gptq_quantize(W, H, grid, act_order=act_order, block_size=16)
        assert torch.all(proxy_loss(W, gptq.weight, H) <= proxy_loss(W, rtn.weight, H) * (1 + 1e-6))


@pytest.mark.parametrize("grid", GRIDS, ids=str)
@pytest.mark.parametrize("act_order", [True, False])
def test_a_precomputed_factor_gives_the_same_bytes(grid, act_order):
    """GPTQ again on the same Hessians (the rounds) reuses `gptq_factor`: identical results, also for an expert
    without tokens, a dead column, on a subset of rows and with given group parameters."""
    W, H = _problem(6)
    H[1] = 0  # no token at all
    H[2, :, 5] = H[2, 5, :] = 0  # a column no token touched
    factor = gptq_factor(H, 0.05, act_order)
    for rows, params in ((slice(None), None), (slice(3, 9), None), (slice(None), "first")):
        Wr = W[:, rows]
        if params == "first":
            first = gptq_quantize(Wr, H, grid, damp=0.05, act_order=act_order)
            params = (first.scales * 1.1, first.zeros)
        a = gptq_quantize(Wr, H, grid, damp=0.05, act_order=act_order, params=params)
        b = gptq_quantize(Wr, H, grid, damp=0.05, act_order=act_order, params=params, factor=factor)
        assert torch.equal(a.codes, b.codes) and torch.equal(a.weight, b.weight), rows


@pytest.mark.parametrize("grid", GRIDS, ids=str)
def test_identity_hessian_reproduces_rtn(grid):
    W, _ = _problem(3)
    eye = torch.eye(W.shape[2]).expand(W.shape[0], -1, -1).clone()
    g, r = gptq_quantize(W, eye, grid, act_order=False, damp=0.0), rtn_quantize(W, grid)
    assert torch.equal(g.codes, r.codes) and torch.allclose(g.weight, r.weight)
    zero = gptq_quantize(W, torch.zeros_like(eye), grid)  # no tokens at all: RTN too
    assert torch.equal(zero.codes, r.codes)


@pytest.mark.parametrize("grid", GRIDS, ids=str)
def test_codes_scales_zeros_rebuild_the_weights(grid):
    W, H = _problem(4)
    res = gptq_quantize(W, H, grid)
    E, O, C = W.shape
    G = res.scales.shape[-1]
    assert res.codes.dtype == torch.uint8 and int(res.codes.max()) <= grid.maxq
    rebuilt = ((res.codes.float().view(E, O, G, C // G) - res.zeros[..., None]) * res.scales[..., None]).view(E, O, C)
    assert torch.allclose(rebuilt, res.weight, atol=1e-6)


def test_clip_search_lowers_rtn_error():
    W, _ = _problem(5)
    W[:, :, 0] *= 20  # an outlier column
    plain = rtn_quantize(W, QuantGrid(3, -1, clip_search=False))
    clipped = rtn_quantize(W, QuantGrid(3, -1, clip_search=True))
    assert (clipped.weight - W).abs().pow(2.4).sum() < (plain.weight - W).abs().pow(2.4).sum()


@pytest.mark.parametrize("floor", [0.37, 0.5, 0.8, 1.0])
def test_clip_floor_bounds_the_search(floor):
    """The clip search tries range factors in [clip_floor, 1] only: every group keeps at least ``floor`` of its
    min-max range (up to scale storage rounding), the default floor 0.2 clips below 0.8 somewhere on this heavy-tailed
    matrix, a floor of 1 is min-max, and a higher floor never lowers the rounding error it searches for."""
    W, _ = _problem(7, C=64)
    W = W * torch.randn(W.shape, generator=torch.Generator().manual_seed(3)).abs().pow(3)  # heavy tails
    group = W.view(3, 24, 4, 16)
    span = (group.amax(-1) - group.amin(-1)) / 3  # min-max scale at 2 bits
    default = rtn_quantize(W, QuantGrid(2, 16))
    floored = rtn_quantize(W, QuantGrid(2, 16, clip_floor=floor))
    assert (floored.scales >= floor * span * (1 - 1e-2)).all()
    assert (default.scales < 0.79 * span).any()
    if floor == 1.0:
        assert torch.equal(floored.weight, rtn_quantize(W, QuantGrid(2, 16, clip_search=False)).weight)
    err = lambda r: (r.weight - W).abs().pow(2.4).view(3, 24, 4, 16).sum(-1)  # noqa: E731
    assert (err(default) <= err(floored) * (1 + 1e-5)).all()


def test_group_size_must_divide():
    W, _ = _problem(6, C=60)
    with pytest.raises(ValueError, match="does not divide"):
        rtn_quantize(W, QuantGrid(4, 32))


def test_activation_fake_quant():
    x = torch.randn(5, 64)
    assert torch.allclose(fake_quant_tokens(x, 16), x, atol=1e-3)
    q4 = fake_quant_tokens(x, 4)
    assert all(len(torch.unique(r)) <= 16 for r in q4)
    qa = fake_quant_tokens(x, 4, 0.9, symmetric=False)
    assert (qa - x).abs().mean() < (x.abs().mean())


def test_smoothing_math():
    act = torch.tensor([10.0, 1.0, 0.0])
    w = torch.tensor([1.0, 1.0, 1.0])
    s = smooth_scales(act, w, 0.5)
    assert torch.allclose(s, torch.tensor([10 ** 0.5, 1.0, 1.0]))
    per = torch.tensor([[1.0, 4.0], [3.0, 2.0]])
    assert aggregate_scales(per).tolist() == [3.0, 4.0]
    assert torch.allclose(aggregate_scales(per, "freq", torch.tensor([3.0, 1.0])), torch.tensor([1.5, 3.5]))
    assert aggregate_scales(per, "max", router=torch.tensor([5.0, 0.0])).tolist() == [5.0, 4.0]
    h = torch.ones(2, 20)
    h[0, 3] = 50.0
    sd = down_outlier_scales(h)
    assert sd[0, 3] > 1 and (sd[0, :3] == 1).all() and (sd[1] == 1).all()


def test_router_alignment_lowers_kl():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(8, 32, generator=g)
    W[:, 5] *= 10
    X = torch.randn(400, 32, generator=g)
    _, ratios, rep = align_router(W, X, 3, 2)
    assert rep["kl_after"] < rep["kl_before"] and ratios.shape == (8,)
    _, _, rep = align_router(W, X, 3, 2, objective="topk")  # EAQuant's own loss
    assert rep["kl_after"] < rep["kl_before"]


def test_topk_rest_objective_is_a_divergence_and_eaquants_is_not():
    ref = torch.tensor([[1.0, 1.0, 0.0, 0.0]])
    sharper = ref * 2  # more confident in the same top-2: a different distribution
    assert float(topk_kl(ref, sharper, 2, objective="topk")) < 0  # EAQuant's loss rewards the change
    assert float(topk_kl(ref, sharper, 2, objective="topk_rest")) > 0
    assert float(topk_kl(ref, ref, 2, objective="topk_rest")) == 0
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(500, 8, generator=g), torch.randn(500, 8, generator=g)
    full = (a.softmax(-1) * (a.log_softmax(-1) - b.log_softmax(-1))).sum(-1).mean()
    assert 0 <= float(topk_kl(a, b, 2, objective="topk_rest")) <= float(full) + 1e-6  # coarsening never adds


@pytest.mark.parametrize("grid", [QuantGrid(4, 32, symmetric=True), QuantGrid(3, 32, symmetric=False),
                                  QuantGrid(2, 32, symmetric=False, zero_frac=6)], ids=["sym4", "asym3", "fz2"])
def test_gptq_and_rtn_make_every_tensor_on_the_weights_device(grid):
    """`quantize --device cuda`: GPTQ (clip search, factorization, column loop) and RTN run on the weights'
    device, with no tensor made on the CPU along the way (run on ``meta``, where any such tensor is a mix)."""
    W, H = torch.randn(2, 16, 64, device="meta"), torch.randn(2, 64, 64, device="meta")
    with DeviceMix() as mix:
        results = [gptq_quantize(W, H, grid), rtn_quantize(W, grid)]
    assert mix.mixed == []
    assert all(t.device.type == "meta" for r in results for t in (r.codes, r.weight, r.scales, r.zeros))
