"""Expert views agree with each other and with the storage they wrap."""

import pytest
import torch
from torch import nn

from moecompress.models import FusedExperts, ListExperts, find_arch
from moecompress.testing import tiny_moe
from moecompress.types import Proj


def _mlp(H, I):
    m = nn.Module()
    m.gate_proj, m.up_proj, m.down_proj = nn.Linear(H, I, bias=False), nn.Linear(H, I, bias=False), nn.Linear(I, H, bias=False)
    return m


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss"])
def test_fused_stacked_roundtrip_and_layout(family):
    model = tiny_moe(family)
    view = find_arch(model.config).moe_blocks(model)[0].experts
    assert isinstance(view, FusedExperts)
    E, H = view.num_experts, model.config.hidden_size
    gate, up, down = (view.stacked(p).clone() for p in Proj)
    I = gate.shape[1]
    assert gate.shape == (E, I, H) and up.shape == (E, I, H) and down.shape == (E, H, I)
    raw = view.module.gate_up_proj
    if family == "gpt_oss":  # [E, H, 2I], interleaved columns
        assert torch.equal(raw[2, :, 0::2].T, gate[2]) and torch.equal(raw[2, :, 1::2].T, up[2])
        assert torch.equal(view.module.down_proj[2].T, down[2])
        assert view.bias(Proj.GATE).shape == (E, I) and view.bias(Proj.DOWN).shape == (E, H)
    else:  # [E, 2I, H], gate rows first
        assert torch.equal(raw[2, :I], gate[2]) and torch.equal(raw[2, I:], up[2])
        assert view.bias(Proj.GATE) is None
    # set_stacked writes exactly the projection asked for
    view.set_stacked(Proj.UP, up * 2)
    assert torch.equal(view.stacked(Proj.UP), up * 2)
    assert torch.equal(view.stacked(Proj.GATE), gate) and torch.equal(view.stacked(Proj.DOWN), down)
    view.set_stacked(Proj.DOWN, down + 1)
    assert torch.equal(view.stacked(Proj.DOWN), down + 1)


def test_list_view_matches_fused_view_and_keeps():
    model = tiny_moe("mixtral")
    fused = find_arch(model.config).moe_blocks(model)[0].experts
    E, H = fused.num_experts, model.config.hidden_size
    I = fused.stacked(Proj.GATE).shape[1]
    mlps = nn.ModuleList(_mlp(H, I) for _ in range(E))
    lst = ListExperts(mlps)
    for p in Proj:
        lst.set_stacked(p, fused.stacked(p))
        assert torch.equal(lst.stacked(p), fused.stacked(p))
        assert torch.equal(lst.weight(3, p), fused.weight(3, p))
    lst.keep([1, 5, 6])
    fused.keep([1, 5, 6])
    assert lst.num_experts == fused.num_experts == 3
    for p in Proj:
        assert torch.equal(lst.stacked(p), fused.stacked(p))
    assert fused.module.num_experts == 3


def test_projections_can_be_named_by_string():
    model = tiny_moe("gpt_oss")
    view = find_arch(model.config).moe_blocks(model)[0].experts
    assert torch.equal(view.stacked("gate"), view.stacked(Proj.GATE))
    lst = ListExperts(_mlp(8, 4))
    assert torch.equal(lst.stacked("down"), lst.stacked(Proj.DOWN))


def test_single_mlp_is_a_list_of_one():
    view = ListExperts(_mlp(8, 4))
    assert view.num_experts == 1 and view.stacked(Proj.DOWN).shape == (1, 8, 4)
    with pytest.raises(TypeError):
        view.keep([0])
