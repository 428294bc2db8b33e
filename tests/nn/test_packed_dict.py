"""Packed checkpoints with QMoE's sparse ternary experts (``ternary --grid qmoe``): ``ternary-dict`` loads through
``AutoModelForCausalLM.from_pretrained`` after ``import moecompress`` and computes what the same codes in
``ternary-b3`` compute, for every model family; ``auto`` picks the smaller codec per weight; bad inputs fail with
one line."""

import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from moecompress.errors import MoecompressError
from moecompress.formats.checkpoint import checksum
from moecompress.formats.inspect import inspect_dir
from moecompress.nn.packed import PackedExperts
from moecompress.pipeline import run
from moecompress.recipe import validate_recipe
from moecompress.runtime.source import load_model
from moecompress.testing import FAMILY


def _run(family, out, **stage):
    r = validate_recipe({"model": f"tiny:{family}", "calibration": {"tasks": ["prose"], "samples": 2, "seq_len": 32},
                         "stages": [{"stage": "ternary", "grid": "qmoe", **stage}]})
    return run(r, output=out)


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory):
    root = tmp_path_factory.mktemp("qmoe")
    for codec in ("ternary-dict", "ternary-b3", "auto"):
        _run("mixtral", root / codec, codec=codec)
    return root


@pytest.mark.parametrize("family", list(FAMILY))
@torch.no_grad()
def test_dict_equals_b3_for_every_family(family, tmp_path):
    _run(family, tmp_path / "dict", codec="ternary-dict")
    _run(family, tmp_path / "b3", codec="ternary-b3")
    a, b = load_model(str(tmp_path / "dict")), load_model(str(tmp_path / "b3"))
    experts = [m for m in a.model.modules() if isinstance(m, PackedExperts)]
    assert experts and all(set(m.codecs.values()) == {"ternary-dict"} for m in experts)
    assert all(m.spec.symmetric is False for m in experts)  # QMoE's grid: two scales per row
    x = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(a.model(input_ids=x).logits, b.model(input_ids=x).logits, atol=1e-5, rtol=1e-5)


