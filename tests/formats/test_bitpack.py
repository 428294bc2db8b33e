"""Pack -> unpack is exact for every width and odd shapes, and matches the reference implementations
(compressed-tensors' pack_to_int32, GGUF's TQ1_0) byte for byte when they are installed."""

import itertools

import numpy as np
import pytest
import torch

from moecompress.formats.bitpack import pack_bits, pack_trits, packed_width, unpack_bits, unpack_trits


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("columns", [1, 5, 31, 32, 33, 100, 257])
def test_pack_unpack_exact(bits, columns):
    g = torch.Generator().manual_seed(bits * 1000 + columns)
    codes = torch.randint(0, 2 ** bits, (3, 4, columns), generator=g)
    packed = pack_bits(codes, bits)
    assert packed.dtype == torch.int32 and packed.shape == (3, 4, packed_width(columns, bits))
    assert torch.equal(unpack_bits(packed, bits, columns).long(), codes)


@pytest.mark.parametrize("columns", [1, 4, 5, 6, 128, 257])
def test_trits_exact(columns):
    t = torch.randint(-1, 2, (2, 3, columns), generator=torch.Generator().manual_seed(columns))
    packed = pack_trits(t)
    assert packed.dtype == torch.uint8 and packed.shape[-1] == (columns + 4) // 5
    assert torch.equal(unpack_trits(packed, columns).long(), t)


def test_every_trit_byte():
    allt = torch.tensor(list(itertools.product([-1, 0, 1], repeat=5)))
    assert torch.equal(unpack_trits(pack_trits(allt), 5).long(), allt)


def test_out_of_range_codes_are_refused():
    with pytest.raises(ValueError):
        pack_bits(torch.tensor([[16]]), 4)
    with pytest.raises(ValueError):
        pack_trits(torch.tensor([[2]]))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_matches_compressed_tensors(bits):
    ct = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers")
    g = torch.Generator().manual_seed(bits)
    signed = torch.randint(-(2 ** (bits - 1)), 2 ** (bits - 1), (7, 75), generator=g)
    theirs = ct.pack_to_int32(signed.to(torch.int8), bits)
    assert torch.equal(pack_bits(signed + 2 ** (bits - 1), bits), theirs)


def test_matches_gguf_tq1_0():
    gguf = pytest.importorskip("gguf")
    from gguf.quants import quantize

    g = torch.Generator().manual_seed(0)
    t = torch.randint(-1, 2, (256,), generator=g)
    block = quantize(t.float().numpy()[None], gguf.GGMLQuantizationType.TQ1_0)[0]  # qs[48], qh[4], d (fp16)
    qs = torch.from_numpy(np.frombuffer(block[:48].tobytes(), dtype=np.uint8).copy())
    # TQ1_0 orders elements within a block: bytes 0-31 hold elements m + 32 n (n = 0..4)
    first = torch.stack([t[m + 32 * n] for m in range(32) for n in range(5)]).view(32, 5)
    assert torch.equal(pack_trits(first).view(-1), qs[:32])
