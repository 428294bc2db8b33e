"""Per-group scale/zero refit after GPTQ: never increases any row's Hessian-weighted error (random and adversarial
Hessians and weights, batched over experts), keeps the codes, keeps zeros on their storable steps (integers, or
multiples of 2^-f for fractional zeros; symmetric zeros fixed),
and the stored parameters rebuild the returned weights; pooled Hessians for rare experts; GPTQ rounds on the refit
grid never increase any row's error, choose row by row, and stop once a round gains too little."""

import pytest
import torch

from moecompress.algorithms.coord_descent import refine_codes
from moecompress.algorithms.gptq import gptq_quantize
from moecompress.algorithms.moe_math import glu
from moecompress.algorithms.quant_grid import QuantGrid, QuantResult, dequantize, rtn_quantize
from moecompress.algorithms.rare_experts import pooled_hessians
from moecompress.algorithms.refit import alternate, refit_groups, row_errors
from moecompress.types import Activation

GRIDS = [QuantGrid(2, 16), QuantGrid(3, 16), QuantGrid(4, 32), QuantGrid(2, 16, symmetric=True),
         QuantGrid(3, -1), QuantGrid(2, 16, clip_search=False), QuantGrid(2, 16, zero_frac=6),
         QuantGrid(3, 16, zero_frac=5), QuantGrid(4, 32, clip_search=False, zero_frac=4)]


def _random(seed, E=4, O=12, C=64, T=300):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(E, O, C, generator=g) * 0.1
    X = torch.randn(E, T, C, generator=g) * (torch.rand(C, generator=g) * 4)
    return W, torch.einsum("etc,etd->ecd", X, X)


