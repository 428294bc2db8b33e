"""compressed-tensors export: plain transformers loads it in a fresh process (no moecompress import) and gives the
packed checkpoint's logits; compressed-tensors' own decompressor returns our weights; what cannot load is refused."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from moecompress.errors import MoecompressError
from moecompress.formats.codecs import decode
from moecompress.kernels.reference import dequantize
from moecompress.pipeline import run
from moecompress.recipe import validate_recipe
from moecompress.formats.export_ct import export_compressed_tensors
from moecompress.testing import FAMILY

ct = pytest.importorskip("compressed_tensors")

IDS = [[1, 5, 9, 33, 77, 100, 200, 255, 17, 42, 3, 250, 7, 64, 128, 300]]
FUSED = {"gpt_oss", "granitemoe"}  # checkpoints keep experts fused: refused
# transformers dequantizes MoE experts in the scales' dtype (float16), moecompress in float32: each expert weight
# differs by up to 2^-11 relative. Measured on every case below: relative L2 <= 8.2e-5, max |diff| <= 1.2e-4 of the
# largest logit (1.3e-4 / 1.8e-4 on the bf16 demo model; with float32 scales 1.5e-7); allowed: 5e-4 for both.
TOL = 5e-4

# A fresh interpreter with only torch + transformers (compressed-tensors through transformers): loads the export,
# checks nothing was left unread or re-initialised, runs one forward and saves the logits.
CHILD = """
import json, sys, torch
from transformers import AutoModelForCausalLM
model, info = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32, output_loading_info=True)
with torch.no_grad():
    logits = model(torch.tensor(json.loads(sys.argv[3]))).logits
torch.save({"logits": logits, "info": {k: sorted(map(str, v)) for k, v in info.items()},
            "compressed": sum(hasattr(m, "quantization_scheme") for m in model.modules()),
            "config": type(model.config.quantization_config).__name__,
            "moecompress": sorted(m for m in sys.modules if m.split(".")[0] == "moecompress")}, sys.argv[2])
