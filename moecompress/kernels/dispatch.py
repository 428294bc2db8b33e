"""Choosing a kernel: ``auto`` (Triton on a CUDA device that can run it, else the torch reference), ``triton``, or
``torch``. Tensors and ints in, tensors out; nothing touches ``torch.cuda`` at import.

``MOECOMPRESS_KERNELS`` (``auto`` / ``triton`` / ``torch``) sets the default backend. Under ``auto``, a CUDA
device where Triton cannot run (no ``triton`` package, compute capability below 8.0) or a codec without a
Triton kernel falls back to the torch reference with one logged line naming the fallback; asking for
``triton`` there is an error that says why. On the CPU, Triton runs only under ``TRITON_INTERPRET=1``.

Both backends make every tensor on the input's device and never read device values back to the host in a
forward pass (no ``.item()``, ``.tolist()``, ``torch.unique``, boolean-mask indexing): a packed model's forward
can be captured in a CUDA graph. The grouped MoE path sorts rows by expert on the device (`moe_route`), once
per layer call, shared by the gate, up and down projections.
"""

from __future__ import annotations

import logging
import os

import torch

from moecompress.kernels import reference
from moecompress.kernels.routing import MoeRoute, torch_route

__all__ = ["MoeRoute", "dequantize_packed", "dict_dequantize", "dict_grouped_linear", "dict_linear", "grouped_linear",
           "moe_route", "packed_linear", "resolve_backend", "trellis_dequantize", "trellis_grouped_linear",
           "trellis_linear", "trellis_search", "triton_available", "triton_usable"]

log = logging.getLogger("moecompress.kernels")

_TRITON_IMPORT: tuple[bool, str] | None = None
_DEVICE_OK: dict[tuple[str, int | None], tuple[bool, str]] = {}
_WARNED: set[str] = set()
_TORCH_BLOCK_ELEMENTS = 1 << 26  # dense weight elements the torch grouped path materialises at once


def _triton_import() -> tuple[bool, str]:
    global _TRITON_IMPORT
    if _TRITON_IMPORT is None:
        try:
            import triton  # noqa: F401

            _TRITON_IMPORT = (True, "")
        except Exception as e:  # ImportError, or a broken install
            _TRITON_IMPORT = (False, f"triton cannot be imported ({type(e).__name__}: {e})")
    return _TRITON_IMPORT


def triton_usable(device: torch.device) -> tuple[bool, str]:
    """``(usable, reason)``: can the Triton kernels run on ``device``?"""
    key = (device.type, device.index)
    if key not in _DEVICE_OK:
        ok, why = _triton_import()
        if ok and device.type == "cuda":
            if torch.version.hip is None:
                cc = torch.cuda.get_device_capability(device)
                if cc < (8, 0):
                    ok, why = False, f"compute capability {cc[0]}.{cc[1]} < 8.0 (the kernels need sm_80 or newer)"
        elif ok and device.type == "cpu":
            if os.environ.get("TRITON_INTERPRET") != "1":
                ok, why = False, "a CPU device runs Triton only under TRITON_INTERPRET=1"
        elif ok:
            ok, why = False, f"no Triton kernels for {device.type} devices"
        _DEVICE_OK[key] = (ok, why)
    return _DEVICE_OK[key]


def triton_available() -> bool:
    """Triton importable and either a CUDA GPU or the interpreter present."""
    if not _triton_import()[0]:
        return False
    return os.environ.get("TRITON_INTERPRET") == "1" or torch.cuda.is_available()


def _warn_once(msg: str) -> None:
    if msg not in _WARNED:
        _WARNED.add(msg)
        log.warning(msg)


