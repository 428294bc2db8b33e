"""The layer-streaming executor: a model read from disk one decoder layer at a time computes exactly what the
whole model computes, for every family, from one file or many shards; what it writes is what save_pretrained
writes; memory is one layer; devices are checked."""

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from moecompress.errors import MoecompressError
from moecompress.io.checkpoint import CheckpointSource, build_skeleton, layer_of
from moecompress.models import find_arch
from moecompress.runtime.executor import LayerStream, ModelSource, Placement, resolve_device
from moecompress.io.model import LoadedModel, save_model, tiny_tokenizer
from moecompress.runtime.sink import LayerSink
from moecompress.testing import FAMILY, tiny_moe


def _saved(family, tmp_path, shard=None, **overrides):
    model = tiny_moe(family, **overrides)
    d = tmp_path / family
    if shard:
        model.save_pretrained(d, max_shard_size=shard)
        tiny_tokenizer().save_pretrained(d)
    else:
        save_model(LoadedModel(model, tiny_tokenizer(), find_arch(model.config), family, None, torch.float32), d)
    return model, d


def _batches():
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, 256, (2, 20), generator=g), torch.randint(0, 256, (1, 20), generator=g)]


def _stream(source, batches):
    s = LayerStream(source, batches)
    for i in range(s.num_layers):
        s.run_layer(i)
        s.release(i)
    s.load_head()
    return s


@pytest.mark.parametrize("family", sorted(FAMILY))
def test_streamed_from_disk_equals_the_whole_model(family, tmp_path):
    overrides = {"logits_scaling": 4.0} if family == "granitemoe" else {}
    model, d = _saved(family, tmp_path, **overrides)
    batches = _batches()
    src = ModelSource(model.config, find_arch(model.config), directory=d)
    s = _stream(src, batches)
    mem = _stream(ModelSource(model.config, find_arch(model.config), model=model), batches)
    with torch.no_grad():
        for b, x in enumerate(batches):
            full = model(input_ids=x).logits
            torch.testing.assert_close(s.logits(b), full, atol=1e-6, rtol=0)
            assert torch.equal(s.logits(b), mem.logits(b)), family  # streamed == in-memory, bitwise
    # one layer at a time: every decoder layer but none is back on the meta device after release
    assert all(p.is_meta for layer in s.layers for p in layer.parameters())


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3", "gpt_oss", "qwen2_moe"])
def test_each_layer_loads_what_from_pretrained_loads(family, tmp_path):
    """Per-layer reads go through transformers' key conversions (per-expert -> fused, renames, fp32 plans)."""
    _, d = _saved(family, tmp_path, shard="20KB")  # several shards
    assert (d / "model.safetensors.index.json").is_file()
    full = AutoModelForCausalLM.from_pretrained(d, experts_implementation="eager")
    ref = full.state_dict()
    sk = build_skeleton(full.config, torch.float32)
    src = CheckpointSource(d, sk, find_arch(full.config).layers)
    for layer in sorted(k for k in src.groups if k is not None):
        src.load(sk, src.layer_keys(layer), "cpu", torch.float32)
        for k, v in sk.state_dict().items():
            if layer_of(k, "model.layers") == layer:
                assert v.dtype == ref[k].dtype and torch.equal(v, ref[k]), k
    assert src.bytes_read > 0


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3", "gpt_oss"])
def test_sink_writes_what_save_pretrained_writes(family, tmp_path):
    model, d = _saved(family, tmp_path)
    src = ModelSource(model.config, find_arch(model.config), directory=d, tokenizer=tiny_tokenizer())
    out = tmp_path / "out"
    s = LayerStream(src, [])
    sink = LayerSink(src, out, shard_bytes=30_000)  # several shards
    for i, _ in s.layers_in_order():
        sink.layer(s, i)
    sink.outside(s)
    sink.close(model.config, src.arch)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    got = {}
    for f in set(index["weight_map"].values()):
        got.update(load_file(str(out / f)))
    want = load_file(str(d / "model.safetensors"))
    assert sorted(got) == sorted(want)
    for k in want:
        assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k
    again = AutoModelForCausalLM.from_pretrained(out)
    with torch.no_grad():
        x = _batches()[0]
        torch.testing.assert_close(again(input_ids=x).logits, model(input_ids=x).logits, atol=1e-6, rtol=0)


def test_layers_must_run_in_order(tmp_path):
    model, d = _saved("mixtral", tmp_path)
    s = LayerStream(ModelSource(model.config, find_arch(model.config), directory=d), [torch.zeros(1, 4).long()])
    with pytest.raises(RuntimeError, match="out of order"):
        s.run_layer(1)
    with pytest.raises(RuntimeError, match="every layer"):
        s.logits(0)


def test_last_layer_runs_only_the_batches_asked_for(tmp_path):
    """Through the last layer a storing pass may run some batches: theirs are the full run's outputs, the
    others' hidden states are freed; before the last layer a storing pass runs every batch."""
    model, d = _saved("mixtral", tmp_path)
    src = ModelSource(model.config, find_arch(model.config), directory=d)
    batches = _batches()
    full = _stream(src, batches)
    s = LayerStream(src, batches)
    with pytest.raises(ValueError, match="every batch"):
        s.run_layer(0, batches=[1])
    for i in range(s.num_layers - 1):
        s.run_layer(i)
    s.run_layer(s.num_layers - 1, batches=[1])
    s.load_head()
    assert torch.equal(s.logits(1), full.logits(1))
    assert s.hidden[0].numel() == 0


def test_offloaded_hidden_states_give_the_same_result(tmp_path):
    model, d = _saved("qwen3_moe", tmp_path)
    src = ModelSource(model.config, find_arch(model.config), directory=d)
    batches = _batches()
    a = _stream(src, batches)
    b = LayerStream(src, batches, Placement(offload=True))
    for i in range(b.num_layers):
        b.run_layer(i)
    b.load_head()
    for j in range(len(batches)):
        assert torch.equal(a.logits(j), b.logits(j))


def test_missing_layer_tensor_is_one_line(tmp_path):
    from safetensors.torch import save_file

    model, d = _saved("mixtral", tmp_path)
    sd = load_file(str(d / "model.safetensors"))
    sd.pop(next(k for k in sorted(sd) if k.startswith("model.layers.1.self_attn.q_proj")))
    save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})
    s = LayerStream(ModelSource(model.config, find_arch(model.config), directory=d), _batches())
    s.run_layer(0)
    with pytest.raises(MoecompressError, match="lacks layer 1's"):
        s.run_layer(1)


def test_devices():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(MoecompressError, match="asks for a GPU, but torch sees none"):
            resolve_device("cuda")
        with pytest.raises(MoecompressError, match="asks for a GPU"):
            resolve_device("cuda:3")
    with pytest.raises(MoecompressError, match="is not a device"):
        resolve_device("gpu0")
    with pytest.raises(MoecompressError, match="not supported"):
        resolve_device("mps")
    assert Placement().compute_dtype(torch.bfloat16) == torch.float32
    assert Placement(torch.device("cpu"), torch.bfloat16).compute_dtype(torch.float32) == torch.bfloat16
