"""Packed modules on any device, without a GPU: the forward pass makes no tensor on the CPU and never reads
a device value back to the host (so it runs on CUDA and can be captured in a CUDA graph), for the torch
reference path and for the Triton path's host code; and it computes the right values (both backends, fp16
and bf16 activations, uneven expert loads with experts that get no tokens, T = 1).

How, without a GPU:

* **meta device**: the modules and inputs are moved to ``meta`` (shapes, no data). Any read of a value
  (``.item()``, ``int(t)``, ``torch.unique``, ``nonzero``, boolean-mask indexing) fails there, and a
  ``TorchDispatchMode`` records every operator that takes or makes a CPU tensor (e.g. a ``torch.arange``
  without ``device=``, a lookup table built on the CPU). The Triton launches are replaced by a stub that
  checks every tensor argument is on the input's device.
* **real values with syncs forbidden**: ``Tensor.item/tolist/__bool__/__int__/__float__/__index__``,
  ``torch.unique``, ``torch.nonzero`` and ``torch.bincount`` raise during the forward.
"""

import contextlib
import os

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from moecompress.formats.codecs import CODECS, encode  # noqa: E402
from moecompress.formats.spec import ModuleSpec  # noqa: E402
from moecompress.kernels import dispatch  # noqa: E402
from moecompress.nn.act_quant import ActQuant, rotation_matrix  # noqa: E402
from moecompress.nn.packed import PackedExperts, PackedLinear  # noqa: E402
from moecompress.types import Activation  # noqa: E402

HAS_TRITON = dispatch._triton_import()[0]
BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.skipif(not HAS_TRITON, reason="no triton"))]


def _fill(module, prefix, codec, shape, group, symmetric, g):
    c = CODECS.get(codec)
    E, O, C = shape
    G = max(1, C // group)
    top = 2 if c.ternary else 2 ** c.bits - 1
    codes = torch.randint(0, top + 1, (E, O, C), generator=g)
    scale = (torch.rand(E, O, G, generator=g) * 0.05 + 0.01).half().float()
    if c.ternary:
        zero = torch.ones_like(scale)
    elif symmetric:
        zero = torch.full_like(scale, float(2 ** (c.bits - 1)))
    else:
        zero = torch.randint(0, top + 1, scale.shape, generator=g).float()
    for k, v in encode(codec, codes.to(torch.uint8), scale, zero, symmetric).items():
        getattr(module, f"{prefix}_{k}").copy_(v)


def make_experts(codecs=("int4", "int4", "int4"), symmetric=False, E=5, H=48, I=32, group=16, bias=False,
                 rotation_seed=None, act=None, seed=0):
    spec = ModuleSpec.experts((E, I, H), dict(zip(("gate", "up", "down"), codecs)), group, symmetric, bias,
                              Activation("glu", "silu"), rotation_seed)
    m = PackedExperts(spec)
    g = torch.Generator().manual_seed(seed)
    for p, shape in (("gate", (E, I, H)), ("up", (E, I, H)), ("down", (E, H, I))):
        _fill(m, p, spec.codecs[p], shape, group, symmetric, g)
        if bias:
            getattr(m, f"{p}_bias").data.normal_(generator=g)
    m.act = act
    return m


def make_linear(codec="int3", symmetric=False, O=24, C=48, group=16, seed=1):
    m = PackedLinear(C, O, codec, group, symmetric, bias=True)
    _fill(m, "weight", codec, (1, O, C), group, symmetric, torch.Generator().manual_seed(seed))
    m.bias.data.normal_(generator=torch.Generator().manual_seed(seed))
    return m


def routing(T, K, E, seed=0, skip=(1,)):
    g = torch.Generator().manual_seed(seed)
    allowed = torch.tensor([e for e in range(E) if e not in skip])
    idx = torch.stack([allowed[torch.randperm(len(allowed), generator=g)[:K]] for _ in range(T)])
    w = torch.softmax(torch.randn(T, K, generator=g), -1)
    return idx, w


@torch.no_grad()
def dense_reference(m, x, idx, w):
    """Float32 loop over (token, slot) pairs with the dequantized weights."""
    gate, up, down = (m.dequantized(p) for p in ("gate", "up", "down"))
    out = torch.zeros(x.shape[0], m.hidden)
    xf = x.float()
    if m.act is not None:
        xf = m.act(xf)
    for t in range(x.shape[0]):
        for k in range(idx.shape[1]):
            e = int(idx[t, k])
            gt, ut = xf[t] @ gate[e].T, xf[t] @ up[e].T
            if getattr(m, "gate_bias", None) is not None:
                gt, ut = gt + m.gate_bias[e].float(), ut + m.up_bias[e].float()
            h = torch.nn.functional.silu(gt) * ut
            if m.act is not None:
                h = m.act(h)
            y = h @ down[e].T
            if getattr(m, "down_bias", None) is not None:
                y = y + m.down_bias[e].float()
            out[t] += w[t, k] * y
    return out


class _Recorder(TorchDispatchMode):
    """Records operators that take or make a CPU tensor, or read a value back to the host."""

    HOST_READS = ("_local_scalar_dense", "nonzero", "unique", "bincount", "masked_select", "item")

    def __init__(self):
        super().__init__()
        self.bad = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        out = func(*args, **(kwargs or {}))
        tensors = [a for a in torch.utils._pytree.tree_leaves((args, kwargs, out)) if isinstance(a, torch.Tensor)]
        if any(t.device.type == "cpu" for t in tensors):
            self.bad.append(f"{name}: CPU tensor")
        if any(h in name for h in self.HOST_READS):
            self.bad.append(f"{name}: reads a device value")
        return out


@contextlib.contextmanager
def triton_host_only(monkeypatch, device):
    """Run the Triton path's host code on ``device`` with every launch replaced by an argument check."""
    from moecompress.kernels import triton_dequant as td

    launches = []

    def fake_launch(kernel, grid, *args, **kwargs):
        devices = {a.device for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)}
        assert devices == {torch.device(device)}, f"kernel arguments on {devices}"
        launches.append(getattr(kernel, "__name__", type(kernel).__name__))

    monkeypatch.setattr(td, "_launch", fake_launch)
    monkeypatch.setattr(dispatch, "triton_usable", lambda dev: (True, ""))
    yield launches


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("T", [1, 7])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_forward_makes_no_cpu_tensor_and_reads_nothing_back(backend, T, dtype, monkeypatch):
    # symmetric: a ternary codec in an asymmetric module is QMoE's two-level grid (format 2), torch only
    experts = make_experts(("ternary-b3", "int4", "int3"), symmetric=True, bias=True, rotation_seed=3,
                           act=ActQuant(8))
    linear = make_linear()
    idx, w = routing(T, 2, 5)
    x = torch.randn(T, 48).to(dtype)
    monkeypatch.setenv("MOECOMPRESS_KERNELS", backend)
    experts, linear = experts.to("meta"), linear.to("meta")
    args = x.to("meta"), idx.to("meta"), w.to(dtype).to("meta")
    with triton_host_only(monkeypatch, "meta") if backend == "triton" else contextlib.nullcontext() as launches:
        experts(*args)  # warm-up: builds the rotation on this device (a host-to-device copy, once)
        with _Recorder() as rec:
            y = experts(*args)
            z = linear(args[0])
    assert not rec.bad, rec.bad[:10]
    assert y.shape == (T, 48) and y.device.type == "meta" and z.shape == (T, 24)
    if backend == "triton":
        assert "_packed_mm_kernel" in launches


