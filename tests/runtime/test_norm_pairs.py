"""The attention-norm readers' statistics from the norm alone (`runtime.paired.norm_reader_pairs`, which spares the
quantizer a statistics pass through the attention) equal those of a statistics pass under `collect` and
`pair_linears`, with and without token weights, on every adapter; `norm_sources` finds the norm each linear reads as
`collect` does."""

import pytest
import torch

from moecompress.models import find_arch
from moecompress.runtime.calibration import collect, dense_linears, norm_sources
from moecompress.runtime.executor import LayerStream, ModelSource
from moecompress.runtime.paired import capture_inputs, norm_reader_pairs, pair_linears
from moecompress.testing import FAMILY, tiny_moe


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("family", sorted(FAMILY))
def test_norm_reader_pairs_equal_a_statistics_pass(family, weighted):
    model = tiny_moe(family)
    arch = find_arch(model.config)
    i = arch.moe_layer_indices(model.config)[0]
    g = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, 256, (2, 12), generator=g) for _ in range(3)]
    stream = LayerStream(ModelSource(model.config, arch, model=model), batches)
    weights = [torch.rand(b.numel(), generator=g) * 2 for b in batches] if weighted else None
    if weighted:
        stream.token_weights = lambda layer, b: weights[b]
    for j in range(i):
        stream.run_layer(j)
    layer, view = stream.layers[i], arch.block(model, i)
    norm = getattr(layer, arch.pre_attn_norm)
    dense = dense_linears(layer, [view])
    with torch.no_grad():
        with capture_inputs(layer, dense) as fp, norm_sources(layer, [view], norm, dense) as sources:
            stream.run_layer(i, store=False)  # the "full-precision" side: this stream's own inputs
        with collect(layer, [view], norm, near_miss=0) as stats, \
                pair_linears(dense, fp, want=lambda n: stats.linears[n].source is not None) as pairs:
            stream.run_layer(i, store=False)
        first = [n for n, s in sources.items() if s == "attn_norm"]
        got_stats, got_pairs = norm_reader_pairs(
            norm, [(h, None if weights is None else weights[b]) for b, h in enumerate(stream.hidden)],
            {n: fp[n] for n in first}, stream.device)
    assert first and sources == {n: st.source for n, st in stats.linears.items()}
    assert sorted(got_stats) == sorted(first) == sorted(got_pairs)
    for n in first:
        want, got = stats.linears[n], got_stats[n]
        assert (got.tokens, got.source) == (want.tokens, "attn_norm")
        torch.testing.assert_close(got.act_max, want.act_max, rtol=0, atol=0)
        tol = dict(rtol=1e-5, atol=1e-5 * float(want.H.abs().max()))
        torch.testing.assert_close(got.H, want.H, **tol, msg=n)
        for k, what in enumerate(("Hq", "C")):
            torch.testing.assert_close(got_pairs[n][k], pairs[n][k], **tol, msg=f"{what}:{n}")
        assert got_pairs[n][2] == pairs[n][2]
        if not weighted:  # the same products, bit for bit: the quantizer writes the same attention
            assert torch.equal(got.H, want.H) and torch.equal(got_pairs[n][1], pairs[n][1])