def test_from_pretrained_in_a_fresh_process(mixtral):
    code = ("import torch, moecompress; from transformers import AutoModelForCausalLM; "
            f"a = AutoModelForCausalLM.from_pretrained({str(mixtral / 'ternary-dict')!r}); "
            f"b = AutoModelForCausalLM.from_pretrained({str(mixtral / 'ternary-b3')!r}); "
            "x = torch.tensor([[3, 4, 5, 6]]); "
            "print(type(a.model.layers[0].mlp.experts).__name__, a.model.layers[0].mlp.experts.codecs['gate'], "
            "float((a(x).logits - b(x).logits).abs().max()) < 1e-5)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["PackedExperts", "ternary-dict", "True"]


def test_format_version_and_auto_codec(mixtral):
    qc = json.loads((mixtral / "ternary-dict" / "config.json").read_text())["quantization_config"]
    assert qc["format_version"] == 2
    spec = next(s for s in qc["modules"].values() if s["type"] == "experts")
    assert set(spec["dict"]) == {"gate", "up", "down"}
    sizes = {c: inspect_dir(mixtral / c)["expert_bits_per_weight"] for c in ("ternary-dict", "ternary-b3", "auto")}
    assert sizes["auto"] <= min(sizes["ternary-dict"], sizes["ternary-b3"]) + 1e-9


def _copy_edit(src, dst, edit):
    shutil.copytree(src, dst)
    f = dst / "model.safetensors"
    sd = load_file(str(f))
    cfg = json.loads((dst / "config.json").read_text())
    edit(sd, cfg["quantization_config"])
    for k in list(cfg["quantization_config"]["checksums"]):  # consistent checksums: only the stream is wrong
        if k in sd:
            t = sd[k]
            cfg["quantization_config"]["checksums"][k] = checksum(t.to(torch.float16) if t.is_floating_point() else t)
    save_file(sd, str(f), metadata={"format": "pt"})
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def _gate(sd):
    return next(k[: -len("gate_codewords")] for k in sd if k.endswith("gate_codewords"))


def test_truncated_row_index(mixtral, tmp_path):
    def edit(sd, qc):
        p = _gate(sd)
        sd[p + "gate_row_index"] = sd[p + "gate_row_index"][:-5].clone()
    d = _copy_edit(mixtral / "ternary-dict", tmp_path / "t", edit)
    with pytest.raises(MoecompressError) as e:
        load_model(str(d))
    assert "\n" not in str(e.value) and "row_index" in str(e.value)


def test_codeword_past_the_dictionary(mixtral, tmp_path):
    def edit(sd, qc):
        p = _gate(sd)
        h = sd[p + "gate_dict"].clone()
        h[0] = 256  # a smaller dictionary than the codewords were written for
        sd[p + "gate_dict"] = h
        spec = next(s for s in qc["modules"].values() if s["type"] == "experts")
        spec["dict"]["gate"][1] = 256
    d = _copy_edit(mixtral / "ternary-dict", tmp_path / "m", edit)
    with pytest.raises(MoecompressError, match="dictionary/codeword mismatch|decodes to a length") as e:
        load_model(str(d))
    assert "\n" not in str(e.value)


def test_dictionary_header_disagrees_with_config(mixtral, tmp_path):
    def edit(sd, qc):
        spec = next(s for s in qc["modules"].values() if s["type"] == "experts")
        spec["dict"]["gate"][1] = 1024
    d = _copy_edit(mixtral / "ternary-dict", tmp_path / "h", edit)
    with pytest.raises(MoecompressError, match="the config says 1024"):
        load_model(str(d))


def test_ternary_codec_on_an_integer_scheme_is_one_line(tmp_path):
    r = validate_recipe({"model": "tiny:mixtral", "calibration": {"tasks": ["prose"], "samples": 2, "seq_len": 32},
                         "stages": [{"stage": "quantize", "scheme": "w4a16", "group_size": 8,
                                     "codec": "ternary-dict"}]})
    with pytest.raises(MoecompressError, match="stores ternary weights, but scheme w4a16") as e:
        run(r, output=tmp_path / "x")
    assert "\n" not in str(e.value) and not (tmp_path / "x").exists()


def test_grid_conflicting_with_method(tmp_path):
    with pytest.raises(MoecompressError, match="cannot use --grid qmoe"):
        _run("mixtral", tmp_path / "y", method="twn")


def test_version_1_checkpoint_still_loads(mixtral, tmp_path):
    """A checkpoint written before version 2 (same tensors, ``format_version: 1``) loads unchanged."""
    d = tmp_path / "v1"
    shutil.copytree(mixtral / "ternary-b3", d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["quantization_config"]["format_version"] = 1
    for spec in cfg["quantization_config"]["modules"].values():  # version 1 had symmetric ternary only
        spec["symmetric"] = True
    sd = load_file(str(d / "model.safetensors"))
    for k in [k for k in sd if k.endswith("_scale_neg")]:
        del sd[k]
        del cfg["quantization_config"]["checksums"][k]
    save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})
    (d / "config.json").write_text(json.dumps(cfg))
    m = load_model(str(d))
    assert inspect_dir(d)["format"] == "moecompress v1"
    x = torch.randint(0, 256, (1, 6))
    assert torch.isfinite(m.model(input_ids=x).logits).all()


def test_decode_table_is_never_a_freed_headers():
    """The decode-table cache must not hand a new header the table of a freed one that lived at the same address
    (it did: two ternary-dict checkpoints loaded one after the other in a process, and the second decoded its
    codewords with the first's dictionary: perplexity x6 to x65 instead of x1.1). Same memory, a new tensor
    with other contents, as when an allocator or a memory map hands a freed block out again."""
    import numpy as np

    from moecompress.formats.dictcode import dict_table
    from moecompress.nn.packed import decode_table

    buf = np.array([4096, 1, 3, 3, 3, 5, 5, 3, 5, 5], dtype=np.int32)
    first = torch.from_numpy(buf)
    decode_table(first)
    del first
    buf[:] = [4096, 2, 2, 3, 4, 4, 4, 4, 4, 4]
    second = torch.from_numpy(buf)  # the same address and version as the freed header, other contents
    assert not torch.equal(dict_table(second), dict_table(torch.tensor([4096, 1, 3, 3, 3, 5, 5, 3, 5, 5])))
    assert torch.equal(decode_table(second), dict_table(second))