def resolve_backend(backend: str | None, device: torch.device, codec: tuple | None = None) -> str:
    """``"triton"`` or ``"torch"`` for tensors on ``device`` (``codec``: ``(bits, ternary, base3)``, optionally
    followed by ``(two-level ternary, dictionary code, trellis code)``)."""
    backend = backend or os.environ.get("MOECOMPRESS_KERNELS", "auto")
    if backend not in ("auto", "triton", "torch"):
        raise ValueError(f"unknown kernel backend {backend!r}; use auto, triton or torch")
    if backend == "torch":
        return "torch"
    ok, why = triton_usable(device)
    if ok and codec is not None:
        from moecompress.kernels.triton_dequant import supported

        two_level, is_dict, trellis = (tuple(codec[3:6]) + (False, False, False))[:3]
        if trellis or is_dict:
            pass  # moecompress.kernels.triton_trellis / triton_dict
        elif two_level:
            ok, why = False, "no Triton kernel for two-level ternary scales in ternary-b3 / ternary2 (ternary-dict has one)"
        elif not supported(*codec[:3]):
            ok, why = False, f"no Triton kernel for {codec[0]}-bit codes"
    if backend == "triton":
        if not ok:
            raise RuntimeError(f"MOECOMPRESS_KERNELS=triton cannot run on {device}: {why}")
        return "triton"
    if device.type != "cuda":
        return "torch"
    if not ok:
        _warn_once(f"moecompress kernels: {why}; using the torch reference kernels on {device} instead of Triton")
        return "torch"
    return "triton"


def _key(bits: int, ternary: bool, base3: bool, zero: torch.Tensor | None) -> tuple:
    return bits, ternary, base3, ternary and zero is not None, False


