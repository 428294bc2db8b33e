"""``prune --score auto``: every candidate score's expert set is judged on held-out calibration text and the
lowest loss is kept; the held-out windows are none that the profile, this run's calibration or the eval split
read."""

import copy
import json

import pytest
import torch

from moecompress.algorithms.pruning import pick_lowest
from moecompress.calib import read_documents, token_windows
from moecompress.calib.data import token_stream
from moecompress.context import Context
from moecompress.errors import MoecompressError
from moecompress.eval.expert_sets import LAYERWISE
from moecompress.eval.perplexity import score_windows
from moecompress.formats.profile import Profile
from moecompress.io.model import LoadedModel, tiny_tokenizer
from moecompress.models import find_arch
from moecompress.recipe import CalibrationConfig
from moecompress.stages import STAGES
from moecompress.stages.profile import ProfileConfig
from moecompress.stages.prune import CANDIDATES, PruneConfig
from moecompress.testing import FAMILY, tiny_moe

CALIB = {"tasks": ["prose", "code"], "samples": 3, "seq_len": 32}


def _ctx(model, tmp_path, **calib):
    loaded = LoadedModel(model, tiny_tokenizer(), find_arch(model.config), "tiny", None, torch.float32)
    return Context(loaded, CalibrationConfig(**{**CALIB, **calib}), tmp_path)


def _profiled(family, tmp_path, **calib):
    """A tiny model without hot experts (so the scores disagree) and its profile, saved in ``tmp_path``."""
    model = tiny_moe(family)
    ctx = _ctx(model, tmp_path, **calib)
    STAGES.get("profile").run(ctx, ProfileConfig())
    return model, ctx


def _keep(ctx):
    return 4 if ctx.arch.name.startswith("deepseek") else ctx.arch.num_experts(ctx.config) // 2


def _held(auto):
    """The held-out windows the report names, cut again from each task's calibration token stream."""
    tok = tiny_tokenizer()
    return {t: torch.stack([token_stream(tok, read_documents(t, "calib"))[s:s + h["seq_len"]] for s in h["starts"]])
            for t, h in auto["heldout"].items()}


@pytest.mark.parametrize("family", sorted(FAMILY))
@torch.no_grad()
def test_auto_keeps_the_argmin_of_its_losses_which_are_the_pruned_models_losses(family, tmp_path):
    """On every family: each candidate's reported loss is the loss of the model its experts make (pruned for real
    and scored on the reported held-out windows), and auto keeps the lowest."""
    model, ctx = _profiled(family, tmp_path)
    original = copy.deepcopy(model)
    keep = _keep(ctx)
    r = STAGES.get("prune").run(ctx, PruneConfig(keep=keep, auto_samples=3))
    auto = r["score_auto"]
    losses = {c: v["loss"] for c, v in auto["candidates"].items()}
    assert list(losses) == list(CANDIDATES) + [LAYERWISE]
    assert r["score"] == auto["chosen"] == pick_lowest(losses)
    assert losses[auto["chosen"]] == min(losses.values())
    held = _held(auto)
    assert {t: len(w) for t, w in held.items()} == {"prose": 3, "code": 3}

    def loss(m):
        return sum(score_windows(m, w).mean_nll for w in held.values()) / len(held)

    assert loss(original) == pytest.approx(auto["unpruned"]["loss"], abs=1e-4)
    assert loss(model) == pytest.approx(losses[auto["chosen"]], abs=1e-4)  # the model written is the chosen one
    worst = max(losses, key=losses.get)  # another candidate, pruned from scratch by its own score
    other = copy.deepcopy(original)
    STAGES.get("prune").run(_ctx(other, tmp_path / "o"), PruneConfig(profile=str(tmp_path), keep=keep, score=worst))
    assert loss(other) == pytest.approx(losses[worst], abs=1e-4)


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "deepseek_v3"])
@torch.no_grad()
def test_layerwise_takes_the_closest_set_per_layer_and_reports_that_models_loss(family, tmp_path):
    """The layerwise candidate: in every MoE layer the candidate set with the lowest reported layer error (first
    listed among equals), and its reported loss is the loss of the model pruned to those sets; when auto keeps it,
    the written model is that model; --no-layerwise compares the single scores only."""
    from moecompress.stages.keep_experts import apply_keep

    model, ctx = _profiled(family, tmp_path)
    original = copy.deepcopy(model)
    keep = _keep(ctx)
    cands = ["random", "frequency", "reap", "tcess"]  # a bad candidate among them: the layers disagree
    r = STAGES.get("prune").run(ctx, PruneConfig(keep=keep, auto_samples=3, candidates=cands))
    auto = r["score_auto"]
    lw = auto["candidates"][LAYERWISE]
    layers = ctx.arch.moe_layer_indices(ctx.config)
    assert sorted(map(int, lw["layers"])) == layers
    plan = {}
    for i in layers:
        err = lw["layer_error"][str(i)]
        assert lw["layers"][str(i)] == min(err, key=err.get)
        single = STAGES.get("prune").run(_ctx(copy.deepcopy(original), tmp_path / f"s{i}"), PruneConfig(
            profile=str(tmp_path), keep=keep, score=lw["layers"][str(i)]))
        plan[i] = single["kept_experts"][str(i)]
    held = _held(auto)

    def loss(m):
        return sum(score_windows(m, w).mean_nll for w in held.values()) / len(held)

    mixed = copy.deepcopy(original)
    apply_keep(_ctx(mixed, tmp_path / "m"), plan)
    assert loss(mixed) == pytest.approx(lw["loss"], abs=1e-4)
    if auto["chosen"] == LAYERWISE:
        assert r["kept_experts"] == {str(i): v for i, v in plan.items()}
        assert loss(model) == pytest.approx(lw["loss"], abs=1e-4)
    off = STAGES.get("prune").run(_ctx(copy.deepcopy(original), tmp_path / "off"), PruneConfig(
        profile=str(tmp_path), keep=keep, auto_samples=3, candidates=cands, layerwise=False))
    assert list(off["score_auto"]["candidates"]) == cands


