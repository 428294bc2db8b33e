"""Choosing a kernel: ``auto`` (Triton when a GPU is present or ``TRITON_INTERPRET=1``, else torch), ``triton``,
or ``torch`` (the reference). Tensors and ints in, tensors out; nothing touches ``torch.cuda`` at import.

``MOECOMPRESS_KERNELS`` (``auto`` / ``triton`` / ``torch``) sets the default backend.
"""

from __future__ import annotations

import os

import torch

from moecompress.kernels import reference

__all__ = ["dequantize_packed", "grouped_linear", "packed_linear", "triton_available"]


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return os.environ.get("TRITON_INTERPRET") == "1" or torch.cuda.is_available()


def _backend(backend: str | None) -> str:
    backend = backend or os.environ.get("MOECOMPRESS_KERNELS", "auto")
    if backend not in ("auto", "triton", "torch"):
        raise ValueError(f"unknown kernel backend {backend!r}; use auto, triton or torch")
    if backend == "auto":
        return "triton" if triton_available() and torch.cuda.is_available() else "torch"
    return backend


def dequantize_packed(bits: int, ternary: bool, base3: bool, data: torch.Tensor, scale: torch.Tensor,
                      zero: torch.Tensor | None, columns: int, dtype: torch.dtype = torch.float32,
                      backend: str | None = None) -> torch.Tensor:
    """Dense ``[E, O, C]`` weights from packed codes ``data`` (int32 words, or base-3 bytes) and group
    ``scale`` / ``zero`` ``[E, O, G]`` (``zero=None``: symmetric, ``2^(bits-1)``; ternary: 1 after decoding)."""
    if _backend(backend) == "triton":
        from moecompress.kernels import triton_dequant

        return triton_dequant.dequantize(bits, ternary, base3, data, scale, zero, columns, dtype)
    if base3:
        codes = reference.unpack_trits(data, columns).to(torch.int64) + 1
    else:
        codes = reference.unpack_bits(data, bits, columns).to(torch.int64)
        if ternary:
            codes = codes - 1  # stored t + 2 -> t + 1
    if ternary:
        z = torch.ones_like(scale, dtype=torch.float32)
    else:
        z = zero.float() if zero is not None else torch.full_like(scale, float(2 ** (bits - 1)), dtype=torch.float32)
    return reference.dequantize(codes, scale, z, dtype)


def packed_linear(x: torch.Tensor, bits: int, ternary: bool, base3: bool, data: torch.Tensor, scale: torch.Tensor,
                  zero: torch.Tensor | None, columns: int, backend: str | None = None) -> torch.Tensor:
    """``x [T, C] @ W^T`` for one packed weight ``[1, O, C]`` -> ``[T, O]`` (fused dequant + matmul on Triton)."""
    if _backend(backend) == "triton":
        from moecompress.kernels import triton_dequant

        return triton_dequant.packed_matmul(x, bits, ternary, base3, data, scale, zero, columns).to(x.dtype)
    w = dequantize_packed(bits, ternary, base3, data, scale, zero, columns, x.dtype, "torch")[0]
    return x @ w.T


def grouped_linear(x: torch.Tensor, rows_expert: torch.Tensor, bits: int, ternary: bool, base3: bool,
                   data: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, columns: int,
                   backend: str | None = None) -> torch.Tensor:
    """Row ``t`` of ``x [T, C]`` times expert ``rows_expert[t]``'s packed weight -> ``[T, O]``; on Triton one
    launch serves every active expert."""
    if _backend(backend) == "triton":
        from moecompress.kernels import triton_dequant

        return triton_dequant.grouped_experts_matmul(x, rows_expert, bits, ternary, base3, data, scale, zero,
                                                     columns).to(x.dtype)
    out = x.new_zeros(x.shape[0], data.shape[1])
    for e in torch.unique(rows_expert).tolist():
        sel = rows_expert == e
        w = dequantize_packed(bits, ternary, base3, data[e:e + 1], scale[e:e + 1],
                              None if zero is None else zero[e:e + 1], columns, x.dtype, "torch")[0]
        out[sel] = x[sel] @ w.T
    return out
