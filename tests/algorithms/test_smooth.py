"""algorithms/smooth folds: the full-precision function is unchanged, and the inputs are left as they were."""

import torch

from moecompress.algorithms.smooth import fold_down, fold_into_columns, fold_into_norm, moe_smooth_scales


def test_norm_and_consumer_fold_keep_the_function():
    g = torch.Generator().manual_seed(0)
    T, C, O = 7, 16, 5
    x, w, b = torch.randn(T, C, generator=g), torch.rand(C, generator=g) + 0.5, torch.randn(C, generator=g)
    W = torch.randn(O, C, generator=g)
    s = torch.rand(C, generator=g) * 3 + 0.1
    before = (w.clone(), b.clone(), W.clone())
    w2, b2 = fold_into_norm(w, b, s)
    W2 = fold_into_columns(W, s)
    torch.testing.assert_close((x * w2 + b2) @ W2.T, (x * w + b) @ W.T, rtol=1e-5, atol=1e-5)
    assert fold_into_norm(w, None, s)[1] is None
    assert all(torch.equal(a, c) for a, c in zip(before, (w, b, W)))  # pure: the inputs are untouched


def test_down_fold_keeps_each_glu_expert():
    g = torch.Generator().manual_seed(1)
    E, I, H, T = 3, 6, 8, 5
    gate, up, down = torch.randn(E, I, H, generator=g), torch.randn(E, I, H, generator=g), torch.randn(E, H, I, generator=g)
    bias = torch.randn(E, I, generator=g)
    sd = torch.rand(E, I, generator=g) * 2 + 0.5
    x = torch.randn(T, H, generator=g)
    up2, down2, bias2 = fold_down(up, down, sd, bias)
    for e in range(E):
        h = torch.nn.functional.silu(x @ gate[e].T) * (x @ up[e].T + bias[e])
        h2 = torch.nn.functional.silu(x @ gate[e].T) * (x @ up2[e].T + bias2[e])
        torch.testing.assert_close(h2 @ down2[e].T, h @ down[e].T, rtol=1e-4, atol=1e-5)
    assert fold_down(up, down, sd)[2] is None


def test_moe_scales_skip_experts_without_tokens():
    act, wmax = torch.rand(4, 8) + 0.1, torch.rand(4, 8) + 0.1
    assert moe_smooth_scales(act, wmax, torch.zeros(4), 0.5, router_act_max=torch.ones(8)) is None
    router = torch.ones(8)
    router[2] = 0  # a channel the router never saw keeps 1
    s = moe_smooth_scales(act, wmax, torch.tensor([3, 0, 1, 2]), 0.5, router_act_max=router)
    assert s.shape == (8,) and s[2] == 1 and bool((s > 0).all())
    alone = moe_smooth_scales(act[[0, 2, 3]], wmax[[0, 2, 3]], torch.tensor([3, 1, 2]), 0.5, router_act_max=router)
    assert torch.equal(s, alone)  # an expert without tokens does not vote
