"""Runtime modules whose weights stay packed in memory and are dequantized on the fly.

`PackedLinear` replaces an ``nn.Linear``; `PackedExperts` replaces a fused experts module and computes each
active expert from its own packed slice (only the experts the tokens were routed to are decoded). Buffer
names follow docs/FORMAT.md; for experts they avoid ``gate_up_proj.*`` / ``down_proj.*``, which transformers'
reverse key conversion would split per expert. Activation quantization recorded with the checkpoint
(A8/A4, and the online rotation of the experts' intermediate) is applied inside the modules.

Devices and dtypes: every packed tensor is a registered buffer, so ``.to(device)`` / ``device_map`` move them;
the forward makes its tensors on the input's device and never reads a device value back to the host (the
MoE routing is sorted on the device, once per layer call), so it can be captured in a CUDA graph after one
warm-up call (Triton autotunes on its first call of a shape). ``.to(dtype)`` / ``.half()`` leave the packed
tensors and their float16 scales as stored (the format's values); only biases follow the model's dtype.
"""

from __future__ import annotations

import os
import weakref

import torch
from torch import nn

from moecompress.algorithms.moe_math import ExpertWeights, glu
from moecompress.algorithms.trellis import SEQ, STATE_BITS
from moecompress.formats.codecs import CODECS
from moecompress.formats.dictcode import dict_table
from moecompress.formats.spec import PROJS, ModuleSpec
from moecompress.kernels import dispatch
from moecompress.models.calls import experts_call_args
from moecompress.nn.act_quant import ActQuant, rotation_matrix
from moecompress.types import Proj

__all__ = ["PackedExperts", "PackedLinear"]


