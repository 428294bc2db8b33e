"""The quantize stage: smoothing is function-preserving, every expert is quantized, every adapter works."""

import json

import pytest
import torch

from moecompress.algorithms.router_align import topk_kl
from moecompress.context import Context
from moecompress.errors import MoecompressError
from moecompress.formats.quant_record import QuantRecord
from moecompress.models import find_arch
from moecompress.pipeline import run
from moecompress.recipe import CalibrationConfig, validate_recipe
from moecompress.runtime.calibration import collect
from moecompress.runtime.executor import LayerStream, ModelSource
from moecompress.runtime.layer_smooth import quantize_router, smooth_layer
from moecompress.io.model import LoadedModel, tiny_tokenizer
from moecompress.runtime.source import load_model
from moecompress.stages import STAGES
from moecompress.stages.quantize import QuantizeConfig, plan_of
from moecompress.testing import FAMILY, tiny_config, tiny_moe


def _ctx(model, tmp_path, samples=2, seq_len=32):
    loaded = LoadedModel(model, tiny_tokenizer(), find_arch(model.config), "tiny", None, torch.float32)
    return Context(loaded, CalibrationConfig(tasks=["prose", "code"], samples=samples, seq_len=seq_len), tmp_path)


def _layer_stats(model, arch, i):
    runner = LayerStream(ModelSource(model.config, arch, model=model),
                         [torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))])
    for j in range(i):
        runner.run_layer(j)
    layer = runner.layers[i]
    views = [arch.block(model, i)]
    with collect(layer, views, getattr(layer, arch.pre_attn_norm), near_miss=2) as stats:
        runner.run_layer(i, store=False)
    return runner, layer, views, stats


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "deepseek_v3", "gpt_oss", "phimoe"])
@torch.no_grad()
def test_smoothing_fold_leaves_the_unquantized_function_unchanged(family):
    model = tiny_moe(family)
    arch = find_arch(model.config)
    i = arch.moe_layer_indices(model.config)[0]
    runner, layer, views, stats = _layer_stats(model, arch, i)
    h, kw = runner.hidden[0], runner.kwargs[i][0]
    before = layer(h, **kw)
    used = smooth_layer(layer, views, stats, getattr(layer, arch.pre_attn_norm), 0.6, "max", True, True, True)
    assert "moe" in used and "attn" in used and (used["moe"] != 1).any()
    after = layer(h, **kw)
    before, after = (x[0] if isinstance(x, tuple) else x for x in (before, after))
    torch.testing.assert_close(after, before, atol=1e-4, rtol=1e-4)


@torch.no_grad()
def test_router_alignment_lowers_router_kl():
    model = tiny_moe("mixtral")
    arch = find_arch(model.config)
    _, _, views, stats = _layer_stats(model, arch, 0)
    v = views[0]
    X = torch.cat(stats.experts.sample)
    ref = X @ v.router_weight.T.clone()
    W0 = v.router_weight.clone()
    plain = quantize_router(v, stats, 3, False, QuantRecord(), "p", "topk_rest")
    kl_plain = float(topk_kl(ref, X @ v.router_weight.T, 2, objective="topk_rest"))
    v.router_weight.copy_(W0)
    aligned = quantize_router(v, stats, 3, True, QuantRecord(), "p", "topk_rest")
    kl_aligned = float(topk_kl(ref, X @ v.router_weight.T, 2, objective="topk_rest"))
    assert aligned["aligned"] and not plain["aligned"]
    assert kl_aligned <= kl_plain and aligned["kl_after"] <= aligned["kl_before"]


@pytest.mark.parametrize("rare", ["pooled", "rtn"])
@torch.no_grad()
def test_every_expert_is_quantized_even_with_tiny_calibration(rare, tmp_path):
    model = tiny_moe("mixtral", hot_experts=(0, 1))  # the other experts get almost no tokens
    ctx = _ctx(model, tmp_path, samples=1, seq_len=8)
    result = STAGES.get("quantize").run(ctx, QuantizeConfig(scheme="w4a16", group_size=8, save_format="fake-quant",
                                                            rare_experts=rare))
    record = QuantRecord.load(tmp_path)
    arch = ctx.arch
    for view in arch.moe_blocks(model):
        layer = result["layers"][str(view.index)]["experts"]
        short = layer["topped_up_pooled"] if rare == "pooled" else layer["rtn_fallback"]
        assert len(short) > 0 and len(layer["topped_up_pooled" if rare == "rtn" else "rtn_fallback"]) == 0
        assert sum((result["pooled_experts_per_layer"] if rare == "pooled" else
                    result["rtn_fallback_experts_per_layer"]).values()) > 0  # reported, never silent
        for proj in ("gate", "up", "down"):
            name = f"model.layers.{view.index}.mlp.experts:{proj}"
            deq = record.dequantize(name, 8)
            assert deq.shape[0] == 8  # all experts present
            torch.testing.assert_close(view.experts.stacked(proj).float(), deq, atol=1e-6, rtol=0)


