"""Streamed quantization: a directory read one decoder layer at a time gives, bit for bit, what a model held in
memory gives through the same stage, and what the whole-model path before streaming wrote (frozen in
`_legacy_quantize`), for every family; packed checkpoints load and match their fake-quant twins; nothing is
held across layers."""

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from moecompress.context import Context
from moecompress.errors import MoecompressError
from moecompress.formats.quant_record import RECORD_FILE, RECORD_INDEX, QuantRecord, RecordWriter, is_record_file
from moecompress.io.validate import check_weight_files
from moecompress.models import find_arch
from moecompress.pipeline import run
from moecompress.recipe import CalibrationConfig, validate_recipe
from moecompress.runtime import rotate as rotate_mod
from moecompress.io.model import LoadedModel, save_model, tiny_tokenizer
from moecompress.runtime.source import load_model
from moecompress.stages import STAGES
from moecompress.stages import quantize as quantize_stage
from moecompress.stages import ternary as ternary_stage
from moecompress.testing import FAMILY, tiny_moe

sys.path.insert(0, str(Path(__file__).parent))
import _legacy_quantize as legacy

CALIB = {"tasks": ["prose", "code"], "samples": 2, "seq_len": 16}
KINDS = {
    # the frozen old path predates sequential quantization (`runtime.paired`): compared without it
    "w4a16": {"stage": "quantize", "scheme": "w4a16", "group_size": 8, "sequential": False},
    "ternary": {"stage": "ternary", "method": "gptq", "group_size": 8},
}


def _loaded(family, **overrides):
    model = tiny_moe(family, **overrides)
    return LoadedModel(model, tiny_tokenizer(), find_arch(model.config), "tiny", None, torch.float32)


def _tensors(directory):
    out = {}
    for f in sorted(Path(directory).glob("*.safetensors")):
        if not is_record_file(f.name):
            out.update(load_file(str(f)))
    return out


def _assert_same_checkpoint(a, b):
    """Same tensors (names, dtypes, shapes, bytes) and the same quantization_config; file sharding may differ."""
    ta, tb = _tensors(a), _tensors(b)
    assert sorted(ta) == sorted(tb)
    for k in ta:
        assert ta[k].dtype == tb[k].dtype and ta[k].shape == tb[k].shape, k
        assert torch.equal(ta[k].contiguous().view(torch.uint8), tb[k].contiguous().view(torch.uint8)), k
    ca, cb = (json.loads((Path(d) / "config.json").read_text()) for d in (a, b))
    assert ca.get("quantization_config") == cb.get("quantization_config")
    for key in ("dtype", "tie_word_embeddings", "num_hidden_layers"):
        assert ca.get(key) == cb.get(key), key


def _legacy(family, stage, out, **overrides):
    """The pre-streaming path: the whole model in memory, `quantize_model` then `write_packed`."""
    lm = _loaded(family, **overrides)
    cfg = STAGES.get(stage["stage"]).config(**stage)
    ctx = Context(lm, CalibrationConfig(**CALIB), None)
    base, extra = quantize_stage.split_windows(ctx, cfg.reserve if cfg.balance else 0.0)
    plan, meta = (quantize_stage if stage["stage"] == "quantize" else ternary_stage).plan_of(cfg)
    result = legacy.quantize_model(lm.model, lm.arch, base, extra, plan)
    legacy.write_packed(lm, result.record, meta, out, getattr(cfg, "codec", "ternary-b3"))
    return lm, result


def _in_memory(family, stage, out, **overrides):
    """The stage over a model held in memory (`Context(LoadedModel)`), writing to ``out``."""
    lm = _loaded(family, **overrides)
    ctx = Context(lm, CalibrationConfig(**CALIB), None, write_to=out)
    summary = STAGES.get(stage["stage"]).run(ctx, STAGES.get(stage["stage"]).config(**stage))
    return lm, ctx, summary


def _streamed(src, stage, out):
    """The pipeline over a model directory (streamed one layer at a time)."""
    return run(validate_recipe({"model": str(src), "calibration": CALIB, "stages": [stage]}), output=out)


