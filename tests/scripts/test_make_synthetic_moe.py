"""scripts/make_synthetic_moe.py: what it writes loads in transformers exactly like a save_pretrained checkpoint."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from moecompress.models import find_arch
from moecompress.testing import FAMILY

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("make_synthetic_moe", ROOT / "scripts" / "make_synthetic_moe.py")
syn = sys.modules.setdefault("make_synthetic_moe", importlib.util.module_from_spec(_spec))
_spec.loader.exec_module(syn)

# hidden 64, experts of width 96 (2I != H, I != H), 4 experts, 3 layers; 150 KB shards -> many shards
TINY = dict(layers=3, hidden=64, intermediate=96, experts=4, top_k=2, heads=4, kv_heads=2, shard_bytes=150_000,
            verbose=False)
TEXT = "The quick brown fox jumps over the lazy dog. def f(x): return 2 * x + 1\n"


def _write(tmp_path: Path, name: str = "m", **kw) -> Path:
    return syn.write_synthetic_moe(tmp_path / name, **{**TINY, **kw})


def _files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def _tensors(d: Path) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    out = {}
    for f in d.glob("*.safetensors"):
        with safe_open(str(f), "pt") as fh:
            for k in fh.keys():
                t = fh.get_tensor(k)
                out[k] = (tuple(t.shape), t.dtype)
    return out


@pytest.mark.parametrize("model_type,layout,tie", [
    ("mixtral", "saved", False), ("qwen3_moe", "saved", False), ("mixtral", "fused", False), ("mixtral", "saved", True),
])
def test_loads_without_missing_keys(tmp_path, model_type, layout, tie):
    d = _write(tmp_path, model_type=model_type, layout=layout, tie_embeddings=tie)
    model, info = AutoModelForCausalLM.from_pretrained(d, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert model.dtype == torch.bfloat16
    cfg = model.config
    assert cfg.model_type == model_type and cfg.num_hidden_layers == 3 and len(model.model.layers) == 3
    assert cfg.num_experts_per_tok == 2 and cfg.tie_word_embeddings is tie
    for layer in model.model.layers:
        experts = layer.mlp.experts
        assert tuple(experts.gate_up_proj.shape) == (4, 2 * 96, 64)
        assert tuple(experts.down_proj.shape) == (4, 64, 96)
        assert tuple(layer.mlp.gate.weight.shape) == (4, 64)
    if tie:
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
        assert "lm_head.weight" not in _tensors(d)
    # norms are 1, matrices random with std ~ 1/sqrt(fan_in)
    assert torch.equal(model.model.norm.weight.float(), torch.ones(64))
    q = model.model.layers[0].self_attn.q_proj.weight.float()
    assert 0.8 / 8 < q.std().item() < 1.2 / 8
    tok = AutoTokenizer.from_pretrained(d)
    assert len(tok) == cfg.vocab_size
    ids = tok(TEXT * 3, return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], cfg.vocab_size) and torch.isfinite(logits).all()
    assert 0.3 < logits.float().std().item() < 3


def test_index_is_valid(tmp_path):
    d = _write(tmp_path)
    index = json.loads((d / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in d.glob("*.safetensors"))
    assert len(shards) > 3 and shards == sorted(set(index["weight_map"].values()))
    assert all(s.endswith(f"-of-{len(shards):05d}.safetensors") for s in shards)
    total = 0
    for s in shards:
        with safe_open(str(d / s), "pt") as fh:
            assert fh.metadata() == {"format": "pt"}
            keys = set(fh.keys())
            assert keys == {k for k, v in index["weight_map"].items() if v == s}
            sizes = [fh.get_tensor(k).nbytes for k in keys]
        assert sum(sizes) <= TINY["shard_bytes"] or len(sizes) == 1  # only a lone tensor may exceed a shard
        total += sum(sizes)
    assert index["metadata"]["total_size"] == total
    model = AutoModelForCausalLM.from_pretrained(d)
    assert index["metadata"]["total_parameters"] == model.num_parameters()


@pytest.mark.parametrize("model_type,tie", [("mixtral", False), ("qwen3_moe", True)])
def test_matches_save_pretrained(tmp_path, model_type, tie):
    """Same tensor names, shapes, dtypes and index metadata as transformers' own save_pretrained."""
    d = _write(tmp_path, model_type=model_type, tie_embeddings=tie)
    model = AutoModelForCausalLM.from_pretrained(d)
    ref = tmp_path / "ref"
    model.save_pretrained(ref, max_shard_size=TINY["shard_bytes"])
    assert _tensors(d) == _tensors(ref)
    ours, theirs = (json.loads((x / "model.safetensors.index.json").read_text()) for x in (d, ref))
    assert ours["metadata"] == theirs["metadata"]
    assert set(ours["weight_map"]) == set(theirs["weight_map"])
    cfg_ours, cfg_ref = (json.loads((x / "config.json").read_text()) for x in (d, ref))
    if model_type == "qwen3_moe":  # both spellings of the expert count, like moecompress's save_model
        assert cfg_ours.pop("num_experts") == cfg_ours["num_local_experts"] == 4
    assert cfg_ours == cfg_ref


