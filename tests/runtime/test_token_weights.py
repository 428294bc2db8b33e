"""Token weights on the calibration statistics (`runtime.token_weights`, set per batch by `LayerStream`): a weight
of ``n`` on a window's tokens gives the statistics of that window repeated ``n`` times (0: left out), for the
dense linears' Hessians, the routed experts' gate-weighted Hessians and the sequential pairing's products, on
every adapter."""

import pytest
import torch

from moecompress.models import find_arch
from moecompress.runtime import token_weights
from moecompress.runtime.calibration import collect, dense_linears
from moecompress.runtime.executor import LayerStream, ModelSource
from moecompress.runtime.paired import capture_inputs, collect_pairs, pair_linears
from moecompress.testing import FAMILY, tiny_moe

S = 16
REPEAT = [2, 0, 1, 3]  # window j's weight in the weighted batch = its copies in the unweighted one


def _statistics(family: str, weighted: bool) -> dict[str, torch.Tensor]:
    model = tiny_moe(family)
    arch = find_arch(model.config)
    i = arch.moe_layer_indices(model.config)[0]
    ids = torch.randint(0, 256, (len(REPEAT), S), generator=torch.Generator().manual_seed(0))
    if weighted:
        batch = ids
        w = torch.tensor(REPEAT, dtype=torch.float32).repeat_interleave(S)
    else:
        batch = ids.repeat_interleave(torch.tensor(REPEAT), dim=0)
    stream = LayerStream(ModelSource(model.config, arch, model=model), [batch])
    if weighted:
        stream.token_weights = lambda layer, b: w
    for j in range(i):
        stream.run_layer(j)
    layer, view = stream.layers[i], arch.block(model, i)
    dense = dense_linears(layer, [view])
    out: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        with collect(layer, [view], getattr(layer, arch.pre_attn_norm, None), near_miss=0) as stats, \
                capture_inputs(layer, dense) as fp:
            stream.run_layer(i, store=False)
        for n, st in stats.linears.items():
            out[f"H:{n}"] = st.H
        out["experts.H"], out["experts.H_down"] = stats.experts.H, stats.experts.H_down
        with pair_linears(dense, fp) as pairs:
            stream.run_layer(i, store=False)
        for n, (Hq, C, _) in pairs.items():
            out[f"Hq:{n}"], out[f"C:{n}"] = Hq, C
        w_ = view.experts.weights()
        for which in ("gate_up", "down"):
            with collect_pairs(view, which, w_.gate.float(), w_.up.float()) as ps:
                stream.run_layer(i, store=False)
            out[f"pairs.{which}.Hq"], out[f"pairs.{which}.C"] = ps.Hq, ps.C
    return out


@pytest.mark.parametrize("family", sorted(FAMILY))
def test_token_weights_equal_repeated_windows(family):
    got, want = _statistics(family, True), _statistics(family, False)
    assert got.keys() == want.keys() and any(k.startswith("Hq:") for k in got)
    for k in got:
        assert want[k].abs().sum() > 0, k
        torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-4 * float(want[k].abs().max()), msg=k)


def test_weighting_is_scoped():
    assert token_weights.current() is None
    with token_weights.weighting(torch.ones(2, 3)):
        assert token_weights.current().shape == (6,)
        with token_weights.weighting(None):
            assert token_weights.current() is None
        assert token_weights.current() is not None
    assert token_weights.current() is None
