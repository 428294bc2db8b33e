"""The routed experts quantized a chunk at a time (`runtime.expert_quant`, `QuantizeConfig.expert_chunk`): the
same weights as all at once on every adapter, with each chunk's statistics the only ones held, and the automatic
chunk sized to the device's memory (`runtime.memory.expert_chunk`)."""

import pytest
import torch

import moecompress.runtime.expert_quant as expert_quant
import moecompress.runtime.paired as paired
import moecompress.runtime.quantize_run as quantize_run
from moecompress.context import Context
from moecompress.io.model import LoadedModel, tiny_tokenizer
from moecompress.models import find_arch
from moecompress.recipe import CalibrationConfig
from moecompress.runtime import memory
from moecompress.runtime import token_weights
from moecompress.runtime.expert_stats import ExpertStats, expert_step
from moecompress.stages import STAGES
from moecompress.stages.quantize import QuantizeConfig
from moecompress.testing import FAMILY, tiny_moe


def _quantized(family: str, tmp_path, chunk: int, seen: list | None = None, **kw) -> dict[str, torch.Tensor]:
    """The fake-quantized state dict of a tiny ``family`` model at ``kw`` with ``expert_chunk=chunk``; ``seen``
    collects how many experts each pairing pass's statistics held."""
    model = tiny_moe(family)
    ctx = Context(LoadedModel(model, tiny_tokenizer(), find_arch(model.config), "tiny", None, torch.float32),
                  CalibrationConfig(tasks=["prose", "code"], samples=4, seq_len=32), tmp_path / f"{family}{chunk}")
    STAGES.get("quantize").run(ctx, QuantizeConfig(group_size=8, save_format="fake-quant", expert_chunk=chunk, **kw))
    return {k: v.detach().clone() for k, v in ctx.model.state_dict().items()}


@pytest.mark.parametrize("family", sorted(FAMILY))
def test_chunks_of_experts_give_the_weights_of_one(family, tmp_path, monkeypatch):
    """W2's default (sequential targets from the original model: every Hessian from the pairing passes, GPTQ
    rounds, pooled rare experts) in chunks of 1 and 3 experts: the same weights, bit for bit, as all at once, and
    no pairing pass holds more experts than the chunk."""
    seen: list[int] = []
    real = paired.collect_pairs

    def counting(view, which, gate, up, owned=None, *a, **k):
        seen.append(len(range(view.num_experts) if owned is None else owned))
        return real(view, which, gate, up, owned, *a, **k)

    monkeypatch.setattr(quantize_run, "collect_pairs", counting)
    whole = _quantized(family, tmp_path, 10 ** 6, scheme="w2a16")
    E = find_arch(tiny_moe(family).config).num_experts(tiny_moe(family).config)
    assert seen and max(seen) == E  # one chunk: every expert's pairs at once
    for chunk in (1, 3):
        seen.clear()
        got = _quantized(family, tmp_path, chunk, scheme="w2a16")
        assert seen and max(seen) <= chunk
        assert got.keys() == whole.keys()
        for k in whole:
            assert torch.equal(got[k], whole[k]), (chunk, k)


@pytest.mark.parametrize("family", sorted(FAMILY))
def test_chunks_without_pairing_give_the_weights_of_one(family, tmp_path, monkeypatch):
    """W4's default (plain GPTQ, calibration balance) and W3 with the layer's own sequential targets (the down
    projections paired, the experts' calls replayed across chunks): in chunks of 2 the statistics pass keeps no
    routed Hessian and each chunk's are computed from its kept calls, the same weights as all at once."""
    seen: list[int] = []
    real = expert_quant.routed_hessians

    def counting(st, view, experts):
        assert st.H.shape[0] == 0  # no [E, H, H] tensor from the statistics pass
        seen.append(len(experts))
        return real(st, view, experts)

    monkeypatch.setattr(expert_quant, "routed_hessians", counting)
    for kw in ({"scheme": "w4a16"}, {"scheme": "w3a16", "sequential_targets": "layer"}):
        whole = _quantized(family, tmp_path / kw["scheme"], 0, **kw)
        assert not seen  # all experts fit: the statistics pass's own routed Hessians
        got = _quantized(family, tmp_path / kw["scheme"], 2, **kw)
        assert seen and max(seen) <= 2
        seen.clear()
        for k in whole:
            assert torch.equal(got[k], whole[k]), (kw, k)


