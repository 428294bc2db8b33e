"""Residual-stream rotation (QuaRot), folded layer by layer: the full-precision function is unchanged on every
family with RMSNorm, and refused (one clear error) on LayerNorm families."""

import pytest
import torch

from moecompress.errors import MoecompressError
from moecompress.models import find_arch
from moecompress.runtime.executor import LayerStream, ModelSource
from moecompress.runtime.rotate import ResidualRotation, check_rotatable, norm_readers, rotate_layer, rotate_outside
from moecompress.testing import FAMILY, tiny_moe


@pytest.mark.parametrize("family", sorted(FAMILY))
@torch.no_grad()
def test_rotation_folding_leaves_the_full_precision_function_unchanged(family):
    model = tiny_moe(family).float().eval()
    arch = find_arch(model.config)
    x = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    ref = model(input_ids=x).logits
    stream = LayerStream(ModelSource(model.config, arch, model=model), [x])
    try:
        check_rotatable(stream.layers, arch)
    except MoecompressError as e:  # LayerNorm (mean subtraction) does not commute with a rotation
        assert "LayerNorm" in str(e)
        return
    rotation = ResidualRotation(model.config.hidden_size, seed=3)
    moe = set(arch.moe_layer_indices(model.config))
    for i in range(stream.num_layers):  # readers are found on each layer's own forward, as the quantize stream does
        layer = stream.layers[i]
        with norm_readers(layer, arch) as readers:
            stream.run_layer(i)
        rotate_layer(layer, arch, arch.block(model, i) if i in moe else None, readers, rotation)
    rotate_outside(model, arch, rotation)
    got = model(input_ids=x).logits
    change = float((got - ref).abs().max()) / float(ref.abs().max())
    assert change < 1e-4, change
    Q = rotation.Q()
    assert torch.allclose(Q @ Q.T, torch.eye(len(Q), dtype=Q.dtype), atol=1e-12)