def _buffers(module: nn.Module, prefix: str, codec: str, shape: tuple[int, int, int], group: int,
             symmetric: bool, lengths: tuple[int, int] | None = None) -> None:
    E, O, C = shape
    c = CODECS.get(codec)
    G = max(1, C // group) if group > 0 else 1
    if c.trellis:
        module.register_buffer(f"{prefix}_stream", torch.zeros(E, -(-O // SEQ), C, SEQ * c.bits // 32,
                                                               dtype=torch.int32))
        module.register_buffer(f"{prefix}_order", torch.zeros(O, dtype=torch.int32))
        module.register_buffer(f"{prefix}_table", torch.zeros(1 << STATE_BITS, dtype=torch.float32))
    elif c.dict:
        n, N = lengths
        module.register_buffer(f"{prefix}_codewords", torch.zeros(n, dtype=torch.uint16))
        module.register_buffer(f"{prefix}_row_index", torch.zeros(E * O + 1, dtype=torch.int32))
        module.register_buffer(f"{prefix}_dict", torch.zeros(10, dtype=torch.int32))  # N and the symbol costs
    elif c.base3:
        module.register_buffer(f"{prefix}_trits", torch.zeros(E, O, (C + 4) // 5, dtype=torch.uint8))
    else:
        module.register_buffer(f"{prefix}_packed", torch.zeros(E, O, (C * c.bits + 31) // 32, dtype=torch.int32))
    module.register_buffer(f"{prefix}_scale", torch.zeros(E, O, G, dtype=torch.float16))
    if not symmetric and c.ternary:  # two-level ternary grid: the negative level
        module.register_buffer(f"{prefix}_scale_neg", torch.zeros(E, O, G, dtype=torch.float16))
    if (not symmetric or c.trellis) and not c.ternary:
        module.register_buffer(f"{prefix}_zero", torch.zeros(E, O, G, dtype=torch.uint8))
    module.register_buffer(f"{prefix}_shape", torch.tensor([E, O, C], dtype=torch.int64))


def dequantize_packed(codec: str, t: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Dense ``[E, O, C]`` from a codec's packed tensors (through the kernel dispatch)."""
    return dequantize_packed_columns(codec, t, int(t["shape"][2]), dtype)


def dequantize_packed_columns(codec: str, t: dict[str, torch.Tensor], columns: int,
                              dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """As `dequantize_packed`, with the column count given (no read of the ``shape`` tensor)."""
    if CODECS.get(codec).dict:
        return dispatch.dict_dequantize(*_dict_args(t), columns, dtype)
    if CODECS.get(codec).trellis:
        return dispatch.trellis_dequantize(*_trellis_args(codec, t), dtype)
    return dispatch.dequantize_packed(*_args(codec, t, columns), dtype, zero_frac=CODECS.get(codec).zero_frac)


def _args(codec: str, t: dict[str, torch.Tensor], columns: int | None = None) -> tuple:
    """Kernel arguments. ``columns`` comes from the module's attributes in a forward pass: reading it from the
    ``shape`` buffer would copy a device value to the host (a sync) on every call. A two-level ternary weight
    passes its ``scale_neg`` in the zero point's place (the kernels' convention for ternary codecs)."""
    c = CODECS.get(codec)
    if columns is None:
        columns = int(t["shape"][2])
    zero = t.get("scale_neg") if c.ternary else t.get("zero")
    return c.bits, c.ternary, c.base3, (t["trits"] if c.base3 else t["packed"]), t["scale"], zero, columns


_TABLES: dict = {}  # (pointer, device, version) -> (the header tensor, weakly; its table)


def decode_table(header: torch.Tensor) -> torch.Tensor:
    """The decode table of a ``ternary-dict`` header, on the header's device; built once per header tensor
    (the first forward pass reads the 10-int header on the host; later calls do not). An entry belongs to the
    tensor object it was built for: a new header at a freed one's address (same pointer, same version) is a
    miss, never the old table."""
    key = (header.data_ptr(), header.device, header._version)  # a changed or moved header is a new key
    hit = _TABLES.get(key)
    if hit is not None and hit[0]() is header:
        return hit[1]
    if len(_TABLES) > 4096:
        _TABLES.clear()
    table = dict_table(header)
    _TABLES[key] = (weakref.ref(header), table)
    return table


def _trellis_args(codec: str, t: dict[str, torch.Tensor]) -> tuple:
    c = CODECS.get(codec)
    return t["stream"], t["order"], t["table"], t["scale"], t["zero"], c.bits, c.zero_frac


def _dict_args(t: dict[str, torch.Tensor]) -> tuple:
    return t["codewords"], t["row_index"], decode_table(t["dict"]), t["scale"], t.get("scale_neg")


def _codec_key(codec: str, symmetric: bool = True) -> tuple:
    """The dispatch's codec key ``(bits, ternary, base3, two-level ternary, dictionary, trellis)``."""
    c = CODECS.get(codec)
    return c.bits, c.ternary, c.base3, c.ternary and not symmetric, c.dict, c.trellis


def _tensors(module: nn.Module, prefix: str, experts: slice | None = None) -> dict[str, torch.Tensor]:
    """The packed tensors (``experts``: a slice of the stacked ones; ``shape`` is left out then)."""
    out = {}
    buffers = module._buffers  # they are all buffers: one dict read each, not Module.__getattr__ (host time per call)
    for local in ("packed", "trits", "scale", "scale_neg", "zero", "shape", "codewords", "row_index", "dict", "stream",
                  "order", "table"):
        t = buffers.get(f"{prefix}_{local}")
        if t is not None and not (experts is not None and local == "shape"):
            whole = experts is None or local in ("codewords", "row_index", "dict", "order", "table")
            out[local] = t if whole else t[experts]
    return out


def _keep_scales(module: nn.Module, fn, apply) -> nn.Module:
    """``Module._apply`` that moves the packed tensors (device) but never re-types their float16 scales (or a
    trellis code's float32 table): ``model.to(torch.bfloat16)`` must not round the stored values."""
    scales = {k: b for k, b in module._buffers.items() if k.endswith(("_scale", "_table")) and b is not None}
    apply(fn)
    for k, b in scales.items():
        moved = module._buffers[k]
        if moved is not None and moved.dtype != b.dtype:
            module._buffers[k] = b.to(device=moved.device)
    return module


class PackedLinear(nn.Module):
    """A linear layer with a packed weight (``weight_packed`` / ``weight_trits``, ``weight_scale``, ...)."""

    def __init__(self, in_features: int, out_features: int, codec: str, group_size: int, symmetric: bool,
                 bias: bool, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.codec, self.group_size, self.symmetric = codec, group_size, symmetric
        self.act: ActQuant | None = None
        _buffers(self, "weight", codec, (1, out_features, in_features), group_size, symmetric)
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype)) if bias else None

    def _apply(self, fn, recurse=True):
        return _keep_scales(self, fn, lambda f: super(PackedLinear, self)._apply(f, recurse))

    def dequantized(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_packed_columns(self.codec, _tensors(self, "weight"), self.in_features, dtype)[0]  # [O, C]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act is not None:
            x = self.act(x)
        flat = x.reshape(-1, x.shape[-1])
        if CODECS.get(self.codec).trellis:
            y = dispatch.trellis_linear(flat, *_trellis_args(self.codec, _tensors(self, "weight")))
        else:
            y = dispatch.packed_linear(flat, *_args(self.codec, _tensors(self, "weight"), self.in_features),
                                       zero_frac=CODECS.get(self.codec).zero_frac)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*x.shape[:-1], self.out_features)


class _PackedExpertView:
    """The adapter-facing view of `PackedExperts` (dequantized stacks, read-only)."""

    def __init__(self, module: PackedExperts) -> None:
        self.module = module

    @property
    def num_experts(self) -> int:
        return self.module.num_experts

    def stacked(self, proj) -> torch.Tensor:
        return self.module.dequantized(Proj(proj).value)

    def weight(self, e: int, proj) -> torch.Tensor:
        return self.stacked(proj)[e]

    def bias(self, proj) -> torch.Tensor | None:
        return getattr(self.module, f"{Proj(proj).value}_bias", None)

    def bias_tensors(self) -> list[torch.Tensor]:
        return [b for p in PROJS if (b := self.bias(p)) is not None]

    def weights(self) -> ExpertWeights:
        return ExpertWeights(*(self.stacked(p) for p in PROJS), *(self.bias(p) for p in PROJS))

    def set_stacked(self, proj, w, start: int = 0) -> None:
        raise TypeError("packed experts are read-only; quantize from the unpacked (fake-quant) checkpoint")

    def keep(self, ids) -> None:
        raise TypeError("packed experts cannot be pruned; prune before quantizing")

    def numel(self) -> int:
        E, I, H = self.module.num_experts, self.module.intermediate, self.module.hidden
        return 3 * E * I * H

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32


class PackedExperts(nn.Module):
    """Routed experts with packed gate/up ``[E, I, H]`` and down ``[E, H, I]`` weights, as ``spec`` (an
    ``experts`` `ModuleSpec`, shape ``(E, I, H)``) lays them out."""

    def __init__(self, spec: ModuleSpec, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        num_experts, intermediate, hidden = spec.shape
        self.num_experts, self.hidden, self.intermediate = num_experts, hidden, intermediate
        self.spec = spec
        self.codecs = dict(spec.codecs)  # proj -> codec
        self.activation = spec.activation
        self.inter_rotation_seed = spec.intermediate_rotation_seed
        self.act: ActQuant | None = None
        shapes = {"gate": (num_experts, intermediate, hidden), "up": (num_experts, intermediate, hidden),
                  "down": (num_experts, hidden, intermediate)}
        for p in PROJS:
            _buffers(self, p, self.codecs[p], shapes[p], spec.group_size, spec.symmetric,
                     (spec.dict_sizes or {}).get(p))
            if spec.bias:
                self.register_parameter(f"{p}_bias", nn.Parameter(torch.zeros(shapes[p][:2], dtype=dtype)))

    def expert_view(self) -> _PackedExpertView:
        return _PackedExpertView(self)

    def _apply(self, fn, recurse=True):
        self._rotations = {}
        return _keep_scales(self, fn, lambda f: super(PackedExperts, self)._apply(f, recurse))

    def _columns(self, proj: str) -> int:
        return self.intermediate if proj == "down" else self.hidden

    def rotation(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """The intermediate rotation ``Q`` on ``device``: built once per (device, dtype) on first use (a host to
        device copy; the warm-up call before a CUDA graph capture makes it), then reused."""
        key = (device, dtype)
        rot = getattr(self, "_rotations", None)
        if rot is None:
            rot = self._rotations = {}
        if key not in rot:
            rot[key] = rotation_matrix(self.intermediate, self.inter_rotation_seed, device).to(dtype=dtype)
        return rot[key]

    def dequantized(self, proj: str, experts: slice | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        if CODECS.get(self.codecs[proj]).dict:  # a variable-rate stream: decode the whole weight, then slice
            w = dequantize_packed_columns(self.codecs[proj], _tensors(self, proj), self._columns(proj), dtype)
            w = w if experts is None else w[experts]
        else:
            w = dequantize_packed_columns(self.codecs[proj], _tensors(self, proj, experts), self._columns(proj), dtype)
        if proj == "down" and self.inter_rotation_seed is not None:  # stored as W Q: give back W = (W Q) Q^T
            w = w @ self.rotation(w.device, dtype).T
        return w

    def _backend(self, device: torch.device) -> str:
        """One backend for the three projections (their routing is shared): Triton only if all can use it.
        Decided once per device and ``MOECOMPRESS_KERNELS`` value (it is asked on every forward call)."""
        key = (device, os.environ.get("MOECOMPRESS_KERNELS"))
        cache = self.__dict__.setdefault("_backends", {})
        if key not in cache:
            b = {dispatch.resolve_backend(None, device, _codec_key(self.codecs[p], self.spec.symmetric))
                 for p in PROJS}
            cache[key] = "triton" if b == {"triton"} else "torch"
        return cache[key]

    def _project(self, x: torch.Tensor, route, proj: str, backend: str, x_div: int) -> torch.Tensor:
        t = _tensors(self, proj)
        if CODECS.get(self.codecs[proj]).trellis:
            return dispatch.trellis_grouped_linear(x, route, *_trellis_args(self.codecs[proj], t), self._columns(proj),
                                                   backend=backend, x_div=x_div)
        if CODECS.get(self.codecs[proj]).dict:
            return dispatch.dict_grouped_linear(x, route, *_dict_args(t), self._columns(proj), backend=backend,
                                                x_div=x_div)
        return dispatch.grouped_linear(x, route, *_args(self.codecs[proj], t, self._columns(proj)),
                                       backend=backend, x_div=x_div, zero_frac=CODECS.get(self.codecs[proj]).zero_frac)

    def forward(self, *args, **kwargs) -> torch.Tensor:
        """Every (token, slot) pair through its expert: gate/up, the GLU, down; weighted sum over slots.
        The rows are routed once (on the device); on Triton each projection is one grouped launch over all
        active experts, and gate/up read the token rows directly (no copy per slot)."""
        hidden, index, weights = experts_call_args(args, kwargs)
        x = hidden if self.act is None else self.act(hidden)
        T, K = index.shape
        rows_expert = index.reshape(-1)  # [T*K], row t*K + k is token t's k-th slot
        backend = self._backend(x.device)
        route = dispatch.moe_route(rows_expert, self.num_experts, backend)
        gb, ub, db = (getattr(self, f"{p}_bias", None) for p in PROJS)
        g = self._project(x, route, "gate", backend, K)
        u = self._project(x, route, "up", backend, K)
        if gb is not None:
            g, u = g + gb[rows_expert].to(g.dtype), u + ub[rows_expert].to(u.dtype)
        h = glu(g, u, self.activation)
        if self.inter_rotation_seed is not None:  # the online rotation the rotated down weights expect
            h = h @ self.rotation(h.device, h.dtype)
        if self.act is not None:
            h = self.act(h)
        y = self._project(h, route, "down", backend, 1)
        if db is not None:
            y = y + db[rows_expert].to(y.dtype)
        y = y * weights.reshape(-1, 1).to(y.dtype)
        return y.view(T, K, -1).sum(1).to(hidden.dtype)
