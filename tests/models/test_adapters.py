"""Every registered family: the adapter recomputes the block, captures routing exactly, and prunes
into a checkpoint that plain transformers reloads in a process that never imports moecompress."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from moecompress.algorithms.routing import route
from moecompress.models import ARCHS, find_arch
from moecompress.models.surgery import keep_experts
from moecompress.runtime.hooks import capture_routing
from moecompress.io.model import LoadedModel, save_model, tiny_tokenizer
from moecompress.testing import FAMILY, tiny_moe

FAMILIES = sorted(FAMILY)


def test_every_registered_arch_has_a_tiny_config():
    for name, arch in ARCHS.items():
        assert arch.name in FAMILY, f"add a tiny config for {name} to moecompress/testing.py FAMILY"


def test_the_issue_families_are_registered():
    wanted = {"mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3", "gpt_oss", "phimoe",
              "granitemoe", "glm4_moe", "ernie4_5_moe", "hunyuan_v1_moe"}
    assert wanted <= set(ARCHS.names())


def _ids(model, seed=0, batch=2, seq=12):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, seq), generator=g)


def _block_inputs(model, arch, ids):
    """The real inputs each MoE block receives during a forward pass: {layer: [B, S, H]}."""
    got, handles = {}, []
    for v in arch.moe_blocks(model):
        handles.append(v.block.register_forward_pre_hook(lambda m, a, i=v.index: got.__setitem__(i, a[0].detach())))
    try:
        with torch.no_grad():
            model(input_ids=ids)
    finally:
        for h in handles:
            h.remove()
    return got


@pytest.mark.parametrize("family", FAMILIES)
def test_moe_layers_match_the_modules(family):
    model = tiny_moe(family)
    arch = find_arch(model.config)
    layers = arch.decoder_layers(model)
    for i, layer in enumerate(layers):
        block = getattr(layer, arch.moe_block, None)
        has_router = block is not None and hasattr(block, arch.router)
        assert has_router == (i in arch.moe_layer_indices(model.config)), f"layer {i}"
    assert len(arch.moe_layer_indices(model.config)) >= 2


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_block_recomputed_from_adapter_alone(family):
    model = tiny_moe(family)
    arch = find_arch(model.config)
    inputs = _block_inputs(model, arch, _ids(model))
    for view in arch.moe_blocks(model):
        for x in (inputs[view.index], torch.randn(3, 5, model.config.hidden_size)):
            ref = view.call_block(x).reshape(-1, x.shape[-1])
            mine = view.forward(x.reshape(-1, x.shape[-1]))
            torch.testing.assert_close(mine, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_routing_capture_is_the_models_topk(family):
    model = tiny_moe(family)
    arch = find_arch(model.config)
    ids = _ids(model, seed=1)
    inputs = _block_inputs(model, arch, ids)
    with capture_routing(model, arch) as traces:
        out = model(input_ids=ids, output_router_logits=True)
    assert sorted(traces) == arch.moe_layer_indices(model.config)
    for j, view in enumerate(arch.moe_blocks(model)):
        logits, index, weights = traces[view.index].cat()
        T = ids.numel()
        assert index.shape == (T, view.routing.top_k) and weights.shape == index.shape
        # The model's own router-logit output (transformers' output_router_logits) is what we captured.
        torch.testing.assert_close(logits, out.router_logits[j].float().reshape(T, -1), atol=0, rtol=0)
        # The adapter's routing rule, applied to the captured logits, picks exactly the same experts.
        x = inputs[view.index].reshape(T, -1)
        _, w_ref, i_ref = view.route(x)
        order, order_ref = index.argsort(dim=-1), i_ref.argsort(dim=-1)
        assert torch.equal(index.gather(-1, order), i_ref.gather(-1, order_ref))
        torch.testing.assert_close(weights.gather(-1, order), w_ref.gather(-1, order_ref), atol=1e-6, rtol=1e-6)
        cb = view.correction_bias
        w2, i2 = route(logits, view.routing, None if cb is None else cb.reshape(-1))
        assert torch.equal(i2.sort(dim=-1).values, index.sort(dim=-1).values)


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_keeping_every_expert_is_the_identity(family):
    model = tiny_moe(family)
    arch = find_arch(model.config)
    ids = _ids(model)
    before = model(input_ids=ids).logits
    n = arch.num_experts(model.config)
    plan = keep_experts(model, arch, {i: range(n) for i in arch.moe_layer_indices(model.config)})
    assert all(v == list(range(n)) for v in plan.values())
    assert torch.equal(model(input_ids=ids).logits, before)
    assert arch.num_experts(model.config) == n


def _subset(arch, config, layer_pos):
    """Keep 6 of 8 experts, a different set per layer, the same number from every routing group."""
    plans = ([0, 1, 2, 4, 5, 6], [1, 2, 3, 5, 6, 7], [0, 2, 3, 4, 6, 7])
    return plans[layer_pos % len(plans)]


FRESH_PROCESS = textwrap.dedent("""
    import json, sys, torch
    from transformers import AutoModelForCausalLM
    out = {}
    for family, path in json.loads(sys.argv[1]).items():
        m = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        m.eval()
        ids = torch.tensor(json.loads(sys.argv[2]))
        with torch.no_grad():
            logits = m(input_ids=ids).logits
            gen = m.generate(ids[:1, :4], max_new_tokens=3, min_new_tokens=3, do_sample=False)
        experts = {n: tuple(p.shape) for n, p in m.named_parameters() if n.endswith("gate_up_proj")}
        out[family] = {"logits": logits.tolist(), "experts": experts, "gen": gen.shape[1]}
    assert "moecompress" not in sys.modules
    json.dump(out, open(sys.argv[3], "w"))