# ------------------------------------------------------------------------------------------- torch reference
def _dequant_torch(bits: int, ternary: bool, base3: bool, data: torch.Tensor, scale: torch.Tensor,
                   zero: torch.Tensor | None, columns: int, dtype: torch.dtype, zero_frac: int = 0) -> torch.Tensor:
    if base3:
        codes = reference.unpack_trits(data, columns).to(torch.int64) + 1
    else:
        codes = reference.unpack_bits(data, bits, columns).to(torch.int64)
        if ternary:
            codes = codes - 1  # stored t + 2 -> t + 1
    if ternary and zero is not None:  # two-level ternary: ``zero`` carries the negative level (scale_neg)
        E, O, C = codes.shape
        G = scale.shape[-1]
        q = codes.view(E, O, G, C // G)
        s, neg = scale.float()[..., None], zero.float()[..., None]
        return torch.where(q > 1, s, torch.where(q < 1, -neg, torch.zeros_like(s))).view(E, O, C).to(dtype)
    if ternary:
        z = torch.ones_like(scale, dtype=torch.float32)
    else:
        z = zero.float() / 2 ** zero_frac if zero is not None else \
            torch.full_like(scale, float(2 ** (bits - 1)), dtype=torch.float32)
    return reference.dequantize(codes, scale, z, dtype)


def dequantize_packed(bits: int, ternary: bool, base3: bool, data: torch.Tensor, scale: torch.Tensor,
                      zero: torch.Tensor | None, columns: int, dtype: torch.dtype = torch.float32,
                      backend: str | None = None, zero_frac: int = 0) -> torch.Tensor:
    """Dense ``[E, O, C]`` weights from packed codes ``data`` (int32 words, or base-3 bytes) and group
    ``scale`` / ``zero`` ``[E, O, G]`` (``zero=None``: symmetric, ``2^(bits-1)``; ternary: 1 after decoding, or
    when given the magnitude of the negative level of a two-level grid; ``zero_frac``: the stored zeros' fraction
    bits, the -fz codecs)."""
    if resolve_backend(backend, data.device, _key(bits, ternary, base3, zero)) == "triton":
        from moecompress.kernels import triton_dequant

        return triton_dequant.dequantize(bits, ternary, base3, data, scale, zero, columns, dtype, zero_frac)
    return _dequant_torch(bits, ternary, base3, data, scale, zero, columns, dtype, zero_frac)


def packed_linear(x: torch.Tensor, bits: int, ternary: bool, base3: bool, data: torch.Tensor, scale: torch.Tensor,
                  zero: torch.Tensor | None, columns: int, backend: str | None = None,
                  zero_frac: int = 0) -> torch.Tensor:
    """``x [T, C] @ W^T`` for one packed weight ``[1, O, C]`` -> ``[T, O]`` in ``x.dtype`` (fused dequant +
    matmul on Triton)."""
    if resolve_backend(backend, x.device, _key(bits, ternary, base3, zero)) == "triton":
        from moecompress.kernels import triton_dequant

        return triton_dequant.packed_matmul(x, bits, ternary, base3, data, scale, zero, columns,
                                            zero_frac=zero_frac).to(x.dtype)
    w = _dequant_torch(bits, ternary, base3, data, scale, zero, columns, x.dtype, zero_frac)[0]
    return x @ w.T


def moe_route(rows_expert: torch.Tensor, num_experts: int, backend: str | None = None,
              codec: tuple | None = None) -> MoeRoute:
    """Routing of the (token, slot) rows ``rows_expert [R]`` for `grouped_linear`; compute it once per MoE
    layer call and pass it to each projection."""
    if resolve_backend(backend, rows_expert.device, codec) == "triton":
        from moecompress.kernels import triton_dequant

        return triton_dequant.moe_align(rows_expert, num_experts)
    return torch_route(rows_expert, num_experts)


def _grouped_torch(x: torch.Tensor, route: MoeRoute, x_div: int, bits: int, ternary: bool, base3: bool, data: torch.Tensor,
                   scale: torch.Tensor, zero: torch.Tensor | None, columns: int, zero_frac: int = 0) -> torch.Tensor:
    """Blocks of ``block_m`` rows times their expert's weight (dequantized per block): ``bmm`` over a bounded
    number of blocks at a time. Static shapes, no host sync (on the CPU: one decode per active expert instead)."""
    def weights(e: torch.Tensor) -> torch.Tensor:
        return _dequant_torch(bits, ternary, base3, data.index_select(0, e), scale.index_select(0, e),
                              None if zero is None else zero.index_select(0, e), columns, x.dtype, zero_frac)

    return _grouped_blocks(x, route, x_div, data.shape[1], columns, weights)


def _grouped_blocks(x: torch.Tensor, route: MoeRoute, x_div: int, O: int, columns: int, weights) -> torch.Tensor:
    """`_grouped_torch` for any weights: ``weights(e [b])`` gives the dense ``[b, O, C]`` of experts ``e``."""
    R, bm, nb = route.num_rows, route.block_m, route.num_blocks
    out = x.new_zeros(R + 1, O)  # row R collects the padding rows
    rows = route.sorted_rows.to(torch.int64)
    if host_reads_free(x.device):  # each active expert decoded once, unused blocks skipped
        return _grouped_per_expert(x, route, x_div, rows, out, weights)
    experts = route.block_expert.clamp(min=0)
    step = max(1, _TORCH_BLOCK_ELEMENTS // max(1, O * columns))
    for b0 in range(0, nb, step):
        b1 = min(nb, b0 + step)
        w = weights(experts[b0:b1])
        r = rows[b0 * bm:b1 * bm]
        xb = x.index_select(0, torch.clamp(r, max=R - 1) // x_div).view(b1 - b0, bm, columns)
        out.index_put_((r,), torch.bmm(xb, w.transpose(1, 2)).reshape(-1, O))
    return out[:R]


def host_reads_free(device: torch.device) -> bool:
    """May the torch path read device values on the host? On the CPU it costs nothing (and there are no graphs to
    capture); on an accelerator it would stall the stream, so the blocked path there has none."""
    return device.type == "cpu"


def _grouped_per_expert(x: torch.Tensor, route: MoeRoute, x_div: int, rows: torch.Tensor, out: torch.Tensor,
                        weights) -> torch.Tensor:
    """`_grouped_blocks` on the CPU: one dense weight per active expert (not per block), rows of an expert in one
    matmul; experts without rows and the route's unused blocks cost nothing."""
    R, bm = route.num_rows, route.block_m
    owner = route.block_expert.repeat_interleave(bm)  # [num_blocks * block_m]: each sorted slot's expert
    live = rows < R
    rows, owner = rows[live], owner[live]
    for e in torch.unique(owner).tolist():
        r = rows[owner == e]
        w = weights(torch.tensor([e], device=x.device))[0]  # [O, C]
        out.index_put_((r,), x.index_select(0, r // x_div) @ w.T)
    return out[:R]


def grouped_linear(x: torch.Tensor, route: MoeRoute | torch.Tensor, bits: int, ternary: bool, base3: bool, data: torch.Tensor,
                   scale: torch.Tensor, zero: torch.Tensor | None, columns: int, backend: str | None = None,
                   x_div: int = 1, num_experts: int | None = None, zero_frac: int = 0) -> torch.Tensor:
    """Row ``r`` of the result is ``x[r // x_div]`` times expert ``e(r)``'s packed weight -> ``[R, O]`` in
    ``x.dtype``. ``route``: a `moe_route` result (or the ``[R]`` row -> expert tensor itself, routed here).
    On Triton one launch serves every active expert."""
    if isinstance(route, torch.Tensor):
        route = moe_route(route, data.shape[0] if num_experts is None else num_experts, backend,
                          (bits, ternary, base3))
    if route.backend == "triton" and resolve_backend(backend, x.device, _key(bits, ternary, base3, zero)) == "triton":
        from moecompress.kernels import triton_dequant

        return triton_dequant.grouped_matmul(x, route, x_div, bits, ternary, base3, data, scale, zero,
                                             columns, zero_frac=zero_frac).to(x.dtype)
    if route.backend != "torch":
        raise ValueError("this route was made for the Triton kernels; make it with the same backend")
    return _grouped_torch(x, route, x_div, bits, ternary, base3, data, scale, zero, columns, zero_frac)


# ------------------------------------------------------------------------------- ternary-dict (QMoE's code)
def _dict_rows(codewords: torch.Tensor, row_index: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The sub-stream of ``rows``: ``(codewords, row_index)`` (sizes it from the row index: a host sync)."""
    ri = row_index.to(torch.int64)
    start, count = ri[rows], ri[rows + 1] - ri[rows]
    sub_index = torch.cat([count.new_zeros(1), count.cumsum(0)])
    total = int(sub_index[-1])
    owner = torch.repeat_interleave(torch.arange(rows.numel(), device=rows.device), count, output_size=total)
    idx = start[owner] + torch.arange(total, device=rows.device) - sub_index[owner]
    return codewords[idx], sub_index


def dict_dequantize(codewords: torch.Tensor, row_index: torch.Tensor, dec: torch.Tensor, scale: torch.Tensor,
                    scale_neg: torch.Tensor | None, columns: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Dense ``[E, O, C]`` of a ``ternary-dict`` weight (the torch reference on every device)."""
    return reference.dict_dequantize(codewords, row_index, dec, scale, scale_neg, columns, dtype)


def dict_linear(x: torch.Tensor, codewords: torch.Tensor, row_index: torch.Tensor, dec: torch.Tensor,
                scale: torch.Tensor, scale_neg: torch.Tensor | None, columns: int,
                backend: str | None = None) -> torch.Tensor:
    """``x [T, C] @ W^T`` for one ``ternary-dict`` weight ``[1, O, C]`` -> ``[T, O]`` in ``x.dtype``; on Triton the
    codewords are decoded and multiplied in one pass (`triton_dict.dict_matmul`)."""
    if resolve_backend(backend, x.device, (16, True, False, scale_neg is not None, True)) == "triton":
        from moecompress.kernels import triton_dict

        return triton_dict.dict_matmul(x, codewords, row_index, dec, scale, scale_neg, columns).to(x.dtype)
    w = dict_dequantize(codewords, row_index, dec, scale, scale_neg, columns, x.dtype)[0]
    return x @ w.T


def dict_grouped_linear(x: torch.Tensor, route: MoeRoute, codewords: torch.Tensor, row_index: torch.Tensor,
                        dec: torch.Tensor, scale: torch.Tensor, scale_neg: torch.Tensor | None, columns: int,
                        backend: str | None = None, x_div: int = 1) -> torch.Tensor:
    """`grouped_linear` for a ``ternary-dict`` weight: one fused decode + multiply launch on Triton; the torch
    path decodes only the routed experts' rows (reading the row index on the host)."""
    if route.backend == "triton" and resolve_backend(backend, x.device,
                                                     (16, True, False, scale_neg is not None, True)) == "triton":
        from moecompress.kernels import triton_dict

        return triton_dict.grouped_dict_matmul(x, route, x_div, codewords, row_index, dec, scale, scale_neg,
                                               columns).to(x.dtype)
    if route.backend != "torch":
        raise ValueError("this route was made for the Triton kernels; make it with the same backend")
    E, O, G = scale.shape

    def weights(e: torch.Tensor) -> torch.Tensor:
        rows = (e[:, None] * O + torch.arange(O, device=e.device)).reshape(-1)
        cw, ri = _dict_rows(codewords, row_index, rows)
        neg = None if scale_neg is None else scale_neg.index_select(0, e)
        return reference.dict_dequantize(cw, ri, dec, scale.index_select(0, e), neg, columns, x.dtype)

    return _grouped_blocks(x, route, x_div, O, columns, weights)


# ---------------------------------------------------------------------- trellis (QTIP's bitshift trellis code)
def _trellis_backend(backend: str | None, device: torch.device, bits: int) -> str:
    return resolve_backend(backend, device, (bits, False, False, False, False, True))


def trellis_dequantize(stream: torch.Tensor, order: torch.Tensor, table: torch.Tensor, scale: torch.Tensor,
                       zero: torch.Tensor, bits: int, zero_frac: int,
                       dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Dense ``[E, O, C]`` of a trellis-coded weight (`reference.trellis_dequantize`, on every device: the forward
    passes use the fused kernels)."""
    return reference.trellis_dequantize(stream, order, table, scale, zero, bits, zero_frac, dtype)


def trellis_linear(x: torch.Tensor, stream: torch.Tensor, order: torch.Tensor, table: torch.Tensor,
                   scale: torch.Tensor, zero: torch.Tensor, bits: int, zero_frac: int,
                   backend: str | None = None) -> torch.Tensor:
    """``x [T, C] @ W^T`` for one trellis-coded weight ``[1, O, C]`` -> ``[T, O]`` in ``x.dtype`` (fused decode +
    product on Triton, `triton_trellis`)."""
    if _trellis_backend(backend, x.device, bits) == "triton":
        from moecompress.kernels import triton_trellis

        return triton_trellis.trellis_matmul(x, stream, order, table, scale, zero, bits, zero_frac).to(x.dtype)
    w = trellis_dequantize(stream, order, table, scale, zero, bits, zero_frac, x.dtype)[0]
    return x @ w.T


def trellis_grouped_linear(x: torch.Tensor, route: MoeRoute, stream: torch.Tensor, order: torch.Tensor,
                           table: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, zero_frac: int,
                           columns: int, backend: str | None = None, x_div: int = 1) -> torch.Tensor:
    """`grouped_linear` for a trellis-coded weight: one fused decode + multiply launch on Triton; the torch path
    decodes each routed expert's weight with the reference."""
    if route.backend == "triton" and _trellis_backend(backend, x.device, bits) == "triton":
        from moecompress.kernels import triton_trellis

        return triton_trellis.grouped_trellis_matmul(x, route, x_div, stream, order, table, scale, zero, bits,
                                                     zero_frac).to(x.dtype)
    if route.backend != "torch":
        raise ValueError("this route was made for the Triton kernels; make it with the same backend")

    def weights(e: torch.Tensor) -> torch.Tensor:
        return reference.trellis_dequantize(stream.index_select(0, e), order, table, scale.index_select(0, e),
                                            zero.index_select(0, e), bits, zero_frac, x.dtype)

    return _grouped_blocks(x, route, x_div, scale.shape[1], columns, weights)


def trellis_search(t: torch.Tensor, w: torch.Tensor, table: torch.Tensor, L: int, k: int,
                   backend: str | None = None) -> torch.Tensor | None:
    """The trellis quantizer's tail-biting search on Triton (`triton_viterbi`, one launch for all sequences), or
    None where the Triton kernels do not run (then `algorithms.trellis.tailbite` searches in torch)."""
    if resolve_backend(backend, t.device) != "triton":
        return None
    from moecompress.kernels import triton_viterbi

    return triton_viterbi.tailbite_triton(t, w, table, L, k)
