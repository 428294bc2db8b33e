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


def test_with_prior_adds_the_prior_at_its_share_of_the_trace_whatever_its_scale():
    from moecompress.algorithms.gram import with_prior

    g = torch.Generator().manual_seed(0)
    x, v = torch.randn(30, 12, generator=g, dtype=torch.float64), torch.randn(90, 12, generator=g, dtype=torch.float64)
    H, P = x.T @ x, v.T @ v / 90
    torch.testing.assert_close(with_prior(H, P, 0.0), H)
    got = with_prior(H, P, 0.25)
    torch.testing.assert_close(got.trace(), 1.25 * H.trace())
    torch.testing.assert_close(got - H, 0.25 * H.trace() / P.trace() * P)
    torch.testing.assert_close(with_prior(H, 7.0 * P, 0.25), got)  # the prior's scale does not matter
    torch.testing.assert_close(with_prior(H, torch.zeros_like(P), 0.25), H)  # an empty prior: H
    assert with_prior(H, P, 0.25) is not H and torch.equal(H, x.T @ x)  # a new tensor, H untouched