""")


@pytest.fixture(scope="module")
def pruned_and_reloaded(tmp_path_factory):
    """Prune every family, save, and reload all of them in one fresh python process."""
    root = tmp_path_factory.mktemp("pruned")
    ids = _ids(None, seed=2).tolist()
    models, paths = {}, {}
    for family in FAMILIES:
        model = tiny_moe(family)
        arch = find_arch(model.config)
        keep = {i: _subset(arch, model.config, j) for j, i in enumerate(arch.moe_layer_indices(model.config))}
        keep_experts(model, arch, keep)
        save_model(LoadedModel(model, tiny_tokenizer(), arch, family, None, torch.float32), root / family)
        models[family], paths[family] = (model, arch), str(root / family)
    result = root / "result.json"
    subprocess.run([sys.executable, "-c", FRESH_PROCESS, json.dumps(paths), json.dumps(ids), str(result)],
                   check=True, cwd=root)
    return models, paths, torch.tensor(ids), json.loads(result.read_text())


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_pruned_checkpoint_reloads_with_plain_transformers(family, pruned_and_reloaded):
    models, paths, ids, fresh = pruned_and_reloaded
    model, arch = models[family]
    cfg = json.loads(open(f"{paths[family]}/config.json").read())
    for key in arch.num_experts_keys:
        assert cfg[key] == 6
    assert arch.num_experts(model.config) == 6
    for view in arch.moe_blocks(model):
        assert view.num_experts == 6 and view.router_weight.shape[0] == 6
    got = fresh[family]
    assert got["gen"] == 7
    torch.testing.assert_close(torch.tensor(got["logits"]), model(input_ids=ids).logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_pruned_block_keeps_the_routing_rule(family):
    """After pruning, the real block still equals the adapter's recomputation (router rows, biases and
    expert tensors were sliced consistently and cached counts updated)."""
    model = tiny_moe(family)
    arch = find_arch(model.config)
    keep_experts(model, arch, {i: _subset(arch, model.config, j)
                               for j, i in enumerate(arch.moe_layer_indices(model.config))})
    for view in arch.moe_blocks(model):
        x = torch.randn(2, 9, model.config.hidden_size)
        torch.testing.assert_close(view.forward(x.reshape(-1, x.shape[-1])),
                                   view.call_block(x).reshape(-1, x.shape[-1]), atol=1e-5, rtol=0)
