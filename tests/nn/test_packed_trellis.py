"""``quantize --codec trellis`` on every adapter: the packed checkpoint (trellis3 codecs, format version 4) loads
through transformers, keeps its streams packed, and gives the fake-quantized checkpoint's logits; bad requests
are refused before any work."""

import json
import re

import pytest
import torch

from moecompress.errors import MoecompressError
from moecompress.formats.quant_record import QuantRecord
from moecompress.nn.packed import PackedExperts, PackedLinear
from moecompress.pipeline import run
from moecompress.recipe import validate_recipe
from moecompress.runtime.source import load_model
from moecompress.stages.quantize import QuantizeConfig
from moecompress.models.registry import find_arch
from moecompress.testing import FAMILY, tiny_config


def _run(family, out, fmt, **over):
    stage = {"stage": "quantize", "scheme": "w3a16", "group_size": 8, "codec": "trellis", "save_format": fmt,
             "gptq_rounds": 1, **over}
    r = validate_recipe({"model": f"tiny:{family}", "calibration": {"tasks": ["prose"], "samples": 2, "seq_len": 32},
                         "stages": [stage]})
    return run(r, output=out)


@pytest.mark.parametrize("family", sorted(FAMILY))
@torch.no_grad()
def test_trellis_checkpoint_loads_and_matches_fake_quant(family, tmp_path):
    _run(family, tmp_path / "packed", "packed")
    _run(family, tmp_path / "fake", "fake-quant")
    qc = json.loads((tmp_path / "packed" / "config.json").read_text())["quantization_config"]
    assert qc["format_version"] == 4
    codecs = {c for m in qc["modules"].values()
              for c in ([m["codec"]] if m["type"] == "linear" else m["codecs"].values())}
    assert codecs == {"trellis3"}
    record = QuantRecord.load(tmp_path / "fake")
    assert all(record.tensors[f"{w}.codes"].dtype == torch.int16 for w in record.weights() if ":router" not in w)
    packed, fake = load_model(str(tmp_path / "packed")), load_model(str(tmp_path / "fake"))
    mods = list(packed.model.modules())
    assert any(isinstance(m, PackedExperts) for m in mods) and any(isinstance(m, PackedLinear) for m in mods)
    assert all(m.gate_stream.dtype == torch.int32 for m in mods if isinstance(m, PackedExperts))
    x = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    a, b = packed.model(input_ids=x).logits, fake.model(input_ids=x).logits
    torch.testing.assert_close(a, b, atol=2e-3, rtol=2e-3)  # fake-quant stores bf16-rounded weights
    # the stored table survives a dtype change of the model (the values are the format's)
    packed.model.to(torch.bfloat16)
    assert all(m.gate_table.dtype == torch.float32 for m in mods if isinstance(m, PackedExperts))


def test_trellis_requests_that_cannot_work_are_refused():
    config = tiny_config("mixtral")
    arch = find_arch(config)
    with pytest.raises(MoecompressError, match="codes 2-4-bit weights"):
        QuantizeConfig(scheme="w8a16", codec="trellis").check(config, arch)
    with pytest.raises(MoecompressError, match="no symmetric form"):
        QuantizeConfig(scheme="w3a16", codec="trellis", symmetric=True).check(config, arch)
    with pytest.raises(MoecompressError, match="--codec trellis"):
        QuantizeConfig(scheme="w3a16", codec="int4").check(config, arch)
    assert QuantizeConfig(scheme="w3a16", codec="trellis").rounds() == 1


def test_trellis_on_a_cpu_warns_with_the_expected_time(tmp_path, caplog, monkeypatch):
    """The torch search is slow (microseconds per weight and pass): a CPU run says so once, with the weights it
    codes and an estimate; an integer codec says nothing; a Triton-capable device says nothing."""
    import logging

    import moecompress.stages.quantize as stage

    monkeypatch.delenv("MOECOMPRESS_KERNELS", raising=False)
    with caplog.at_level(logging.WARNING, logger="moecompress"):
        _run("mixtral", tmp_path / "t", "packed")
    said = [r.getMessage() for r in caplog.records if "--codec trellis on cpu" in r.getMessage()]
    assert len(said) == 1 and "a minute for" in said[0] and "--device cuda" in said[0]
    config = tiny_config("mixtral")
    with torch.device("meta"):
        from transformers import AutoModelForCausalLM

        layers = find_arch(config).decoder_layers(AutoModelForCausalLM.from_config(config))
    assert f"{sum(p.numel() for p in layers.parameters() if p.dim() >= 2):.3g} weights" in said[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="moecompress"):
        _run("mixtral", tmp_path / "i", "packed", codec="auto")
        monkeypatch.setattr(stage, "resolve_backend", lambda *a: "triton")
        _run("mixtral", tmp_path / "g", "packed")
    assert not [r for r in caplog.records if "--codec trellis" in r.getMessage()]
    monkeypatch.setattr(stage, "resolve_backend", lambda *a: "torch")
    monkeypatch.setattr(stage, "TRELLIS_CPU_SECONDS_PER_WEIGHT", 1.0)  # a model of hours on this CPU
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="moecompress"):
        _run("mixtral", tmp_path / "h", "packed")
    assert any(re.search(r"about [\d,]+ min for", r.getMessage()) for r in caplog.records)


@pytest.mark.parametrize("family", ["gpt_oss", "qwen2_moe"])
@torch.no_grad()
def test_triton_backend_logits_equal_torch_backend(family, tmp_path, monkeypatch):
    """The fused trellis kernels (interpreted without a GPU) through the whole model, linears and grouped experts
    (gpt-oss: expert biases; qwen2-moe: shared experts): logits within 1e-4 of the torch reference's."""
    pytest.importorskip("triton")
    _run(family, tmp_path / "packed", "packed")
    x = torch.randint(0, 256, (1, 6), generator=torch.Generator().manual_seed(1))
    out = {}
    for backend in ("torch", "triton"):
        monkeypatch.setenv("MOECOMPRESS_KERNELS", backend)
        out[backend] = load_model(str(tmp_path / "packed")).model(input_ids=x).logits
    torch.testing.assert_close(out["triton"], out["torch"], atol=1e-4 * float(out["torch"].abs().max()), rtol=1e-4)