def _adversarial(seed, E=5, O=12, C=64):
    """Expert 0: rank 3 (three tokens); 1: all-zero (no token); 2: dead columns and a huge outlier weight;
    3: very ill-conditioned (channel scales over 8 decades); 4: rows constant within groups (codes all equal)."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(E, O, C, generator=g) * 0.1
    H = torch.zeros(E, C, C)
    X = torch.randn(3, C, generator=g)
    H[0] = X.T @ X
    X = torch.randn(200, C, generator=g)
    X[:, :20] = 0
    H[2] = X.T @ X
    W[2, 0, 5] = 50.0
    X = torch.randn(400, C, generator=g) * torch.logspace(-4, 4, C)
    H[3] = X.T @ X
    X = torch.randn(200, C, generator=g)
    H[4] = X.T @ X
    W[4] = 0.3
    return W, H


def _check(W, H, res, grid):
    out, info = refit_groups(W, H, res, grid.symmetric, zero_frac=grid.zero_frac)
    Hc = _identity_for_empty(H)  # no token: plain squared error
    before, after = row_errors(W, res.weight, Hc), row_errors(W, out.weight, Hc)
    assert bool((after <= before).all()), (after - before).max()
    assert torch.equal(out.codes, res.codes)
    stored = out.zeros * 2 ** grid.zero_frac  # the byte the packed format stores
    assert torch.equal(stored, stored.round()) and bool((stored >= 0).all() and (stored <= 255).all())
    if grid.symmetric:
        assert torch.equal(out.zeros, res.zeros)
    E, O, C = W.shape
    G = out.scales.shape[-1]
    rebuilt = dequantize(out.codes.float().view(E, O, G, -1), out.scales[..., None], out.zeros[..., None])
    assert torch.equal(rebuilt.view(E, O, C), out.weight)
    assert torch.equal(out.scales, out.scales.half().float())  # storable as the packed format stores them
    assert info["error_after"] <= info["error_before"]
    return before, after


@pytest.mark.parametrize("grid", GRIDS, ids=str)
@pytest.mark.parametrize("seed", [0, 1])
def test_refit_never_increases_the_hessian_weighted_error_random(grid, seed):
    W, H = _random(seed)
    before, after = _check(W, H, gptq_quantize(W, H, grid), grid)
    assert float(after.sum()) < float(before.sum())  # and on ordinary problems it helps


@pytest.mark.parametrize("grid", GRIDS, ids=str)
@pytest.mark.parametrize("seed", [0, 1])
def test_refit_never_increases_the_hessian_weighted_error_adversarial(grid, seed):
    W, H = _adversarial(seed)
    _check(W, H, gptq_quantize(W, H, grid), grid)
    _check(W, H, rtn_quantize(W, grid), grid)  # parameters from another method, same guarantee


def test_refit_rejects_a_worse_fit_row_by_row():
    """Parameters already optimal for their codes (a weight exactly on its grid) are kept."""
    grid = QuantGrid(3, 16, clip_search=False)
    W, H = _random(0)
    res = rtn_quantize(W, grid)
    exact = res.weight.clone()
    out, info = refit_groups(exact, H, res, grid.symmetric)
    assert torch.equal(out.weight, exact) and info["rows_changed"] == 0


def test_refit_in_row_chunks_equals_one_chunk(monkeypatch):
    import moecompress.algorithms.refit as refit

    grid = QuantGrid(2, 16)
    W, H = _random(3)
    res = gptq_quantize(W, H, grid)
    whole, _ = refit_groups(W, H, res, False)  # every expert in one batch
    monkeypatch.setattr(refit, "CHUNK_BYTES", 1)  # one expert's row at a time
    rows, _ = refit_groups(W, H, res, False)
    for f in ("weight", "scales", "zeros"):
        torch.testing.assert_close(getattr(rows, f), getattr(whole, f), atol=1e-6, rtol=1e-5)


def test_pooled_hessians_are_the_tokens_own_statistics():
    g = torch.Generator().manual_seed(0)
    X, gate, up = torch.randn(50, 16, generator=g), torch.randn(3, 8, 16, generator=g), torch.randn(3, 8, 16, generator=g)
    act = Activation("glu", "silu")
    Hx, Hd = pooled_hessians(X, gate, up, act, chunk=7)
    torch.testing.assert_close(Hx, X.T @ X / 50)
    for e in range(3):
        h = glu(X @ gate[e].T, X @ up[e].T, act)
        torch.testing.assert_close(Hd[e], h.T @ h / 50, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("grid", GRIDS, ids=str)
@pytest.mark.parametrize("problem", ["random", "adversarial"])
def test_code_sweeps_never_increase_the_error_and_stay_on_the_grid(grid, problem):
    W, H = _random(4) if problem == "random" else _adversarial(4)
    res = gptq_quantize(W, H, grid)
    Hc = H.clone()
    Hc[H.diagonal(dim1=1, dim2=2).sum(-1) == 0] = torch.eye(H.shape[-1])
    err = row_errors(W, res.weight, Hc)
    for _ in range(2):
        out = refine_codes(W, H, res, grid.maxq, fractional=grid.zero_frac > 0)
        new = row_errors(W, out.weight, Hc)
        assert bool((new <= err * (1 + 1e-5) + 1e-9).all()), (new - err).max()  # float32 rank-1 updates
        assert int(out.codes.max()) <= grid.maxq and torch.equal(out.scales, res.scales)
        E, O, C = W.shape
        G = out.scales.shape[-1]
        rebuilt = dequantize(out.codes.float().view(E, O, G, -1), out.scales[..., None], out.zeros[..., None])
        torch.testing.assert_close(rebuilt.view(E, O, C), out.weight, atol=1e-6, rtol=0)
        res, err = out, new
    if problem == "adversarial":  # columns no token touched keep their codes
        dead = H[2].diagonal() == 0
        assert torch.equal(out.codes[2][:, dead], gptq_quantize(W, H, grid).codes[2][:, dead])


@pytest.mark.parametrize("grid", GRIDS, ids=str)
def test_code_sweeps_blocked_updates_make_the_same_choices(grid):
    """Lazy block updates of ``(W - W_hat) H`` choose the codes column-by-column updates choose (block 1)."""
    W, H = _random(4)
    W, H = W.double(), H.double()  # exact enough that no rounding tie flips between the two orders of sums
    res = gptq_quantize(W.float(), H.float(), grid)
    res = type(res)(res.weight.double(), res.codes, res.scales.double(), res.zeros.double(), res.loss)
    frac = grid.zero_frac > 0
    one = refine_codes(W, H, res, grid.maxq, sweeps=2, block=1, fractional=frac)
    for block in (7, 64, 10_000):
        out = refine_codes(W, H, res, grid.maxq, sweeps=2, block=block, fractional=frac)
        assert torch.equal(out.codes, one.codes), block
    assert not torch.equal(one.codes, res.codes)  # the sweeps changed something


def _gptq_refit(W, H, grid, params=None):
    res = gptq_quantize(W, H, grid, params=params)
    return refit_groups(W, H, res, grid.symmetric, zero_frac=grid.zero_frac)[0]


def _identity_for_empty(H):
    Hc = H.clone()
    Hc[H.diagonal(dim1=1, dim2=2).sum(-1) == 0] = torch.eye(H.shape[-1])
    return Hc


@pytest.mark.parametrize("grid", [g for g in GRIDS if g.group_size != -1], ids=str)
@pytest.mark.parametrize("problem", ["random", "adversarial"])
def test_gptq_rounds_never_increase_any_rows_error(grid, problem):
    W, H = (_random if problem == "random" else _adversarial)(3)
    first = _gptq_refit(W, H, grid)
    out, history = alternate(W, H, first, lambda Wr, r: _gptq_refit(Wr, H, grid, (r.scales, r.zeros)), 3,
                             min_gain=0.0)
    Hc = _identity_for_empty(H)
    assert bool((row_errors(W, out.weight, Hc) <= row_errors(W, first.weight, Hc) * (1 + 1e-6) + 1e-9).all())
    assert all(b <= a for a, b in zip(history, history[1:])) and 2 <= len(history) <= 4
    E, O, C = W.shape
    G = out.scales.shape[-1]
    rebuilt = dequantize(out.codes.float().view(E, O, G, -1), out.scales[..., None], out.zeros[..., None])
    assert torch.equal(rebuilt.view(E, O, C), out.weight)  # each row's codes, scales and zeros come together


def test_gptq_rounds_lower_the_two_bit_error():
    """At 2 bits the first grid (clip search on the original weights) is far from what GPTQ's codes want."""
    W, H = _random(4, E=4, O=32, C=128, T=600)
    grid = QuantGrid(2, 32)
    first = _gptq_refit(W, H, grid)
    _, history = alternate(W, H, first, lambda Wr, r: _gptq_refit(Wr, H, grid, (r.scales, r.zeros)), 4,
                           min_gain=0.0)
    assert history[-1] < 0.99 * history[0], history