def _case(family, kind, tmp_path, **overrides):
    stage = KINDS[kind] if isinstance(kind, str) else kind
    if stage["stage"] == "quantize":  # the frozen old path predates the per-input token floor of calibration balance
        stage = {"balance_per_input": 0, "gptq_rounds": 0, **stage}  # and the GPTQ rounds on the refit grid
    src = tmp_path / "src"
    save_model(_loaded(family, **overrides), src)
    lm_old, old = _legacy(family, stage, tmp_path / "legacy", **overrides)
    _in_memory(family, stage, tmp_path / "memory", **overrides)
    streamed = _streamed(src, stage, tmp_path / "streamed")
    _assert_same_checkpoint(tmp_path / "legacy", tmp_path / "memory")
    _assert_same_checkpoint(tmp_path / "legacy", tmp_path / "streamed")
    agreement = streamed.report["stages"][0]["result"]["routing_topk_agreement_calib"]
    assert len(agreement) == len(old.routing_agreement) and all(0.5 < a <= 1 for a in agreement)
    return lm_old, old, src, stage


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_streamed_equals_in_memory_and_the_old_path_mixtral(kind, tmp_path):
    _case("mixtral", kind, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize("family", sorted(f for f in FAMILY if f != "mixtral"))
def test_streamed_equals_in_memory_and_the_old_path(family, kind, tmp_path):
    lm_old, old, src, stage = _case(family, kind, tmp_path)
    # fake-quant: the streamed checkpoint holds the old path's dequantized weights, its record the old record
    _streamed(src, {**stage, "save_format": "fake-quant"}, tmp_path / "fake")
    fake = load_model(str(tmp_path / "fake"))
    want = lm_old.model.state_dict()
    for k, v in fake.model.state_dict().items():
        assert torch.equal(v, want[k]), k
    record = QuantRecord.load(tmp_path / "fake")
    assert sorted(record.tensors) == sorted(old.record.tensors)
    for k, v in record.tensors.items():
        assert torch.equal(v, old.record.tensors[k]), k


@pytest.mark.parametrize("targets", ["model", "layer"])
def test_sequential_streamed_equals_in_memory(targets, tmp_path, monkeypatch):
    """Sequential quantization (the original model's second stream, the paired passes) writes the same bytes
    streamed one layer at a time from disk as over a model held in memory."""
    monkeypatch.setitem(globals(), "CALIB", {**CALIB, "samples": 8, "seq_len": 64})  # enough tokens to pair
    stage = {"stage": "quantize", "scheme": "w2a16", "group_size": 8, "sequential": True,
             "sequential_targets": targets}
    src = tmp_path / "src"
    save_model(_loaded("qwen2_moe"), src)
    _in_memory("qwen2_moe", stage, tmp_path / "memory")
    streamed = _streamed(src, stage, tmp_path / "streamed")
    _assert_same_checkpoint(tmp_path / "memory", tmp_path / "streamed")
    layers = streamed.report["stages"][0]["result"]["layers"]
    assert all(v["experts"]["corrected"]["down"] for v in layers.values() if "experts" in v)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "deepseek_v3", "gpt_oss"])
