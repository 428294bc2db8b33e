#!/usr/bin/env python
"""Would a vector codebook pay at 2 bits? GPTQ's own objective for d-D vector quantization (GPTVQ-style) against
our scalar W2 g128 pipeline, on real weights and real Hessians. A measurement, not a shipped codec.

Weights: the routed experts of one MoE layer of a Mixtral- or Qwen3-MoE-style checkpoint (the demo by default).
Hessians: each expert's gate-weighted routed tokens (``H = sum g x x^T``; the down projections' from the
full-precision intermediates) over the calibration windows (``--samples`` per bundled task, seed 0), as
`moecompress quantize` collects them. Error: ``tr((W - Q) H (W - Q)^T)`` summed over the layer's experts.

Rows (bits per weight, side information counted):
  * scalar GPTQ, act order, clip search (floor 0.8, the W2 default), asymmetric g128 (2 + 24/128 = 2.1875);
  * the same + scale/zero refit + 4 GPTQ rounds (the shipped W2 expert path without the sequential pairing);
  * d-D VQ GPTQ (``--vq-dim d``): ``d`` consecutive columns of a row share one ``2d``-bit index into ``4^d``
    centroids (2 bits per weight) of a codebook per block of ``--vq-rows`` x ``--vq-cols`` weights, centroids
    stored in fp16 or int8 with one scale per codebook (``--book-bits``); optionally one fp16 scale per row
    (``--row-scale``) and per column (``--col-scale``), and columns in act order (``--act-order``, a stored
    permutation). The codebook is fit by GPTQ-importance-weighted k-means on the block's current (error-updated)
    weights when GPTQ reaches it, each vector's centroid chosen jointly under GPTQ's sequential objective, then
    the error spread over the later columns as GPTQ does (GPTVQ, van Baalen et al. 2024, arXiv:2402.15319);
  * the same + a codebook update (least squares in the Hessian metric with the assignments fixed, kept per
    codebook only where it lowers the error) and ``--vq-rounds`` more VQ GPTQ passes on the updated codebooks.

End to end (``--e2e``): `benchmarks/quantize_demo.py`'s W2 "all (default)" row (sequential pairing, balance,
the attention and dense linears as shipped) with every routed expert's projections replaced by the d-D VQ GPTQ
above (on the same paired targets and Hessians), evaluated in memory against the original and, with
``--peer-from``, llm-compressor, window by window. The checkpoint's records keep the scalar codes (not
loadable as VQ): a measurement of the quality a codebook would give, nothing more.

Usage::

    # per layer L (merged over 0-3: benchmarks/results/vq_proxy_demo.json)
    python benchmarks/vq_proxy.py --layer L --vq-dim 4 --vq-rows 256 --vq-cols 256 --book-bits 8 --vq-rounds 1 \\
        --row-scale --act-order --out /tmp/vq_L.json
    # end to end (with and without --row-scale --act-order, --pick; merged: benchmarks/results/vq_demo_e2e.json)
    python benchmarks/vq_proxy.py --vq-dim 4 --vq-rows 256 --vq-cols 256 --book-bits 8 --vq-rounds 1 \\
        --row-scale --act-order --pick --e2e --peer-from benchmarks/results/quantize_lowbit_stop23.json \\
        --out /tmp/vq_pick.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch

from moecompress.algorithms.gptq import gptq_factor, proxy_loss
from moecompress.algorithms.moe_math import glu
from moecompress.calib import bundled_tasks, read_documents, token_windows
from moecompress.io.model import DEMO_MODEL
from moecompress.models.calls import experts_call_args
from moecompress.runtime.layer_quant import _gptq, _quantize
from moecompress.runtime.source import load_model
from moecompress.stages.quantize import QuantizeConfig, plan_of

ROOT = Path(__file__).resolve().parents[1]


def hessians(loaded, layer: int, samples: int) -> tuple[torch.Tensor, ...]:
    """``(gate_up [E, 2I, H], down [E, H, I], H_in [E, H, H], H_down [E, I, I])`` of MoE layer ``layer``."""
    arch, model = loaded.arch, loaded.model
    view = arch.block(model, layer)
    ex = view.experts
    gate, up, down = (ex.stacked(k).float() for k in ("gate", "up", "down"))
    E, I, Hd = gate.shape
    H_in, H_dn = torch.zeros(E, Hd, Hd), torch.zeros(E, I, I)

    def hook(mod, args, kwargs):
        x, index, weights = experts_call_args(args, kwargs)
        x = x.reshape(-1, x.shape[-1]).float()
        index, weights = index.reshape(-1, index.shape[-1]), weights.reshape(-1, weights.shape[-1]).float()
        for e in range(E):
            routed = index == e
            sel = routed.any(1).nonzero().squeeze(-1)
            if len(sel) == 0:
                continue
            g = (weights * routed).sum(1)[sel].sqrt()[:, None]
            xs = x[sel]
            h = glu(xs @ gate[e].T, xs @ up[e].T, view.activation)
            xs, h = xs * g, h * g
            H_in[e] += xs.T @ xs
            H_dn[e] += h.T @ h

    tok = loaded.tokenizer
    ids = torch.cat([token_windows(tok, read_documents(t, "calib"), 256, samples, seed=0) for t in bundled_tasks()])
    handle = ex.module.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            for i in range(0, len(ids), 8):
                model(input_ids=ids[i:i + 8])
    finally:
        handle.remove()
    return torch.cat([gate, up], 1), down, H_in, H_dn


def _kmeans(P: torch.Tensor, w: torch.Tensor, k: int, iters: int = 12) -> torch.Tensor:
    """Weighted Lloyd k-means of ``P [N, d]`` with weights ``w [N]``: ``[k, d]`` centroids (deterministic init
    at weighted quantiles of the points' projection on their first principal axis)."""
    mu = (P * w[:, None]).sum(0) / w.sum()
    Z = P - mu
    cov = (Z * w[:, None]).T @ Z
    axis = torch.linalg.eigh(cov).eigenvectors[:, -1]
    order = torch.argsort(Z @ axis)
    cw = torch.cumsum(w[order], 0) / w.sum()
    picks = torch.searchsorted(cw, (torch.arange(k, dtype=P.dtype) + 0.5) / k).clamp(max=len(P) - 1)
    C = P[order[picks]].clone()
    for _ in range(iters):
        a = torch.cdist(P, C).argmin(1)
        num = torch.zeros_like(C).index_add_(0, a, P * w[:, None])
        den = torch.zeros(k, dtype=P.dtype).index_add_(0, a, w)
        C = torch.where(den[:, None] > 0, num / den.clamp(min=1e-30)[:, None], C)
    return C


BOOK_BITS = [16]  # centroid storage: 16 = fp16, 8 = int8 with one scale per codebook (GPTVQ stores 8-bit books)


def _store(c: torch.Tensor) -> torch.Tensor:
    """Centroids ``[k, d]`` as stored (float64 again)."""
    if BOOK_BITS[0] == 8:
        s = c.abs().amax().clamp(min=1e-12) / 127
        return ((c / s).round().clamp(-127, 127) * s).to(torch.float16).double()
    return c.to(torch.float16).double()


@torch.no_grad()
def vq_gptq(W: torch.Tensor, H: torch.Tensor, rows: int, gs: int, d: int, damp: float = 0.01,
            books: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
    """d-D VQ GPTQ of one matrix ``W [O, C]`` with ``H [C, C]`` (``2^(2d)`` centroids: 2 bits per weight):
    ``(Q [O, C], assignments [O, C/d], codebooks [O/rows, C/gs, k, d])``. Columns in their own order; vectors
    are ``d`` consecutive columns of a row. ``books``: use these codebooks (a round on updated codebooks)."""
    O, C = W.shape
    k = 2 ** (2 * d)
    _, U = gptq_factor(H[None], damp, act_order=False)
    U = U[0].double()
    W = W.double().clone()
    Q = torch.zeros_like(W)
    A = torch.zeros(O, C // d, dtype=torch.long)
    fit = books is None
    books = torch.zeros(O // rows, C // gs, k, d, dtype=torch.float64) if fit else books.clone()
    imp = 1 / U.diagonal().square()  # GPTQ's per-column weight of a rounding error
    ar = torch.arange(O)
    for c0 in range(0, C, gs):
        # the block's codebooks from its current (error-updated) weights, points weighted by GPTQ's importance
        for r in range(O // rows if fit else 0):
            P = W[r * rows:(r + 1) * rows, c0:c0 + gs].reshape(-1, d)
            wt = imp[c0:c0 + gs].view(-1, d).mean(1).repeat(rows)
            books[r, c0 // gs] = _store(_kmeans(P, wt, k))
        book = books[:, c0 // gs].repeat_interleave(rows, 0)  # [O, k, d]
        for j in range(c0, c0 + gs, d):
            # GPTQ's sequential objective for each candidate: column j+t sees the feedback of j..j+t-1
            cost = torch.zeros(O, k, dtype=torch.float64)
            errs = []
            for t in range(d):
                w = W[:, j + t:j + t + 1] - sum((e * U[j + m, j + t] for m, e in enumerate(errs)),
                                                torch.zeros(O, k, dtype=torch.float64))
                e = (w - book[..., t]) / U[j + t, j + t]
                errs.append(e)
                cost += e.square()
            a = cost.argmin(1)
            A[:, j // d] = a
            q = book[ar, a]  # [O, d]
            Q[:, j:j + d] = q
            err = []
            for t in range(d):  # the chosen centroid's errors, spread as GPTQ does column by column
                e = (W[:, j + t] - q[:, t]) / U[j + t, j + t]
                if t + 1 < d:
                    W[:, j + t + 1:j + d] -= e[:, None] * U[j + t, j + t + 1:j + d][None]
                err.append(e)
            if j + d < C:
                W[:, j + d:] -= torch.stack(err, 1) @ U[j:j + d, j + d:]
    return Q.float(), A, books


@torch.no_grad()
def codebook_update(W: torch.Tensor, H: torch.Tensor, A: torch.Tensor, books: torch.Tensor, rows: int, gs: int,
                    d: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Least-squares centroids (assignments fixed) in the Hessian metric, one codebook at a time with the others
    fixed, kept where the error falls; returns the new ``Q`` and codebooks."""
    O, C = W.shape
    k = books.shape[2]
    Hd = H.double()
    books = books.clone()
    blk = torch.arange(C // d) * d // gs  # codebook column-block of each vector

    def dequant(bk: torch.Tensor, R: slice = slice(None)) -> torch.Tensor:  # rows R of the dequantized matrix
        full = bk.repeat_interleave(rows, 0)[R]  # [|R|, C/gs, k, d]
        return full[torch.arange(full.shape[0])[:, None], blk[None, :], A[R]].reshape(-1, C)

    Wd = W.double()
    for r in range(O // rows):
        for b in range(C // gs):
            R = slice(r * rows, (r + 1) * rows)
            cols = slice(b * gs, (b + 1) * gs)
            Q = dequant(books, R)  # [rows, C]
            D = Wd[R] - Q
            before = float((D @ Hd * D).sum())
            Rz = D.clone()
            Rz[:, cols] += Q[:, cols]  # W - Q without this codebook's own contribution
            a = A[R, b * gs // d:(b + 1) * gs // d]  # [rows, gs/d]
            onehot = torch.nn.functional.one_hot(a, k).double()  # [rows, gs/d, k]
            Hbb = Hd[cols, cols].reshape(gs // d, d, gs // d, d)
            RH = (Rz @ Hd[:, cols]).reshape(rows, gs // d, d)  # [rows, gs/d, d]
            # column (d p + t) of the block = sum_k onehot[p, k] c[k, t]: a quadratic in c [k, d]
            G = torch.zeros(k, d, k, d, dtype=torch.float64)
            for c1 in range(0, rows, 8):
                oh = onehot[c1:c1 + 8]
                X = torch.einsum("rpk,ptqs->rktqs", oh, Hbb)
                G += torch.einsum("rktqs,rql->ktls", X, oh)
            rhs = torch.einsum("rpk,rpt->kt", onehot, RH)
            G = G.reshape(k * d, k * d)
            G = G + 1e-9 * G.diagonal().mean().clamp(min=1e-30) * torch.eye(k * d, dtype=torch.float64)
            c = torch.linalg.solve(G, rhs.reshape(-1)).view(k, d)
            used = onehot.sum((0, 1)) > 0
            new = books.clone()
            new[r, b] = _store(torch.where(used[:, None], c, books[r, b]))
            D2 = Wd[R] - dequant(new, R)
            if float((D2 @ Hd * D2).sum()) < before:
                books = new
    return dequant(books).float(), books


def vq_experts(W: torch.Tensor, H: torch.Tensor, args, rounds: int) -> torch.Tensor:
    """The VQ GPTQ (with codebook updates and ``rounds`` rounds, `vq_one`) of stacked experts ``W [E, O, C]``,
    ``H [E, C, C]``."""
    out = []
    scale = torch.ones(*W.shape[:2], 1)
    if args.row_scale:  # one fp16 scale per output row (the RMS of the row): codebooks see rows of equal size
        scale = W.square().mean(-1, keepdim=True).sqrt().clamp(min=1e-8).half().float()
    W = W / scale
    cols = torch.ones(W.shape[0], 1, W.shape[2])
    if args.col_scale:  # and one per input column (its RMS over the rows): the Hessian becomes D H D
        cols = W.square().mean(1, keepdim=True).sqrt().clamp(min=1e-8).half().float()
    W = W / cols
    for e in range(W.shape[0]):
        He = H[e] if float(H[e].diagonal().sum()) > 0 else torch.eye(W.shape[2])
        He = He * cols[e, 0][:, None] * cols[e, 0][None, :]
        perm = torch.argsort(He.diagonal(), descending=True) if args.act_order else torch.arange(W.shape[2])
        inv = torch.argsort(perm)
        We, He = W[e][:, perm], He[perm][:, perm]  # act order: columns by decreasing diag(H), codebooks on them
        q = vq_one(We, He, args, rounds)[:, inv]
        out.append(q)
    return torch.stack(out) * scale * cols


def vq_one(W: torch.Tensor, H: torch.Tensor, args, rounds: int) -> torch.Tensor:
    """`vq_gptq` of ``W [O, C]`` with the codebook update and ``rounds`` rounds (-1: the first pass alone),
    each round kept only if it lowers the error."""
    geo = (min(args.vq_rows, W.shape[0]), min(args.vq_cols, W.shape[1]), args.vq_dim)
    q, a, books = vq_gptq(W, H, *geo)
    if rounds < 0:
        return q
    q, books = codebook_update(W, H, a, books, *geo)
    for _ in range(rounds):  # GPTQ again on the updated codebooks, then update them again
        q2, a2, _ = vq_gptq(W, H, *geo, books=books)
        q2, b2 = codebook_update(W, H, a2, books, *geo)
        if float(proxy_loss(W[None], q2[None], H[None])) < float(proxy_loss(W[None], q[None], H[None])):
            q, books = q2, b2
    return q


PICKS: list[list[int]] = []  # --pick: [VQ chosen, experts] per expert projection call


def end_to_end(args) -> None:
    import sys
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import quantize_demo

    def patch(original):
        def patched(chunk, shape, H, opt, dtype, finish=None, store=None, error=None):
            if store is None or H is None:  # the linears (and RTN): as shipped
                return original(chunk, shape, H, opt, dtype, finish, store, error)
            res = original(chunk, shape, H, opt, dtype, finish, None, error)  # the scalar codes, for the record
            W = chunk(0, shape[0])
            Wq = vq_experts(W, H, args, args.vq_rounds)
            if args.pick:  # per expert projection, the codec with the lower Hessian-weighted error
                Hs = torch.where((H.diagonal(dim1=1, dim2=2).sum(-1) > 0)[:, None, None], H, torch.eye(shape[2]))
                scalar = res.weight.float()
                better = proxy_loss(W, Wq, Hs) < proxy_loss(W, scalar, Hs)
                PICKS.append([int(better.sum()), len(better)])
                Wq = torch.where(better[:, None, None], Wq, scalar)
            store(0, Wq if finish is None else finish(Wq))
            return dataclasses.replace(res, weight=None)
        return patched

    res = quantize_demo.default_row_with(patch, args.model, "w2a16", args.calib_seed, args.out, args.peer_from)
    res["note"] = (f"VQ experts: {args.vq_dim}-D, {4 ** args.vq_dim} centroids, codebook per {args.vq_rows} rows x "
                   f"{args.vq_cols} columns, {args.book_bits}-bit centroids, {args.vq_rounds} rounds; the row named "
                   "'all (default)' is the W2 default with the routed experts VQ-quantized (benchmarks/vq_proxy.py)")
    res["vq_picked"] = PICKS
    args.out.write_text(json.dumps(res, indent=1) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=DEMO_MODEL)
    ap.add_argument("--layer", type=int, default=1)
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--vq-dim", type=int, default=2, help="weights per vector (2^(2 d) centroids: 2 bits/weight)")
    ap.add_argument("--vq-rows", type=int, default=32, help="rows per codebook")
    ap.add_argument("--row-scale", action="store_true", help="one fp16 scale per output row (+16 bits per row)")
    ap.add_argument("--col-scale", action="store_true", help="and one fp16 scale per input column")
    ap.add_argument("--act-order", action="store_true", help="VQ on columns ordered by decreasing diag(H)")
    ap.add_argument("--book-bits", type=int, choices=[8, 16], default=16, help="bits per stored centroid coordinate")
    ap.add_argument("--vq-cols", type=int, default=128, help="columns per codebook")
    ap.add_argument("--vq-rounds", type=int, default=2, help="VQ GPTQ rounds on the updated codebooks")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "vq_proxy.json")
    ap.add_argument("--e2e", action="store_true", help="perplexity end to end (quantize_demo's W2 default row "
                    "with VQ experts)")
    ap.add_argument("--peer-from", type=Path, default=None, help="--e2e: llm-compressor rows from this file")
    ap.add_argument("--calib-seed", type=int, default=0)
    ap.add_argument("--pick", action="store_true", help="--e2e: per expert projection keep VQ or the scalar "
                    "codes, whichever has the lower Hessian-weighted error")
    args = ap.parse_args()
    torch.set_num_threads(2)
    BOOK_BITS[0] = args.book_bits
    if args.e2e:
        end_to_end(args)
        return
    loaded = load_model(str(args.model))
    gu, dn, H_in, H_dn = (t.detach() for t in hessians(loaded, args.layer, args.samples))
    book_bits = args.book_bits * args.vq_dim * 4 ** args.vq_dim / (args.vq_rows * args.vq_cols)
    bits = {"scalar g128": 2 + 24 / 128, "vq": 2 + book_bits + (16 / gu.shape[2] if args.row_scale else 0)}
    result = {"model": str(args.model), "layer": args.layer, "samples_per_task": args.samples,
              **{k: getattr(args, k) for k in ("vq_dim", "vq_rows", "vq_cols", "vq_rounds", "book_bits", "row_scale",
                                               "col_scale", "act_order")},
              "bits_per_weight": bits, "projections": {}}
    opt = plan_of(QuantizeConfig(scheme="w2a16"))[0].experts  # the shipped W2 expert path, its defaults
    for name, W, H in (("gate_up", gu, H_in), ("down", dn, H_dn)):
        t = time.time()
        r = _gptq(W, H, opt)
        t_s = time.time() - t
        e_gptq = float(proxy_loss(W, r.weight, H).sum())
        e_full = float(proxy_loss(W, _quantize(lambda a, b, W=W: W[a:b], tuple(W.shape), H, opt, W.dtype).weight,
                                  H).sum())
        t = time.time()
        Qu = vq_experts(W, H, args, args.vq_rounds)
        t_v = time.time() - t
        Qv = vq_experts(W, H, args, -1)  # the first VQ GPTQ pass alone
        e_vq = float(proxy_loss(W, Qv, H).sum())
        e_vqu = float(proxy_loss(W, Qu, H).sum())
        row = {"scalar_gptq": e_gptq, "scalar_refit_rounds": e_full, "vq_gptq": e_vq, "vq_gptq_update": e_vqu,
               "vq_over_best_scalar": e_vqu / e_full, "seconds_scalar_gptq": round(t_s, 2),
               "seconds_vq": round(t_v, 2)}
        result["projections"][name] = row
        print(name, json.dumps(row), flush=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