"""


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    """``quantized(family, scheme, group, symmetric)``: a packed tiny checkpoint, built once per module."""
    cache = {}

    def make(family, scheme, group, symmetric=True, linear_bits=None):
        key = (family, scheme, group, symmetric, linear_bits)
        if key not in cache:
            out = tmp_path_factory.mktemp("q") / f"{family}-{scheme}-{group}-{symmetric}"
            stage = {
                "stage": "quantize",
                "scheme": scheme,
                "group_size": group,
                "symmetric": symmetric,
                "method": "rtn",
                "smooth": False,
                **({"linear_bits": linear_bits} if linear_bits else {}),
            }
            run(
                validate_recipe(
                    {
                        "model": f"tiny:{family}",
                        "stages": [stage],
                        "calibration": {"tasks": ["prose"], "samples": 2, "seq_len": 32},
                    }
                ),
                output=out,
            )
            cache[key] = out
        return cache[key]

    return make


def _fresh_load(export, tmp_path):
    """Load ``export`` with plain transformers in a fresh interpreter; what it saw."""
    out = tmp_path / "child.pt"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    r = subprocess.run(
        [sys.executable, "-c", CHILD, str(export), str(out), json.dumps(IDS)],
        check=False,
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-4000:]
    return torch.load(out)


def _case(family, scheme, group, slow=True, **kw):
    return pytest.param(
        family,
        scheme,
        group,
        id=f"{family}-{scheme}-g{group}",
        marks=[pytest.mark.slow] * slow + [m for m in kw.get("marks", [])],
    )


CASES = [
    _case("mixtral", "w4a16", 8, slow=False),
    _case("qwen2_moe", "w8a16", -1, slow=False),  # shared experts, 8-bit, one group per row ("channel")
    *[
        _case(f, "w4a16", 8)
        for f in sorted(set(FAMILY) - FUSED - {"mixtral"})
    ],
    _case("deepseek_v3", "w4a16", -1),
    _case("olmoe", "w8a16", 8),
]


@pytest.mark.parametrize("family,scheme,group", CASES)
def test_export_loads_with_plain_transformers_and_gives_the_packed_logits(tmp_path, quantized, family, scheme, group):
    src = quantized(family, scheme, group)
    rep = export_compressed_tensors(src, tmp_path / "ct")
    got = _fresh_load(tmp_path / "ct", tmp_path)
    assert got["moecompress"] == [] and got["config"] == "CompressedTensorsConfig"
    assert not any(got["info"].values()), got["info"]  # nothing missing, unexpected, mismatched or failed
    experts = sum(1 for name in rep["linears"] if ".experts." in name)
    assert got["compressed"] == rep["modules"] - experts  # every other quantized Linear stays compressed, no more

    ref_model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)  # through moecompress (imported)
    with torch.no_grad():
        ref = ref_model(torch.tensor(IDS)).logits
    diff = (got["logits"] - ref).float()
    assert diff.norm() <= TOL * ref.norm(), f"relative L2 {float(diff.norm() / ref.norm()):.2e}"
    assert diff.abs().max() <= TOL * ref.abs().max(), f"max abs {float(diff.abs().max()):.2e}"


def _ours(src):
    """Our dequantized weights per (module path, proj)."""
    cfg = json.loads((src / "config.json").read_text())["quantization_config"]
    sd = load_file(str(src / "model.safetensors"))
    out = {}
    for path, spec in cfg["modules"].items():
        projs = ("gate", "up", "down") if spec["type"] == "experts" else ("weight",)
        for p in projs:
            local = {k[len(path) + len(p) + 2 :]: v for k, v in sd.items() if k.startswith(f"{path}.{p}_")}
            codec = spec["codecs"][p] if spec["type"] == "experts" else spec["codec"]
            out[(path, p)] = dequantize(*decode(codec, local))
    return out


@pytest.mark.parametrize(
    "family,scheme,group,names",
    [
        (
            "mixtral",
            "w4a16",
            8,
            ("block_sparse_moe.experts.{e}.w1", "block_sparse_moe.experts.{e}.w3", "block_sparse_moe.experts.{e}.w2"),
        ),
        (
            "qwen2_moe",
            "w8a16",
            -1,
            ("mlp.experts.{e}.gate_proj", "mlp.experts.{e}.up_proj", "mlp.experts.{e}.down_proj"),
        ),
    ],
)
def test_compressed_tensors_decompresses_to_our_weights(tmp_path, quantized, family, scheme, group, names):
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationScheme

    src = quantized(family, scheme, group)
    rep = export_compressed_tensors(src, tmp_path / "ct")
    cfg = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "compressed-tensors" and cfg["format"] == rep["format"] == "pack-quantized"
    group_cfg = cfg["config_groups"]["group_0"]
    assert group_cfg["weights"]["symmetric"] and group_cfg["weights"]["num_bits"] == rep["bits"]
    assert group_cfg["weights"]["strategy"] == ("channel" if group == -1 else "group")
    scheme_obj = QuantizationScheme(
        targets=group_cfg["targets"], weights=group_cfg["weights"], input_activations=group_cfg["input_activations"]
    )
    compressor = BaseCompressor.get_value_from_registry(cfg["format"])
    exported = load_file(str(tmp_path / "ct" / "model.safetensors"))
    assert not any(k.endswith("weight_zero_point") for k in exported)
    checked = 0
    for (path, proj), dense in _ours(src).items():
        layer = path.split(".")[2]
        if proj == "weight":
            prefixes = [path.replace(".mlp.", ".block_sparse_moe.") if "block_sparse_moe" in names[0] else path]
        else:
            template = names[("gate", "up", "down").index(proj)]
            prefixes = [f"model.layers.{layer}.{template.format(e=e)}" for e in range(dense.shape[0])]
        for e, prefix in enumerate(prefixes):
            local = {k[len(prefix) + 1 :]: v for k, v in exported.items() if k.startswith(prefix + ".weight")}
            assert local, f"{prefix} missing from the export"
            got = compressor.decompress(local, scheme_obj)["weight"]
            assert got.dtype == torch.float16  # it decompresses into the scales' dtype: compare at that precision
            torch.testing.assert_close(got.float(), dense[e].half().float(), atol=1e-7, rtol=1e-3)
            checked += 1
    assert checked > 10


@pytest.mark.parametrize(
    "family,scheme,group,symmetric,match",
    [
        ("mixtral", "w3a16", 8, True, "supports W4A16 and W8A16, not w3a16"),
        ("mixtral", "w8a8", -1, True, "not w8a8: transformers loads compressed-tensors MoE experts only as packed"),
        ("mixtral", "w4a16", 8, False, "asymmetric weights.*symmetric: true"),
        ("gpt_oss", "w4a16", 8, True, "gpt_oss checkpoints keep experts fused"),
    ],
)
def test_export_refuses_what_transformers_cannot_load(tmp_path, quantized, family, scheme, group, symmetric, match):
    src = quantized(family, scheme, group, symmetric)
    with pytest.raises(MoecompressError, match=match) as err:
        export_compressed_tensors(src, tmp_path / "ct")
    assert "\n" not in str(err.value)
    assert not (tmp_path / "ct").exists()


def test_export_refuses_mixed_widths(tmp_path, quantized):
    """Experts at 4 bits and the attention at 8 (``--linear-bits 8``): one scheme per checkpoint in compressed-tensors
    as exported here, so the export names both codecs and the fix."""
    src = quantized("mixtral", "w4a16", 8, True, linear_bits=8)
    with pytest.raises(MoecompressError, match=r"not int4\+int8.*no --linear-bits") as err:
        export_compressed_tensors(src, tmp_path / "ct")
    assert "\n" not in str(err.value)
    assert not (tmp_path / "ct").exists()
