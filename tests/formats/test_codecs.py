import pytest
import torch

from moecompress.errors import MoecompressError
from moecompress.formats.codecs import CODECS, decode, encode, packed_bits_per_weight
from moecompress.kernels.reference import dequantize


@pytest.mark.parametrize("codec,symmetric", [("int8", True), ("int8", False), ("int4", False), ("int3", False),
                                             ("int2", False), ("int4", True), ("ternary2", True), ("ternary-b3", True),
                                             ("int4-fz", False), ("int3-fz", False), ("int2-fz", False)])
def test_encode_decode_exact(codec, symmetric):
    c = CODECS.get(codec)
    g = torch.Generator().manual_seed(0)
    top = 2 if c.ternary else 2 ** c.bits - 1
    codes = torch.randint(0, top + 1, (3, 7, 45), generator=g)
    scale = torch.rand(3, 7, 5, generator=g).half().float()
    if c.ternary:
        zero = torch.ones_like(scale)
    elif symmetric:
        zero = torch.full_like(scale, float(2 ** (c.bits - 1)))
    elif c.zero_frac:  # every storable fractional zero
        zero = torch.arange(105).view(3, 7, 5).float() * 2.43 // 1 / 2 ** c.zero_frac
    else:
        zero = torch.randint(0, top + 1, (3, 7, 5), generator=g).float()
    t = encode(codec, codes.to(torch.uint8), scale, zero, symmetric)
    c2, s2, z2 = decode(codec, t)
    assert torch.equal(c2, codes) and torch.equal(s2, scale) and torch.equal(z2, zero)
    assert torch.equal(dequantize(c2, s2, z2), dequantize(codes, scale, zero))


def test_bits_per_weight():
    assert packed_bits_per_weight("ternary-b3", 256, 128, True) == pytest.approx(1.75)
    assert packed_bits_per_weight("ternary-b3", 1280, 128, True) == pytest.approx(1.725)
    assert packed_bits_per_weight("int4", 256, 128, True) == pytest.approx(4.125)
    assert packed_bits_per_weight("int4", 256, 128, False) == pytest.approx(4.1875)
    assert packed_bits_per_weight("ternary2", 256, 128, True) == pytest.approx(2.125)


def test_unknown_codec():
    with pytest.raises(MoecompressError, match="unknown codec 'int5'"):
        encode("int5", torch.zeros(1, 1, 8, dtype=torch.uint8), torch.ones(1, 1, 1), torch.ones(1, 1, 1), True)


def test_fractional_zeros_take_the_integer_codecs_size_and_are_never_rounded():
    """The -fz codecs store ``zero * 2^(8-b)`` in the zero's byte: the same bits per weight as the integer codec;
    a zero off their grid (or one the integer codec cannot hold) is refused, not rounded."""
    for b in (2, 3, 4):
        assert CODECS.get(f"int{b}-fz").zero_frac == 8 - b
        assert packed_bits_per_weight(f"int{b}-fz", 256, 128, False) == packed_bits_per_weight(f"int{b}", 256, 128,
                                                                                                 False)
    codes, scale = torch.zeros(1, 2, 8, dtype=torch.uint8), torch.ones(1, 2, 1)
    with pytest.raises(ValueError, match="integers"):
        encode("int2", codes, scale, torch.tensor([[[1.5], [1.0]]]), False)
    with pytest.raises(ValueError, match="multiples of 2\\^-6"):
        encode("int2-fz", codes, scale, torch.tensor([[[1.0 / 128], [1.0]]]), False)
    with pytest.raises(ValueError, match="multiples"):
        encode("int2-fz", codes, scale, torch.tensor([[[4.0], [1.0]]]), False)  # 256 does not fit the byte
    t = encode("int2-fz", codes, scale, torch.tensor([[[1.5], [3.984375]]]), False)
    assert t["zero"].tolist() == [[[96], [255]]]
