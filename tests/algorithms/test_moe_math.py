"""`algorithms.moe_math.expert_intermediate`: one expert's intermediate, computed in the model's dtype."""

import pytest
import torch

from moecompress.algorithms.moe_math import RoutedTokens, expert_intermediate
from moecompress.types import Activation

ACTS = [Activation(), Activation(kind="clamped_swiglu", alpha=1.702, limit=7.0)]


def _reference(x, gate, up, gb, ub, act):
    g, u = x.double() @ gate.double().T + gb.double(), x.double() @ up.double().T + ub.double()
    if act.kind == "clamped_swiglu":
        g, u = g.clamp(max=act.limit), u.clamp(-act.limit, act.limit)
        return (u + 1) * g * torch.sigmoid(g * act.alpha)
    return torch.nn.functional.silu(g) * u


@pytest.mark.parametrize("act", ACTS, ids=lambda a: a.kind)
def test_float32_matches_the_formula(act):
    gen = torch.Generator().manual_seed(0)
    x, gate, up = (torch.randn(s, generator=gen) for s in ((50, 16), (24, 16), (24, 16)))
    gb, ub = torch.randn(24, generator=gen), torch.randn(24, generator=gen)
    h = expert_intermediate(x, gate, up, gb, ub, act, torch.float32)
    assert h.dtype == torch.float32 and h.shape == (50, 24)
    torch.testing.assert_close(h.double(), _reference(x, gate, up, gb, ub, act), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("act", ACTS, ids=lambda a: a.kind)
def test_bfloat16_is_computed_in_bfloat16(act):
    """A bf16 model's down projection reads bf16 intermediates: the values returned are bf16 values (float32
    arithmetic would give values bf16 cannot hold), within bf16 rounding of the exact ones."""
    gen = torch.Generator().manual_seed(1)
    x, gate, up = (torch.randn(s, generator=gen).bfloat16().float() for s in ((50, 16), (24, 16), (24, 16)))
    h = expert_intermediate(x, gate.bfloat16(), up.bfloat16(), None, None, act, torch.bfloat16)
    assert h.dtype == torch.float32
    assert torch.equal(h.bfloat16().float(), h)
    zero = torch.zeros(24)
    torch.testing.assert_close(h.double(), _reference(x, gate, up, zero, zero, act), rtol=3e-2, atol=3e-2)
    assert not torch.equal(h, expert_intermediate(x, gate, up, None, None, act, torch.float32))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_routed_tokens_match_a_scan_per_expert(dtype):
    """One sort gives each expert the same tokens, in the same order, and the same gates as scanning ``index``
    for it; experts no token chose (12..15 here) get none."""
    g = torch.Generator().manual_seed(0)
    T, K, E = 97, 3, 16
    index = torch.rand(T, 12, generator=g).argsort(-1)[:, :K]  # distinct experts per token, all below 12
    weights = torch.rand(T, K, generator=g).to(dtype)
    groups = RoutedTokens.group(index, weights, E)
    assert groups.bounds[-1] == T * K
    for e in range(E):
        routed = index == e
        tokens, gates = groups.of(e)
        assert torch.equal(tokens, routed.any(1).nonzero().squeeze(-1))
        assert torch.equal(gates, (weights * routed).sum(1)[tokens])
        assert (len(tokens) == 0) == (e >= 12)
