"""The trellis codecs: encode -> decode returns the states and parameters exactly (padded sequences included),
the torch reference dequantizes them as the record does, and states that are not paths are refused."""

import pytest
import torch

from moecompress.algorithms.gptq import gptq_quantize
from moecompress.algorithms.trellis import TrellisGrid, row_order
from moecompress.formats.codecs import decode, encode, encoded_bits_per_weight
from moecompress.formats.quant_record import QuantRecord
from moecompress.kernels.reference import trellis_dequantize


def _quantized(E, O, C, bits, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(E, O, C, generator=g)
    grid = TrellisGrid(bits, group_size=16)
    res = gptq_quantize(W, torch.zeros(E, C, C), grid)
    return res, grid


@pytest.mark.parametrize("bits,O", [(3, 128), (3, 100), (2, 64), (4, 70)])
def test_encode_decode_is_exact(bits, O):
    E, C = 2, 32
    res, grid = _quantized(E, O, C, bits)
    enc = encode(f"trellis{bits}", res.codes, res.scales, res.zeros, False, order=row_order(O), table=grid.table())
    assert enc["stream"].shape == (E, -(-O // 64), C, 2 * bits) and enc["stream"].dtype == torch.int32
    codes, scale, zero = decode(f"trellis{bits}", enc)
    assert torch.equal(codes, res.codes.long())
    assert torch.equal(scale, res.scales) and torch.equal(zero, res.zeros)
    record = QuantRecord()
    record.add("w", res.codes, res.scales, res.zeros, order=row_order(O), table=grid.table())
    dense = trellis_dequantize(enc["stream"], enc["order"], enc["table"], enc["scale"], enc["zero"], bits, 5)
    torch.testing.assert_close(dense, record.dequantize("w", 16), rtol=0, atol=0)
    torch.testing.assert_close(dense, res.weight, rtol=1e-6, atol=1e-6)
    if O % 64 == 0:  # k bits per weight + byte zero + fp16 scale per group (+ the order and table, per weight)
        extra = (32 * O + 32 * 1024) / (E * O * C)
        assert encoded_bits_per_weight(enc) == pytest.approx(bits + 24 / 16 + extra)


def test_states_that_are_not_paths_are_refused():
    res, grid = _quantized(1, 64, 16, 3)
    codes = res.codes.clone()
    codes[0, 5, 3] ^= 1 << 9  # break one state's high bits (no longer its predecessor's low bits)
    with pytest.raises(ValueError, match="tail-biting paths"):
        encode("trellis3", codes, res.scales, res.zeros, False, order=row_order(64), table=grid.table())
    with pytest.raises(ValueError, match="row order"):
        encode("trellis3", res.codes, res.scales, res.zeros, False)
