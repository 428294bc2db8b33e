"""`algorithms.gram`: the upper-blocks Gram matrix equals ``x^T x`` at any width, its off-diagonal blocks exactly
symmetric."""

import pytest
import torch

from moecompress.algorithms.gram import gram


@pytest.mark.parametrize("D", [1, 7, 16, 17, 40, 64])
def test_gram_equals_the_full_product(D):
    x = torch.randn(50, D, generator=torch.Generator().manual_seed(D), dtype=torch.float64)
    got = gram(x, block=16)
    torch.testing.assert_close(got, x.T @ x, rtol=1e-12, atol=1e-12)
    off = torch.ones(D, D, dtype=torch.bool).triu(1)
    off[torch.arange(D)[:, None] // 16 == torch.arange(D)[None] // 16] = False  # the diagonal blocks: full products
    assert torch.equal(got[off], got.T[off]) and got.dtype == x.dtype


def test_gram_keeps_the_input_device():
    x = torch.empty(8, 40, device="meta")
    assert gram(x, block=16).device.type == "meta" and gram(x, block=16).shape == (40, 40)
