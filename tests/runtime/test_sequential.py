"""Layer-by-layer execution reproduces the full forward exactly, for every family."""

import pytest
import torch

from moecompress.models import find_arch
from moecompress.runtime.sequential import SequentialRunner
from moecompress.testing import FAMILY, tiny_moe


@pytest.mark.parametrize("family", sorted(FAMILY))
def test_layer_by_layer_equals_full_forward(family):
    overrides = {"logits_scaling": 4.0} if family == "granitemoe" else {}
    model = tiny_moe(family, **overrides)
    arch = find_arch(model.config)
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 256, (2, 20), generator=g), torch.randint(0, 256, (1, 20), generator=g)]
    runner = SequentialRunner(model, arch, batches)
    for i in range(runner.num_layers):
        runner.run_layer(i)
    with torch.no_grad():
        for b, x in enumerate(batches):
            torch.testing.assert_close(runner.logits(b), model(input_ids=x).logits, atol=1e-6, rtol=0)


def test_layers_must_run_in_order():
    model = tiny_moe("mixtral")
    runner = SequentialRunner(model, find_arch(model.config), [torch.zeros(1, 4, dtype=torch.long)])
    with pytest.raises(RuntimeError, match="out of order"):
        runner.run_layer(1)
    with pytest.raises(RuntimeError, match="every layer"):
        runner.logits(0)