def test_auto_picks_a_better_set_than_a_bad_candidate_and_is_deterministic(tmp_path):
    """A random expert set loses to the informed ones; the same inputs give the same report."""
    _, ctx = _profiled("qwen3_moe", tmp_path)
    reports = []
    for k in range(2):
        model = tiny_moe("qwen3_moe")
        cfg = PruneConfig(profile=str(tmp_path), keep=2, candidates=["random", "frequency", "reap_freq"],
                          auto_samples=4)
        reports.append(STAGES.get("prune").run(_ctx(model, tmp_path / str(k)), cfg))
    a, b = reports
    assert a["score_auto"] == b["score_auto"] and a["kept_experts"] == b["kept_experts"]
    losses = {c: v["loss"] for c, v in a["score_auto"]["candidates"].items()}
    assert a["score"] == min(losses, key=losses.get)


def _spans(starts, seq_len):
    return [(s, s + seq_len) for s in starts]


def _overlap(a, b):
    return any(x0 < y1 and y0 < x1 for x0, x1 in a for y0, y1 in b)


def test_heldout_windows_are_disjoint_from_profile_calibration_and_eval(tmp_path, monkeypatch):
    # profile 40 windows of 32 tokens; this run calibrates on 7 windows of 24 tokens (another grid)
    model, _ = _profiled("mixtral", tmp_path / "p", samples=40)
    ctx = _ctx(model, tmp_path, samples=7, seq_len=24)
    import moecompress.calib.data as data

    splits = []
    read = data.read_documents
    monkeypatch.setattr(data, "read_documents", lambda task, split="calib", path=None: (
        splits.append(split), read(task, split, path))[1])
    r = STAGES.get("prune").run(ctx, PruneConfig(profile=str(tmp_path / "p"), keep=4, auto_samples=50))
    monkeypatch.undo()
    assert splits and set(splits) == {"calib"}  # the eval split is never read
    auto = r["score_auto"]
    prof = Profile.load(tmp_path / "p").settings["windows"]
    own = ctx.window_record("calib")
    tok = tiny_tokenizer()
    for t in CALIB["tasks"]:
        h = auto["heldout"][t]
        assert h["split"] == "calib" and h["seq_len"] == 32 and h["windows"] == 50 == len(set(h["starts"]))
        held = _spans(h["starts"], 32)  # as long as the profile's windows
        assert not _overlap(held, _spans(prof[t]["starts"], prof[t]["seq_len"]))  # the profile's windows
        assert not _overlap(held, _spans(own[t]["starts"], 24))  # this run's calibration windows
        assert len(prof[t]["starts"]) == 40 and len(own[t]["starts"]) == 7
        # the profile's recorded windows are the ones it read
        assert torch.equal(ctx.windows("calib", samples=40, seq_len=32)[t],
                           torch.stack([token_stream(tok, read_documents(t, "calib"))[s:s + 32]
                                        for s in prof[t]["starts"]]))