def test_statistics_without_routed_hessians_hold_none():
    """With the routed Hessians left to the pairing passes, the statistics hold no [E, H, H] tensor; top-ups are
    still allocated per expert."""
    st = ExpertStats.empty(64, 32, 16, routed=False)
    assert st.H.shape == (0, 32, 32) and st.H_down.shape == (0, 16, 16) and st.hessians
    H, Hd = st.extra("res", 5)
    assert H.shape == (32, 32) and Hd.shape == (16, 16)
    assert not ExpertStats.empty(64, 32, 16, hessians=False).hessians


@pytest.mark.parametrize("family", sorted(FAMILY))
@pytest.mark.parametrize("owned", [None, range(1, 3)])
def test_counts_without_routed_hessians_equal_the_per_expert_ones(family, owned):
    """Without routed Hessians a call's counts, gate sums and input maxima are taken for every expert at once: the
    same as with them (computed expert by expert), for a process's share of the experts and with token weights."""
    model = tiny_moe(family)
    arch = find_arch(model.config)
    view = arch.block(model, arch.moe_layer_indices(model.config)[0])
    E, C = view.num_experts, view.router_weight.shape[1]
    I = view.experts.stacked("down").shape[2]
    got = []
    for routed in (True, False):
        g = torch.Generator().manual_seed(0)  # the same calls
        st = ExpertStats.empty(E, C, I, owned=owned, routed=routed)
        for call in range(3):
            x = torch.randn(40, C, generator=g)
            logits = torch.randn(40, E, generator=g)
            weights, index = logits.softmax(-1).topk(min(2, E), -1)
            tw = torch.rand(40, generator=g) if call == 1 else None
            with token_weights.weighting(tw):
                expert_step(st, view, x, logits, index, weights, 0, "routed", 1000)
        got.append(st)
    a, b = got
    assert a.count.sum() > 0 and b.H.shape[0] == 0
    assert torch.equal(a.count, b.count) and torch.equal(a.act_max, b.act_max)
    torch.testing.assert_close(a.gate_sum, b.gate_sum)
    if owned is not None:  # another process's experts: left at zero (summed over processes)
        mask = torch.ones(E, dtype=torch.bool)
        mask[owned.start:owned.stop] = False
        assert not b.count[mask].any() and not b.act_max[mask].any() and not b.gate_sum[mask].any()
    torch.testing.assert_close(a.router_act_max, b.router_act_max)


def test_automatic_chunk_fits_the_share_of_the_device(monkeypatch):
    monkeypatch.setattr(memory, "device_bytes", lambda device: 100 << 30)  # a 100 GiB device
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    per = 3 * 7168 * 7168 * 4  # DeepSeek-V3's gate/up statistics with the sequential pairing: 617 MB per expert
    assert memory.expert_chunk(per, 256, gpu) == int(0.4 * (100 << 30)) // per == 69
    assert memory.expert_chunk(per, 256, cpu, processes=2) == int(0.4 * (50 << 30)) // per  # the host is shared
    assert memory.expert_chunk(per, 8, gpu) == 8  # never more than the experts
    assert memory.expert_chunk(10 ** 15, 8, gpu) == 1  # never fewer than one
    monkeypatch.setattr(memory, "device_bytes", lambda device: None)
    assert memory.expert_chunk(per, 256, gpu) == 256  # unknown memory: all at once, as before


def test_host_memory_is_known_here():
    assert memory.device_bytes(torch.device("cpu")) > 1 << 28


def test_expert_chunk_is_validated():
    with pytest.raises(ValueError):
        QuantizeConfig(scheme="w4a16", expert_chunk=-1)
