"""Sequential quantization with asymmetric calibration (`runtime.paired`, `algorithms.asym_calib`, GPTAQ): each
linear toward its full-precision outputs from its quantized inputs, on every adapter."""

import pytest
import torch

from moecompress.algorithms.quant_grid import QuantGrid
from moecompress.formats.quant_record import QuantRecord
from moecompress.models import find_arch
from moecompress.runtime.calibration import collect
from moecompress.runtime.paired import collect_pairs
from moecompress.runtime.executor import LayerStream, ModelSource
from moecompress.runtime.expert_quant import quantize_experts
from moecompress.runtime.layer_quant import QuantOptions
from moecompress.stages.quantize import QuantizeConfig
from moecompress.testing import FAMILY, tiny_moe


@torch.no_grad()
def _quantized_block(family: str, correct: bool):
    """W2 g8 GPTQ of the first MoE block's experts; the routed experts' output error on the calibration tokens
    (mean squared, against the full-precision block) and the record."""
    model = tiny_moe(family)
    arch = find_arch(model.config)
    i = arch.moe_layer_indices(model.config)[0]
    stream = LayerStream(ModelSource(model.config, arch, model=model),
                         [torch.randint(0, 256, (16, 32), generator=torch.Generator().manual_seed(0))])
    for j in range(i):
        stream.run_layer(j)
    layer = stream.layers[i]
    view = arch.block(model, i)
    out = {}
    hook = view.experts.module.register_forward_hook(lambda m, a, o: out.__setitem__(
        "y", (o[0] if isinstance(o, tuple) else o).clone()))
    with collect(layer, [view], getattr(layer, arch.pre_attn_norm), near_miss=2) as stats:
        stream.run_layer(i, store=False)
    ref = out["y"]

    def pairs(which, gate, up, experts, last):
        if which == "gate_up":
            return None
        with collect_pairs(view, which, gate, up, experts) as got:
            stream.run_layer(i, store=False)
        return got

    record = QuantRecord()
    opt = QuantOptions.of(QuantGrid(2, 8, False, True), QuantizeConfig())
    result = quantize_experts(view, stats, opt, record, "p", False, 0.0, "rtn",
                              pairs=pairs if correct else None)
    stream.run_layer(i, store=False)
    hook.remove()
    return float(((out["y"] - ref) ** 2).mean()), record, result


@pytest.mark.parametrize("family", sorted(FAMILY))
def test_down_correction_lowers_the_experts_output_error(family):
    plain, rec_plain, _ = _quantized_block(family, False)
    fixed, rec_fixed, result = _quantized_block(family, True)
    assert result["corrected"]["gate_up"] == [] and result["corrected"]["down"]  # down: every expert with 4 x I tokens
    assert fixed < plain  # in-sample: the down projections' paired objective is what the block output sums
    for proj in ("gate", "up"):  # only the down projection changes
        torch.testing.assert_close(rec_fixed.tensors[f"p:{proj}.codes"], rec_plain.tensors[f"p:{proj}.codes"])
    assert not torch.equal(rec_fixed.tensors["p:down.codes"], rec_plain.tensors["p:down.codes"])


@pytest.mark.parametrize("family", sorted(FAMILY))
def test_sequential_quantize_stage_on_every_adapter(family, tmp_path):
    """The stage with ``sequential``: the attention output (every linear not reading a norm) and every expert's
    gate/up and down projections are fit on their quantized inputs; the model is not destroyed (tiny random
    models at W4 g8 move by 0.1-0.25 of the logits' mean magnitude)."""
    from moecompress.context import Context
    from moecompress.io.model import LoadedModel, tiny_tokenizer
    from moecompress.recipe import CalibrationConfig
    from moecompress.stages import STAGES

    model = tiny_moe(family)
    ctx = Context(LoadedModel(model, tiny_tokenizer(), find_arch(model.config), "tiny", None, torch.float32),
                  CalibrationConfig(tasks=["prose", "code"], samples=8, seq_len=64), tmp_path)
    x = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(input_ids=x).logits
    result = STAGES.get("quantize").run(ctx, QuantizeConfig(scheme="w4a16", group_size=8, sequential=True,
                                                            save_format="fake-quant"))
    with torch.no_grad():
        out = model(input_ids=x).logits
    assert torch.isfinite(out).all() and (out - ref).abs().mean() < 0.5 * ref.abs().mean()  # quantized, not destroyed
    moe = [v for v in result["layers"].values() if "experts" in v]
    assert moe and all(v["experts"]["corrected"]["gate_up"] and v["experts"]["corrected"]["down"] for v in moe)
    paired = [n for v in result["layers"].values() for n, lin in v.get("linears", {}).items() if lin["paired"]]
    assert any(n.endswith(("o_proj", "dense", "out_proj", "wo")) for n in paired), paired