def _alternate_every_row(W, H, res, requantize, rounds):
    """The rounds without skipping rows: every row requantized every round, the lower error kept per row."""
    err = row_errors(W, res.weight, _identity_for_empty(H))
    for _ in range(rounds):
        new = requantize(W, res)
        new_err = row_errors(W, new.weight, _identity_for_empty(H))
        take = new_err < err
        res = type(res)(*(torch.where(take.view(*take.shape, *([1] * (a.dim() - 2))), b, a)
                          for a, b in ((res.weight, new.weight), (res.codes, new.codes), (res.scales, new.scales),
                                       (res.zeros, new.zeros))))
        err = torch.minimum(err, new_err)
    return res


@pytest.mark.parametrize("problem", ["random", "adversarial"])
def test_gptq_rounds_skip_only_rows_whose_result_cannot_change(problem):
    """A row left unchanged by a round would get the same rejected result again: skipping it changes nothing."""
    W, H = (_random if problem == "random" else _adversarial)(6)
    grid = QuantGrid(2, 16)
    first = _gptq_refit(W, H, grid)
    sizes = []

    def requantize(Wr, r):
        sizes.append(Wr.shape[1])
        return _gptq_refit(Wr, H, grid, (r.scales, r.zeros))
    out, history = alternate(W, H, first, requantize, 4, min_gain=0.0)
    ref = _alternate_every_row(W, H, first, lambda Wr, r: _gptq_refit(Wr, H, grid, (r.scales, r.zeros)), 4)
    Hc = _identity_for_empty(H)
    got, want = row_errors(W, out.weight, Hc), row_errors(W, ref.weight, Hc)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-9)
    assert (out.codes == ref.codes).float().mean() > 0.999
    assert sizes[0] == W.shape[1] and all(b <= W.shape[1] for b in sizes[1:])
    assert any(b < W.shape[1] for b in sizes[1:]), sizes  # later rounds requantized fewer rows


