"""`quantize --vocab-prior`: the first layer's attention-norm readers (query/key/value) read a function of the
token alone, so their Hessian is smoothed toward the whole vocabulary's (`runtime.layer_passes.vocab_prior`):
their error on the tokens the calibration text lacks falls, on every adapter."""

import pytest
import torch

from moecompress.context import Context
from moecompress.io.model import LoadedModel, tiny_tokenizer
from moecompress.models import find_arch
from moecompress.recipe import CalibrationConfig
from moecompress.runtime.calibration import dense_linears, norm_sources
from moecompress.stages import STAGES
from moecompress.stages.quantize import QuantizeConfig, plan_of
from moecompress.testing import FAMILY, tiny_moe


def test_the_prior_is_on_by_default_only_where_layer_0s_linears_take_3_bit_weights():
    def share(**kw):
        plan, meta = plan_of(QuantizeConfig(**kw))
        assert meta.get("vocab_prior", 0.0) == plan.vocab_prior  # recorded exactly when on
        return plan.vocab_prior

    assert share(scheme="w3a16") == 0.1
    assert share(scheme="w2a16", layer_bits={0: 3}) == 0.1  # layer 0's width decides
    for kw in ({"scheme": "w2a16"}, {"scheme": "w4a16"}, {"scheme": "w3a16", "linear_bits": 4},
               {"scheme": "w3a16", "layer_bits": {0: 4}}, {"scheme": "w3a16", "method": "rtn"}, {"scheme": "w3a16", "codec": "trellis"},
               {"scheme": "w3a4"}, {"scheme": "w3a16", "vocab_prior": 0.0}):
        assert share(**kw) == 0.0, kw
    assert share(scheme="w4a16", vocab_prior=0.5) == 0.5  # an explicit share anywhere
    with pytest.raises(ValueError):
        QuantizeConfig(scheme="w3a16", vocab_prior=-1.0)


def _readers(model, arch) -> dict[str, torch.nn.Linear]:
    """Layer 0's linears reading its attention norm's output (found by running the original model)."""
    layer = model.get_submodule(arch.layers)[0]
    views = [arch.block(model, 0)] if 0 in arch.moe_layer_indices(model.config) else []
    dense = dense_linears(layer, views)
    with norm_sources(layer, views, getattr(layer, arch.pre_attn_norm), dense) as src, torch.no_grad():
        model(input_ids=torch.arange(16)[None])
    return {n: dense[n] for n, s in src.items() if s == "attn_norm"}


@pytest.mark.parametrize("family", sorted(FAMILY))
def test_vocab_prior_lowers_the_first_layers_error_on_the_whole_vocabulary(family, tmp_path):
    original = tiny_moe(family)
    arch = find_arch(original.config)
    names = _readers(original, arch)
    assert names, "layer 0 has linears reading its attention norm"
    layer0 = original.get_submodule(arch.layers)[0]
    with torch.no_grad():  # what those linears read for every token of the vocabulary
        X = getattr(layer0, arch.pre_attn_norm)(original.get_input_embeddings().weight).float()
    err = {}
    for prior in (0.0, 2.0):
        model = tiny_moe(family)
        loaded = LoadedModel(model, tiny_tokenizer(), arch, "tiny", None, torch.float32)
        ctx = Context(loaded, CalibrationConfig(tasks=["prose"], samples=2, seq_len=32), tmp_path / str(prior))
        STAGES.get("quantize").run(ctx, QuantizeConfig(scheme="w3a16", group_size=8, save_format="fake-quant",
                                                       vocab_prior=prior))
        got = ctx.model.get_submodule(arch.layers)[0]
        err[prior] = sum(float(((got.get_submodule(n).weight.detach().float() - m.weight.detach().float()) @ X.T).pow(2).sum())
                         for n, m in names.items())
    # 64 calibration tokens leave most of the vocabulary unseen: the prior must pay there
    assert err[2.0] < 0.9 * err[0.0], err
