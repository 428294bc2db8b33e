import pytest
import torch

from moecompress.algorithms.expert_scores import STATS, expert_scores, js_divergence, routing_statistics, super_experts
from moecompress.testing import DeviceMix


def test_js_divergence_bounds():
    p = torch.tensor([[0.5, 0.5, 0.0, 0.0]])
    assert float(js_divergence(p, p)) == 0.0
    assert abs(float(js_divergence(p, torch.tensor([[0.0, 0.0, 0.5, 0.5]]))) - 1.0) < 1e-12
    q = torch.tensor([[0.25, 0.25, 0.25, 0.25]])
    assert 0 < float(js_divergence(p, q)) < 1 and torch.allclose(js_divergence(p, q), js_divergence(q, p))


def test_super_experts_flag_outliers_in_early_layers_only():
    act = torch.ones(8, 16)
    act[1, 3] = 500.0
    act[7, 2] = 900.0  # last quarter of layers: not looked at
    flags = super_experts(act)
    assert flags.nonzero().tolist() == [[1, 3]]


def test_statistics_of_a_hand_made_layer():
    logits = torch.tensor([[2.0, 1.0, -1.0], [0.0, 3.0, 1.0]])
    probs = logits.softmax(-1)
    index = torch.tensor([[0, 1], [1, 2]])
    weights = torch.tensor([[0.7, 0.3], [0.6, 0.4]])
    norm = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    s = routing_statistics(logits, probs, index, weights, norm, norm, norm, tcess_k=1)
    assert s["count"].tolist() == [1, 2, 1] and s["top1"].tolist() == [1, 1, 0]
    assert torch.allclose(s["gate_sum"], torch.tensor([0.7, 0.9, 0.4], dtype=torch.float64))
    assert torch.allclose(s["tcess_logit"], torch.tensor([2.0, 3.0, 0.0], dtype=torch.float64))
    assert torch.allclose(s["reap_sum"], torch.tensor([0.7, 0.6 + 1.8, 1.6], dtype=torch.float64))
    assert s["act_max"].tolist() == [1.0, 3.0, 4.0]
    freq = expert_scores({k: v[None] for k, v in s.items()}, 2, "frequency")[0]
    assert freq.tolist() == [0.5, 1.0, 0.5]
    reap = expert_scores({k: v[None] for k, v in s.items()}, 2, "reap")[0]
    assert torch.allclose(reap, torch.tensor([0.7, 1.2, 1.6], dtype=torch.float64))
    with pytest.raises(ValueError):
        expert_scores({k: v[None] for k, v in s.items()}, 2, "nonsense")


def test_consensus_is_the_mean_rank_and_ignores_each_scores_units():
    """consensus: each expert's rank in its layer averaged over tcess, frequency, reap, reap_freq and ean; a
    monotone change of the statistics' scale changes no rank, so no consensus value."""
    g = torch.Generator().manual_seed(0)
    L, E = 3, 6
    stats = {"count": torch.randint(1, 50, (L, E), generator=g).double(),
             "tcess_logit": torch.randn(L, E, generator=g).double(), "tcess_prob": torch.rand(L, E, generator=g).double(),
             "reap_sum": torch.rand(L, E, generator=g).double() * 10, "ean_sum": torch.rand(L, E, generator=g).double(),
             "gate_sum": torch.rand(L, E, generator=g).double()}
    got = expert_scores(stats, 100, "consensus")
    want = torch.zeros(L, E, dtype=torch.float64)
    for c in ("tcess", "frequency", "reap", "reap_freq", "ean"):
        s = expert_scores(stats, 100, c)
        for j in range(L):
            for e in range(E):
                lower = (s[j] < s[j, e]) | ((s[j] == s[j, e]) & (torch.arange(E) < e))  # ties: by expert index
                want[j, e] += float(lower.sum()) / 5
    assert torch.allclose(got, want)
    scaled = {**stats, "reap_sum": stats["reap_sum"] * 1e6, "ean_sum": stats["ean_sum"] * 1e-6}
    assert torch.equal(expert_scores(scaled, 100, "consensus"), got)
    assert got.min() >= 0 and got.max() <= E - 1


def test_routing_statistics_stay_on_the_inputs_device():
    """`profile --device cuda` calls this on the GPU's tensors: every sum must be made there (a CPU buffer
    with a CUDA index is an error in ``index_add_``)."""
    T, E, K = 12, 6, 2
    logits = torch.randn(T, E, device="meta")
    probs = logits.softmax(-1)
    weights, index = probs.topk(K, dim=-1)
    per_slot = [torch.rand(T, K, device="meta") for _ in range(3)]
    with DeviceMix() as mix:
        stats = routing_statistics(logits, probs, index, weights, *per_slot, tcess_k=K)
    assert mix.mixed == []
    assert set(stats) == set(STATS)
    assert all(v.device.type == "meta" and v.shape == (E,) and v.dtype == torch.float64 for v in stats.values())