def test_too_few_tokens_keep_plain_gptq(tmp_path):
    """Below `MIN_TOKENS_PER_INPUT` tokens per input no linear or expert is paired: the first layer's norm readers
    (q, k, v) equal plain GPTQ's byte for byte; the linears after them (the attention output) and the experts are
    GPTQ on the Hessian of their inputs once the linears before them are quantized (GPTQ's "true sequential"), so
    they differ, as do the layers after."""
    from moecompress.context import Context
    from moecompress.io.model import LoadedModel, tiny_tokenizer
    from moecompress.recipe import CalibrationConfig
    from moecompress.stages import STAGES

    codes = []
    for seq in (True, False):
        model = tiny_moe("mixtral")
        ctx = Context(LoadedModel(model, tiny_tokenizer(), find_arch(model.config), "tiny", None, torch.float32),
                      CalibrationConfig(tasks=["prose"], samples=1, seq_len=32), tmp_path / str(seq))
        result = STAGES.get("quantize").run(ctx, QuantizeConfig(scheme="w4a16", group_size=8, sequential=seq,
                                                                balance=False, save_format="fake-quant"))
        if seq:
            assert not any(v["experts"]["corrected"]["down"] or v["experts"]["corrected"]["gate_up"]
                           for v in result["layers"].values() if "experts" in v)
        codes.append(model.state_dict())
    first = [k for k in codes[0] if k.startswith("model.layers.0.") and k.endswith(("q_proj.weight", "k_proj.weight",
                                                                                       "v_proj.weight"))]
    assert len(first) == 3
    for k in first:
        assert torch.equal(codes[0][k], codes[1][k]), k
    assert not torch.equal(codes[0]["model.layers.0.self_attn.o_proj.weight"],
                           codes[1]["model.layers.0.self_attn.o_proj.weight"])
    assert any(not torch.equal(v, codes[1][k]) for k, v in codes[0].items() if ".experts." in k)


def _quantize_records(family, tmp_path, **cfg):
    """The quantize stage (W2 g8, fake-quant) on a tiny model of ``family``: its record tensors and result."""
    from moecompress.context import Context
    from moecompress.io.model import LoadedModel, tiny_tokenizer
    from moecompress.recipe import CalibrationConfig
    from moecompress.stages import STAGES

    model = tiny_moe(family)
    ctx = Context(LoadedModel(model, tiny_tokenizer(), find_arch(model.config), "tiny", None, torch.float32),
                  CalibrationConfig(tasks=["prose", "code"], samples=4, seq_len=64), tmp_path)
    result = STAGES.get("quantize").run(ctx, QuantizeConfig(scheme="w2a16", group_size=8, save_format="fake-quant",
                                                            **cfg))
    return QuantRecord.load(tmp_path).tensors, result


