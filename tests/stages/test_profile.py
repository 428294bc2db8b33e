"""Profiling finds known hot experts, sums add up, and TCESS / REAP equal direct recomputations."""

import pytest
import torch

from moecompress.algorithms.moe_math import routed_outputs
from moecompress.context import Context
from moecompress.errors import MoecompressError
from moecompress.formats.profile import Profile
from moecompress.models import find_arch
from moecompress.models.identity import check_identity, model_identity
from moecompress.recipe import CalibrationConfig
from moecompress.runtime.hooks import capture_routing
from moecompress.io.model import LoadedModel, tiny_tokenizer
from moecompress.stages import STAGES
from moecompress.stages.profile import ProfileConfig
from moecompress.testing import FAMILY, tiny_moe


def _profile(model, tmp_path, tasks=("prose", "code"), samples=3, seq_len=32, **cfg):
    loaded = LoadedModel(model, tiny_tokenizer(), find_arch(model.config), "tiny", None, torch.float32)
    ctx = Context(loaded, CalibrationConfig(tasks=list(tasks), samples=samples, seq_len=seq_len), tmp_path)
    STAGES.get("profile").run(ctx, ProfileConfig(**cfg))
    return ctx.artifacts["profile"], ctx


@pytest.mark.parametrize("family", sorted(FAMILY))
def test_profile_finds_the_hot_experts(family, tmp_path):
    hot = (1, 5) if family not in ("deepseek_v3", "glm4_moe", "deepseek_v2") else (1, 2)  # same routing group
    model = tiny_moe(family, hot_experts=hot)
    prof, _ = _profile(model, tmp_path)
    for score in ("frequency", "tcess_prob", "gate"):
        s = prof.scores(score)  # [L, E]
        for j in range(s.shape[0]):
            assert set(s[j].argsort(descending=True)[:2].tolist()) == set(hot), (score, j, s[j])


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3", "gpt_oss", "phimoe", "qwen2_moe"])
def test_counts_sum_to_tokens_times_top_k(family, tmp_path):
    model = tiny_moe(family)
    prof, _ = _profile(model, tmp_path)
    k = prof.model["top_k"]
    for t in prof.tasks:
        T = prof.tokens[t]
        assert T == 3 * 32
        assert torch.all(prof.stats[t]["count"].sum(-1) == T * k)
        assert torch.all(prof.stats[t]["top1"].sum(-1) == T)
        assert torch.all(prof.stats[t]["count"] >= prof.stats[t]["top1"])


@torch.no_grad()
def test_tcess_and_reap_equal_direct_recomputation(tmp_path):
    model = tiny_moe("qwen3_moe")
    arch = find_arch(model.config)
    prof, ctx = _profile(model, tmp_path, tasks=("math",), samples=2, seq_len=16, tcess_k=2, tcess_r=0.6)
    x_ids = ctx.windows("calib")["math"]
    with capture_routing(model, arch, keep_inputs=True) as traces:
        model(input_ids=x_ids)
    for j, view in enumerate(arch.moe_blocks(model)):
        logits, index, weights = traces[view.index].cat()
        x = torch.cat(traces[view.index].inputs)
        T, E = logits.shape
        tcess, tcess_p = torch.zeros(E, dtype=torch.float64), torch.zeros(E, dtype=torch.float64)
        probs = logits.softmax(-1)
        for t in range(T):  # token by token, as PreMoe's code does it
            vals, idx = logits[t].topk(2)
            share = vals.softmax(-1)
            for v, e, s in zip(vals, idx, share):
                if s >= 0.6:
                    tcess[e] += v
                    tcess_p[e] += probs[t, e]
        torch.testing.assert_close(prof.scores("tcess")[j], tcess / T)
        torch.testing.assert_close(prof.scores("tcess_prob")[j], tcess_p / T)
        out = routed_outputs(x, index, view.experts.weights(), view.activation)  # [T, K, H]
        reap = torch.zeros(E, dtype=torch.float64).index_add_(0, index.flatten(), (weights * out.norm(dim=-1)).flatten().double())
        count = torch.bincount(index.flatten(), minlength=E).double()
        expected = torch.where(count > 0, reap / count.clamp(min=1), torch.zeros_like(reap))
        torch.testing.assert_close(prof.scores("reap")[j], expected, rtol=1e-5, atol=1e-7)


def test_profile_roundtrip_and_identity(tmp_path):
    model = tiny_moe("mixtral")
    prof, _ = _profile(model, tmp_path / "p")
    again = Profile.load(tmp_path / "p")
    assert again.tasks == prof.tasks and again.tokens == prof.tokens
    for t in prof.tasks:
        for s, v in prof.stats[t].items():
            assert torch.equal(again.stats[t][s], v)
    arch = find_arch(model.config)
    check_identity(again.model, model_identity(model, arch), "profile", "fix")  # same model: fine
    other = tiny_moe("mixtral", seed=3)
    with pytest.raises(MoecompressError, match="profile was taken on another model \\(router weights differ\\)"):
        check_identity(again.model, model_identity(other, arch), "profile", "profile this model first")


def test_corrupt_or_missing_profiles(tmp_path):
    with pytest.raises(MoecompressError, match="no profile"):
        Profile.load(tmp_path)
    model = tiny_moe("mixtral")
    _profile(model, tmp_path / "p")
    (tmp_path / "p" / "profile.safetensors").write_bytes(b"\x00" * 10)
    with pytest.raises(MoecompressError, match="corrupt"):
        Profile.load(tmp_path / "p")
    with pytest.raises(MoecompressError, match="not in the profile"):
        prof, _ = _profile(model, tmp_path / "q")
        prof.scores("frequency", ["poetry"])


@pytest.mark.parametrize("family", sorted(FAMILY))
def test_streamed_profile_equals_the_in_memory_one(family, tmp_path):
    """The same statistics, bitwise, whether the model streams from its directory (the CLI's path) or is held
    in memory."""
    from moecompress.pipeline import run
    from moecompress.recipe import validate_recipe
    from moecompress.io.model import save_model

    model = tiny_moe(family)
    d = tmp_path / "m"
    save_model(LoadedModel(model, tiny_tokenizer(), find_arch(model.config), family, None, torch.float32), d)
    mem, _ = _profile(model, tmp_path / "mem")
    run(validate_recipe({"model": str(d), "stages": [{"stage": "profile"}],
                         "calibration": {"tasks": ["prose", "code"], "samples": 3, "seq_len": 32}}),
        output=tmp_path / "p")
    streamed = Profile.load(tmp_path / "p")
    assert streamed.model == mem.model
    for t in mem.tasks:
        for s, v in mem.stats[t].items():
            assert torch.equal(streamed.stats[t][s], v), (t, s)
