"""Keep plans: what transformers can load and what keeps each family's routing rule intact."""

import pytest
import torch

from moecompress.errors import MoecompressError
from moecompress.models import find_arch
from moecompress.models.surgery import check_keep, keep_experts
from moecompress.testing import FAMILY, DeviceMix, tiny_config, tiny_moe


def test_fewer_than_top_k_names_the_minimum():
    cfg = tiny_config("mixtral")
    arch = find_arch(cfg)
    with pytest.raises(MoecompressError, match="keeps 1 of 8 experts but top_k is 2: keep at least 2"):
        check_keep(arch, cfg, {0: [3], 1: [4]})


def test_uneven_counts_are_refused():
    cfg = tiny_config("qwen3_moe")
    arch = find_arch(cfg)
    with pytest.raises(MoecompressError, match="same number in every MoE layer"):
        check_keep(arch, cfg, {0: [0, 1, 2], 2: [0, 1, 2, 3]})


def test_bad_ids_and_layers_are_refused():
    cfg = tiny_config("qwen3_moe")  # layer 1 is dense
    arch = find_arch(cfg)
    with pytest.raises(MoecompressError, match="not MoE layers"):
        check_keep(arch, cfg, {1: [0, 1]})
    with pytest.raises(MoecompressError, match="distinct and in 0..7"):
        check_keep(arch, cfg, {0: [0, 8], 2: [0, 1]})
    with pytest.raises(MoecompressError, match="distinct"):
        check_keep(arch, cfg, {0: [1, 1], 2: [0, 1]})


def test_missing_layers_keep_everything():
    cfg = tiny_config("mixtral")
    plan = check_keep(find_arch(cfg), cfg, {})
    assert plan == {0: list(range(8)), 1: list(range(8))}


@pytest.mark.parametrize("family", ["deepseek_v3", "glm4_moe", "deepseek_v2"])
def test_group_limited_routing_needs_even_groups(family):
    cfg = tiny_config(family)  # 8 experts in 2 groups of 4, top-2, topk_group 1
    arch = find_arch(cfg)
    layers = arch.moe_layer_indices(cfg)
    uneven = {i: [0, 1, 2, 4, 5, 7][:5] + [3] for i in layers}  # 4 from group 0, 2 from group 1
    with pytest.raises(MoecompressError, match="routing groups"):
        check_keep(arch, cfg, uneven)
    even = {i: [0, 1, 4, 5] for i in layers}
    assert check_keep(arch, cfg, even)[layers[0]] == [0, 1, 4, 5]


def test_group_limited_routing_needs_two_per_group_for_top2_sum():
    cfg = tiny_config("deepseek_v3")
    arch = find_arch(cfg)
    with pytest.raises(MoecompressError, match="per group"):
        check_keep(arch, cfg, {i: [0, 4] for i in arch.moe_layer_indices(cfg)})


@torch.no_grad()
def test_regroup_rewrites_grouping_and_still_runs():
    model = tiny_moe("deepseek_v3")
    arch = find_arch(model.config)
    plan = {i: [0, 1, 2, 3, 5] for i in arch.moe_layer_indices(model.config)}  # 4 + 1: uneven
    keep_experts(model, arch, plan, regroup=True)
    assert model.config.n_group == 1 and model.config.topk_group == 1 and model.config.n_routed_experts == 5
    for view in arch.moe_blocks(model):
        x = torch.randn(10, model.config.hidden_size)
        torch.testing.assert_close(view.forward(x), view.call_block(x[None])[0], atol=1e-5, rtol=0)
    model(input_ids=torch.randint(0, 256, (1, 6)))


def test_dense_and_unknown_models_get_clear_errors():
    from transformers import AutoConfig

    with pytest.raises(MoecompressError, match="'llama' is a dense model, not a Mixture-of-Experts"):
        find_arch(AutoConfig.for_model("llama"))
    with pytest.raises(MoecompressError, match="unknown MoE architecture 'dbrx'.*moecompress/models/dbrx.py"):
        find_arch(_fake("dbrx", num_local_experts=16))
    with pytest.raises(MoecompressError, match="has no MoE layers"):
        find_arch(tiny_config("qwen2_moe", num_experts=0))


def _fake(model_type, **kw):
    from transformers import PretrainedConfig

    cfg = PretrainedConfig(**kw)
    cfg.model_type = model_type
    return cfg


@pytest.mark.parametrize("family", sorted(FAMILY))
@torch.no_grad()
def test_keep_makes_no_tensor_off_the_model_device(family):
    """Pruning runs on the layers where they compute (``--device cuda``): the kept ids must be indexed on each
    tensor's own device (a CPU index into a CUDA tensor is an error in ``index_select``)."""
    model = tiny_moe(family).to("meta")
    arch = find_arch(model.config)
    plan = {i: [0, 1, 4, 5] for i in arch.moe_layer_indices(model.config)}
    with DeviceMix() as mix:
        keep_experts(model, arch, plan)
    assert mix.mixed == []
    for view in arch.moe_blocks(model):
        assert view.num_experts == 4 and view.router_weight.shape[0] == 4
        assert {p.device.type for p in view.block.parameters()} == {"meta"}
