"""Task-adaptive retrieval as stages: the probe reads only the first layers, retrieve reads only the kept experts
and writes what pruning to the same experts writes, falls back when far, and refuses other models' stores."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from moecompress.errors import MoecompressError
from moecompress.models import find_arch
from moecompress.models.surgery import keep_experts
from moecompress.pipeline import run
from moecompress.recipe import validate_recipe
from moecompress.runtime.executor import LayerStream, ModelSource
from moecompress.runtime.hooks import capture_routing
from moecompress.io.model import LoadedModel, save_model, tiny_tokenizer
from moecompress.runtime.source import load_model
from moecompress.runtime.prompt_routing import routing_signatures
from moecompress.testing import tiny_moe

PROMPT = "The quick brown fox jumps over the lazy dog. " * 4
CALIB = {"samples": 2, "seq_len": 32}


def _setup(family, tmp_path, seed=0):
    model = tiny_moe(family, seed=seed)
    d = tmp_path / f"{family}-{seed}"
    save_model(LoadedModel(model, tiny_tokenizer(), find_arch(model.config), family, None, torch.float32), d)
    recipe = validate_recipe({"calibration": {"tasks": ["prose", "code"], "samples": 3, "seq_len": 32},
                              "stages": [{"stage": "profile"}]})
    run(recipe, model=str(d), output=tmp_path / f"prof-{family}-{seed}")
    return d, tmp_path / f"prof-{family}-{seed}"


def _patterns(d, prof, out, **stage):
    recipe = validate_recipe({"calibration": CALIB, "stages": [{"stage": "patterns", "profile": str(prof), **stage}]})
    return run(recipe, model=str(d), output=out).report["stages"][0]["result"]


def _retrieve(d, store, out, **stage):
    recipe = validate_recipe({"stages": [{"stage": "retrieve", "store": str(store), "prompt": PROMPT, **stage}]})
    return run(recipe, model=str(d), output=out).report["stages"][0]["result"]


def _tensors(d):
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.mark.parametrize("family", ["mixtral", "granitemoe", "gpt_oss", "deepseek_v3"])
def test_retrieve_reads_only_kept_experts_and_equals_pruning(family, tmp_path):
    d, prof = _setup(family, tmp_path)
    _patterns(d, prof, tmp_path / "store", signature_layers=1)
    r = _retrieve(d, tmp_path / "store", tmp_path / "out", keep=4, max_distance=10.0)
    assert not r["fallback_to_generalist"] and r["matched_task"] in ("prose", "code")
    kept = {int(k): v for k, v in r["kept_experts"].items()}
    assert all(len(v) == 4 for v in kept.values())
    # with a one-layer signature the probe reads no expert, so exactly half the expert bytes are read
    assert r["expert_bytes_read_share"] == pytest.approx(0.5)
    per_expert = [k for k in _tensors(d) if ".experts." in k and k.split(".experts.")[1].split(".")[0].isdigit()]
    if per_expert:  # checkpoints with one tensor per expert: exactly the kept experts' tensors were read
        layer_of = {k: int(k.split(".layers.")[1].split(".")[0]) for k in per_expert}
        expected = sorted(k for k in per_expert if int(k.split(".experts.")[1].split(".")[0]) in kept[layer_of[k]])
        assert r["expert_tensors_read"] == expected
    # the written checkpoint is what pruning to the same experts writes (keep_experts reads every expert)...
    recipe = validate_recipe({"stages": [{"stage": "keep_experts", "keep": kept}]})
    run(recipe, model=str(d), output=tmp_path / "kept")
    a, b = _tensors(tmp_path / "out"), _tensors(tmp_path / "kept")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # ... and what pruning the loaded model in memory computes
    full = load_model(str(d))
    keep_experts(full.model, full.arch, kept)
    got = load_model(str(tmp_path / "out"))
    x = torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(got.model(input_ids=x).logits, full.model(input_ids=x).logits, atol=1e-5, rtol=0)
    side = json.loads((tmp_path / "out" / "moecompress.json").read_text())
    assert side["kept_experts"] == r["kept_experts"]


@pytest.mark.parametrize("family", ["qwen2_moe", "gpt_oss", "deepseek_v3"])
def test_probe_reads_only_up_to_the_router_of_the_last_signature_layer(family, tmp_path):
    model = tiny_moe(family)
    arch = find_arch(model.config)
    d = tmp_path / family
    save_model(LoadedModel(model, tiny_tokenizer(), arch, family, None, torch.float32), d)
    sig = arch.moe_layer_indices(model.config)[:1]
    x = torch.randint(0, 256, (3, 12), generator=torch.Generator().manual_seed(0))
    with LayerStream(ModelSource(model.config, arch, directory=d), [x[:2], x[2:]]) as stream:
        got = routing_signatures(stream, sig)
        files = stream.files
        read = set(files.read_log)
        expert = {k for k, target in files.target.items() if f".{arch.experts}." in target}
        later = {k for k, target in files.target.items() if target.startswith(f"{arch.layers}.{sig[-1] + 1}.")}
    assert read and not read & expert and not read & later
    with torch.no_grad(), capture_routing(model, arch, layers=sig) as traces:
        model(input_ids=x)
    want = torch.cat([traces[i].logits[0].view(3, 12, -1).mean(1) for i in sig], dim=1)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_retrieved_model_loads_in_a_fresh_process(tmp_path):
    d, prof = _setup("qwen3_moe", tmp_path)
    _patterns(d, prof, tmp_path / "store")
    _retrieve(d, tmp_path / "store", tmp_path / "out", keep_ratio=0.5, max_distance=10.0)
    code = ("import sys, torch; from transformers import AutoModelForCausalLM; "
            f"m = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'out')!r}); "
            "print(m.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=2, min_new_tokens=2).shape[1], "
            "m.config.num_experts); assert 'moecompress' not in sys.modules")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["5", "4"]


def test_far_prompt_falls_back_to_the_generalist(tmp_path):
    d, prof = _setup("mixtral", tmp_path)
    _patterns(d, prof, tmp_path / "store")
    r = _retrieve(d, tmp_path / "store", tmp_path / "out", keep=4, max_distance=0.0)
    assert r["fallback_to_generalist"] and r["matched_task"] is None
    store = json.loads((tmp_path / "store" / "patterns.json").read_text())
    expected = {str(i): sorted(rank[:4]) for i, rank in zip(range(2), store["generalist"]["ranking"])}
    assert r["kept_experts"] == expected


def test_profile_patterns_retrieve_in_one_recipe(tmp_path):
    """The store passes from stage to stage; the output holds the profile, the store and the pruned model."""
    d, _ = _setup("mixtral", tmp_path)
    recipe = validate_recipe({"calibration": {"tasks": ["prose", "code"], **CALIB}, "stages": [
        {"stage": "profile"}, {"stage": "patterns", "signature_layers": 1},
        {"stage": "retrieve", "prompt": PROMPT, "keep": 4, "max_distance": 10.0}]})
    res = run(recipe, model=str(d), output=tmp_path / "o")
    out = tmp_path / "o"
    assert (out / "profile.json").is_file() and (out / "patterns.json").is_file()
    assert json.loads((out / "config.json").read_text())["num_local_experts"] == 4
    assert res.report["stages"][2]["result"]["store"] == "(this recipe)"
    with pytest.raises(MoecompressError, match="needs a pattern store and none comes before it"):
        run(validate_recipe({"stages": [{"stage": "retrieve", "prompt": PROMPT, "keep": 4}]}), model=str(d),
            output=tmp_path / "o2")
    with pytest.raises(MoecompressError, match="changed its experts"):
        run(validate_recipe({"stages": [{"stage": "keep_experts", "drop": {"all": [0]}},
                                        {"stage": "retrieve", "store": str(out), "prompt": PROMPT, "keep": 4}]}),
            model=str(d), output=tmp_path / "o2")
    assert not (tmp_path / "o2").exists()


def test_store_or_profile_from_another_model_is_refused(tmp_path):
    d, prof = _setup("mixtral", tmp_path)
    d2, _ = _setup("mixtral", tmp_path, seed=7)
    with pytest.raises(MoecompressError, match="profile was taken on another model"):
        _patterns(d2, prof, tmp_path / "s2")
    _patterns(d, prof, tmp_path / "store")
    with pytest.raises(MoecompressError, match="pattern store was taken on another model"):
        _retrieve(d2, tmp_path / "store", tmp_path / "o", keep=4)
    with pytest.raises(MoecompressError, match="keeping 1 of 8 experts is impossible"):
        _retrieve(d, tmp_path / "store", tmp_path / "o", keep=1)
    with pytest.raises(MoecompressError, match="no pattern store"):
        _retrieve(d, tmp_path / "nope", tmp_path / "o", keep=4)
    assert not (tmp_path / "o").exists() and not (tmp_path / "s2").exists()


def test_retrieve_budget_names_routing_groups_only_where_the_model_has_them():
    from moecompress.models import find_arch
    from moecompress.stages.retrieve import RetrieveConfig
    from moecompress.testing import tiny_config

    for family, keep, want, unwanted in (("mixtral", 1, "keep between 2 and 8 experts", "multiple"),
                                         ("deepseek_v2", 3, "a multiple of 2", None)):
        cfg = tiny_config(family)
        with pytest.raises(MoecompressError, match=want) as err:
            RetrieveConfig(prompt="x", keep=keep).check(cfg, find_arch(cfg))
        assert unwanted is None or unwanted not in str(err.value)
