"""The down projection's target on quantized inputs (GPTAQ's asymmetric calibration, closed form)."""

import torch

from moecompress.algorithms.asym_calib import corrected_weight


def _problem(seed, E=3, H=12, I=16, T=400, noise=0.3):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(E, H, I, generator=g)
    h = torch.randn(E, T, I, generator=g) @ torch.randn(E, I, I, generator=g)  # correlated intermediates
    hq = h + noise * torch.randn(E, T, I, generator=g) + 0.2 * h.roll(1, -1)  # quantized gate/up: other inputs
    gate = torch.rand(E, T, generator=g)
    hw, hqw = h * gate.sqrt()[..., None], hq * gate.sqrt()[..., None]
    return W, h, hq, gate, hqw.transpose(1, 2) @ hqw, hw.transpose(1, 2) @ hqw


def _loss(W, h, hq, gate, Q):  # sum_t g_t |W h_t - Q hq_t|^2 per expert
    r = h @ W.transpose(1, 2) - hq @ Q.transpose(1, 2)
    return (gate * (r ** 2).sum(-1)).sum(-1).double()


def test_equal_inputs_keep_the_weights():
    W, h, _, gate, _, _ = _problem(0)
    hw = h * gate.sqrt()[..., None]
    H = hw.transpose(1, 2) @ hw
    torch.testing.assert_close(corrected_weight(W, H, H), W, atol=1e-4, rtol=1e-4)


def test_the_target_is_the_least_squares_weight_on_quantized_inputs():
    W, h, hq, gate, Hq, C = _problem(1)
    Wp = corrected_weight(W, C, Hq, damp=1e-7)
    s = gate.sqrt()[..., None]
    for e in range(W.shape[0]):
        ls = torch.linalg.lstsq((hq[e] * s[e]).double(), (h[e] @ W[e].T * s[e]).double()).solution.T
        torch.testing.assert_close(Wp[e].double(), ls, atol=1e-3, rtol=1e-3)
    # and it beats the original weight on the error the down projection is judged by
    assert (_loss(W, h, hq, gate, Wp) < _loss(W, h, hq, gate, W)).all()


def test_gptq_on_the_target_minimises_the_true_error_up_to_a_constant():
    """sum g |W h - Q hq|^2 = sum g |(W' - Q) hq|^2 + const for every Q: the objective GPTQ gets is exact."""
    W, h, hq, gate, Hq, C = _problem(2)
    Wp = corrected_weight(W, C, Hq, damp=1e-7)
    g = torch.Generator().manual_seed(3)
    diffs = []
    for _ in range(3):
        Q = Wp + 0.5 * torch.randn(Wp.shape, generator=g)
        proxy = _loss(Wp, hq, hq, gate, Q)  # |(W' - Q) hq|^2
        diffs.append(_loss(W, h, hq, gate, Q) - proxy)
    for d in diffs[1:]:
        torch.testing.assert_close(d, diffs[0], rtol=1e-3, atol=1e-2)


def test_damping_shrinks_toward_the_weight_and_no_token_keeps_it():
    W, h, hq, gate, Hq, C = _problem(4)
    near = (corrected_weight(W, C, Hq, damp=1e-6) - W).norm()
    far = (corrected_weight(W, C, Hq, damp=10.0) - W).norm()
    assert far < near
    Hq[1] = 0
    C[1] = 0
    torch.testing.assert_close(corrected_weight(W, C, Hq)[1], W[1])