def test_gptq_rounds_choose_row_by_row_and_stop_when_nothing_improves():
    W, H = _random(5)
    grid = QuantGrid(2, 16)
    first = _gptq_refit(W, H, grid)
    better = rtn_quantize(W, QuantGrid(4, 16))  # finer grid: lower error on every row, kept only on even rows
    worse = _gptq_refit(W, H, grid)
    mixed = type(first)(*(torch.where((torch.arange(W.shape[1]) % 2 == 0).view(1, -1, *([1] * (a.dim() - 2))),
                                      b, a) for a, b in ((worse.weight, better.weight), (worse.codes, better.codes),
                                                         (worse.scales, better.scales), (worse.zeros, better.zeros))))
    calls = []

    def requantize(Wr, r):  # the rows of ``mixed`` whose weights are Wr's
        calls.append(Wr.shape[1])
        idx = (Wr[:, :, None, :] == W[:, None, :, :]).all(-1).float().argmax(-1)  # [E, R] row numbers
        return type(first)(*(t.gather(1, idx.view(*idx.shape, 1).expand(-1, -1, t.shape[-1]))
                             for t in (mixed.weight, mixed.codes, mixed.scales, mixed.zeros)))
    out, history = alternate(W, H, first, requantize, 5)
    assert torch.equal(out.weight[:, 0::2], better.weight[:, 0::2])  # taken where lower
    assert torch.equal(out.weight[:, 1::2], first.weight[:, 1::2])  # kept where not
    assert len(history) == 3  # the second round changed nothing: stopped
    assert calls == [W.shape[1], W.shape[1] // 2]  # the second round requantized only the rows the first changed
    same, h = alternate(W, H, first, lambda Wr, r: r, 0)
    assert same is first and len(h) == 1


def test_float32_refit_matches_the_float64_reference_and_redoes_close_rows_exactly(monkeypatch):
    """The default float32 products give the float64 reference's error (to float rounding); a row whose
    decision is close is redone in float64: with every row close, the result is the reference's, bit for bit."""
    import moecompress.algorithms.refit as refit

    for grid in (QuantGrid(2, 16), QuantGrid(3, 16, symmetric=True)):
        W, H = _random(5)
        res = gptq_quantize(W, H, grid)
        ref, ref_info = refit_groups(W, H, res, grid.symmetric, exact=True)
        fast, info = refit_groups(W, H, res, grid.symmetric)
        assert ref_info["rows_verified"] == 0
        assert float(row_errors(W, fast.weight, H).sum()) == pytest.approx(float(row_errors(W, ref.weight, H).sum()),
                                                                           rel=1e-6)
        monkeypatch.setattr(refit, "VERIFY", 1e30)  # every decision "close": every row redone in float64
        redone, info = refit_groups(W, H, res, grid.symmetric)
        monkeypatch.undo()
        assert info["rows_verified"] == 1.0
        assert torch.equal(redone.weight, ref.weight) and torch.equal(redone.scales, ref.scales)
        assert torch.equal(redone.zeros, ref.zeros)


def test_float64_redo_of_close_rows_batched_over_experts_equals_each_expert_alone(monkeypatch):
    """The close rows of every expert are redone in float64 in one batch (padded to the expert with the most):
    the result is each expert refit alone, bit for bit, with a different number of redone rows per expert."""
    import moecompress.algorithms.refit as refit

    W, H = _random(7, E=6, O=16, C=64)
    H[1] = 0  # an expert without tokens
    grid = QuantGrid(2, 16, zero_frac=5)
    res = gptq_quantize(W, H, grid)
    monkeypatch.setattr(refit, "VERIFY", 2e-3)
    whole, info = refit_groups(W, H, res, False, zero_frac=grid.zero_frac)
    assert 0 < info["rows_verified"] < 1
    redone = []
    for e in range(W.shape[0]):
        sub = QuantResult(*(t[e:e + 1] for t in (res.weight, res.codes, res.scales, res.zeros)), None)
        alone, i = refit_groups(W[e:e + 1], H[e:e + 1], sub, False, zero_frac=grid.zero_frac)
        redone.append(i["rows_verified"])
        for a, b in ((whole.weight, alone.weight), (whole.scales, alone.scales), (whole.zeros, alone.zeros)):
            assert torch.equal(a[e:e + 1], b), e
    assert len(set(redone)) > 1  # experts with different numbers of redone rows: the batch was padded
