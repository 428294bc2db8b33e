#!/usr/bin/env python
"""Would a trellis code pay at 3 bits? Bitshift-trellis coded quantization (QTIP, Tseng et al. 2024,
arXiv:2406.11235) inside GPTQ's column loop, against our scalar W3 g128 path, on real weights and Hessians.
A measurement, not a shipped codec.

The code: a bitshift trellis with ``L``-bit states and ``k`` bits per weight. Each weight's value is
``s (lut[state] - z)``: ``state`` is the last ``L`` bits of a bitstream that advances ``k`` bits per weight,
``lut`` a fixed table of ``2^L`` values (learned once on N(0, 1) samples by Lloyd iterations over Viterbi
assignments, seeded), ``s`` and ``z`` a group's scale (fp16) and offset (8 bits, steps of 1/32 in table units):
the same side information as our asymmetric g128 grid (16 + 8 bits per group), and exactly ``k`` bits per
weight (tail-biting sequences: each sequence's first state shares its top ``L - k`` bits with its last).

Where the sequences run: along the output rows of one column, ``--seq`` rows at a time. GPTQ visits one column
at a time and its objective for that column is the plain squared error of the column's rows (every row of a
column has the same inverse-Hessian diagonal), so the Viterbi search on a column is exactly GPTQ's step, with the
whole column chosen jointly instead of weight by weight; the error is then spread over the later columns as GPTQ
does. Act order changes only the order columns are visited, not how they are stored. With ``--row-shuffle`` a
sequence runs over a fixed pseudo-random set of rows (one seeded permutation of the rows, the same for every
column) instead of neighbouring rows: a trellis path correlates the errors of the weights along it, and
neighbouring rows (one attention head's channels, neighbouring expert channels) are where such correlation costs
most end to end (measured: docs/BENCHMARKS.md, stop 34). ``--direction row`` runs the sequences along a row's
columns in blocks instead (QTIP's BlockLDLQ, the block's own inverse-Hessian coupling dropped). After GPTQ the
group scales and offsets are refit to the Hessian-weighted error (least squares, the trellis values fixed), and
``--rounds`` more trellis GPTQ passes run on the refit parameters, each row keeping its best result.

Layer mode: the routed experts of one demo layer (their gate-weighted Hessians, as `vq_proxy.py` collects them):
``tr((W - Q) H (W - Q)^T)`` of the trellis against the shipped scalar W3 expert path. End to end (``--e2e``):
`benchmarks/quantize_demo.py`'s W3 "all (default)" row with every quantized linear (attention and experts) replaced
by the trellis on the same (paired) targets and Hessians; the checkpoint's records keep the scalar codes.

Usage (``--scale-error A``: no trellis, the shipped scalar result with its error multiplied by ``A``, an
oracle for what a uniformly smaller error would give)::

    python benchmarks/trellis_proxy.py --layer 1 --L 10 --rounds 2 --out /tmp/trellis_l1.json
    python benchmarks/trellis_proxy.py --e2e --L 10 --rounds 2 --row-shuffle --calib-seed S \
        --peer-from benchmarks/results/stop29/w3_demo_sS.json --out benchmarks/results/stop34/F.json
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import sys
import time
from pathlib import Path

import torch

from moecompress.algorithms.gptq import gptq_factor, proxy_loss
from moecompress.algorithms.quant_grid import storable
from moecompress.algorithms.refit import row_errors

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

ZSTEP, ZMAX = 1 / 32, 4.0  # the offset's 8 bits: steps of 1/32 table units on [-4, 4)


def viterbi(t: torch.Tensor, w: torch.Tensor, lut: torch.Tensor, L: int, k: int,
            init_hi: torch.Tensor | None = None) -> torch.Tensor:
    """States ``[N, n]`` minimising ``sum w (t - lut[state])^2`` over bitshift-trellis paths, ``t, w [N, n]``.
    A state's successors are ``((s << k) | c) mod 2^L``; ``init_hi`` fixes the first state's top ``L - k`` bits."""
    N, n = t.shape
    S, Lo, K = 1 << L, 1 << (L - k), 1 << k
    cost = w[:, :1] * (t[:, :1] - lut[None, :]) ** 2  # [N, S]
    if init_hi is not None:
        top = torch.arange(S, device=t.device) >> k
        cost = cost.masked_fill(top[None, :] != init_hi[:, None], float("inf"))
    back = torch.empty(n, N, Lo, dtype=torch.uint8, device=t.device)
    lutv = lut.view(Lo, K)
    for i in range(1, n):
        best, arg = cost.view(N, K, Lo).min(1)  # predecessor p = hi * Lo + low of the successors (low, c)
        back[i] = arg
        cost = (best[:, :, None] + w[:, i, None, None] * (t[:, i, None, None] - lutv[None]) ** 2).view(N, S)
    if init_hi is not None:  # and the last state's low bits equal to them: the stream closes on itself
        low = torch.arange(S, device=t.device) & (Lo - 1)
        cost = cost.masked_fill(low[None, :] != init_hi[:, None], float("inf"))
    s = cost.argmin(1)
    states = torch.empty(N, n, dtype=torch.long, device=t.device)
    states[:, -1] = s
    for i in range(n - 1, 0, -1):
        low = s >> k
        s = back[i].gather(1, low[:, None])[:, 0].long() * Lo + low
        states[:, i - 1] = s
    return states


def tailbite(t: torch.Tensor, w: torch.Tensor, lut: torch.Tensor, L: int, k: int) -> torch.Tensor:
    """`viterbi` with the first state's top bits tied to the last state's low bits (QTIP's tail-biting
    approximation: one free pass, then one with both the start's top bits and the end's low bits fixed to the free
    pass's end): a circular stream of ``n k`` bits exactly."""
    free = viterbi(t, w, lut, L, k)
    return viterbi(t, w, lut, L, k, init_hi=free[:, -1] & ((1 << (L - k)) - 1))


def train_lut(L: int, k: int, seed: int = 0, n: int = 128, rows: int = 2048, iters: int = 4) -> torch.Tensor:
    """A table of ``2^L`` values for N(0, 1) weights: each successor set (same low bits) starts as a ``2^k``-level
    quantizer dithered by a per-set offset, then Lloyd iterations (each value the mean of what the Viterbi paths
    assign to it)."""
    g = torch.Generator().manual_seed(seed)
    Lo, K = 1 << (L - k), 1 << k
    u = (torch.randperm(Lo, generator=g).float() + 0.5) / Lo
    p = ((torch.arange(K).float()[None, :] + u[:, None]) / K).clamp(1e-4, 1 - 1e-4)
    lut = torch.distributions.Normal(0.0, 1.0).icdf(p).reshape(-1)
    t = torch.randn(rows, n, generator=g)
    w = torch.ones_like(t)
    for _ in range(iters):
        st = tailbite(t, w, lut, L, k).reshape(-1)
        tot = torch.zeros_like(lut).index_add_(0, st, t.reshape(-1))
        cnt = torch.zeros_like(lut).index_add_(0, st, torch.ones_like(t.reshape(-1)))
        lut = torch.where(cnt > 0, tot / cnt.clamp(min=1), lut)
    return lut


def group_params(W: torch.Tensor, gs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Static groups from the original weights: scale = the group's standard deviation (fp16), offset z with
    ``s (v - z)`` centred on the group's mean, on the 8-bit offset grid. ``[E, O, C] -> 2 x [E, O, G]``."""
    E, O, C = W.shape
    Wg = W.reshape(E, O, C // gs, gs)
    s = storable(Wg.std(-1, unbiased=False).clamp(min=1e-8))
    z = (-Wg.mean(-1) / s / ZSTEP).round().clamp(-ZMAX / ZSTEP, ZMAX / ZSTEP - 1) * ZSTEP
    return s, z


@torch.no_grad()
def trellis_gptq(W: torch.Tensor, H: torch.Tensor, lut: torch.Tensor, L: int, k: int, gs: int, seq: int,
                 params: tuple[torch.Tensor, torch.Tensor] | None = None, factor=None, damp: float = 0.01,
                 act_order: bool = True, shuffle: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """GPTQ with the trellis as its per-column quantizer (``shuffle [O]``: the row order sequences follow).
    ``W [E, O, C]``, ``H [E, C, C]`` -> ``(weights [E, O, C],
    table values [E, O, C], scales, offsets [E, O, G])``."""
    E, O, C = W.shape
    s, z = group_params(W, gs) if params is None else params
    perm, U = factor if factor is not None else gptq_factor(H, damp, act_order)
    Wt = W.float().gather(2, perm[:, None, :].expand(E, O, C)).transpose(1, 2).contiguous()  # [E, C, O]
    Vt = torch.empty_like(Wt)
    grp = torch.div(perm, gs, rounding_mode="floor")  # [E, C]
    st, zt = s.transpose(1, 2), z.transpose(1, 2)  # [E, G, O]
    n = min(seq, O)
    for i in range(C):
        w = Wt[:, i]  # [E, O]
        gi = grp[:, i, None, None].expand(E, 1, O)
        sc, zc = st.gather(1, gi)[:, 0], zt.gather(1, gi)[:, 0]
        if shuffle is None:
            states = tailbite((w / sc + zc).reshape(-1, n), (sc * sc).reshape(-1, n), lut, L, k).view(E, O)
        else:  # sequences over a fixed pseudo-random order of the rows, not neighbouring rows
            states = torch.empty(E, O, dtype=torch.long, device=w.device)
            states[:, shuffle] = tailbite((w / sc + zc)[:, shuffle].reshape(-1, n),
                                          (sc * sc)[:, shuffle].reshape(-1, n), lut, L, k).view(E, O)
        v = lut[states]
        Vt[:, i] = v
        err = (w - sc * (v - zc)) / U[:, i, i, None]  # [E, O]
        if i + 1 < C:
            Wt[:, i + 1:] -= U[:, i, i + 1:, None] * err[:, None, :]
    at = perm[:, :, None].expand(E, C, O)
    V = torch.empty(E, O, C).transpose(1, 2).scatter_(1, at, Vt).transpose(1, 2).contiguous()
    return dequant(V, s, z, gs), V, s, z


@torch.no_grad()
def trellis_gptq_rows(W: torch.Tensor, H: torch.Tensor, lut: torch.Tensor, L: int, k: int, gs: int, seq: int,
                      params: tuple[torch.Tensor, torch.Tensor] | None = None, factor=None, damp: float = 0.01,
                      act_order: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`trellis_gptq` with the sequences along each row instead (QTIP's BlockLDLQ): columns in blocks of ``seq``
    (in GPTQ's order), each row's block one tail-biting sequence, its Viterbi weighting column ``j`` by
    ``1 / U_jj^2`` (the block's own inverse-Hessian coupling dropped), then the block's error spread over the later
    columns exactly, ``W_rest -= ((W_b - Q_b) U_bb^-1) U_b,rest``."""
    E, O, C = W.shape
    s, z = group_params(W, gs) if params is None else params
    perm, U = factor if factor is not None else gptq_factor(H, damp, act_order)
    Wp = W.float().gather(2, perm[:, None, :].expand(E, O, C)).contiguous()  # [E, O, C] in GPTQ's order
    sp = s.repeat_interleave(gs, -1).gather(2, perm[:, None, :].expand(E, O, C))  # each column's group scale
    zp = z.repeat_interleave(gs, -1).gather(2, perm[:, None, :].expand(E, O, C))
    Vp = torch.empty_like(Wp)
    b = min(seq, C)
    for i1 in range(0, C, b):
        i2 = i1 + b
        B, sc, zc = Wp[:, :, i1:i2], sp[:, :, i1:i2], zp[:, :, i1:i2]
        d = U[:, i1:i2, i1:i2].diagonal(dim1=1, dim2=2)  # [E, b]
        wts = sc * sc / (d * d)[:, None, :]
        states = tailbite((B / sc + zc).reshape(-1, b), wts.reshape(-1, b), lut, L, k)
        v = lut[states].view(E, O, b)
        Vp[:, :, i1:i2] = v
        D = B - sc * (v - zc)  # [E, O, b]
        if i2 < C:
            Err = torch.linalg.solve_triangular(U[:, i1:i2, i1:i2], D, upper=True, left=False)
            Wp[:, :, i2:] -= torch.bmm(Err, U[:, i1:i2, i2:])
    V = torch.empty(E, O, C).scatter_(2, perm[:, None, :].expand(E, O, C), Vp)
    return dequant(V, s, z, gs), V, s, z


def dequant(V: torch.Tensor, s: torch.Tensor, z: torch.Tensor, gs: int) -> torch.Tensor:
    E, O, C = V.shape
    return (s[..., None] * (V.reshape(E, O, -1, gs) - z[..., None])).reshape(E, O, C)


@torch.no_grad()
def refit(W: torch.Tensor, H: torch.Tensor, V: torch.Tensor, s: torch.Tensor, z: torch.Tensor, gs: int,
          damp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """Least squares of each row's group scales and offsets in the Hessian metric with the table values fixed:
    the joint fit proposes the offset (rounded to its 8 bits), the scales are refit with it fixed; a row keeps its
    parameters unless that lowers its error."""
    E, O, C = W.shape
    G = C // gs
    Hd = H + damp * H.diagonal(dim1=1, dim2=2).mean(-1)[:, None, None] * torch.eye(C)
    Vg = V.reshape(E, O, G, gs)
    eye = torch.eye(G)
    A = torch.cat([(Vg[..., None, :] * eye[:, :, None]).reshape(E, O, G, C),
                   eye[:, :, None].expand(G, G, gs).reshape(G, C).expand(E, O, G, C)], 2).double()  # [E, O, 2G, C]
    Hd = Hd.double()
    AH = torch.einsum("eojc,ecd->eojd", A, Hd)
    M = torch.einsum("eoic,eojc->eoij", AH, A)
    r = torch.einsum("eoic,eoc->eoi", AH, W.double())
    p = torch.linalg.solve(M + 1e-12 * torch.eye(2 * G, dtype=M.dtype), r)
    s1 = p[..., :G].float()
    z1 = torch.where(s1.abs() > 1e-12, -p[..., G:].float() / s1, z)
    z1 = (z1 / ZSTEP).round().clamp(-ZMAX / ZSTEP, ZMAX / ZSTEP - 1) * ZSTEP
    B = (Vg - z1[..., None]).reshape(E, O, G, 1, gs) * eye[:, :, None]  # scales with the offsets fixed
    B = B.reshape(E, O, G, C).double()
    BH = torch.einsum("eojc,ecd->eojd", B, Hd)
    s2 = torch.linalg.solve(torch.einsum("eoic,eojc->eoij", BH, B) + 1e-12 * torch.eye(G, dtype=M.dtype),
                            torch.einsum("eoic,eoc->eoi", BH, W.double())).float()
    s2 = storable(torch.where(torch.isfinite(s2) & (s2 > 0), s2, s))
    before = row_errors(W, dequant(V, s, z, gs), H)
    after = row_errors(W, dequant(V, s2, z1, gs), H)
    keep = (after < before)[..., None]
    return torch.where(keep, s2, s), torch.where(keep, z1, z)


@torch.no_grad()
def trellis_quantize(W: torch.Tensor, H: torch.Tensor, args, lut: torch.Tensor) -> torch.Tensor:
    """Trellis GPTQ, the refit, then ``args.rounds`` rounds (GPTQ again on the refit parameters, then the refit),
    each row keeping its best result. ``W [E, O, C]``, ``H [E, C, C]`` (an empty Hessian: plain squared error)."""
    E, O, C = W.shape
    gs = min(args.group_size, C)
    H = torch.where((H.diagonal(dim1=1, dim2=2).sum(-1) > 0)[:, None, None], H.float(), torch.eye(C))
    factor = gptq_factor(H, 0.01, True)
    quant = trellis_gptq_rows if args.direction == "row" else trellis_gptq
    if (args.row_shuffle or args.row_stride) and args.direction == "column":
        n = min(args.seq, O)
        order = torch.randperm(O, generator=torch.Generator().manual_seed(0)) if args.row_shuffle else \
            torch.arange(O).view(n, O // n).t().reshape(-1)  # sequence j: rows j, j + O/n, j + 2 O/n, ...
        quant = functools.partial(trellis_gptq, shuffle=order)
    Q, V, s, z = quant(W, H, lut, args.L, args.k, gs, args.seq, factor=factor)
    best, best_err = Q, row_errors(W, Q, H)

    def keep(Q: torch.Tensor) -> None:  # per row, the result with the lower error so far
        nonlocal best, best_err
        err = row_errors(W, Q, H)
        best = torch.where((err < best_err)[..., None], Q, best)
        best_err = torch.minimum(err, best_err)

    for r in range(args.rounds + 1):
        s, z = refit(W, H, V, s, z, gs)
        keep(dequant(V, s, z, gs))
        if r < args.rounds:
            _, V, s, z = quant(W, H, lut, args.L, args.k, gs, args.seq, params=(s, z), factor=factor)
            keep(dequant(V, s, z, gs))
    return best


def end_to_end(args, lut: torch.Tensor) -> None:
    import quantize_demo

    calls = []

    def patch(original):
        def patched(chunk, shape, H, opt, dtype, finish=None, store=None, error=None):
            res = original(chunk, shape, H, opt, dtype, finish, None, error)  # the scalar codes, for the record
            if H is None:  # round-to-nearest calls: as shipped
                if store is not None:
                    store(0, res.weight)
                    return dataclasses.replace(res, weight=None)
                return res
            t = time.time()
            W = chunk(0, shape[0])
            if args.scale_error is not None:  # the oracle: the shipped scalar result with its error scaled
                if finish is not None:
                    raise SystemExit("--scale-error: experts stored through finish() are not supported")
                Wq = W + args.scale_error * (res.weight.float() - W)
            else:
                Wq = trellis_quantize(W, H, args, lut)
            Hs = torch.where((H.diagonal(dim1=1, dim2=2).sum(-1) > 0)[:, None, None], H, torch.eye(shape[2]))
            e_t = float(proxy_loss(W, Wq, Hs).sum())
            e_s = float(proxy_loss(W, res.weight.float(), Hs).sum()) if finish is None else None
            calls.append({"shape": list(shape), "trellis": e_t, "scalar": e_s, "seconds": round(time.time() - t, 2)})
            print("call", calls[-1], flush=True)
            weight = Wq if finish is None else finish(Wq)
            if store is not None:
                store(0, weight)
                return dataclasses.replace(res, weight=None)
            return dataclasses.replace(res, weight=weight.to(dtype))
        return patched

    res = quantize_demo.default_row_with(patch, args.model, f"w{args.k}a16", args.calib_seed, args.out,
                                         args.peer_from)
    res["note"] = (f"trellis L={args.L} k={args.k} seq={args.seq} g{args.group_size} rounds={args.rounds} "
                   f"direction={args.direction} row_shuffle={args.row_shuffle} row_stride={args.row_stride}: the row "
                   "named 'all (default)' is the default with every GPTQ-quantized linear replaced by the trellis "
                   "(benchmarks/trellis_proxy.py)")
    if args.scale_error is not None:
        res["note"] = (f"oracle: the row named 'all (default)' is the W3 default with every GPTQ-quantized linear's "
                       f"error (Q - W) multiplied by {args.scale_error} (benchmarks/trellis_proxy.py --scale-error)")
    res["trellis_calls"] = calls
    args.out.write_text(json.dumps(res, indent=1) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    from moecompress.io.model import DEMO_MODEL
    ap.add_argument("--model", type=Path, default=DEMO_MODEL)
    ap.add_argument("--layer", type=int, default=1)
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--L", type=int, default=8, help="state bits")
    ap.add_argument("--k", type=int, default=3, help="bits per weight")
    ap.add_argument("--seq", type=int, default=64, help="rows per trellis sequence (along a column)")
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--row-shuffle", action="store_true", help="column direction: each sequence over a fixed "
                    "pseudo-random set of rows instead of neighbouring rows (errors not correlated along heads)")
    ap.add_argument("--row-stride", action="store_true", help="column direction: sequence j over rows j, j + O/n, "
                    "j + 2 O/n, ... (n = --seq): no stored permutation")
    ap.add_argument("--direction", choices=["column", "row"], default="column", help="sequences along a column's "
                    "rows (exact GPTQ step) or along a row's columns in blocks of --seq (QTIP's BlockLDLQ)")
    ap.add_argument("--rounds", type=int, default=0, help="trellis GPTQ rounds on the refit parameters")
    ap.add_argument("--e2e", action="store_true")
    ap.add_argument("--gaussian", action="store_true", help="the code alone on N(0, 1) samples (held out from the "
                    "table's training samples)")
    ap.add_argument("--scale-error", type=float, default=None, help="--e2e oracle: no trellis; every GPTQ-quantized "
                    "linear is the shipped scalar result with its error (Q - W) multiplied by this factor")
    ap.add_argument("--peer-from", type=Path, default=None)
    ap.add_argument("--calib-seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "trellis_proxy.json")
    args = ap.parse_args()
    torch.set_num_threads(2)
    if args.gaussian:  # the code alone on N(0, 1) samples: squared error per weight against the best uniform grid
        t = torch.randn(2048, 128, generator=torch.Generator().manual_seed(1))
        a = torch.linspace(1.5, 3.5, 81)[:, None, None]  # clip ranges of a uniform 2^k-level grid
        step = 2 * a / 2 ** args.k
        r = (((t + a) / step - 0.5).round().clamp(0, 2 ** args.k - 1) + 0.5) * step - a
        out = {"uniform_best_clip": float(((t - r) ** 2).mean((1, 2)).min())}
        for L in (8, 10, 12):
            lut = train_lut(L, args.k)
            out[f"trellis_L{L}"] = float(((t - lut[tailbite(t, torch.ones_like(t), lut, L, args.k)]) ** 2).mean())
        out["rate_distortion_bound"] = 2.0 ** (-2 * args.k)
        print(json.dumps(out))
        return
    lut = train_lut(args.L, args.k)
    if args.e2e:
        end_to_end(args, lut)
        return
    from moecompress.runtime.layer_quant import _quantize
    from moecompress.runtime.source import load_model
    from moecompress.stages.quantize import QuantizeConfig, plan_of
    from vq_proxy import hessians
    loaded = load_model(str(args.model))
    gu, dn, H_in, H_dn = (t.detach() for t in hessians(loaded, args.layer, args.samples))
    opt = plan_of(QuantizeConfig(scheme=f"w{args.k}a16"))[0].experts
    result = {"layer": args.layer, "L": args.L, "k": args.k, "seq": args.seq, "rounds": args.rounds,
              "direction": args.direction,
              "projections": {}}
    for name, W, H in (("gate_up", gu, H_in), ("down", dn, H_dn)):
        t = time.time()
        e_s = float(proxy_loss(W, _quantize(lambda a, b, W=W: W[a:b], tuple(W.shape), H, opt, W.dtype).weight,
                               H).sum())
        t_s = time.time() - t
        t = time.time()
        Q = trellis_quantize(W, H, args, lut)
        t_t = time.time() - t
        e_t = float(proxy_loss(W, Q, H).sum())
        row = {"scalar_shipped": e_s, "trellis": e_t, "trellis_over_scalar": e_t / e_s,
               "seconds_scalar": round(t_s, 2), "seconds_trellis": round(t_t, 2)}
        result["projections"][name] = row
        print(name, json.dumps(row), flush=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