def _forbid_host_reads(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("a device value was read back to the host in the forward pass")

    for name in ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero"):
        monkeypatch.setattr(torch.Tensor, name, boom)
    for name in ("unique", "nonzero", "bincount"):
        monkeypatch.setattr(torch, name, boom)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_grouped_forward_values_without_host_reads(backend, dtype, monkeypatch):
    """Uneven loads, an expert with no tokens, T = 1 and T = 9 (GEMV routing and sorted blocks on Triton).
    Tolerance: 2e-2 of the largest output (fp16: the intermediate GLU output is rounded to the activation
    dtype between the projections; bf16 rounds to 8 bits)."""
    experts = make_experts(("int4", "int4", "ternary-b3"), symmetric=True, bias=True)
    monkeypatch.setenv("MOECOMPRESS_KERNELS", backend)
    for T in (1, 9):
        idx, w = routing(T, 2, 5, seed=T)
        x = torch.randn(T, 48, generator=torch.Generator().manual_seed(T))
        ref = dense_reference(experts, x.to(dtype), idx, w)
        with monkeypatch.context() as mp:
            _forbid_host_reads(mp)
            mp.setattr(dispatch, "host_reads_free", lambda device: False)  # the path an accelerator takes
            y = experts(x.to(dtype), idx, w.to(dtype))
        assert y.dtype == dtype
        cpu = experts(x.to(dtype), idx, w.to(dtype))  # the CPU's own path: one decode per active expert
        torch.testing.assert_close(cpu, y, atol=1e-2 * float(ref.abs().max()), rtol=0)
        tol = 2e-2 * float(ref.abs().max())
        torch.testing.assert_close(y.float(), ref, atol=tol, rtol=2e-2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_and_rotated_experts_match_the_reference(backend, monkeypatch):
    """float32 activations (tolerance 1e-4 relative): asymmetric int3 linear, int2 experts with the online
    intermediate rotation, activation fake-quantization."""
    monkeypatch.setenv("MOECOMPRESS_KERNELS", backend)
    lin = make_linear("int3", symmetric=False)
    x = torch.randn(5, 48, generator=torch.Generator().manual_seed(0))
    ref = (x @ lin.dequantized().T + lin.bias).detach()
    torch.testing.assert_close(lin(x), ref, atol=1e-4 * float(ref.abs().max()), rtol=1e-4)
    experts = make_experts(("int2", "int2", "int2"), rotation_seed=5, act=ActQuant(8))
    idx, w = routing(4, 2, 5)
    x = torch.randn(4, 48, generator=torch.Generator().manual_seed(1))
    Q = rotation_matrix(32, 5).float()
    gate, up, down = (experts.dequantized(p) for p in ("gate", "up", "down"))  # down given back un-rotated
    xa = experts.act(x)
    ref = torch.zeros(4, 48)
    for t in range(4):
        for k in range(2):
            e = int(idx[t, k])
            h = torch.nn.functional.silu(xa[t] @ gate[e].T) * (xa[t] @ up[e].T)
            h = experts.act((h @ Q)[None])[0]  # quantized in the rotated basis, times the stored W Q
            ref[t] += w[t, k] * (h @ (down[e] @ Q).T)
    y = experts(x, idx, w)
    torch.testing.assert_close(y, ref, atol=1e-4 * float(ref.abs().max()), rtol=1e-4)


def test_to_dtype_keeps_the_packed_values():
    experts, linear = make_experts(bias=True), make_linear()
    before = {k: v.clone() for k, v in {**dict(experts.named_buffers()), **{
        "lin." + k: v for k, v in linear.named_buffers()}}.items()}
    for m in (experts.to(torch.bfloat16), linear.half()):
        for k, b in m.named_buffers():
            if k.endswith("_scale"):
                assert b.dtype == torch.float16
    after = {**dict(experts.named_buffers()), **{"lin." + k: v for k, v in linear.named_buffers()}}
    for k, v in before.items():
        assert after[k].dtype == v.dtype and torch.equal(after[k], v), k
    assert experts.gate_bias.dtype == torch.bfloat16 and linear.bias.dtype == torch.float16


def _trellis_fill(module, prefix, shape, group, seed):
    from moecompress.algorithms.gptq import gptq_quantize
    from moecompress.algorithms.trellis import TrellisGrid, row_order

    E, O, C = shape
    grid = TrellisGrid(3, group)
    res = gptq_quantize(torch.randn(E, O, C, generator=torch.Generator().manual_seed(seed)), torch.zeros(E, C, C), grid)
    enc = encode("trellis3", res.codes, res.scales, res.zeros, False, order=row_order(O), table=grid.table())
    for k, v in enc.items():
        getattr(module, f"{prefix}_{k}").copy_(v)


@pytest.mark.parametrize("backend", BACKENDS)
def test_trellis_forward_makes_no_cpu_tensor_and_reads_nothing_back(backend, monkeypatch):
    """The trellis codecs (a padded sequence in down): the experts' grouped forward and a linear's make every tensor
    on the input's device and read nothing back (Triton: host code only, launches checked)."""
    E, I, H = 5, 64, 48
    spec = ModuleSpec.experts((E, I, H), {p: "trellis3" for p in ("gate", "up", "down")}, 16, False, False,
                              Activation("glu", "silu"))
    experts = PackedExperts(spec)
    for i, (p, shape) in enumerate((("gate", (E, I, H)), ("up", (E, I, H)), ("down", (E, H, I)))):
        _trellis_fill(experts, p, shape, 16, i)
    linear = PackedLinear(H, I, "trellis3", 16, False, bias=False)
    _trellis_fill(linear, "weight", (1, I, H), 16, 3)
    idx, w = routing(3, 2, E)
    monkeypatch.setenv("MOECOMPRESS_KERNELS", backend)
    experts, linear = experts.to("meta"), linear.to("meta")
    args = torch.randn(3, H).to("meta"), idx.to("meta"), w.to("meta")
    with triton_host_only(monkeypatch, "meta") if backend == "triton" else contextlib.nullcontext() as launches:
        if backend == "triton":
            from moecompress.kernels import triton_trellis as tt

            monkeypatch.setattr(tt, "_launch", lambda k, grid, *a, **kw: launches.append(k.__name__))
        with _Recorder() as rec:
            y = experts(*args)
            z = linear(args[0])
    assert not rec.bad, rec.bad[:10]
    assert y.shape == (3, H) and y.device.type == "meta" and z.shape == (3, I)
    if backend == "triton":
        assert "_trellis_mm_kernel" in launches