@torch.no_grad()
def test_balance_tops_gptq_experts_up_to_the_tokens_per_input_floor(tmp_path):
    """`balance_per_input`: GPTQ experts with fewer routed tokens than that many per input dimension are topped up
    (reserve, near-miss, pooled) to at least it; 0 keeps the ratio's minimum alone; RTN needs no floor."""
    got = {}
    for floor, method in ((0.0, "gptq"), (4.0, "gptq"), (4.0, "rtn")):
        model = tiny_moe("mixtral")
        hidden = model.config.hidden_size
        ctx = _ctx(model, tmp_path / f"{floor}{method}", samples=2, seq_len=32)
        result = STAGES.get("quantize").run(ctx, QuantizeConfig(scheme="w4a16", group_size=8, method=method,
                                                                balance_per_input=floor, sequential=False,
                                                                save_format="fake-quant"))
        got[floor, method] = [v["experts"] for v in result["layers"].values() if "experts" in v]
    ratio_min = got[0.0, "gptq"][0]["min_tokens"]
    assert ratio_min < 4 * hidden and got[4.0, "gptq"][0]["min_tokens"] == 4 * hidden
    assert got[4.0, "rtn"][0]["min_tokens"] == ratio_min
    # the same base tokens in the first MoE layer (later layers read the differently quantized layers before them)
    assert got[0.0, "gptq"][0]["routed_tokens"] == got[4.0, "gptq"][0]["routed_tokens"]
    for high in got[4.0, "gptq"]:
        short = [e for e, n in enumerate(high["routed_tokens"]) if n < 4 * hidden]
        assert short  # tiny calibration: experts under the floor exist
        topped = set(high["topped_up_reserve"]) | set(high["topped_up_near_miss"]) | set(high["topped_up_pooled"])
        assert set(short) <= topped
        assert all(high["tokens_used"][e] >= min(4 * hidden, n) for e, n in enumerate(high["routed_tokens"]))
        assert all(high["tokens_used"][e] >= 4 * hidden or e in high["topped_up_pooled"] for e in short)


@pytest.mark.parametrize("family", sorted(FAMILY))
def test_quantize_runs_on_every_adapter(family, tmp_path):
    model = tiny_moe(family)
    ctx = _ctx(model, tmp_path)
    scheme = "w4a4" if family in ("qwen2_moe", "deepseek_v3", "gpt_oss") else "w4a16"
    x = torch.randint(0, 256, (1, 16))
    with torch.no_grad():
        ref = model(input_ids=x).logits
    result = STAGES.get("quantize").run(ctx, QuantizeConfig(scheme=scheme, group_size=8, router_bits=8,
                                                            save_format="fake-quant"))
    with torch.no_grad():
        out = model(input_ids=x).logits
    assert torch.isfinite(out).all() and not torch.equal(out, ref)
    assert (out - ref).abs().mean() < ref.abs().mean()  # quantized, not destroyed
    assert all(a > 0.5 for a in result["routing_topk_agreement_calib"])
    assert len(QuantRecord.load(tmp_path).weights()) > 3


def test_group_size_must_divide_every_width():
    cfg = tiny_config("mixtral")  # expert width 24
    with pytest.raises(MoecompressError, match="group size 16 does not divide the input width 24 .*--group-size 8"):
        QuantizeConfig(scheme="w4a16", group_size=16).check(cfg, find_arch(cfg))
    QuantizeConfig(scheme="w4a16", group_size=8).check(cfg, find_arch(cfg))
    QuantizeConfig(scheme="w4a4").check(cfg, find_arch(cfg))  # per channel


