"""Packed checkpoints: load through transformers with experts packed in memory, match the fake-quantized
model, and fail loudly (never random weights) on anything wrong."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from moecompress.errors import MoecompressError
from moecompress.formats.quant_record import QuantRecord
from moecompress.nn.packed import PackedExperts, PackedLinear
from moecompress.pipeline import run
from moecompress.recipe import validate_recipe
from moecompress.runtime.source import load_model

CASES = [
    ("mixtral", {"stage": "quantize", "scheme": "w4a16"}),
    ("gpt_oss", {"stage": "quantize", "scheme": "w3a16"}),
    ("qwen2_moe", {"stage": "quantize", "scheme": "w2a16"}),
    ("deepseek_v3", {"stage": "quantize", "scheme": "w8a8"}),
    ("qwen3_moe", {"stage": "quantize", "scheme": "w4a4"}),
    ("olmoe", {"stage": "ternary", "method": "gptq", "codec": "ternary-b3"}),
    ("mixtral", {"stage": "ternary", "method": "twn", "codec": "ternary2", "others": "int8"}),
]


def _run(family, stage, out, fmt):
    stage = {**stage, "save_format": fmt}
    stage.setdefault("group_size", 8)
    if stage["stage"] == "ternary":
        stage["others_group_size"] = 8
    r = validate_recipe({"model": f"tiny:{family}", "calibration": {"tasks": ["prose"], "samples": 2, "seq_len": 32},
                         "stages": [stage]})
    return run(r, output=out)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("packed")
    out = {}
    for i, (family, stage) in enumerate(CASES):
        _run(family, stage, root / f"{i}-packed", "packed")
        _run(family, stage, root / f"{i}-fake", "fake-quant")
        out[i] = (root / f"{i}-packed", root / f"{i}-fake")
    return out


@pytest.mark.parametrize("case", range(len(CASES)), ids=[f"{f}-{s.get('scheme', s.get('codec'))}" for f, s in CASES])
@torch.no_grad()
def test_packed_logits_equal_fake_quant(case, built):
    packed_dir, fake_dir = built[case]
    packed, fake = load_model(str(packed_dir)), load_model(str(fake_dir))
    kinds = {type(m) for m in packed.model.modules()}
    assert PackedExperts in kinds
    experts = [m for m in packed.model.modules() if isinstance(m, PackedExperts)]
    assert all(b.dtype in (torch.int32, torch.uint8) for m in experts for n, b in m.named_buffers()
               if n.endswith(("_packed", "_trits")))  # weights stay packed in memory
    x = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(case))
    a, b = packed.model(input_ids=x).logits, fake.model(input_ids=x).logits
    torch.testing.assert_close(a, b, atol=2e-3, rtol=2e-3)  # fake-quant stores bf16-rounded weights


def test_two_bit_default_writes_fractional_zeros_as_version_3(built):
    """W2 (fractional zero points by default) packs as int2-fz in a version 3 checkpoint, zeros off the integers
    (their logits equal the fake-quantized model's above); W4 keeps integer zeros in a version 2 checkpoint that
    version-2 readers still load."""
    w2 = json.loads((built[2][0] / "config.json").read_text())["quantization_config"]
    assert w2["format_version"] == 3
    codecs = {c for m in w2["modules"].values()
              for c in ([m["codec"]] if m["type"] == "linear" else m["codecs"].values())}
    assert codecs == {"int2-fz"}
    record = QuantRecord.load(built[2][1])
    zeros = torch.cat([t.flatten() for k, t in record.tensors.items() if k.endswith(".zeros")])
    assert not torch.equal(zeros, zeros.round()) and torch.equal(zeros * 64, (zeros * 64).round())
    w4 = json.loads((built[0][0] / "config.json").read_text())["quantization_config"]
    assert w4["format_version"] == 2
    assert {c for m in w4["modules"].values() if m["type"] == "experts" for c in m["codecs"].values()} == {"int4"}


def test_others_and_linears_are_packed_too(built):
    packed = load_model(str(built[6][0]))  # ternary experts, int8 attention
    assert any(isinstance(m, PackedLinear) and m.codec == "int8" for m in packed.model.modules())
    cfg = json.loads((built[6][0] / "config.json").read_text())["quantization_config"]
    assert {s.get("codec") for s in cfg["modules"].values() if s["type"] == "linear"} == {"int8"}


def test_fresh_process_with_only_import_moecompress(built):
    code = ("import torch, moecompress; from transformers import AutoModelForCausalLM; "
            f"m = AutoModelForCausalLM.from_pretrained({str(built[0][0])!r}); "
            "print(type(m.model.layers[0].mlp.experts).__name__, "
            "m.generate(torch.tensor([[3, 4, 5]]), max_new_tokens=2, min_new_tokens=2).shape[1])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["PackedExperts", "5"]


def _copy(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_truncated_file(built, tmp_path):
    d = _copy(built[0][0], tmp_path / "t")
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(MoecompressError, match="is truncated"):
        load_model(str(d))


def _edit(d, fn):
    f = d / "model.safetensors"
    sd = load_file(str(f))
    fn(sd)
    save_file(sd, str(f), metadata={"format": "pt"})


def test_corrupt_packed_tensor_fails_its_checksum(built, tmp_path):
    d = _copy(built[0][0], tmp_path / "c")

    def flip(sd):
        k = next(k for k in sd if k.endswith("gate_packed"))
        sd[k] = sd[k].clone()
        sd[k].view(-1)[0] ^= 1

    _edit(d, flip)
    with pytest.raises(MoecompressError, match="does not match its checksum"):
        load_model(str(d))


def test_missing_packed_tensor_is_an_error_not_random_weights(built, tmp_path):
    d = _copy(built[0][0], tmp_path / "m")
    _edit(d, lambda sd: sd.pop(next(k for k in sd if k.endswith("down_scale"))))
    with pytest.raises(MoecompressError, match="down_scale"):
        load_model(str(d))


@pytest.mark.parametrize("edit,match", [
    (lambda q: q.update(format_version=99), "format version 99 is not supported"),
    (lambda q: next(s for s in q["modules"].values() if s["type"] == "experts")["codecs"].update(gate="int5"),
     "unknown codec 'int5'"),
    (lambda q: next(s for s in q["modules"].values() if s["type"] == "experts")["codecs"].update(gate="int3"),
     "cannot load the weights"),
])
def test_config_that_does_not_match_the_tensors(built, tmp_path, edit, match):
    d = _copy(built[0][0], tmp_path / "x")
    cfg = json.loads((d / "config.json").read_text())
    edit(cfg["quantization_config"])
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(MoecompressError, match=match):
        load_model(str(d))


@pytest.mark.parametrize("case", [0, 5, 6], ids=["mixtral-int4", "olmoe-ternary-b3", "mixtral-ternary2-int8"])
@torch.no_grad()
def test_packed_model_in_half_precision(case, built):
    """``model.to(float16 / bfloat16)`` keeps the packed tensors and their float16 scales as stored and gives
    the float32 model's logits within 3e-3 (fp16) / 3e-2 (bf16) of their largest magnitude (the whole model,
    attention and norms included, runs in the lower precision)."""
    ref_model = load_model(str(built[case][0])).model
    x = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(case))
    ref = ref_model(input_ids=x).logits
    stored = {k: v.clone() for k, v in ref_model.named_buffers() if k.endswith(("_packed", "_trits", "_scale", "_zero"))}
    for dtype, tol in ((torch.float16, 3e-3), (torch.bfloat16, 3e-2)):
        m = load_model(str(built[case][0])).model.to(dtype)
        for k, v in m.named_buffers():
            if k in stored:
                assert v.dtype == stored[k].dtype and torch.equal(v, stored[k]), k
        out = m(input_ids=x).logits
        assert out.dtype == dtype
        torch.testing.assert_close(out.float(), ref, atol=tol * float(ref.abs().max()), rtol=tol)


@pytest.mark.parametrize("case", [1, 5], ids=["gpt_oss-w3a16", "olmoe-ternary-b3"])
@torch.no_grad()
def test_triton_backend_logits_equal_torch_backend(case, built, monkeypatch):
    """The Triton kernels (interpreted without a GPU) through the whole model: logits within 1e-4 of the
    torch reference's largest magnitude (float32 model)."""
    pytest.importorskip("triton")
    x = torch.randint(0, 256, (1, 6), generator=torch.Generator().manual_seed(case))
    out = {}
    for backend in ("torch", "triton"):
        monkeypatch.setenv("MOECOMPRESS_KERNELS", backend)
        out[backend] = load_model(str(built[case][0])).model(input_ids=x).logits
    torch.testing.assert_close(out["triton"], out["torch"], atol=1e-4 * float(out["torch"].abs().max()), rtol=1e-4)