def test_rotation_smoothing_router_equal_the_old_path(family, tmp_path):
    """QuaRot rotation per layer (a tied head untied), EAQuant smoothing, intermediate rotation, A4 simulation,
    8-bit aligned router: still the old whole-model bytes."""
    overrides = {"tie_word_embeddings": True} if family == "mixtral" else {}
    stage = {"stage": "quantize", "scheme": "w4a4", "group_size": 8, "router_bits": 8, "rotate": True}
    _case(family, stage, tmp_path, **overrides)
    cfg = json.loads((tmp_path / "streamed" / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is False
    assert json.loads((tmp_path / "src" / "config.json").read_text())["tie_word_embeddings"] is \
        (family == "mixtral")  # the input is untouched


def test_rotated_tied_model_streamed_untied_and_loadable(tmp_path):
    src = tmp_path / "src"
    save_model(_loaded("mixtral", tie_word_embeddings=True), src)
    stage = {"stage": "quantize", "scheme": "w4a16", "group_size": 8, "rotate": True}
    packed = _streamed(src, stage, tmp_path / "packed")
    _streamed(src, {**stage, "save_format": "fake-quant"}, tmp_path / "fake")
    result = packed.report["stages"][0]["result"]
    assert result["rotation"]["residual"] and result["rotation_max_relative_change"] < 1e-4
    assert json.loads((src / "config.json").read_text())["tie_word_embeddings"] is True
    p, f = load_model(str(tmp_path / "packed")), load_model(str(tmp_path / "fake"))
    assert p.model.config.tie_word_embeddings is False and f.model.config.tie_word_embeddings is False
    x = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(p.model(input_ids=x).logits, f.model(input_ids=x).logits, atol=2e-3, rtol=2e-3)
        ref = _loaded("mixtral", tie_word_embeddings=True).model(input_ids=x).logits
        assert (f.model(input_ids=x).logits - ref).abs().mean() < ref.abs().mean()  # quantized, not destroyed


def test_a_rotation_that_changes_a_layer_is_refused(tmp_path, monkeypatch):
    real = rotate_mod.rotate_layer

    def broken(layer, arch, view, readers, rotation):
        real(layer, arch, view, {"attn": readers["attn"][:-1], "mlp": readers["mlp"]}, rotation)

    monkeypatch.setattr("moecompress.runtime.layer_passes.rotate_layer", broken)
    src = tmp_path / "src"
    save_model(_loaded("mixtral"), src)
    with pytest.raises(MoecompressError, match="rotating mixtral changed layer 0's"):
        _streamed(src, {"stage": "quantize", "scheme": "w4a16", "group_size": 8, "rotate": True}, tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_check_layer_ignores_a_flipped_near_tie_but_not_many():
    arch = find_arch(tiny_moe("mixtral").config)
    y = torch.randn(100, 8)
    topk = torch.zeros(100, 2, dtype=torch.long)
    topk[:, 1] = 1
    flipped = topk.clone()
    flipped[0, 1] = 5
    bad = y.clone()
    bad[0] += 10  # the token whose routing flipped
    assert rotate_mod.check_layer(arch, 0, y, bad, topk, flipped) == 0.0
    with pytest.raises(MoecompressError, match="outputs"):
        rotate_mod.check_layer(arch, 0, y, bad, topk, topk)
    many = topk.clone()
    many[:5, 1] = 5
    with pytest.raises(MoecompressError, match="routing for 5.0% of the tokens"):
        rotate_mod.check_layer(arch, 0, y, y, topk, many)


def test_layers_are_written_and_freed_one_at_a_time(tmp_path, monkeypatch):
    """At most one decoder layer is materialised; each is written before the next is read; the record is
    written with its layer (nothing accumulates across layers)."""
    from moecompress.formats.pack import PackedWriter
    from moecompress.runtime.executor import LayerStream

    events, most = [], {"loaded": 0}
    real_load, real_release, real_add = LayerStream.load, LayerStream.release, PackedWriter.add

    def load(self, i):
        if self.files is not None and i not in self.loaded:
            events.append(("load", i))
        out = real_load(self, i)
        most["loaded"] = max(most["loaded"], len(self.loaded))
        return out

    def release(self, i):
        if i in self.loaded:
            events.append(("release", i))
        real_release(self, i)

    def add(self, tensors, record=None, experts=None, bits=None):
        layers = {int(k.split(".")[2]) for k in tensors if k.startswith("model.layers.")}
        events.append(("write", layers.pop() if layers else None))
        real_add(self, tensors, record, experts, bits)

    monkeypatch.setattr(LayerStream, "load", load)
    monkeypatch.setattr(LayerStream, "release", release)
    monkeypatch.setattr(PackedWriter, "add", add)
    src = tmp_path / "src"
    save_model(_loaded("qwen2_moe"), src)  # 3 layers, the first one dense
    result = _streamed(src, KINDS["w4a16"], tmp_path / "o")
    assert most["loaded"] == 1
    n = 3
    assert events == [e for i in range(n) for e in (("load", i), ("write", i), ("release", i))] + [("write", None)]
    assert "quant_record" not in result.report  # the record is never kept whole


def test_sharded_record_round_trip_and_is_not_weights(tmp_path):
    rec = QuantRecord()
    g = torch.Generator().manual_seed(0)
    for i in range(4):
        rec.add(f"model.layers.{i}.mlp.experts:gate", torch.randint(0, 16, (8, 24, 64), generator=g),
                torch.rand(8, 24, 8, generator=g), torch.rand(8, 24, 8, generator=g))
    writer = RecordWriter(tmp_path, shard_bytes=20_000)
    for i in range(4):  # one layer at a time
        writer.add(QuantRecord({k: v for k, v in rec.tensors.items() if f".{i}." in k}))
    assert writer.close() == RECORD_INDEX
    shards = sorted(p.name for p in tmp_path.glob("quantization-*.safetensors"))
    assert len(shards) >= 2 and all(is_record_file(s) for s in shards) and not (tmp_path / RECORD_FILE).exists()
    back = QuantRecord.load(tmp_path)
    assert sorted(back.tensors) == sorted(rec.tensors)
    assert all(torch.equal(back.tensors[k], v) for k, v in rec.tensors.items())
    save_model(_loaded("mixtral"), tmp_path)  # a model in the same directory: the record shards are not weights
    assert [p.name for p in check_weight_files(tmp_path)] == ["model.safetensors"]
    (tmp_path / RECORD_INDEX).unlink()
    with pytest.raises(MoecompressError, match="cannot read the quantization record"):
        QuantRecord.load(tmp_path)


def test_old_single_file_record_still_reads(tmp_path):
    from safetensors.torch import save_file

    t = {"a:gate.codes": torch.ones(1, 2, 8, dtype=torch.uint8), "a:gate.scales": torch.ones(1, 2, 1),
         "a:gate.zeros": torch.zeros(1, 2, 1)}
    save_file(t, str(tmp_path / RECORD_FILE), metadata={"format": "moecompress-quant-record"})
    back = QuantRecord.load(tmp_path)
    assert back.weights() == ["a:gate"] and torch.equal(back.dequantize("a:gate", 8), torch.ones(1, 2, 8))


def test_round_to_nearest_runs_only_the_probe_and_writes_rtn_codes(tmp_path):
    """RTN without smoothing or a quantized router needs no calibration statistics: the summary says no
    calibration window ran, and every expert's codes are round-to-nearest of the original weights."""
    from moecompress.algorithms.quant_grid import QuantGrid, rtn_quantize

    r = run(validate_recipe({"model": "tiny:qwen3_moe", "calibration": CALIB, "stages": [
        {"stage": "quantize", "scheme": "w4a16", "group_size": 8, "method": "rtn", "save_format": "fake-quant"}]}),
        output=tmp_path / "q")
    s = r.report["stages"][0]["result"]
    assert s["calibration_windows"] == 0 and "round-to-nearest" in s["note"]
    original = load_model("tiny:qwen3_moe")
    moe = original.arch.moe_layer_indices(original.model.config)
    assert len(s["routing_topk_agreement_calib"]) == len(moe)  # the probe still ran through every layer
    record = QuantRecord.load(tmp_path / "q")
    arch = original.arch
    for i in arch.moe_layer_indices(original.model.config):
        view = arch.block(original.model, i)
        gate_up = torch.cat([view.experts.stacked("gate"), view.experts.stacked("up")], 1).float()
        want = rtn_quantize(gate_up, QuantGrid(4, 8, False, True)).codes
        I = view.experts.stacked("gate").shape[1]
        name = f"{arch.layers}.{i}.{arch.moe_block}.{arch.experts}"
        assert torch.equal(record.tensors[f"{name}:gate.codes"], want[:, :I])
        assert torch.equal(record.tensors[f"{name}:up.codes"], want[:, I:])
