"""The bitshift trellis code (QTIP) as GPTQ's quantizer: the Viterbi search is optimal, paths close on
themselves, GPTQ and its rounds only lower the Hessian-weighted error, and sequences stay inside a stored weight."""

import itertools

import pytest
import torch

from moecompress.algorithms.gptq import gptq_quantize, proxy_loss
from moecompress.algorithms.quant_grid import QuantGrid
from moecompress.algorithms.refit import row_errors
from moecompress.algorithms.trellis import (TrellisGrid, refit_trellis, row_layout, row_sequences, tailbite,
                                            train_table, trellis_rounds, trellis_table, viterbi)


def _brute(t, w, table, L, k, tie=None):
    """The least cost over every path (``tie``: first state's high bits and last state's low bits fixed)."""
    n, S, Lo = t.numel(), 1 << L, (1 << (L - k)) - 1
    best = float("inf")
    for s0 in range(S):
        if tie is not None and s0 >> k != tie:
            continue
        for bits in itertools.product(range(1 << k), repeat=n - 1):
            s = [s0]
            for b in bits:
                s.append(((s[-1] << k) | b) & (S - 1))
            if tie is not None and s[-1] & Lo != tie:
                continue
            best = min(best, float((w * (t - table[torch.tensor(s)]) ** 2).sum()))
    return best


@pytest.mark.parametrize("tied", [False, True])
def test_viterbi_finds_the_least_cost_path(tied):
    g = torch.Generator().manual_seed(0)
    L, k, n = 4, 2, 5
    table = torch.randn(1 << L, generator=g, dtype=torch.float64)
    t = torch.randn(6, n, generator=g, dtype=torch.float64)
    w = torch.rand(6, n, generator=g, dtype=torch.float64)
    tie = torch.arange(6) % 4 if tied else None
    st = viterbi(t, w, table, L, k, tie)
    for i in range(6):
        assert all(int(st[i, p]) == ((int(st[i, p - 1]) << k) | (int(st[i, p]) & 3)) & 15 for p in range(1, n))
        got = float((w[i] * (t[i] - table[st[i]]) ** 2).sum())
        assert got == pytest.approx(_brute(t[i], w[i], table, L, k, None if tie is None else int(tie[i])), rel=1e-12)


def test_tailbiting_paths_close_and_chunks_agree():
    """Every sequence is a circular path (s_0's high bits = s_{n-1}'s low bits); searching in chunks changes
    nothing."""
    g = torch.Generator().manual_seed(1)
    table = trellis_table(10, 3) - 4
    t, w = torch.randn(300, 64, generator=g), torch.rand(300, 64, generator=g)
    st = tailbite(t, w, table, 10, 3)
    lo = (1 << 7) - 1
    assert torch.equal(st[:, 0] >> 3, st[:, -1] & lo)
    assert torch.equal(st[:, 1:] >> 3, st[:, :-1] & lo)
    assert torch.equal(st[:10], tailbite(t[:10], w[:10], table, 10, 3))


def test_the_code_beats_the_best_uniform_grid_on_gaussian_weights():
    t = torch.randn(256, 64, generator=torch.Generator().manual_seed(2))
    for k in (2, 3, 4):
        table = trellis_table(10, k) - 4
        mse = float(((t - table[tailbite(t, torch.ones_like(t), table, 10, k)]) ** 2).mean())
        a = torch.linspace(1.0, 4.0, 61)[:, None, None]
        step = 2 * a / 2 ** k
        uniform = float(((t - ((((t + a) / step - 0.5).round().clamp(0, 2 ** k - 1) + 0.5) * step - a)) ** 2)
                        .mean((1, 2)).min())
        assert mse < 0.9 * uniform, (k, mse, uniform)


def test_shipped_tables_are_the_trained_ones():
    for k in (2, 3, 4):
        torch.testing.assert_close(trellis_table(10, k) - 4, train_table(10, k), atol=1e-5, rtol=0)


def _problem(E=2, O=96, C=32, seed=3):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(E, O, C, generator=g)
    X = torch.randn(E, 4 * C, C, generator=g) @ torch.randn(C, C, generator=g)  # correlated inputs
    return W, X.transpose(1, 2) @ X


def test_gptq_with_the_trellis_beats_searching_columns_alone():
    W, H = _problem()
    grid = TrellisGrid(3, group_size=16)
    gptq = gptq_quantize(W, H, grid)
    alone = gptq_quantize(W, torch.zeros_like(H), grid)  # identity Hessian: no error feedback
    assert gptq.codes.dtype == torch.int16
    assert float(proxy_loss(W, gptq.weight, H).sum()) < float(proxy_loss(W, alone.weight, H).sum())
    torch.testing.assert_close(gptq.weight, grid.dequant(gptq.codes, gptq.scales.repeat_interleave(16, -1),
                                                         gptq.zeros.repeat_interleave(16, -1)))
    # the same size as 3-bit scalar GPTQ with its group parameters, and lower error than it
    scalar = gptq_quantize(W, H, QuantGrid(3, 16))
    assert float(proxy_loss(W, gptq.weight, H).sum()) < float(proxy_loss(W, scalar.weight, H).sum())


def _paths_ok(codes, grid, rows):
    """Along every column, the rows of each sequence (in layout order) form a tail-biting path."""
    idx = grid.layout(rows)
    k, lo = grid.bits, (1 << (grid.state_bits - grid.bits)) - 1
    for seq in idx.view(-1, grid.seq):
        real = seq[seq >= 0]
        if len(real) < grid.seq:
            continue  # a padded sequence: its padding states are not stored
        st = codes[:, real].long()  # [E, n, C]
        if not (torch.equal(st[:, 1:] >> k, st[:, :-1] & lo) and torch.equal(st[:, 0] >> k, st[:, -1] & lo)):
            return False
    return True


def test_rounds_and_refit_never_increase_the_error_and_keep_valid_paths():
    W, H = _problem(O=128)
    grid = TrellisGrid(3, group_size=16, blocks=(64, 64))
    res = gptq_quantize(W, H, grid)
    e0 = float(row_errors(W, res.weight, H).sum())
    refit = refit_trellis(W, H, res, grid)
    assert float(row_errors(W, refit.weight, H).sum()) <= e0
    out, history = trellis_rounds(W, H, res, grid, lambda p: gptq_quantize(W, H, grid, params=p), rounds=2)
    assert all(b <= a for a, b in zip(history, history[1:]))
    assert float(row_errors(W, out.weight, H).sum()) <= e0
    assert _paths_ok(out.codes, grid, 128)
    vals = grid.values(out.codes)
    torch.testing.assert_close(out.weight, (vals - out.zeros.repeat_interleave(16, -1)) *
                               out.scales.repeat_interleave(16, -1))


def test_sequences_never_cross_stored_weights():
    layout = row_layout((64, 40, 24), 64)
    assert layout.numel() == 64 * 3
    blocks = [layout[:64], layout[64:128], layout[128:]]
    assert sorted(blocks[0].tolist()) == list(range(64))
    assert sorted(x for x in blocks[1].tolist() if x >= 0) == list(range(64, 104))
    assert sorted(x for x in blocks[2].tolist() if x >= 0) == list(range(104, 128))
    seq = row_sequences(TrellisGrid(3, blocks=(64, 40, 24)), 128)
    assert seq[:64].unique().tolist() == [0] and seq[64:104].unique().tolist() == [1]
    with pytest.raises(ValueError, match="do not add up"):
        TrellisGrid(3, blocks=(64, 32)).layout(128)