def test_quantized_directory_reloads_with_activation_quantization(tmp_path):
    r = validate_recipe({"model": "tiny:olmoe", "calibration": {"tasks": ["prose"], "samples": 2, "seq_len": 32},
                         "stages": [{"stage": "quantize", "scheme": "w4a4", "group_size": 8,
                                     "save_format": "fake-quant"}]})
    run(r, output=tmp_path / "q")
    side = json.loads((tmp_path / "q" / "moecompress.json").read_text())
    assert side["quantization"]["activations"]["bits"] == 4
    loaded = load_model(str(tmp_path / "q"))
    x = torch.randint(0, 256, (1, 12))
    with torch.no_grad():
        simulated = loaded.model(input_ids=x).logits
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "q", dtype=torch.float32).eval()
    with torch.no_grad():
        assert not torch.allclose(plain(input_ids=x).logits, simulated)  # A4 is simulated on load


def test_calibration_text_too_short(tmp_path):
    f = tmp_path / "tiny.txt"
    f.write_text("just a few words")
    r = validate_recipe({"model": "tiny:mixtral", "calibration": {"tasks": ["mine"], "data": {"mine": str(f)},
                                                                  "samples": 4, "seq_len": 32},
                         "stages": [{"stage": "quantize", "scheme": "w4a16", "group_size": 8}]})
    with pytest.raises(MoecompressError, match="fewer than one window"):
        run(r, output=tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_clip_floor_defaults_to_0_8_for_gptq_at_two_bits_only():
    """`clip_floor` None: 0.8 for GPTQ at 2 bits (wider ranges suit GPTQ's error feedback there), 0.2 (the full
    search) for round-to-nearest and above 2 bits; a number applies everywhere; out of [0.2, 1] is refused."""
    from pydantic import ValidationError

    for scheme, method, want in (("w2a16", "gptq", 0.8), ("w2a16", "rtn", 0.2), ("w3a16", "gptq", 0.2),
                                 ("w4a16", "gptq", 0.2), ("w4a4", "gptq", 0.2)):
        plan = plan_of(QuantizeConfig(scheme=scheme, method=method))[0]
        assert plan.experts.grid.clip_floor == plan.linears.grid.clip_floor == want
        assert plan_of(QuantizeConfig(scheme=scheme, method=method, clip_floor=0.5))[0].experts.grid.clip_floor == 0.5
    for bad in (0.1, 1.5):
        with pytest.raises(ValidationError):
            QuantizeConfig(scheme="w2a16", clip_floor=bad)


def test_fractional_zeros_default_to_two_bit_asymmetric_weights():
    """`fractional_zeros` None: 6 fraction bits (steps of 1/64) for 2-bit asymmetric grids, integers above and on
    symmetric grids; True/False apply to every asymmetric width; per width with mixed precision; recorded in the
    metadata only where used."""
    for scheme, sym, want in (("w2a16", False, 6), ("w2a16", True, 0), ("w3a16", False, 0), ("w4a16", False, 0),
                              ("w4a4", False, 0)):
        plan, meta = plan_of(QuantizeConfig(scheme=scheme, symmetric=sym))
        assert plan.experts.grid.zero_frac == plan.linears.grid.zero_frac == want
        assert meta["experts"].get("zero_fraction_bits", 0) == want
    on = plan_of(QuantizeConfig(scheme="w4a16", fractional_zeros=True))[0]
    assert on.experts.grid.zero_frac == 4
    assert plan_of(QuantizeConfig(scheme="w2a16", fractional_zeros=False))[0].experts.grid.zero_frac == 0
    plan, meta = plan_of(QuantizeConfig(scheme="w2a16", linear_bits=4, layer_bits={0: 3}))
    assert (plan.experts.grid.zero_frac, plan.linears.grid.zero_frac) == (6, 0)
    assert all(o.grid.zero_frac == 0 for o in plan.layers[0])
    assert "zero_fraction_bits" not in meta["weights"] and "layer_zero_fraction_bits" not in meta


def test_gptq_rounds_default_to_two_bit_weights_and_change_only_those_bytes(tmp_path):
    """`gptq_rounds` None: 2 rounds for 2-bit weights, none above; a number applies at every width. At W2 the
    rounds change the codes (GPTQ on the refit grid chooses others), at W3 the default writes what 0 writes."""
    for scheme, want in (("w2a16", 2), ("w3a16", 0), ("w4a16", 0), ("w4a4", 0)):
        plan = plan_of(QuantizeConfig(scheme=scheme))[0]
        assert plan.experts.gptq_rounds == plan.linears.gptq_rounds == want
        assert plan_of(QuantizeConfig(scheme=scheme, gptq_rounds=3))[0].experts.gptq_rounds == 3
    got, errors = {}, {}
    for scheme, rounds in (("w2a16", None), ("w2a16", 0), ("w3a16", None), ("w3a16", 0)):
        ctx = _ctx(tiny_moe("mixtral"), tmp_path / f"{scheme}{rounds}", samples=2, seq_len=32)
        result = STAGES.get("quantize").run(ctx, QuantizeConfig(scheme=scheme, group_size=8, gptq_rounds=rounds,
                                                                save_format="fake-quant"))
        got[scheme, rounds] = {k: v.clone() for k, v in ctx.model.state_dict().items()}
        errors[scheme, rounds] = [e for v in result["layers"].values() if "experts" in v
                                  for e in v["experts"]["weight_error"].values()]
    # the result reports the rounds run and the share of the Hessian-weighted error they removed (never negative)
    assert all(1 <= e["gptq_rounds"] <= 2 and 0.0 <= e["gptq_rounds_gain"] < 1.0 for e in errors["w2a16", None])
    assert any(e["gptq_rounds_gain"] > 0.01 for e in errors["w2a16", None])
    assert not any("gptq_rounds" in e for k in (("w2a16", 0), ("w3a16", None)) for e in errors[k])
    assert any(not torch.equal(got["w2a16", None][k], got["w2a16", 0][k]) for k in got["w2a16", 0])
    assert all(torch.equal(got["w3a16", None][k], got["w3a16", 0][k]) for k in got["w3a16", 0])


def test_linear_bits_defaults_to_the_scheme_and_sets_its_own_width_defaults():
    """`linear_bits` None: every linear at the scheme's width; a number: the non-expert linears at that width with
    that width's clip floor and GPTQ rounds (0.2 / 0 at 4 bits), the routed experts keep the scheme's (0.8 / 2 at 2),
    and the metadata records both widths; out of [2, 8] is refused."""
    from pydantic import ValidationError

    plan, meta = plan_of(QuantizeConfig(scheme="w3a16"))
    assert plan.experts.grid.bits == plan.linears.grid.bits == 3 and meta["weights"]["bits"] == 3
    plan, meta = plan_of(QuantizeConfig(scheme="w2a16", linear_bits=4))
    assert (plan.experts.grid.bits, plan.experts.grid.clip_floor, plan.experts.gptq_rounds) == (2, 0.8, 2)
    assert (plan.linears.grid.bits, plan.linears.grid.clip_floor, plan.linears.gptq_rounds) == (4, 0.2, 0)
    assert (meta["experts"]["bits"], meta["weights"]["bits"]) == (2, 4)
    for bad in (1, 9):
        with pytest.raises(ValidationError):
            QuantizeConfig(scheme="w2a16", linear_bits=bad)


def test_layer_bits_give_those_layers_their_own_options_and_are_checked():
    """`layer_bits` {0: 4}: layer 0's experts and linears at 4 bits with 4-bit defaults (no GPTQ rounds, the full clip
    search), the other layers the scheme's; the packed writer gets the widths; a layer the model lacks or a width
    outside 2-8 is refused."""
    from pydantic import ValidationError

    plan, meta = plan_of(QuantizeConfig(scheme="w2a16", linear_bits=3, layer_bits={0: 4}))
    first, other = plan.at(0), plan.at(1)
    for opt in (first.experts, first.linears):
        assert (opt.grid.bits, opt.gptq_rounds, opt.grid.clip_floor) == (4, 0, 0.2)
    assert other is plan and (other.experts.grid.bits, other.linears.grid.bits, other.experts.gptq_rounds) == (2, 3, 2)
    assert meta["layer_bits"] == {"0": 4} and "layer_bits" not in plan_of(QuantizeConfig(scheme="w2a16"))[1]
    cfg = tiny_config("mixtral")
    with pytest.raises(MoecompressError, match=f"layer 9, but the model has {cfg.num_hidden_layers} decoder layers"):
        QuantizeConfig(scheme="w2a16", layer_bits={9: 4}).check(cfg, find_arch(cfg))
    for bad in ({0: 1}, {0: 9}, {-1: 4}):
        with pytest.raises(ValidationError):
            QuantizeConfig(scheme="w2a16", layer_bits=bad)


def test_widths_without_a_packed_codec_are_refused_before_any_work_unless_fake_quant():
    """5-7-bit linears or layers have no integer codec: a packed run stops in `check` (before calibrating) with
    the widths it can store; a fake-quant run (no codec needed) passes the check."""
    cfg = tiny_config("mixtral")
    for given, named in (({"linear_bits": 7}, r"--linear-bits 7 \(linear_bits\)"),
                          ({"layer_bits": {1: 5}}, r"--layer-bits 1:5 \(layer_bits\)")):
        with pytest.raises(MoecompressError, match=f"{named}: packed checkpoints store 2, 3, 4, 8-bit") as err:
            QuantizeConfig(scheme="w4a16", group_size=8, **given).check(cfg, find_arch(cfg))
        assert "--fake-quant" in err.value.fix
        QuantizeConfig(scheme="w4a16", group_size=8, save_format="fake-quant", **given).check(cfg, find_arch(cfg))
    QuantizeConfig(scheme="w2a16", group_size=8, linear_bits=8, layer_bits={0: 3}).check(cfg, find_arch(cfg))


@pytest.mark.parametrize("family", sorted(FAMILY))
def test_linear_and_layer_bits_pack_each_part_at_its_width(family, tmp_path):
    """W2A16 with ``linear_bits: 4`` and ``layer_bits: {1: 3}`` on every adapter: the packed checkpoint stores every
    non-expert linear as int4 and every routed expert as int2-fz (2-bit weights take fractional zero points by
    default, the wider ones integers) except in layer 1 (all int3), their codes use those ranges, it loads, and the
    attention's weight error is below the plain W2A16 checkpoint's (same calibration)."""
    from moecompress.formats.spec import module_specs

    outs = {}
    for lb in (None, 4):
        stage = {"stage": "quantize", "scheme": "w2a16", "group_size": 8,
                 **({"linear_bits": lb, "layer_bits": {1: 3}} if lb else {})}
        outs[lb] = tmp_path / f"q{lb}"
        run(validate_recipe({"model": f"tiny:{family}", "stages": [stage],
                             "calibration": {"tasks": ["prose"], "samples": 2, "seq_len": 32}}), output=outs[lb])
    specs = module_specs(json.loads((outs[4] / "config.json").read_text())["quantization_config"]["modules"])
    arch = find_arch(tiny_config(family))

    def codecs(one):
        got = {s.codec for p, s in specs.items() if s.type == "linear" and one(p)}
        return got, {c for p, s in specs.items() if s.type == "experts" and one(p) for c in s.codecs.values()}

    in1 = f"{arch.layers}.1."
    assert codecs(lambda p: not p.startswith(in1)) == ({"int4"}, {"int2-fz"})
    got1 = codecs(lambda p: p.startswith(in1))
    assert got1[0] == {"int3"} and got1[1] <= {"int3"}  # layer 1: every width 3 (some families: dense there)
    side = json.loads((outs[4] / "moecompress.json").read_text())["quantization"]
    assert (side["weights"]["bits"], side["experts"]["bits"], side["layer_bits"]) == (4, 2, {"1": 3})
    # the stage reports the written size: the wider parts cost bits per weight
    sizes = [json.loads((outs[lb] / "moecompress.json").read_text())["stages"][0]["result"] for lb in (None, 4)]
    assert sizes[0]["packed_weights"] == sizes[1]["packed_weights"] > 0
    assert 2.0 < sizes[0]["packed_bits_per_weight"] < sizes[1]["packed_bits_per_weight"]
    from safetensors.torch import load_file

    from moecompress.formats.codecs import decode
    from moecompress.kernels.reference import dequantize

    original = tiny_moe(family).state_dict()
    err = {}
    for lb, out in outs.items():
        x = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            assert torch.isfinite(load_model(str(out)).model(input_ids=x).logits).all()
        sd = load_file(str(out / "model.safetensors"))
        attn = [p for p, s in specs.items() if s.type == "linear" and "attn" in p and f"{p}.weight" in original]
        assert attn
        err[lb] = 0.0
        for p in attn:
            spec = module_specs(json.loads((out / "config.json").read_text())["quantization_config"]["modules"])[p]
            q, sc, z = decode(spec.codec, {k[len(p) + 8:]: v for k, v in sd.items() if k.startswith(f"{p}.weight_")})
            assert int(q.max()) <= (3 if not lb else 7 if p.startswith(in1) else 15)
            err[lb] += float((dequantize(q, sc, z)[0] - original[f"{p}.weight"]).pow(2).sum())
    assert err[4] < 0.5 * err[None]
