"""QMoE's sparse ternary grid and the zero-fraction control (`TernaryGrid`), with and without GPTQ."""

import pytest
import torch

from moecompress.algorithms.gptq import gptq_quantize, proxy_loss
from moecompress.algorithms.quant_grid import TernaryGrid, dequantize_ternary, rtn_quantize


def _gauss(E=3, O=64, C=1024, seed=0):
    return torch.randn(E, O, C, generator=torch.Generator().manual_seed(seed))


def test_qmoe_grid_levels_and_zeros():
    W = _gauss()
    res = rtn_quantize(W, TernaryGrid("qmoe", -1))
    zeros = float((res.codes == 1).float().mean())
    assert 0.85 < zeros < 0.95  # QMoE: 88-93 % zeros on Gaussian rows
    xmax, xmin = W.amax(-1, keepdim=True), W.amin(-1, keepdim=True)
    assert torch.allclose(res.scales, xmax.half().float()) and torch.allclose(res.neg_scales, (-xmin).half().float())
    # levels {min, 0, max} per row, thresholds at half of each
    expect = torch.where(W > res.scales / 2, res.scales, torch.where(W < -res.neg_scales / 2, -res.neg_scales, 0.0))
    assert torch.equal(res.weight, expect)
    assert torch.equal(dequantize_ternary(res.codes.float(), res.scales, res.neg_scales), res.weight)


@pytest.mark.parametrize("rule", ["absmean", "twn", "qmoe"])
def test_threshold_trades_zeros_for_error(rule):
    W = _gauss(seed=1)
    group = -1 if rule == "qmoe" else 128
    stats = []
    for th in (0.3, 0.5, 0.7, 0.9):
        res = rtn_quantize(W, TernaryGrid(rule, group, th))
        stats.append((float((res.codes == 1).float().mean()), float(((res.weight - W) ** 2).sum() / (W ** 2).sum())))
    zeros = [z for z, _ in stats]
    assert zeros == sorted(zeros) and zeros[-1] > zeros[0] + 0.2
    if rule == "qmoe":  # past QMoE's 0.5 (already ~90 % zeros) more zeros cost more error
        assert stats[-1][1] > stats[1][1]


def test_default_thresholds_are_the_rules():
    W = _gauss(seed=2)
    for rule, th in (("absmean", 0.5), ("twn", 0.7), ("qmoe", 0.5)):
        a, b = rtn_quantize(W, TernaryGrid(rule, 128)), rtn_quantize(W, TernaryGrid(rule, 128, th))
        assert torch.equal(a.codes, b.codes)


def test_gptq_on_the_qmoe_grid_beats_rtn_on_its_objective():
    W = _gauss(E=2, O=32, C=64, seed=3)
    X = torch.randn(2, 512, 64, generator=torch.Generator().manual_seed(4)) * torch.linspace(0.2, 3, 64)
    H = torch.einsum("etc,etd->ecd", X, X)
    grid = TernaryGrid("qmoe", -1)
    g = gptq_quantize(W, H, grid, damp=0.1)
    r = rtn_quantize(W, grid)
    assert g.neg_scales is not None and torch.equal(g.neg_scales, r.neg_scales)  # static per-row levels
    assert bool((proxy_loss(W, g.weight, H) < proxy_loss(W, r.weight, H)).all())
    assert set(g.codes.unique().tolist()) <= {0, 1, 2}