def test_deterministic_and_seeded(tmp_path):
    a, b = _write(tmp_path, "a", workers=1), _write(tmp_path, "b", workers=3)
    assert _files(a) == _files(b)  # same bytes, whatever the thread count
    # the shard size does not change the values; the seed does
    one = syn.write_synthetic_moe(tmp_path / "one", **{**TINY, "shard_bytes": "1GB"})
    assert sorted(_files(one)) == ["config.json", "generation_config.json", "model.safetensors",
                                   "tokenizer.json", "tokenizer_config.json"]
    other = _write(tmp_path, "s1", seed=1)
    sa, s1, so = (AutoModelForCausalLM.from_pretrained(x).state_dict() for x in (a, other, one))
    assert all(torch.equal(sa[k], so[k]) for k in sa)
    w = "model.layers.1.mlp.experts.gate_up_proj"
    assert not torch.equal(sa[w], s1[w])
    assert not torch.equal(sa[w][0], sa[w][1])  # experts differ from each other


def test_refuses_existing_output_and_writes_atomically(tmp_path, monkeypatch):
    d = _write(tmp_path)
    before = _files(d)
    with pytest.raises(FileExistsError):
        _write(tmp_path)
    assert syn.main([str(d), "--layers", "1", "--hidden", "64", "--quiet"]) == 2
    assert _files(d) == before

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(syn._ChunkWriter, "write_tensor", boom)
    with pytest.raises(RuntimeError):
        _write(tmp_path, force=True, seed=5)
    assert _files(d) == before  # untouched by the failed rewrite
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no temporary directory left behind
    monkeypatch.undo()
    _write(tmp_path, force=True, layers=2)
    assert json.loads((d / "config.json").read_text())["num_hidden_layers"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_cli(tmp_path, capsys):
    out = tmp_path / "cli"
    rc = syn.main([str(out), "--model-type", "qwen3_moe", "--layers", "2", "--hidden", "64", "--intermediate", "32",
                   "--experts", "4", "--top-k", "2", "--heads", "4", "--kv-heads", "2", "--shard-size", "200KB",
                   "--set", "norm_topk_prob=true", "--set", "mlp_only_layers=[1]"])
    assert rc == 0
    printed = capsys.readouterr().out
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["num_experts"] == 4 and cfg["moe_intermediate_size"] == 32 and cfg["mlp_only_layers"] == [1]
    assert cfg["norm_topk_prob"] is True and cfg["dtype"] == "bfloat16"
    n = AutoModelForCausalLM.from_pretrained(out).num_parameters()
    assert f"{n:,} parameters" in printed


def test_sizes_and_plan():
    assert syn.parse_size("2GB") == 2_000_000_000 and syn.parse_size("1GiB") == 1 << 30
    assert syn.parse_size("500MB") == 500_000_000 and syn.parse_size(1234) == 1234
    # a Mixtral-8x7B-width model is planned from shapes alone (nothing allocated)
    cfg = syn.synthetic_config("mixtral", layers=2, hidden=4096, intermediate=14336, vocab=32000)
    specs, n_params, arch = syn.plan_tensors(cfg)
    assert arch == "MixtralForCausalLM" and cfg.num_attention_heads == 32 and cfg.num_key_value_heads == 8
    w1 = next(s for s in specs if s.name == "model.layers.1.block_sparse_moe.experts.7.w1.weight")
    assert w1.shape == (14336, 4096) and w1.dtype == torch.bfloat16
    assert sum(s.numel for s in specs) == n_params
    shards = syn.plan_shards(specs, 2_000_000_000)
    assert all(sum(s.nbytes for s in sh) <= 2_000_000_000 for sh in shards)
    with pytest.raises(ValueError, match="n_group"):
        syn.synthetic_config("deepseek_v3", experts=4)


def test_multi_chunk_tensors_deterministic(tmp_path, monkeypatch):
    """Tensors spanning many chunks (each seeded on its own) come out the same for any thread count."""
    monkeypatch.setattr(syn, "CHUNK", 3000)  # not a multiple of any row length
    a = _write(tmp_path, "a", workers=1, layers=1)
    b = _write(tmp_path, "b", workers=4, layers=1)
    assert _files(a) == _files(b)
    model, info = AutoModelForCausalLM.from_pretrained(a, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    w = model.model.embed_tokens.weight.float()  # 8192 x 64: ~175 chunks
    assert abs(w.std().item() - 1 / 8) < 0.01 and w[:47].std() > 0.1 and w[-47:].std() > 0.1
    flat = w.flatten()
    assert not torch.equal(flat[:3000], flat[3000:6000])  # consecutive chunks are not repeats


_GROUPED = {"n_group": 1, "topk_group": 1, "first_k_dense_replace": 1}  # 4 experts; leave one dense layer
_MLA = {"q_lora_rank": 32, "kv_lora_rank": 16, "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 16}


@pytest.mark.parametrize("model_type", sorted(FAMILY))
def test_every_registered_family(tmp_path, model_type):
    """Generic key mapping: every family moecompress supports gets the asked expert count, top-k and widths."""
    overrides = ({**_GROUPED, **_MLA} if model_type.startswith("deepseek")
                 else _GROUPED if model_type == "glm4_moe" else {})
    d = syn.write_synthetic_moe(tmp_path / model_type, model_type, layers=2, hidden=64, intermediate=48, experts=4,
                                top_k=2, heads=4, shard_bytes="300KB", overrides=overrides, verbose=False)
    model, info = AutoModelForCausalLM.from_pretrained(d, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    arch = find_arch(model.config)
    assert arch.num_experts(model.config) == 4 and getattr(model.config, arch.top_k_key) == 2
    views = arch.moe_blocks(model)
    assert views and all(v.num_experts == 4 for v in views)
    with torch.no_grad():
        assert torch.isfinite(model(torch.arange(1, 17)[None]).logits).all()
