"""Task-adaptive retrieval reads only the kept experts, equals in-memory pruning, and falls back when far."""

import json
import subprocess
import sys

import pytest
import torch

from moecompress.errors import MoecompressError
from moecompress.models import find_arch
from moecompress.models.surgery import keep_experts
from moecompress.pipeline import run
from moecompress.recipe import validate_recipe
from moecompress.runtime.checkpoint_io import CheckpointReader, classify
from moecompress.runtime.modelio import LoadedModel, load_model, save_model, tiny_tokenizer
from moecompress.taer import build_patterns, retrieve
from moecompress.testing import tiny_moe

PROMPT = "The quick brown fox jumps over the lazy dog. " * 4


def _setup(family, tmp_path, seed=0):
    model = tiny_moe(family, seed=seed)
    d = tmp_path / f"{family}-{seed}"
    save_model(LoadedModel(model, tiny_tokenizer(), find_arch(model.config), family, None, torch.float32), d)
    recipe = validate_recipe({"calibration": {"tasks": ["prose", "code"], "samples": 3, "seq_len": 32},
                              "stages": [{"stage": "profile"}]})
    run(recipe, model=str(d), output=tmp_path / f"prof-{family}-{seed}")
    return d, tmp_path / f"prof-{family}-{seed}"


@pytest.mark.parametrize("family", ["mixtral", "granitemoe", "gpt_oss", "deepseek_v3"])
def test_retrieve_reads_only_kept_experts_and_equals_pruning(family, tmp_path):
    d, prof = _setup(family, tmp_path)
    build_patterns(str(d), prof, tmp_path / "store", signature_layers=1, samples=2, seq_len=32)
    r = retrieve(str(d), tmp_path / "store", tmp_path / "out", prompt=PROMPT, keep=4, max_distance=10.0)
    assert not r["fallback_to_generalist"] and r["matched_task"] in ("prose", "code")
    kept = {int(k): v for k, v in r["kept_experts"].items()}
    assert all(len(v) == 4 for v in kept.values())
    # count what was read: with a one-layer signature, matching reads no expert, so exactly half the expert bytes
    reader = CheckpointReader(d)
    roles = classify(reader, load_model(str(d)).model.config, find_arch(load_model(str(d)).model.config)).roles
    per_expert = [k for k, role in roles.items() if role.kind == "expert"]
    if per_expert:  # checkpoints with one tensor per expert: exactly the kept experts' tensors were read
        expected = sorted(k for k in per_expert if roles[k].expert in kept[roles[k].layer])
        assert r["expert_tensors_read"] == expected
    assert r["expert_bytes_read_share"] == pytest.approx(0.5)
    # the written checkpoint equals pruning the loaded model in memory
    full = load_model(str(d))
    keep_experts(full.model, full.arch, kept)
    got = load_model(str(tmp_path / "out"))
    x = torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(got.model(input_ids=x).logits, full.model(input_ids=x).logits, atol=1e-5, rtol=0)
    side = json.loads((tmp_path / "out" / "moecompress.json").read_text())
    assert side["kept_experts"] == r["kept_experts"]


def test_retrieved_model_loads_in_a_fresh_process(tmp_path):
    d, prof = _setup("qwen3_moe", tmp_path)
    build_patterns(str(d), prof, tmp_path / "store", samples=2, seq_len=32)
    retrieve(str(d), tmp_path / "store", tmp_path / "out", prompt=PROMPT, keep_ratio=0.5, max_distance=10.0)
    code = ("import sys, torch; from transformers import AutoModelForCausalLM; "
            f"m = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'out')!r}); "
            "print(m.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=2, min_new_tokens=2).shape[1], "
            "m.config.num_experts); assert 'moecompress' not in sys.modules")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["5", "4"]


def test_far_prompt_falls_back_to_the_generalist(tmp_path):
    d, prof = _setup("mixtral", tmp_path)
    build_patterns(str(d), prof, tmp_path / "store", samples=2, seq_len=32)
    r = retrieve(str(d), tmp_path / "store", tmp_path / "out", prompt=PROMPT, keep=4, max_distance=0.0)
    assert r["fallback_to_generalist"] and r["matched_task"] is None
    store = json.loads((tmp_path / "store" / "patterns.json").read_text())
    expected = {str(i): sorted(rank[:4]) for i, rank in zip(range(2), store["generalist"]["ranking"])}
    assert r["kept_experts"] == expected


def test_store_or_profile_from_another_model_is_refused(tmp_path):
    d, prof = _setup("mixtral", tmp_path)
    d2, _ = _setup("mixtral", tmp_path, seed=7)
    with pytest.raises(MoecompressError, match="profile was taken on another model"):
        build_patterns(str(d2), prof, tmp_path / "s2", samples=2, seq_len=32)
    build_patterns(str(d), prof, tmp_path / "store", samples=2, seq_len=32)
    with pytest.raises(MoecompressError, match="pattern store was taken on another model"):
        retrieve(str(d2), tmp_path / "store", tmp_path / "o", prompt=PROMPT, keep=4)
    with pytest.raises(MoecompressError, match="keeping 1 of 8 experts is impossible"):
        retrieve(str(d), tmp_path / "store", tmp_path / "o", prompt=PROMPT, keep=1)
    with pytest.raises(MoecompressError, match="no pattern store"):
        retrieve(str(d), tmp_path / "nope", tmp_path / "o", prompt=PROMPT, keep=4)
    assert not (tmp_path / "o").exists() and not (tmp_path / "s2").exists()
