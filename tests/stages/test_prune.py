"""Pruning from a profile: the right experts, exact outputs where routing is unaffected, loadable results."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from moecompress.algorithms.pruning import cumulative_counts, select_experts
from moecompress.context import Context
from moecompress.errors import MoecompressError
from moecompress.models import find_arch
from moecompress.recipe import CalibrationConfig
from moecompress.runtime.hooks import capture_routing
from moecompress.io.model import LoadedModel, save_model, tiny_tokenizer
from moecompress.stages import STAGES
from moecompress.stages.profile import ProfileConfig
from moecompress.stages.prune import PruneConfig
from moecompress.testing import FAMILY, tiny_config, tiny_moe


def _ctx(model, tmp_path, **calib):
    loaded = LoadedModel(model, tiny_tokenizer(), find_arch(model.config), "tiny", None, torch.float32)
    return Context(loaded, CalibrationConfig(**{"tasks": ["prose"], "samples": 3, "seq_len": 32, **calib}), tmp_path)


def _profiled(family, tmp_path, hot=(1, 5), **kw):
    model = tiny_moe(family, hot_experts=hot, **kw)
    ctx = _ctx(model, tmp_path)
    STAGES.get("profile").run(ctx, ProfileConfig())
    return model, ctx


def test_select_experts_by_score_groups_and_protection():
    s = torch.tensor([[5.0, 1.0, 4.0, 0.0, 3.0, 2.0, 9.0, 8.0]])
    assert select_experts(s, 3) == [[0, 6, 7]]
    assert select_experts(s, 4, n_group=2) == [[0, 2, 6, 7]]  # two from each group of four
    protect = torch.zeros(1, 8, dtype=torch.bool)
    protect[0, 3] = True
    assert select_experts(s, 3, protect) == [[3, 6, 7]]
    assert cumulative_counts(torch.tensor([[6.0, 3.0, 1.0, 0.0]]), 0.85, 1) == [2]
    assert cumulative_counts(torch.tensor([[6.0, 3.0, 1.0, 0.0]]), 0.95, 1) == [3]
    with pytest.raises(ValueError):
        cumulative_counts(torch.tensor([[-1.0, 2.0]]), 0.5, 1)


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "deepseek_v3", "gpt_oss", "ernie4_5_moe"])
@torch.no_grad()
def test_pruning_keeps_the_hot_experts_and_is_exact_where_routing_is_inside(family, tmp_path):
    hot = (1, 2) if family == "deepseek_v3" else (1, 5)
    model, ctx = _profiled(family, tmp_path, hot)
    arch = ctx.arch
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(5))
    with capture_routing(model, arch) as traces:
        before = model(input_ids=ids).logits
    used = {layer: sorted(set(traces[layer].cat()[1].flatten().tolist())) for layer in traces}
    keep = 4
    # a frequency profile of *these* tokens must keep every expert they use, if they use few enough
    cfg = PruneConfig(keep=keep, score="frequency")
    STAGES.get("prune").run(ctx, cfg)
    kept = ctx.artifacts["kept_experts"]
    for layer, ids_kept in kept.items():
        assert set(hot) <= set(ids_kept)
    if all(set(used[layer]) <= set(kept[layer]) for layer in kept):
        torch.testing.assert_close(model(input_ids=ids).logits, before, atol=1e-5, rtol=0)


@torch.no_grad()
def test_outputs_equal_when_every_tokens_top_k_is_kept(tmp_path):
    """Profile exactly the evaluation tokens, keep every expert they route to: identical outputs."""
    model = tiny_moe("qwen3_moe", hot_experts=(0, 3))
    arch = find_arch(model.config)
    ctx = _ctx(model, tmp_path, samples=1, seq_len=16)
    x = ctx.windows("calib")["prose"]
    with capture_routing(model, arch) as traces:
        before = model(input_ids=x).logits
    need = max(len(set(traces[layer].cat()[1].flatten().tolist())) for layer in traces)
    STAGES.get("profile").run(ctx, ProfileConfig())
    STAGES.get("prune").run(ctx, PruneConfig(keep=max(need, 2), score="frequency"))
    for layer, kept in ctx.artifacts["kept_experts"].items():
        assert set(traces[layer].cat()[1].flatten().tolist()) <= set(kept)
    torch.testing.assert_close(model(input_ids=x).logits, before, atol=1e-5, rtol=0)


def test_keep_all_is_identity(tmp_path):
    model, ctx = _profiled("olmoe", tmp_path)
    x = torch.randint(0, 256, (1, 12))
    with torch.no_grad():
        before = model(input_ids=x).logits
        STAGES.get("prune").run(ctx, PruneConfig(keep_ratio=1.0, score="reap"))
        assert torch.equal(model(input_ids=x).logits, before)


@torch.no_grad()
def test_group_limited_pruning_stays_valid_and_reloads(tmp_path):
    model, ctx = _profiled("deepseek_v3", tmp_path, hot=(1, 6))
    STAGES.get("prune").run(ctx, PruneConfig(keep=4, score="tcess_prob"))
    kept = ctx.artifacts["kept_experts"]
    for ids in kept.values():
        assert sum(e < 4 for e in ids) == 2 and sum(e >= 4 for e in ids) == 2  # two per routing group
    assert model.config.n_group == 2 and model.config.n_routed_experts == 4
    for view in ctx.arch.moe_blocks(model):
        x = torch.randn(7, model.config.hidden_size)
        torch.testing.assert_close(view.forward(x), view.call_block(x[None])[0], atol=1e-5, rtol=0)
    save_model(ctx.loaded, tmp_path / "out")
    code = ("import sys, torch; from transformers import AutoModelForCausalLM; "
            f"m = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'out')!r}); "
            "m(input_ids=torch.tensor([[1, 2, 3]])); assert 'moecompress' not in sys.modules; "
            "print(m.config.n_routed_experts, m.config.n_group)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["4", "2"]


def test_budget_checks_name_the_fix():
    cfg = tiny_config("mixtral")
    arch = find_arch(cfg)
    with pytest.raises(MoecompressError, match="keeps 1 of 8 experts but top_k is 2: keep at least 2"):
        PruneConfig(keep_ratio=0.1).check(cfg, arch)
    with pytest.raises(MoecompressError, match="more than the model's 8 experts"):
        PruneConfig(keep=9).check(cfg, arch)
    ds = tiny_config("deepseek_v3")
    with pytest.raises(MoecompressError, match="not a multiple of the 2 routing groups"):
        PruneConfig(keep=5).check(ds, find_arch(ds))
    with pytest.raises(ValueError, match="exactly one budget"):
        PruneConfig(keep=2, keep_ratio=0.5)
    for score in ("tcess", "consensus"):
        with pytest.raises(ValueError, match="a score measured in shares"):
            PruneConfig(cumulative=0.9, score=score)


@torch.no_grad()
def test_cumulative_masks_uneven_layers_with_dead_experts(tmp_path):
    model, ctx = _profiled("gpt_oss", tmp_path, hot=(2, 3))
    STAGES.get("prune").run(ctx, PruneConfig(cumulative=0.6, score="frequency", uneven="mask"))
    arch = ctx.arch
    n = arch.num_experts(model.config)
    with capture_routing(model, arch) as traces:
        model(input_ids=torch.randint(0, 256, (2, 30)))
    for view in arch.moe_blocks(model):
        dead = (view.router_bias < -1e3).nonzero().flatten().tolist()
        used = set(traces[view.index].cat()[1].flatten().tolist())
        assert not used & set(dead)  # padding experts are never chosen
    assert n >= 2
    model2, ctx2 = _profiled("mixtral", tmp_path / "m")
    with pytest.raises(MoecompressError, match="no bias"):
        STAGES.get("prune").run(ctx2, PruneConfig(cumulative=0.3, score="frequency", uneven="mask"))


def test_router_recalibration_lowers_kl(tmp_path):
    """Layer-wise refit (each pruned block fitted to its unpruned output): the per-layer reconstruction error and
    the end-to-end next-token KL against the unpruned model both drop. Routers not skewed to a few hot experts,
    so that dropping five of eight changes the outputs."""
    model, ctx = _profiled("mixtral", tmp_path, hot=())
    result = STAGES.get("prune").run(ctx, PruneConfig(keep=3, score="random", recalibrate_router=True,
                                                      recalibrate_steps=30, recalibrate_lr=3e-3))
    kd = result["router_recalibration"]
    assert kd["kl_after"] < kd["kl_before"]
    assert [r["layer"] for r in kd["layers"]] == ctx.arch.moe_layer_indices(model.config)
    for r in kd["layers"]:
        assert r["error_after"] < r["error_before"]
    assert all(len(v) == 3 for v in ctx.artifacts["kept_experts"].values())
    assert all(not p.requires_grad or p.dtype == torch.float32 for p in model.parameters())


def test_prune_report_in_sidecar(tmp_path):
    from moecompress.pipeline import run
    from moecompress.recipe import validate_recipe

    r = validate_recipe({"model": "tiny:qwen2_moe", "calibration": {"tasks": ["code"], "samples": 2, "seq_len": 32},
                         "stages": [{"stage": "profile"}, {"stage": "prune", "keep": 4, "score": "reap"}]})
    res = run(r, output=tmp_path / "o")
    side = json.loads((tmp_path / "o" / "moecompress.json").read_text())
    assert side["kept_experts"] == res.report["stages"][1]["result"]["kept_experts"]
    assert (tmp_path / "o" / "profile.json").is_file()


def _tensors(d):
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _streamed_and_in_memory(family, tmp_path, calib=None, **prune):
    """Prune a saved tiny model by streaming it (the pipeline) and the same model in memory; both checkpoints."""
    from moecompress.pipeline import run
    from moecompress.recipe import validate_recipe

    calib = calib or {"tasks": ["prose"], "samples": 3, "seq_len": 32}
    model = tiny_moe(family)
    d = tmp_path / "model"
    save_model(LoadedModel(model, tiny_tokenizer(), find_arch(model.config), family, None, torch.float32), d)
    run(validate_recipe({"calibration": calib, "stages": [{"stage": "profile"}]}), model=str(d), output=tmp_path / "p")
    stage = {"profile": str(tmp_path / "p"), **prune}
    res = run(validate_recipe({"calibration": calib, "stages": [{"stage": "prune", **stage}]}), model=str(d),
              output=tmp_path / "streamed")
    ctx = _ctx(model, tmp_path, **calib)
    mem = STAGES.get("prune").run(ctx, PruneConfig(**stage))
    save_model(ctx.loaded, tmp_path / "memory")
    return res.report["stages"][0]["result"], mem, _tensors(tmp_path / "streamed"), _tensors(tmp_path / "memory")


@pytest.mark.parametrize("family", sorted(FAMILY))
def test_streamed_prune_equals_in_memory_prune(family, tmp_path):
    """Streamed (reading only the kept experts, layer by layer into the output) == pruning the whole model."""
    got, want, a, b = _streamed_and_in_memory(family, tmp_path, keep_ratio=0.5, score="reap")
    assert got["kept_experts"] == want["kept_experts"] and got["params_after"] == want["params_after"]
    assert got["params_before"] == want["params_before"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("family", ["gpt_oss", "deepseek_v3"])
def test_streamed_uneven_mask_equals_in_memory(family, tmp_path):
    got, want, a, b = _streamed_and_in_memory(family, tmp_path, cumulative=0.6, score="frequency", uneven="mask")
    assert got["dead_padding"] == want["dead_padding"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["mixtral", "gpt_oss", "deepseek_v3"])
def test_streamed_router_recalibration_equals_in_memory(family, tmp_path):
    """The layer-wise refit reads whole layers (it compares with the unpruned block) and computes what the
    in-memory refit computes, bitwise; it never raises the reconstruction error of a layer."""
    got, want, a, b = _streamed_and_in_memory(family, tmp_path, keep=4, score="frequency", recalibrate_router=True,
                                              recalibrate_steps=5, recalibrate_lr=3e-3)
    assert got["router_recalibration"] == want["router_recalibration"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for r in got["router_recalibration"]["layers"]:
        assert r["error_best"] <= r["error_before"]