def test_moecompress_json_records_the_choice_and_the_figures(tmp_path):
    from moecompress.pipeline import run
    from moecompress.recipe import validate_recipe

    r = validate_recipe({"model": "tiny:olmoe", "calibration": {"tasks": ["code"], "samples": 2, "seq_len": 32},
                         "stages": [{"stage": "profile"}, {"stage": "prune", "keep": 4, "auto_samples": 3}]})
    res = run(r, output=tmp_path / "o")
    side = json.loads((tmp_path / "o" / "moecompress.json").read_text())
    auto = side["stages"][1]["result"]["score_auto"]
    assert side["stages"][1]["config"]["score"] == "auto"
    assert side["prune_score"]["chosen"] == auto["chosen"] == side["stages"][1]["result"]["score"]
    assert side["prune_score"]["heldout_loss"] == {c: round(v["loss"], 6) for c, v in auto["candidates"].items()}
    assert auto == res.report["stages"][1]["result"]["score_auto"]
    assert auto["heldout"]["code"]["windows"] == 3


def test_bad_inputs_one_line(tmp_path):
    with pytest.raises(ValueError, match="unknown score 'magic' among the candidates"):
        PruneConfig(keep=4, candidates=["tcess", "magic"])
    with pytest.raises(ValueError, match="each once"):
        PruneConfig(keep=4, candidates=["reap", "reap"])
    with pytest.raises(ValueError, match="not 'auto'"):
        PruneConfig(cumulative=0.8)
    model, ctx = _profiled("mixtral", tmp_path / "p")
    prof = Profile.load(tmp_path / "p")
    old = copy.deepcopy(prof)  # a profile made before profiles recorded their windows
    del old.settings["windows"]
    old.save(tmp_path / "old")
    with pytest.raises(MoecompressError, match="does not record which calibration windows") as e:
        STAGES.get("prune").run(_ctx(model, tmp_path), PruneConfig(profile=str(tmp_path / "old"), keep=4))
    assert "moecompress profile" in e.value.fix
    other = copy.deepcopy(prof)  # profiled on other text
    other.settings["windows"]["code"]["digest"] = "0" * 16
    other.save(tmp_path / "other")
    with pytest.raises(MoecompressError, match="other calibration text for task 'code'"):
        STAGES.get("prune").run(_ctx(model, tmp_path), PruneConfig(profile=str(tmp_path / "other"), keep=4))


def test_no_text_left_to_hold_out_says_so(tmp_path):
    """A profile that read every window of a small user file leaves nothing: one line, with the fix."""
    text = tmp_path / "tiny.txt"
    text.write_text("a few words of text, repeated. " * 40)
    model, _ = _profiled("mixtral", tmp_path / "p", tasks=["mine"], data={"mine": str(text)}, samples=1000)
    ctx = _ctx(model, tmp_path, tasks=["mine"], data={"mine": str(text)})
    with pytest.raises(MoecompressError, match="no window of 32 tokens left") as e:
        STAGES.get("prune").run(ctx, PruneConfig(profile=str(tmp_path / "p"), keep=4))
    assert "fewer --samples" in e.value.fix
    assert len(token_windows(tiny_tokenizer(), [text.read_text()], 32)) > 0


@pytest.mark.parametrize("family", ["qwen2_moe", "deepseek_v3"])
def test_streamed_auto_equals_in_memory_auto(family, tmp_path):
    """The pipeline streams the candidates' evaluation (one layer at a time, from disk) and computes what the
    in-memory model computes: same held-out windows, losses, choice and kept experts."""
    from moecompress.io.model import save_model
    from moecompress.pipeline import run
    from moecompress.recipe import validate_recipe

    model = tiny_moe(family)
    d = tmp_path / "model"
    save_model(LoadedModel(model, tiny_tokenizer(), find_arch(model.config), family, None, torch.float32), d)
    run(validate_recipe({"calibration": CALIB, "stages": [{"stage": "profile"}]}), model=str(d), output=tmp_path / "p")
    stage = {"profile": str(tmp_path / "p"), "keep": 4, "auto_samples": 3}
    got = run(validate_recipe({"calibration": CALIB, "stages": [{"stage": "prune", **stage}]}), model=str(d),
              output=tmp_path / "streamed").report["stages"][0]["result"]
    want = STAGES.get("prune").run(_ctx(model, tmp_path), PruneConfig(**stage))
    a, b = got["score_auto"], want["score_auto"]
    assert a["heldout"] == b["heldout"] and a["chosen"] == b["chosen"]
    assert got["kept_experts"] == want["kept_experts"]
    for c in [*CANDIDATES, LAYERWISE]:
        assert a["candidates"][c]["loss"] == pytest.approx(b["candidates"][c]["loss"], abs=1e-5)
    assert a["candidates"][LAYERWISE]["layers"] == b["candidates"][LAYERWISE]["layers"]
