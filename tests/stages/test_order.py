"""Stage order is part of a recipe's validation: every ordered pair of stages, run on a tiny model, is either
refused before any weight is read (with an order that works) or gives the model the working order gives."""

import itertools

import pytest
import torch
from transformers import AutoModelForCausalLM

import moecompress.pipeline as pipeline
from moecompress.errors import MoecompressError
from moecompress.recipe import validate_recipe
from moecompress.stages import STAGES
from moecompress.stages.order import working_order

MODEL = "tiny:mixtral"
CALIB = {"tasks": ["prose", "code"], "samples": 2, "seq_len": 32}


@pytest.fixture(scope="module")
def profile_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("profile") / "p"
    pipeline.run(validate_recipe({"model": MODEL, "calibration": CALIB, "stages": [{"stage": "profile"}]}), output=out)
    pipeline.run(validate_recipe({"model": MODEL, "calibration": CALIB, "stages": [  # and its pattern store
        {"stage": "patterns", "profile": str(out), "signature_layers": 1}]}), output=out.parent / "store")
    return out


def _stage(name, profile_dir):
    return {
        "profile": {"stage": "profile"},
        "prune": {"stage": "prune", "profile": str(profile_dir), "keep": 4, "score": "frequency"},
        "keep_experts": {"stage": "keep_experts", "drop": {"all": [6, 7]}},
        "quantize": {"stage": "quantize", "scheme": "w4a16", "group_size": 8, "method": "rtn"},
        "ternary": {"stage": "ternary", "method": "absmean", "group_size": 8},
        "evaluate": {"stage": "evaluate", "baseline": None, "samples": 2},
        "patterns": {"stage": "patterns", "profile": str(profile_dir), "signature_layers": 1},
        "retrieve": {"stage": "retrieve", "store": str(profile_dir.parent / "store"), "prompt": "def f(x): return x",
                     "keep": 4, "max_distance": 10.0},
    }[name]


def _logits(directory):
    if not (directory / "config.json").is_file():
        return None  # the recipe wrote no model (only reports)
    model = AutoModelForCausalLM.from_pretrained(directory).eval()
    ids = torch.arange(40).view(2, 20) * 7 % 256
    with torch.no_grad():
        return model(input_ids=ids).logits


def _run(names, profile_dir, out):
    recipe = validate_recipe({"model": MODEL, "calibration": CALIB,
                              "stages": [_stage(n, profile_dir) for n in names]})
    pipeline.run(recipe, output=out)
    return _logits(out)


NAMES = sorted(STAGES.names())


def test_every_stage_declares_its_needs():
    for name in NAMES:
        spec = STAGES.get(name)
        assert spec.changes in (None, "experts", "weights")
        if spec.changes:
            assert spec.modifies_model and spec.needs_original


@pytest.mark.slow
@pytest.mark.parametrize("first,second", list(itertools.product(NAMES, NAMES)),
                         ids=[f"{a}-{b}" for a, b in itertools.product(NAMES, NAMES)])
def test_pair_is_refused_up_front_or_equals_the_working_order(first, second, profile_dir, tmp_path, monkeypatch):
    names = [first, second]
    specs = [STAGES.get(n) for n in names]
    reference = working_order(specs)
    real_load = pipeline.open_source
    loads = []

    def load(*args, **kwargs):
        loads.append(args)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(pipeline, "open_source", load)
    try:
        got = _run(names, profile_dir, tmp_path / "out")
    except MoecompressError as e:
        assert not loads, "a senseless order must be refused before any weight is read"
        text = str(e)
        assert ", ".join(reference) in text or "once" in text or "one stage" in text or "profile" in text, text
        assert not (tmp_path / "out").exists()
        return
    if names == reference:
        return  # it ran: this is the reference itself
    want = _run(reference, profile_dir, tmp_path / "reference")
    assert (got is None) == (want is None)
    if got is not None:
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("pair", [("quantize", "prune"), ("quantize", "keep_experts"), ("quantize", "quantize"),
                                  ("quantize", "ternary"), ("ternary", "quantize"), ("quantize", "profile"),
                                  ("keep_experts", "keep_experts"), ("prune", "prune"), ("keep_experts", "prune")])
def test_senseless_pairs_are_refused_before_loading(pair, profile_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(pipeline, "open_source", lambda *a, **k: pytest.fail("weights were read"))
    with pytest.raises(MoecompressError):
        _run(list(pair), profile_dir, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_prune_needs_a_profile_of_the_current_experts(tmp_path, monkeypatch):
    monkeypatch.setattr(pipeline, "open_source", lambda *a, **k: pytest.fail("weights were read"))

    def refused(stages, *needles):
        with pytest.raises(MoecompressError) as e:
            pipeline.run(validate_recipe({"model": MODEL, "calibration": CALIB, "stages": stages}), output=tmp_path / "o")
        for n in needles:
            assert n in str(e.value), str(e.value)

    refused([{"stage": "prune", "keep": 4}], "needs a profile", "stage: profile")
    refused([{"stage": "profile"}, {"stage": "prune", "keep": 4, "tasks": ["maths"]}], "'maths'", "prose, code")
    refused([{"stage": "profile"}, {"stage": "keep_experts", "drop": {"all": [0]}}, {"stage": "prune", "keep": 4}],
            "taken before stage 2 (keep_experts)")


def test_prune_profile_prune_maps_kept_experts_to_the_input(tmp_path):
    stages = [{"stage": "profile"}, {"stage": "prune", "keep": 6, "score": "frequency"}, {"stage": "profile"},
              {"stage": "prune", "keep": 4, "score": "frequency"}]
    result = pipeline.run(validate_recipe({"model": MODEL, "calibration": CALIB, "stages": stages}),
                          output=tmp_path / "o")
    first = result.report["stages"][1]["result"]["kept_experts"]
    second = result.report["stages"][3]["result"]["kept_experts"]  # in the once-pruned model's numbering
    for layer, ids in result.report["kept_experts"].items():
        assert ids == [first[layer][e] for e in second[layer]]


@pytest.mark.parametrize("stage", ["profile", "prune", "keep_experts", "quantize", "ternary"])
def test_quantized_input_names_its_original(stage, profile_dir, tmp_path):
    packed = tmp_path / "packed"
    pipeline.run(validate_recipe({"model": MODEL, "calibration": CALIB,
                                  "stages": [_stage("quantize", profile_dir)]}), output=packed)
    with pytest.raises(MoecompressError, match=r"packed w4a16 checkpoint; \w+ needs the original .*tiny:mixtral") \
            as err:
        pipeline.run(validate_recipe({"model": str(packed), "calibration": CALIB,
                                      "stages": [_stage(stage, profile_dir)]}), output=tmp_path / "o")
    # the fix: a stage that changes the expert set runs on the original and its result is quantized; the others
    # run on the original instead (not "then quantize the result": quantize or profile twice)
    then = "then quantize the result" if stage in ("prune", "keep_experts") else "instead"
    assert then in str(err.value)
