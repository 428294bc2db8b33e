"""The stages make no tensor on the CPU while a decoder layer runs on the compute device (`--device cuda`).

Without a GPU: every layer forward of the stream (the original layers' stream included) and every hook it fires
run with torch's default device set to ``meta``, so a factory call without ``device=`` (a CPU buffer on a GPU run)
makes a meta tensor there, and the first operator mixing it with the layer's real tensors fails, naming the line.
On a GPU run such a tensor is an error (``index_add_``/``index_select`` with a CPU index) or a hidden host round
trip. Found this way: the profile's routing sums (`algorithms.expert_scores.routing_statistics`).
"""

import functools

import pytest
import torch

import moecompress.eval.expert_sets as expert_sets
import moecompress.runtime.executor as executor
import moecompress.runtime.layer_passes as layer_passes
import moecompress.stages.patterns as patterns_stage
import moecompress.stages.retrieve as retrieve_stage
import moecompress.runtime.quantize_run as quantize_run
from moecompress.context import Context
from moecompress.io.model import LoadedModel, tiny_tokenizer
from moecompress.models import find_arch
from moecompress.recipe import CalibrationConfig
from moecompress.stages import STAGES
from moecompress.stages.evaluate import EvaluateConfig
from moecompress.stages.profile import ProfileConfig
from moecompress.stages.prune import PruneConfig
from moecompress.stages.quantize import QuantizeConfig
from moecompress.testing import FAMILY, tiny_moe


def _meta_default(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with torch.device("meta"):
            return fn(*args, **kwargs)
    return wrapper


@pytest.fixture
def layers_on_meta_default(monkeypatch):
    monkeypatch.setattr(executor.LayerStream, "run_layer", _meta_default(executor.LayerStream.run_layer))
    # the quantize stage's per-layer work between the layer runs: the linears, the experts (their down
    # projections' pairs replayed without a layer run), smoothing and the router
    for name in ("forward_layer", "quantize_linears", "quantize_experts", "smooth_layer", "quantize_router"):
        monkeypatch.setattr(quantize_run, name, _meta_default(getattr(quantize_run, name)))
    monkeypatch.setattr(layer_passes, "forward_layer", _meta_default(layer_passes.forward_layer))  # the probe's
    for stage in (patterns_stage, retrieve_stage):  # TAER's prompt probe
        monkeypatch.setattr(stage, "routing_signatures", _meta_default(stage.routing_signatures))
    for name in ("_run", "_pruned_copy", "_nll"):  # `prune --score auto`: candidate layers and their losses
        monkeypatch.setattr(expert_sets, name, _meta_default(getattr(expert_sets, name)))


def _ctx(family, tmp_path):
    model = tiny_moe(family)
    loaded = LoadedModel(model, tiny_tokenizer(), find_arch(model.config), "tiny", None, torch.float32)
    return Context(loaded, CalibrationConfig(tasks=["prose", "code"], samples=2, seq_len=32), tmp_path)


def test_the_harness_catches_a_cpu_buffer(layers_on_meta_default, tmp_path, monkeypatch):
    import moecompress.algorithms.expert_scores as es

    def on_cpu(index, values, E):  # the profile's sums as they were: a CPU buffer, the index on the device
        return torch.zeros(E, dtype=torch.float64, device="cpu").index_add_(0, index.reshape(-1).cpu(),
                                                                             values.reshape(-1).double().cpu())

    def made_without_device(index, values, E):
        return torch.zeros(E, dtype=torch.float64).index_add_(0, index.reshape(-1), values.reshape(-1).double())

    monkeypatch.setattr(es, "_scatter_sum", on_cpu)  # explicit transfers are fine
    STAGES.get("profile").run(_ctx("mixtral", tmp_path / "a"), ProfileConfig())
    monkeypatch.setattr(es, "_scatter_sum", made_without_device)
    with pytest.raises(RuntimeError, match="device"):
        STAGES.get("profile").run(_ctx("mixtral", tmp_path / "b"), ProfileConfig())


@pytest.mark.parametrize("family", sorted(FAMILY))
def test_profile_and_w2_quantize_make_nothing_off_device(family, layers_on_meta_default, tmp_path):
    ctx = _ctx(family, tmp_path)
    STAGES.get("profile").run(ctx, ProfileConfig())
    STAGES.get("quantize").run(ctx, QuantizeConfig(scheme="w2a16"))


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "deepseek_v3"])
def test_prune_auto_makes_nothing_off_device(family, layers_on_meta_default, tmp_path):
    ctx = _ctx(family, tmp_path)
    STAGES.get("profile").run(ctx, ProfileConfig())
    STAGES.get("prune").run(ctx, PruneConfig(keep=4, auto_samples=2))


@pytest.mark.parametrize("settings", [dict(scheme="w4a4"), dict(scheme="w8a8"),
                                      dict(scheme="w3a16", router_bits=8, align_router=True),
                                      dict(scheme="w2a16", sequential_targets="layer"),
                                      dict(scheme="w4a16", rotate=True),
                                      dict(scheme="w3a16", codec="trellis", gptq_rounds=1)],
                         ids=["w4a4", "w8a8", "w3-router", "w2-layer-targets", "w4-rotate", "w3-trellis"])
def test_quantize_variants_and_eval_make_nothing_off_device(settings, layers_on_meta_default, tmp_path):
    ctx = _ctx("qwen2_moe", tmp_path)  # shared experts and a dense layer
    STAGES.get("quantize").run(ctx, QuantizeConfig(**settings))
    STAGES.get("evaluate").run(ctx, EvaluateConfig(baseline=None, samples=2))


def test_taer_patterns_and_retrieve_make_nothing_off_device(layers_on_meta_default, tmp_path):
    from moecompress.io.model import save_model
    from moecompress.pipeline import run
    from moecompress.recipe import validate_recipe

    model = tiny_moe("deepseek_v3")
    d = tmp_path / "model"
    save_model(LoadedModel(model, tiny_tokenizer(), find_arch(model.config), "tiny", None, torch.float32), d)
    calib = {"tasks": ["prose", "code"], "samples": 2, "seq_len": 32}
    run(validate_recipe({"calibration": calib, "stages": [{"stage": "profile"}]}), model=str(d), output=tmp_path / "p")
    run(validate_recipe({"calibration": calib, "stages": [{"stage": "patterns", "profile": str(tmp_path / "p")}]}),
        model=str(d), output=tmp_path / "store")
    r = run(validate_recipe({"stages": [{"stage": "retrieve", "store": str(tmp_path / "store"), "keep": 4,
                                         "prompt": "The quick brown fox jumps over the lazy dog. " * 4}]}),
            model=str(d), output=tmp_path / "out").report["stages"][0]["result"]
    assert all(len(v) == 4 for v in r["kept_experts"].values())
