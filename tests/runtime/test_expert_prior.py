"""`quantize --expert-prior`: the first layer's routed experts read mostly a function of the token, so each
expert's Hessian is smoothed toward its gate-weighted share of the vocabulary's one-token sequences through
layer 0 (`runtime.layer_passes.expert_prior`): their error on the tokens the calibration text lacks falls, on
every adapter; the vocabulary rows are layer 0's own inputs for those tokens."""

import pytest
import torch

from moecompress.algorithms.gram import routed_gram
from moecompress.context import Context
from moecompress.io.model import LoadedModel, tiny_tokenizer
from moecompress.models import find_arch
from moecompress.models.calls import experts_call_args
from moecompress.recipe import CalibrationConfig
from moecompress.runtime.executor import VOCAB_CHUNK, LayerStream, ModelSource
from moecompress.stages import STAGES
from moecompress.stages.quantize import QuantizeConfig, plan_of
from moecompress.testing import FAMILY, tiny_moe

# the tiny configs whose layer 0 is dense, made sparse there (the prior is layer 0's)
LAYER0_MOE = {"deepseek_v2": {"first_k_dense_replace": 0}, "deepseek_v3": {"first_k_dense_replace": 0},
              "glm4_moe": {"first_k_dense_replace": 0}, "qwen2_moe": {"mlp_only_layers": [1]},
              "ernie4_5_moe": {"moe_layer_start_index": 0}}


def test_the_prior_is_off_by_default_and_applies_at_any_width_when_given():
    def share(**kw):
        plan, meta = plan_of(QuantizeConfig(**kw))
        assert meta.get("expert_prior", 0.0) == plan.expert_prior  # recorded exactly when on
        return plan.expert_prior

    for scheme in ("w2a16", "w3a16", "w4a16", "w3a4"):
        assert share(scheme=scheme) == 0.0
        assert share(scheme=scheme, expert_prior=0.5) == 0.5
    with pytest.raises(ValueError):
        QuantizeConfig(scheme="w3a16", expert_prior=-1.0)


def _vocab_inputs(model, arch):
    """Layer 0's input and its experts' ``(x, index, weights)`` for every token as a one-token sequence."""
    layer = model.get_submodule(arch.layers)[0]
    got = {}

    def keep(key, value) -> None:  # a pre-hook returning a value would replace the call's arguments
        got.setdefault(key, value)
    h1 = layer.register_forward_pre_hook(lambda m, a, kw: keep("h", a[0] if a else kw["hidden_states"]),
                                         with_kwargs=True)
    h2 = arch.block(model, 0).experts.module.register_forward_pre_hook(
        lambda m, a, kw: keep("x", experts_call_args(a, kw)), with_kwargs=True)
    try:
        with torch.no_grad():
            model(input_ids=torch.arange(model.config.vocab_size)[:, None])
    finally:
        h1.remove()
        h2.remove()
    x, index, weights = got["x"]
    return got["h"][:, 0], x.reshape(-1, x.shape[-1]).float(), index.reshape(-1, index.shape[-1]), weights.float()


@pytest.mark.parametrize("family", sorted(FAMILY))
def test_the_streams_vocabulary_rows_are_layer_0s_inputs(family):
    model = tiny_moe(family, **LAYER0_MOE.get(family, {}))
    arch = find_arch(model.config)
    h, *_ = _vocab_inputs(model, arch)
    stream = LayerStream(ModelSource(model.config, arch, model=model), [torch.arange(8)[None]], vocab_rows=100)
    step = -(-model.config.vocab_size // 100)
    assert torch.equal(stream.vocab, h[::step])  # every step-th token, as layer 0 reads it
    assert len(stream.vocab_kwargs) == -(-len(stream.vocab) // VOCAB_CHUNK)
    stream.drop_vocab()
    assert stream.vocab is None and stream.vocab_kwargs == []


@pytest.mark.parametrize("family", sorted(FAMILY))
def test_expert_prior_lowers_the_first_layers_expert_error_on_the_whole_vocabulary(family, tmp_path):
    overrides = LAYER0_MOE.get(family, {})
    original = tiny_moe(family, **overrides)
    arch = find_arch(original.config)
    _, X, index, weights = _vocab_inputs(original, arch)
    E = arch.block(original, 0).num_experts
    G = [routed_gram(X, index, weights, e) for e in range(E)]  # what each expert sees of the vocabulary
    W = {p: arch.block(original, 0).experts.stacked(p).detach().float().clone() for p in ("gate", "up")}
    err = {}
    for prior in (0.0, 2.0):
        model = tiny_moe(family, **overrides)
        loaded = LoadedModel(model, tiny_tokenizer(), arch, "tiny", None, torch.float32)
        ctx = Context(loaded, CalibrationConfig(tasks=["prose"], samples=2, seq_len=32), tmp_path / str(prior))
        STAGES.get("quantize").run(ctx, QuantizeConfig(scheme="w3a16", group_size=8, save_format="fake-quant",
                                                       vocab_prior=0.0, expert_prior=prior))
        view = arch.block(ctx.model, 0)
        err[prior] = sum(float(((view.experts.stacked(p)[e].detach().float() - W[p][e]) @ G[e]
                                * (view.experts.stacked(p)[e].detach().float() - W[p][e])).sum())
                         for p in W for e in range(E))
    # 64 calibration tokens leave most of the vocabulary unseen: the prior must pay there
    assert err[2.0] < 0.9 * err[0.0], err
