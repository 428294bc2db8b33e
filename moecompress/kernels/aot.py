"""Compile the Triton kernels without launching them, with the exact specialization a launch would use.

Two uses: CI without a GPU compiles every specialization for sm_80 / sm_90 (tests/kernels/aot_compile.py);
on a GPU host, `precompile` fills Triton's on-disk cache in parallel worker processes before a benchmark or
a server starts (the JIT compiles autotune candidates one at a time otherwise), and the JIT then finds them.

The launch arguments come from the launchers' own ``*_arguments`` functions in `triton_dequant`, and each
argument is specialized by Triton's own ``native_specialize_impl`` (ints equal to 1 become constants,
multiples of 16 and 16-byte aligned pointers get the divisibility attribute), so the compiled kernels are
the launched ones. Only ``triton.compile`` with ``ASTSource`` and ``GPUTarget`` is used for a full
compilation; `compile_kernel` can stop at an earlier stage (front end only, or no ptxas) with the same
backend passes, which CI uses to keep its run short. Must not run under ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import torch

__all__ = ["KernelSpec", "compile_kernel", "compile_spec", "launch_values", "mm_spec", "precompile", "specialization_key",
           "specialize"]

_TORCH_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def specialize(fn, values: dict, arch: int = 90) -> tuple[dict, dict, dict]:
    """``(signature, constexprs, attrs)`` of a launch of jitted ``fn`` with these argument values, exactly as the
    JIT forms them (Triton's own binder and ``JITFunction._pack_args``): the source's hash, hence Triton's cache
    key, reads ``str(attrs)``, whose form differs between Triton versions (3.6 leaves constexprs out, 3.7 gives
    them an empty entry), and only the same form lets a launch find a kernel compiled here."""
    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler.compiler import make_backend
        from triton.runtime.jit import create_function_from_signature

        backend = make_backend(GPUTarget("cuda", arch, 32))
        bound, specialization, options = create_function_from_signature(fn.signature, fn.params, backend)(**values)
        _, sig, consts, attrs = fn._pack_args(backend, {}, bound, specialization, options)
        return sig, consts, attrs
    except (ImportError, AttributeError, TypeError, ValueError):  # internals moved: the same, made by hand
        return _specialize_by_hand(fn, values)


def _specialize_by_hand(fn, values: dict) -> tuple[dict, dict, dict]:
    """`specialize` from ``native_specialize_impl`` alone (Triton 3.7's form of the attributes)."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend

    sig, consts, attrs = {}, {}, {}
    for i, p in enumerate(fn.params):
        v = values[p.name]
        if p.is_constexpr:
            sig[p.name], consts[p.name] = "constexpr", v
            attrs[(i,)] = BaseBackend.parse_attr("")
            continue
        ty, spec = native_specialize_impl(BaseBackend, v, False, not p.do_not_specialize,
                                          not p.do_not_specialize_on_alignment)
        sig[p.name] = ty
        if ty == "constexpr":
            consts[p.name] = spec
        desc = "" if ty == "constexpr" else spec
        if isinstance(desc, str):
            attrs[(i,)] = BaseBackend.parse_attr(desc)
    return sig, consts, attrs


def compile_kernel(fn, values: dict, arch: int, options: dict, last: str = "cubin") -> int | None:
    """Compile ``fn`` for ``sm_<arch>`` as launched with ``values``; returns its shared memory in bytes (when
    the stage reached reports it). ``last``: ``cubin`` (``triton.compile``, ptxas included), ``ptx`` or ``ttir``
    (the same backend stages, stopped early). Raises the compiler's error."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig, consts, attrs = specialize(fn, values, arch)
    src = ASTSource(fn, sig, constexprs=consts, attrs=attrs)
    target = GPUTarget("cuda", arch, 32)
    if last == "cubin":
        return triton.compile(src, target=target, options=dict(options)).metadata.shared
    from triton._C.libtriton import get_cache_invalidating_env_vars, ir
    from triton.backends.compiler import Language
    from triton.compiler.compiler import make_backend

    backend = make_backend(target)
    opts = backend.parse_options(dict(options))
    context = ir.context()
    ir.load_dialects(context)
    backend.load_dialects(context)
    module = src.make_ir(target, opts, backend.get_codegen_implementation(opts), backend.get_module_map(), context)
    stages: dict = {}
    backend.add_stages(stages, opts, Language.TRITON)
    metadata = {"hash": "aot", "target": target, **opts.__dict__, **get_cache_invalidating_env_vars()}
    names = list(stages)
    for ext in names[names.index("ttir"):names.index(last) + 1]:
        module = stages[ext](module, metadata)
    return metadata.get("shared")


@dataclass(frozen=True)
class KernelSpec:
    """One kernel specialization as plain data (picklable for worker processes)."""

    kernel: str  # "mm", "dequant", "align", "dict" (ternary-dict), "trellis" (its decoder) or "viterbi" (its search)
    # (bits, ternary, base3, asymmetric[, zero fraction bits]); dict: (two-level scales,); trellis, viterbi: (bits,)
    codec: tuple = ()
    dtype: str = "fp16"  # activations (mm) or output (dequant)
    N: int = 0
    K: int = 0
    group: int = 128  # 0: one group per row
    M: int = 1
    grouped: bool = False
    block_m: int = 1  # grouped: the routing's block size
    x_div: int = 1
    config: tuple = ()  # sorted (key, value) pairs: BLOCK_*, SPLIT_K, num_warps, num_stages
    align: tuple = ()  # (R, E, num_blocks, block_m) for the alignment kernel


def mm_spec(codec: tuple, dtype: str, N: int, K: int, group: int, M: int, config, grouped: bool = False,
            block_m: int = 1, x_div: int = 1) -> KernelSpec:
    """The spec of a fused-matmul launch; ``config``: a ``triton.Config`` or a dict of its values."""
    if hasattr(config, "kwargs"):
        config = {**config.kwargs, "num_warps": config.num_warps, "num_stages": config.num_stages}
    return KernelSpec("mm", tuple(codec), dtype, N, K, group, M, grouped, block_m, x_div, tuple(sorted(config.items())))


def _placeholder(dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(16, dtype=dtype)  # aligned; only its dtype and alignment matter


def launch_values(spec: KernelSpec):
    """``(jitted function, argument values, compile options)`` of the launch ``spec`` describes."""
    from moecompress.kernels import triton_dequant as td

    if spec.kernel == "align":
        R, E, nb, bm = spec.align
        values = td.align_arguments(_placeholder(torch.int64), _placeholder(torch.int32), _placeholder(torch.int32),
                                    R=R, E=E, num_blocks=nb, block_m=bm)
        return td._moe_align_kernel, values, {"num_warps": values.pop("num_warps")}
    if spec.kernel == "dict":
        return _dict_launch(spec)
    if spec.kernel == "trellis":
        return _trellis_launch(spec)
    if spec.kernel == "viterbi":
        from moecompress.kernels import triton_viterbi as tv

        values = tv.viterbi_arguments(*(_placeholder(d) for d in (torch.float32, torch.float32, torch.float32,
                                                                   torch.uint8, torch.int32)),
                                      seq=64, L=10, k=spec.codec[0])
        return tv._tailbite_kernel, values, {"num_warps": values.pop("num_warps")}
    bits, ternary, base3, asym, *frac = spec.codec
    geo = td.geometry(bits, ternary, base3, frac[0] if frac else 0)
    K, N = spec.K, spec.N
    G = max(1, K // spec.group) if spec.group > 0 else 1
    W = (K + 4) // 5 if base3 else (K * bits + 31) // 32
    data = _placeholder(torch.uint8 if base3 else torch.int32)
    scale = _placeholder(torch.float16)
    zero = _placeholder(torch.uint8) if asym else None
    dt = _TORCH_DTYPES[spec.dtype]
    if spec.kernel == "dequant":
        values = td.dequant_arguments(data, scale, zero, _placeholder(dt), R=N, C=K, W=W, G=G, geo=geo)  # E = 1
        return td._dequant_kernel, values, {"num_warps": 4}
    cfg = dict(spec.config)
    opts = {k: cfg.pop(k) for k in ("num_warps", "num_stages") if k in cfg}
    if spec.grouped:
        cfg["BLOCK_M"] = spec.block_m
        if spec.block_m == 1:
            rows = experts = _placeholder(torch.int64)  # the row -> expert map itself
        else:
            rows, experts = _placeholder(torch.int32), _placeholder(torch.int32)
        stride = (N * W, N * G)
    else:
        rows = experts = None
        stride = (0, 0)
    x = _placeholder(dt)
    out = _placeholder(td._out_dtype(dt))
    values = td.mm_arguments(x, data, scale, zero, out, out if rows is None else rows,
                             out if experts is None else experts, M=spec.M, N=N, K=K, W=W, G=G, x_div=spec.x_div,
                             stride_e=stride, geo=geo, grouped=spec.grouped)
    values.update(cfg)
    return td._packed_mm_kernel, values, opts


def _dict_launch(spec: KernelSpec):
    """The ternary-dict decoder's launch (`triton_dict.dict_matmul` / `grouped_dict_matmul`)."""
    from moecompress.kernels import triton_dict as tdict
    from moecompress.kernels.triton_common import decoder_batch

    (neg,) = spec.codec
    K, N = spec.K, spec.N
    G = max(1, K // spec.group) if spec.group > 0 else 1
    i32, f16 = _placeholder(torch.int32), _placeholder(torch.float16)
    bm = spec.block_m if spec.grouped else decoder_batch(spec.M)
    mb = 1 if spec.grouped and bm == 1 else min(16, bm)
    values = tdict.dict_arguments(_placeholder(_TORCH_DTYPES[spec.dtype]), _placeholder(torch.uint16), i32, i32, f16,
                                  f16 if neg else None, _placeholder(torch.float32),
                                  _placeholder(torch.int64 if bm == 1 else torch.int32),
                                  _placeholder(torch.int64 if bm == 1 else torch.int32), M=spec.M, N=N, K=K, G=G,
                                  x_div=spec.x_div, subs=max(1, bm // mb), grouped=spec.grouped, block_m=bm, mb=mb)
    return tdict._dict_mm_kernel, values, {"num_warps": values.pop("num_warps")}


def _trellis_launch(spec: KernelSpec):
    """The trellis decoder's launch (`triton_trellis.trellis_matmul` / `grouped_trellis_matmul`; 10-bit states,
    sequences of 64, zeros with 5 fraction bits, as the format writes them)."""
    from moecompress.kernels import triton_trellis as tt
    from moecompress.kernels.triton_common import decoder_batch

    (bits,) = spec.codec
    K, N = spec.K, spec.N
    G = max(1, K // spec.group) if spec.group > 0 else 1
    bm = spec.block_m if spec.grouped else decoder_batch(spec.M)
    mb = 1 if spec.grouped and bm == 1 else min(16, bm)
    idx = _placeholder(torch.int64 if bm == 1 else torch.int32)
    values = tt.trellis_arguments(_placeholder(_TORCH_DTYPES[spec.dtype]), _placeholder(torch.int32),
                                  _placeholder(torch.int32), _placeholder(torch.float32), _placeholder(torch.float16),
                                  _placeholder(torch.uint8), _placeholder(torch.float32), idx, idx, M=spec.M, N=N, K=K,
                                  G=G, S=-(-N // 64), bits=bits, zero_frac=5, x_div=spec.x_div, subs=max(1, bm // mb),
                                  grouped=spec.grouped, block_m=bm, mb=mb)
    return tt._trellis_mm_kernel, values, {"num_warps": values.pop("num_warps")}


def compile_spec(spec: KernelSpec, arch: int, last: str = "cubin") -> int | None:
    fn, values, opts = launch_values(spec)
    return compile_kernel(fn, values, arch, opts, last)


def _precompile_one(args) -> str | None:
    spec, arch = args
    try:
        compile_spec(spec, arch)
        return None
    except Exception as e:  # reported, not fatal: the JIT will compile (and fail) on its own later
        return f"{spec}: {type(e).__name__}: {str(e)[-300:]}"


def specialization_key(spec: KernelSpec) -> tuple:
    """What identifies the compiled kernel of ``spec`` (specs differing only in sizes share it)."""
    fn, values, opts = launch_values(spec)
    sig, consts, attrs = specialize(fn, values)
    return (fn.__name__, tuple(sig.items()), tuple((k, str(v)) for k, v in consts.items()),
            tuple((k, str(v)) for k, v in attrs.items()), tuple(sorted(opts.items())))


def precompile(specs, arch: int, jobs: int | None = None) -> list[str]:
    """Compile ``specs`` for ``sm_<arch>`` into Triton's cache (``TRITON_CACHE_DIR``) in ``jobs`` processes,
    one per distinct specialization; returns the error messages (empty when everything compiled)."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("precompile needs TRITON_INTERPRET unset")
    specs = list({specialization_key(s): s for s in specs}.values())
    jobs = max(1, jobs or os.cpu_count() or 1)
    import multiprocessing as mp

    # fork: the workers inherit the imported modules (and never touch the GPU)
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    with ProcessPoolExecutor(max_workers=jobs, mp_context=ctx) as pool:
        return [e for e in pool.map(_precompile_one, [(s, arch) for s in specs], chunksize=1) if e]
