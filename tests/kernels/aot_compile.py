"""Ahead-of-time compilation of every Triton kernel specialization for real GPUs, on a machine without one.

``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`` runs the whole pipeline (Triton IR,
TritonGPU, LLVM, PTX, and ptxas from the triton wheel) for sm_80 and sm_90. It catches what the interpreter
accepts but a GPU compiler rejects (e.g. both branches of a constexpr ``if`` traced after an early
``return``: "Cannot bitcast data-type of size 8 to data-type of size 32"), and checks that each kernel's
shared memory fits the architecture.

Arguments are specialized exactly as a launch would specialize them (``native_specialize_impl``: ints equal
to 1 become constants, multiples of 16 and 16-byte aligned pointers get the divisibility attribute), from
example values at real model shapes (Mixtral-8x7B experts, group 128) and at odd test shapes.

Run as a script (``python tests/kernels/aot_compile.py [--level ci|full] [--jobs N] [--filter S] [--list]``): it must not run
under ``TRITON_INTERPRET=1`` (the interpreter replaces ``@triton.jit`` functions), so
tests/kernels/test_aot_compile.py starts it in a subprocess with that variable removed and a fresh
``TRITON_CACHE_DIR`` (no result is reused across runs). Prints one JSON line per specialization, then a
summary line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor

ARCHS = (80, 90)
MAX_SHARED = {80: 166912, 90: 232448}  # bytes of shared memory per block (opt-in maximum)
# (codec name, bits, ternary, base3, asymmetric[, zero fraction bits: the -fz codecs])
CODECS = [("int8", 8, False, False, False), ("int8-asym", 8, False, False, True),
          ("int4", 4, False, False, False), ("int4-asym", 4, False, False, True),
          ("int3", 3, False, False, False), ("int3-asym", 3, False, False, True),
          ("int2", 2, False, False, False), ("int2-asym", 2, False, False, True),
          ("int4-fz", 4, False, False, True, 4), ("int3-fz", 3, False, False, True, 5),
          ("int2-fz", 2, False, False, True, 6),
          ("ternary2", 2, True, False, False), ("ternary-b3", 8, True, True, False)]
DTYPES = ("fp16", "bf16")
# Real shapes: (N, K, group); odd: not multiples of 16, groups smaller than an int3/int2 unit.
REAL = (14336, 4096, 128)
ODD = (45, 80, 16)


def _paths():
    """(path name, config list, is grouped, block_m or None for configs carrying it, example M, X_DIV)."""
    from moecompress.kernels import triton_dequant as td

    return [
        ("gemv", [c for c in td.DECODE_CONFIGS if c.kwargs["BLOCK_M"] == 1], False, None, 1, 1),
        ("decode-dot", [c for c in td.DECODE_CONFIGS if c.kwargs["BLOCK_M"] > 1], False, None, 4, 1),
        ("gemm", td.GEMM_CONFIGS, False, None, 512, 1),
        ("grouped-gemv", td.GROUPED_CONFIGS[1], True, 1, 2, 2),
        ("grouped-dot16", td.GROUPED_CONFIGS[16], True, 16, 32, 1),
        ("grouped-gemm64", td.GROUPED_CONFIGS[64], True, 64, 1024, 2),
    ]


DOT_PATHS = ("gemm", "grouped-dot16")  # tensor-core paths: wgmma (BLOCK_M 64) and mma.sync (BLOCK_M 16) on sm_90
GEMV_PATHS = ("gemv", "grouped-gemv")  # no dot: the activation dtype only changes the loads
CUBIN_CODECS = ("int4-asym", "ternary-b3")  # through ptxas in the CI run
ODD_CODECS = ("int4-asym", "int3", "int3-asym", "ternary2", "ternary-b3")  # every scale mode, unaligned sizes


def specs(level: str = "ci") -> list[dict]:
    """Every specialization to compile (plain data, picklable); ``stage``: the last compiler stage to run.

    ``ci`` (tests/kernels/test_aot_compile.py; 471 kernels, about 2 minutes on 2 idle cores, plus the 102
    ternary-dict specializations of `dict_specs`, about 6 more minutes on 2 loaded cores):

    * every codec x tensor-core path (plain GEMM, grouped BLOCK_M = 16) x fp16/bf16 x sm_80/sm_90;
    * every codec x GEMV path (plain, grouped) x sm_80/sm_90, in bf16 on sm_80 and fp16 on sm_90;
    * the dequantization kernel for every codec and arch (bf16 out on sm_80, fp16 on sm_90); the MoE
      alignment kernel (8, 128, 256 experts);
    * the odd shape (unaligned sizes, groups of 16: the per-element and straddling scale modes) for
      `ODD_CODECS`, those four paths and dequantization, fp16, sm_90;

      all at the real shape through PTX (LLVM's NVPTX back end), `CUBIN_CODECS` and the alignment kernel
      through ptxas as well (with the shared-memory check);
    * every autotune configuration of every path x codec (fp16, sm_90) through the front end (Triton IR:
      where the constexpr-branch type errors live, e.g. the old base-3 one).

    ``full``: every configuration x codec x dtype x arch, and the odd shape for every codec, through ptxas
    (for a maintainer: 1316 kernels, 73 minutes on a loaded 2-core machine).
    """
    out = []
    paths = _paths()
    full = level == "full"

    def mm(arch, codec, dtype, path, cfg, stage, shape=REAL, odd=False):
        name, cfgs, grouped, bm, m, xdiv = path
        out.append(dict(kind="mm", arch=arch, codec=codec, dtype=dtype, path=name + ("-odd" if odd else ""),
                        cfg=_cfg_dict(cfg), grouped=grouped, block_m=bm, M=(m + 3 if m > 1 else 1) if odd else m,
                        x_div=xdiv, shape=shape, stage=stage))

    for arch in ARCHS:
        gemv_dtype = "bf16" if arch == 80 else "fp16"
        for codec in CODECS:
            stage = "cubin" if full or codec[0] in CUBIN_CODECS else "ptx"
            for path in paths:
                dtypes = DTYPES if full or path[0] in DOT_PATHS else ((gemv_dtype,) if path[0] in GEMV_PATHS else ())
                for dtype in dtypes:
                    for c in (path[1] if full else path[1][:1]):
                        mm(arch, codec, dtype, path, c, stage)
            for dtype in (DTYPES if full else (gemv_dtype,)):
                out.append(dict(kind="dequant", arch=arch, codec=codec, dtype=dtype, shape=REAL, stage=stage))
        for E, bm in ((8, 16), (128, 16), (256, 64)):
            out.append(dict(kind="align", arch=arch, E=E, block_m=bm, stage="cubin"))
    for codec in CODECS:
        if not (full or codec[0] in ODD_CODECS):
            continue
        stage = "cubin" if full else "ptx"
        for path in paths:
            if full or path[0] in DOT_PATHS + GEMV_PATHS:
                mm(90, codec, "fp16", path, path[1][0], stage, ODD, odd=True)
        out.append(dict(kind="dequant", arch=90, codec=codec, dtype="fp16", shape=ODD, stage=stage))
    if not full:
        for codec in CODECS:
            for path in paths:
                for c in path[1]:
                    mm(90, codec, "fp16", path, c, "ttir")
    out.extend(dict_specs(level))
    out.extend(trellis_specs(level))
    out.extend(dict(kind="viterbi", arch=arch, bits=bits, stage="cubin") for arch in ARCHS for bits in (2, 3, 4))
    return out


# The ternary-dict decoder (moecompress/kernels/triton_dict.py): (path, grouped, block_m, example M, X_DIV)
DICT_PATHS = [("dict-gemv", False, 1, 1, 1), ("dict-batch16", False, 16, 16, 1), ("dict-batch5", False, 8, 5, 1),
              ("dict-grouped-gemv", True, 1, 2, 2), ("dict-grouped16", True, 16, 32, 1),
              ("dict-grouped64", True, 64, 1024, 2)]


def dict_specs(level: str = "ci") -> list[dict]:
    """Every ternary-dict specialization: each path x one group per row (QMoE) / groups of 128 x one- and two-level
    scales x fp16 / bf16 activations x sm_80 / sm_90, at Mixtral-8x7B's gate shape through PTX (the QMoE case,
    batch 1 and grouped, through ptxas), and the odd shape (fp16, sm_90) through PTX."""
    out = []
    for arch in ARCHS:
        for path, grouped, bm, m, xdiv in DICT_PATHS:
            for group in (0, 128):
                for neg in (True, False):
                    for dtype in DTYPES:
                        qmoe = group == 0 and neg and dtype == "bf16"
                        stage = "cubin" if level == "full" or (qmoe and path in ("dict-gemv", "dict-grouped-gemv")) \
                            else "ptx"
                        out.append(dict(kind="dict", arch=arch, neg=neg, dtype=dtype, path=path, grouped=grouped,
                                        block_m=bm, M=m, x_div=xdiv, shape=(REAL[0], REAL[1], group), stage=stage))
    for path, grouped, bm, m, xdiv in DICT_PATHS:
        out.append(dict(kind="dict", arch=90, neg=True, dtype="fp16", path=path + "-odd", grouped=grouped, block_m=bm,
                        M=m + 3 if m > 1 else 1, x_div=xdiv, shape=ODD, stage="ptx"))
    return out


# The trellis decoder (moecompress/kernels/triton_trellis.py): the dict decoder's paths
TRELLIS_PATHS = [(p.replace("dict", "trellis"), g, bm, m, xdiv) for p, g, bm, m, xdiv in DICT_PATHS]


def trellis_specs(level: str = "ci") -> list[dict]:
    """Every trellis specialization: each path x 2 / 3 / 4 bits x groups of 128 (and one group per row at 3 bits)
    x sm_80 (bf16 activations) / sm_90 (fp16; the kernel has no dot: the dtype only changes a load; ``full``: both
    on both), at Mixtral-8x7B's gate shape through PTX (3 bits, batch 1 and grouped, through ptxas), and the odd
    shape (groups inside a block, a padded sequence; fp16, sm_90)."""
    out = []
    for arch in ARCHS:
        for path, grouped, bm, m, xdiv in TRELLIS_PATHS:
            for bits, group in ((2, 128), (3, 128), (4, 128), (3, 0)):
                for dtype in (DTYPES if level == "full" else ("bf16" if arch == 80 else "fp16",)):
                    main = bits == 3 and group == 128
                    stage = "cubin" if level == "full" or (main and path in ("trellis-gemv", "trellis-grouped-gemv")) \
                        else "ptx"
                    out.append(dict(kind="trellis", arch=arch, bits=bits, dtype=dtype, path=path, grouped=grouped,
                                    block_m=bm, M=m, x_div=xdiv, shape=(REAL[0], REAL[1], group), stage=stage))
    for path, grouped, bm, m, xdiv in TRELLIS_PATHS:
        out.append(dict(kind="trellis", arch=90, bits=3, dtype="fp16", path=path + "-odd", grouped=grouped,
                        block_m=bm, M=m + 3 if m > 1 else 1, x_div=xdiv, shape=ODD, stage="ptx"))
    return out


def _cfg_dict(c) -> dict:
    return {**c.kwargs, "num_warps": c.num_warps, "num_stages": c.num_stages}


def _label(s: dict) -> str:
    return f"[{s['stage']}] " + _what(s)


def _what(s: dict) -> str:
    if s["kind"] == "align":
        return f"moe_align E={s['E']} BLOCK_M={s['block_m']} sm_{s['arch']}"
    if s["kind"] == "viterbi":
        return f"viterbi trellis{s['bits']} sm_{s['arch']}"
    if s["kind"] == "trellis":
        return (f"{s['path']} trellis{s['bits']} {s['dtype']} sm_{s['arch']} shape={s['shape']} M={s['M']} "
                f"BM={s['block_m']}")
    if s["kind"] == "dict":
        return (f"{s['path']} ternary-dict{' two-level' if s['neg'] else ''} {s['dtype']} sm_{s['arch']} "
                f"shape={s['shape']} M={s['M']} BM={s['block_m']}")
    base = f"{s['codec'][0]} {s['dtype']} sm_{s['arch']} shape={s['shape']}"
    if s["kind"] == "dequant":
        return "dequant " + base
    c = s["cfg"]
    return (f"{s['path']} {base} M={s['M']} BM={s['block_m'] or c['BLOCK_M']} BN={c['BLOCK_N']} BK={c['BLOCK_K']} "
            f"SK={c['SPLIT_K']} w={c['num_warps']} s={c['num_stages']}")


def _kernel_spec(s: dict):
    from moecompress.kernels.aot import KernelSpec, mm_spec

    if s["kind"] == "align":
        E, bm = s["E"], s["block_m"]
        return KernelSpec("align", align=(16, E, 37, bm))
    if s["kind"] == "viterbi":
        return KernelSpec("viterbi", (s["bits"],))
    if s["kind"] == "trellis":
        N, K, group = s["shape"]
        return KernelSpec("trellis", (s["bits"],), s["dtype"], N, K, group, s["M"], s["grouped"], s["block_m"],
                          s["x_div"])
    if s["kind"] == "dict":
        N, K, group = s["shape"]
        return KernelSpec("dict", (s["neg"],), s["dtype"], N, K, group, s["M"], s["grouped"], s["block_m"], s["x_div"])
    _, bits, ternary, base3, asym, *frac = s["codec"]
    N, K, group = s["shape"]
    if s["kind"] == "dequant":
        return KernelSpec("dequant", (bits, ternary, base3, asym, *frac), s["dtype"], N, K, group)
    return mm_spec((bits, ternary, base3, asym, *frac), s["dtype"], N, K, group, s["M"], s["cfg"], s["grouped"],
                   s["block_m"] or 1, s["x_div"])


def _compile_one(s: dict) -> dict:
    from moecompress.kernels import aot

    t0 = time.time()
    res = {"label": _label(s)}
    try:
        shared = aot.compile_spec(_kernel_spec(s), s["arch"], s["stage"])
        fits = shared is None or shared <= MAX_SHARED[s["arch"]]
        res.update(ok=fits, shared=shared,
                   error=None if fits else f"shared memory {shared} B > {MAX_SHARED[s['arch']]} B")
    except Exception as e:  # report every failure, keep compiling the rest
        msg = str(e)
        cause = e.__cause__
        while cause is not None:
            msg += f" | {cause}"
            cause = cause.__cause__
        res.update(ok=False, error=f"{type(e).__name__}: {msg[-1500:]}")
    res["seconds"] = round(time.time() - t0, 2)
    return res


def selftest() -> dict:
    """The harness catches what the interpreter accepts: the old base-3 dequantization kernel (kept in
    old_base3_kernel.py) must fail for sm_90 with the bitcast error; the current one must compile."""
    import old_base3_kernel as old
    import torch

    from moecompress.kernels import aot

    values = dict(data_ptr=torch.empty(16, dtype=torch.uint8), scale_ptr=torch.empty(16, dtype=torch.float16),
                  zero_ptr=torch.empty(16, dtype=torch.float16), out_ptr=torch.empty(16, dtype=torch.float32),
                  R=37, C=80, W=16, G=5, GROUP=16, ZERO_CONST=1.0, BITS=8, KIND=2, HAS_ZERO=False, BLOCK_R=16,
                  BLOCK_C=64)
    try:
        aot.compile_kernel(old._dequant_kernel, values, 90, {})
        old_error = None
    except Exception as e:
        old_error = str(e)
        cause = e.__cause__
        while cause is not None:
            old_error += f" | {cause}"
            cause = cause.__cause__
    new = _compile_one(dict(kind="dequant", arch=90, codec=("ternary-b3", 8, True, True, False), dtype="fp16",
                            shape=ODD, stage="cubin"))
    return {"old_error": old_error, "new": new}


def cache_keys() -> dict:
    """Whether a kernel compiled ahead of time (`moecompress.kernels.aot`, e.g. benchmarks/kernels_gpu.py's
    precompilation) is the one a launch finds in Triton's cache: for launches of every kernel, the cache key
    ``triton.compile`` gives our specialization against the one the JIT's own binding (``JITFunction._pack_args``,
    as in a launch on sm_90) gives the same argument values. Uses Triton internals; reports them missing."""
    from triton import knobs
    from triton._C.libtriton import get_cache_invalidating_env_vars
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.compiler.compiler import get_cache_key, make_backend
    from triton.runtime.jit import create_function_from_signature

    from moecompress.kernels import aot, triton_dequant as td

    backend = make_backend(GPUTarget("cuda", 90, 32))
    env = get_cache_invalidating_env_vars()
    gemv = next(c for c in td.DECODE_CONFIGS if c.kwargs["BLOCK_M"] == 1 and c.kwargs["SPLIT_K"] > 1)
    todo = [aot.mm_spec((4, False, False, False), "fp16", *REAL, 1, gemv),
            aot.mm_spec((8, True, True, False), "bf16", *REAL, 32, td.GROUPED_CONFIGS[16][0], True, 16, 2),
            aot.mm_spec((3, False, False, True), "fp16", *ODD, 512, td.GEMM_CONFIGS[0]),
            aot.mm_spec((2, False, False, True, 6), "bf16", *REAL, 2, td.GROUPED_CONFIGS[1][0], True, 1, 2),
            aot.KernelSpec("dequant", (2, False, False, True, 6), "fp32", *REAL),
            aot.KernelSpec("align", align=(37, 8, 10, 16)),
            aot.KernelSpec("dict", (True,), "bf16", *REAL, 1),
            aot.KernelSpec("trellis", (3,), "bf16", *REAL, 1),
            aot.KernelSpec("viterbi", (3,))]
    out = {}
    for spec in todo:
        fn, values, opts = aot.launch_values(spec)
        binder = create_function_from_signature(fn.signature, fn.params, backend)
        kw = {**opts, "debug": knobs.runtime.debug, "instrumentation_mode": knobs.compilation.instrumentation_mode}
        bound, specialization, options = binder(**values, **kw)
        jit_opts, sig, consts, attrs = fn._pack_args(backend, kw, bound, specialization, options)
        launch = get_cache_key(ASTSource(fn, sig, consts, attrs), backend, jit_opts, env)
        parsed = backend.parse_options(dict(opts))
        ours = get_cache_key(ASTSource(fn, *aot.specialize(fn, values)), backend, parsed, env)
        hand = get_cache_key(ASTSource(fn, *aot._specialize_by_hand(fn, values)), backend, parsed, env)
        name = f"{spec.kernel} {spec.codec} {spec.dtype}"
        out[name] = launch == ours
        out[f"{name} (by hand)"] = launch == hand  # the fallback's form is Triton 3.7's
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--filter", default="", help="compile only specializations whose label contains this")
    ap.add_argument("--level", choices=("ci", "full"), default="ci")
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--selftest", action="store_true", help="the old base-3 kernel must fail, the new one compile")
    ap.add_argument("--cache-keys", action="store_true", help="ahead-of-time cache keys equal the launches' ones")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("aot_compile: unset TRITON_INTERPRET (the interpreter replaces the kernels it would compile)")
        return 2
    if args.selftest:
        print(json.dumps(selftest()))
        return 0
    if args.cache_keys:
        print(json.dumps(cache_keys()))
        return 0
    todo = [s for s in specs(args.level) if args.filter in _label(s)]
    if args.list:
        for s in todo:
            print(_label(s))
        return 0
    from moecompress.kernels import triton_dequant, triton_dict, triton_trellis, triton_viterbi  # noqa: F401

    t0 = time.time()
    failed = 0
    todo.sort(key=lambda s: s["stage"] == "ttir")  # the slow ones first, the short front-end runs fill the gaps
    with ProcessPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        for r in pool.map(_compile_one, todo, chunksize=4):
            failed += not r["ok"]
            print(json.dumps(r), flush=True)
    stages = {st: sum(s["stage"] == st for s in todo) for st in ("ttir", "ptx", "cubin")}
    print(json.dumps({"summary": True, "compiled": len(todo), "failed": failed, "stages": stages,
                      "seconds": round(time.time() - t0, 1)}))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    sys.exit(main())
