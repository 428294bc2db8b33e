"""compressed-tensors export: the real compressed-tensors library decompresses it to our weights."""

import json

import pytest
import torch
from safetensors.torch import load_file

from moecompress.errors import MoecompressError
from moecompress.formats.codecs import decode
from moecompress.kernels.reference import dequantize
from moecompress.pipeline import run
from moecompress.recipe import validate_recipe
from moecompress.formats.export_ct import export_compressed_tensors

ct = pytest.importorskip("compressed_tensors")


def _quantized(tmp_path, family, scheme, **kw):
    r = validate_recipe({"model": f"tiny:{family}", "calibration": {"tasks": ["prose"], "samples": 2, "seq_len": 32},
                         "stages": [{"stage": "quantize", "scheme": scheme, "group_size": kw.pop("group", 8), **kw}]})
    run(r, output=tmp_path / "q")
    return tmp_path / "q"


def _ours(src):
    """Our dequantized weights per (module path, proj, expert)."""
    cfg = json.loads((src / "config.json").read_text())["quantization_config"]
    sd = load_file(str(src / "model.safetensors"))
    out = {}
    for path, spec in cfg["modules"].items():
        projs = ("gate", "up", "down") if spec["type"] == "experts" else ("weight",)
        for p in projs:
            local = {k[len(path) + len(p) + 2:]: v for k, v in sd.items() if k.startswith(f"{path}.{p}_")}
            codec = spec["codecs"][p] if spec["type"] == "experts" else spec["codec"]
            out[(path, p)] = dequantize(*decode(codec, local))
    return out


@pytest.mark.parametrize("family,scheme,names", [
    ("mixtral", "w4a16", ("block_sparse_moe.experts.{e}.w1", "block_sparse_moe.experts.{e}.w3",
                          "block_sparse_moe.experts.{e}.w2")),
    ("qwen3_moe", "w4a16", ("mlp.experts.{e}.gate_proj", "mlp.experts.{e}.up_proj", "mlp.experts.{e}.down_proj")),
    ("mixtral", "w8a8", ("block_sparse_moe.experts.{e}.w1", "block_sparse_moe.experts.{e}.w3",
                         "block_sparse_moe.experts.{e}.w2")),
])
def test_compressed_tensors_decompresses_to_our_weights(tmp_path, family, scheme, names):
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationScheme

    src = _quantized(tmp_path, family, scheme, **({"group": -1} if scheme == "w8a8" else {}))
    rep = export_compressed_tensors(src, tmp_path / "ct")
    cfg = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "compressed-tensors" and cfg["format"] == rep["format"]
    group = cfg["config_groups"]["group_0"]
    scheme_obj = QuantizationScheme(targets=group["targets"], weights=group["weights"],
                                    input_activations=group["input_activations"])
    compressor = BaseCompressor.load_from_registry(cfg["format"])
    exported = load_file(str(tmp_path / "ct" / "model.safetensors"))
    ours = _ours(src)
    checked = 0
    for (path, proj), dense in ours.items():
        layer = path.split(".")[2]
        if proj == "weight":
            prefixes = [path.replace(".mlp.", ".block_sparse_moe.") if "block_sparse_moe" in names[0] else path]
        else:
            template = names[("gate", "up", "down").index(proj)]
            prefixes = [f"model.layers.{layer}.{template.format(e=e)}" for e in range(dense.shape[0])]
        for e, prefix in enumerate(prefixes):
            local = {k[len(prefix) + 1:]: v for k, v in exported.items() if k.startswith(prefix + ".weight")}
            assert local, f"{prefix} missing from the export"
            got = compressor.decompress(local, scheme_obj)["weight"]
            assert got.dtype == torch.float16  # it decompresses into the scales' dtype: compare at that precision
            torch.testing.assert_close(got.float(), dense[e].half().float(), atol=1e-7, rtol=1e-3)
            checked += 1
    assert checked > 10


def test_export_refuses_other_schemes(tmp_path):
    src = _quantized(tmp_path, "mixtral", "w3a16")
    with pytest.raises(MoecompressError, match="supports W4A16 and W8A8"):
        export_compressed_tensors(src, tmp_path / "ct")
    assert not (tmp_path / "ct").exists()