@pytest.mark.parametrize("family", sorted(FAMILY))
def test_attention_replay_writes_the_same_bytes(family, tmp_path, monkeypatch):
    """Once the attention's output projection is quantized, the later passes replay it on its recorded inputs
    instead of running the attention: the quantized bytes are those of running it, on every adapter; the replay
    is taken where every other attention linear reads the norm (not on MLA's two-stage projections)."""
    import contextlib

    from moecompress.runtime import quantize_run
    from moecompress.runtime import replay as replay_mod

    found = []
    real = replay_mod.record_output_replay

    @contextlib.contextmanager
    def spy(*args, **kwargs):
        with real(*args, **kwargs) as box:
            yield box
        found.append(box[0])
    monkeypatch.setattr(quantize_run, "record_output_replay", spy)
    with_replay, _ = _quantize_records(family, tmp_path / "replay")

    @contextlib.contextmanager
    def never(*args, **kwargs):
        yield [None]
    monkeypatch.setattr(quantize_run, "record_output_replay", never)
    without, _ = _quantize_records(family, tmp_path / "run")
    assert sorted(with_replay) == sorted(without)
    for k in without:
        assert torch.equal(with_replay[k], without[k]), k
    used = [r for r in found if r is not None]
    if family.startswith("deepseek"):  # MLA: kv_b (and q_b) read their own norms, quantized with the output
        assert found and not used
    else:
        assert found and len(used) == len(found)
        assert all(len(r.inputs) > 0 and isinstance(r.linear, torch.nn.Linear) for r in used)


def test_replay_is_refused_when_the_module_returns_more_than_its_linear():
    """The check: a module whose output is not exactly its last linear's output is never replayed."""
    from moecompress.runtime.replay import record_output_replay

    class Attn(torch.nn.Module):
        def __init__(self, scaled):
            super().__init__()
            self.q, self.o, self.scaled = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4), scaled

        def forward(self, x):
            y = self.o(torch.relu(self.q(x)))
            return (y * 2 if self.scaled else y), None

    for scaled in (False, True):
        layer = torch.nn.Module()
        layer.attn = Attn(scaled)
        with record_output_replay(layer, {"attn.o": layer.attn.o}, {"attn.q"}) as box:
            for _ in range(3):
                layer.attn(torch.randn(2, 4))
        assert (box[0] is None) == scaled
        with record_output_replay(layer, {"attn.o": layer.attn.o}, set()) as box:  # q not final: no candidate
            layer.attn(torch.randn(2, 4))
        assert box[0] is None


@pytest.mark.parametrize("family", sorted(FAMILY))
@pytest.mark.parametrize("which", ["gate_up", "down"])
def test_experts_pairs_grouped_equal_per_call(family, which, monkeypatch):
    """`collect_pairs` accumulates the experts' calls in groups of concatenated tokens (`GROUP_TOKENS`): the same
    products and counts as one call at a time, on every adapter, through the hook and replayed; the replay list
    holds every call."""
    from moecompress.runtime import paired

    model = tiny_moe(family)
    arch = find_arch(model.config)
    i = arch.moe_layer_indices(model.config)[0]
    batches = [torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(s)) for s in range(3)]
    stream = LayerStream(ModelSource(model.config, arch, model=model), batches)
    for j in range(i):
        stream.run_layer(j)
    view = arch.block(model, i)
    w = view.experts.weights()
    gate, up = (t.float() + 0.01 * torch.randn(t.shape, generator=torch.Generator().manual_seed(1))
                for t in (w.gate, w.up))  # "full precision" weights differing from the block's
    got = {}
    for group in (0, 1 << 30):  # one call at a time, every call at once
        monkeypatch.setattr(paired, "GROUP_TOKENS", group)
        monkeypatch.setattr(paired, "GROUP_BYTES", group)
        calls: list = []
        with torch.no_grad(), collect_pairs(view, which, gate, up, keep=calls) as hooked:
            stream.run_layer(i, store=False)
        with torch.no_grad(), collect_pairs(view, which, gate, up, replay=calls) as replayed:
            pass
        assert len(calls) == len(batches)
        got[group] = (hooked, replayed)
    for a, b in [(got[0][0], got[1 << 30][0]), (got[0][1], got[1 << 30][1]), (got[0][0], got[0][1])]:
        assert torch.equal(a.count, b.count) and a.count.sum() > 0
        for x, y in ((a.Hq, b.Hq), (a.C, b.C)):
            assert x.abs().sum() > 0
            torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5 * float(y.abs().max()))
