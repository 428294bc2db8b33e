#!/usr/bin/env python
"""Quantization ablation on the demo model, and llm-compressor side by side.

Calibration: 32 windows x 256 tokens per bundled task (40,960 tokens), the same token ids for every
method and for llm-compressor. Evaluation: every held-out window of every task (757 windows, 193,035
predicted tokens). For each configuration: perplexity ratio to the original per task with a 95 % interval
from the paired per-window log-perplexity differences, per-layer routing agreement with the original
(share of tokens whose top-2 set is unchanged), and the quantization wall time.

Configurations per scheme (W8A8, W4A16, W3A16, W2A16, W4A4, W3A4; weight-only schemes group 128,
A8/A4 schemes per output channel): RTN; GPTQ (gate-weighted Hessians, act order); GPTQ plus one
component: expert-aware smoothing, router W8 with and without logit alignment, calibration balance, and
(A4) the online rotation of the experts' intermediate; and the default pipeline with all of them.

llm-compressor (PyPI ``llmcompressor``) runs in its own virtual environment, created by this script in
``.cache/venv-llmcompressor`` (``pip install torch==2.13.0 llmcompressor==0.14.0``), via
``benchmarks/peers/llmcompressor_worker.py``: GPTQ W4A16 / W3A16 / W2A16, group 128, its defaults
(symmetric, static act order, min-max scales), routers and LM head ignored.

Low-bit rows (issue 12): GPTQ without act order; the scale/zero refit after GPTQ; coordinate-descent sweeps
over the codes (QuantEase) with and without the refit; the residual rotation (QuaRot, folded), the online
Hadamard before the experts' down projections, and both; pooled Hessians for rare experts. For the weight-only
schemes the "all (default)" row and llm-compressor are also compared window by window (``paired``: ours minus
theirs per held-out window, 95 % interval, and each tool's gap to the original).

Usage::

    python benchmarks/quantize_demo.py            # about 40 minutes; writes benchmarks/results/quantize_demo.json
    # the low-bit table of docs/BENCHMARKS.md: three processes side by side, then merged
    python benchmarks/quantize_demo.py --schemes w2a16 --methods "GPTQ + rotation,..." --no-peer \
        --eval-windows 32 --out benchmarks/results/quantize_lowbit_a.json
    python benchmarks/quantize_demo.py --combine benchmarks/results/quantize_lowbit_[abc].json \
        --out benchmarks/results/quantize_lowbit.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from moecompress.calib import bundled_tasks, read_documents, token_windows
from moecompress.context import Context
from moecompress.recipe import CalibrationConfig
from moecompress.runtime.hooks import capture_routing
from moecompress.io.model import DEMO_MODEL
from moecompress.runtime.source import load_model
from moecompress.stages import STAGES
from moecompress.stages.quantize import QuantizeConfig

ROOT = Path(__file__).resolve().parents[1]
VENV = ROOT / ".cache" / "venv-llmcompressor"
BASE = {"smooth": False, "balance": False, "rotate_intermediate": False, "router_bits": None, "refit": False,
        "code_sweeps": 0, "gptq_rounds": 0, "rare_experts": "rtn", "sequential": False, "fractional_zeros": False}
ROWS = [
    ("RTN", {**BASE, "method": "rtn"}),
    ("GPTQ", {**BASE}),
    ("GPTQ - act order", {**BASE, "act_order": False}),
    ("GPTQ symmetric", {**BASE, "symmetric": True}),
    ("GPTQ - clip search", {**BASE, "clip_search": False}),
    ("GPTQ + smoothing", {**BASE, "smooth": True}),
    ("GPTQ + router W8", {**BASE, "router_bits": 8, "align_router": False}),
    ("GPTQ + router W8 aligned", {**BASE, "router_bits": 8, "align_router": True}),
    ("GPTQ + balance", {**BASE, "balance": True}),
    ("GPTQ + balance + pooled rare experts", {**BASE, "balance": True, "rare_experts": "pooled"}),
    ("GPTQ + refit", {**BASE, "refit": True}),
    ("GPTQ + refit + GPTQ rounds", {**BASE, "refit": True, "gptq_rounds": 4}),
    ("GPTQ + refit + 2 GPTQ rounds", {**BASE, "refit": True, "gptq_rounds": 2}),  # stop 40: the W2 default's count
    ("GPTQ + code sweeps", {**BASE, "code_sweeps": 2}),
    ("GPTQ + code sweeps + refit", {**BASE, "code_sweeps": 2, "refit": True}),
    ("GPTQ + rotation", {**BASE, "rotate": True}),
    ("GPTQ + intermediate rotation", {**BASE, "rotate_intermediate": True}),
    ("GPTQ + both rotations", {**BASE, "rotate": True, "rotate_intermediate": True}),
    ("GPTQ + sequential", {**BASE, "sequential": True}),
    ("GPTQ + sequential (layer targets)", {**BASE, "sequential": True, "sequential_targets": "layer"}),
    ("all (default)", {}),
    ("all + fractional zeros", {"fractional_zeros": True}),
    ("all - fractional zeros", {"fractional_zeros": False}),
    ("GPTQ + fractional zeros", {**BASE, "fractional_zeros": True}),
    ("RTN + fractional zeros", {**BASE, "method": "rtn", "fractional_zeros": True}),
    ("all - GPTQ rounds", {"gptq_rounds": 0}),  # at 2 bits (the default has none above)
    ("all + GPTQ rounds", {"gptq_rounds": 4}),  # at 3-4 bits
    ("all with 2 GPTQ rounds", {"gptq_rounds": 2}),  # stop 37: fewer rounds at 2 bits (then 4; the default since)
    ("all with 1 GPTQ round", {"gptq_rounds": 1}),
    ("all - sequential", {"sequential": False}),
    ("all + sequential layer targets", {"sequential_targets": "layer"}),  # stop 19: "all, sequential layer targets"
    ("all - balance", {"balance": False}),
    ("all - refit", {"refit": False}),
    ("all + damp 0.1", {"damp": 0.1}),
    ("all + damp 0.001", {"damp": 0.001}),
    ("all - act order", {"act_order": False}),
    ("all - clip search", {"clip_search": False}),
    ("all + group 64", {"group_size": 64}),  # stop 28: finer groups, full-precision parameters (an upper bound)
    ("all + clip floor 0.7", {"clip_floor": 0.7}),  # stop 28: the floor with fractional zeros (default 0.8 at 2 bits)
    ("all + clip floor 0.9", {"clip_floor": 0.9}),
    ("all - clip search + GPTQ rounds", {"clip_search": False, "gptq_rounds": 4}),
    ("all + code sweeps", {"code_sweeps": 2}),
    ("all + 1 code sweep", {"code_sweeps": 1}),
    ("all without code sweeps", {"code_sweeps": 0}),  # stop 37: none on the attention either (default 2 there)
    ("all + router W8 aligned", {"router_bits": 8, "align_router": True}),
    ("all + rotation", {"rotate": True}),  # stop 29: the residual rotation (QuaRot, folded) on top of the default
    ("GPTQ + linears 4-bit", {**BASE, "linear_bits": 4}),
    ("all + linears 4-bit", {"linear_bits": 4}),  # attention (all non-expert linears) at 4 bits, experts as scheme
    ("all + linears 3-bit", {"linear_bits": 3}),
    ("all + layer 0 4-bit", {"layer_bits": {0: 4}}),  # the first decoder layer entirely at 4 bits
    ("all + linears 4-bit + layer 0 4-bit", {"linear_bits": 4, "layer_bits": {0: 4}}),
    ("all + trellis", {"codec": "trellis"}),  # stop 35: QTIP's bitshift trellis code (2-4 bits; --codec trellis)
    ("all + trellis + rotation", {"codec": "trellis", "rotate": True}),  # stop 36: QTIP's incoherence, folded
    ("all + trellis + intermediate rotation", {"codec": "trellis", "rotate_intermediate": True}),
    ("all + vocab prior", {"vocab_prior": 0.1}),  # stop 42: layer 0's q/k/v Hessian smoothed over the vocabulary
    ("all - vocab prior", {"vocab_prior": 0.0}),  # stop 43: the default at 3 bits; off
    ("all + expert prior", {"expert_prior": 0.1}),  # stop 44: layer 0's experts smoothed over the vocabulary too
    ("all + expert prior 0.3", {"expert_prior": 0.3}),
    ("all + expert prior 1", {"expert_prior": 1.0}),
]
PAIRED = "all (default)"  # the row compared window by window with llm-compressor
PEER = "llm-compressor GPTQ"
# further window-by-window comparisons: (our row, llm-compressor's row); `--peer-linear-bits 4` runs the latter
PAIRS = [(PAIRED, PEER), ("all + linears 4-bit", f"{PEER} + linears 4-bit"), ("all + trellis", PEER)]
SCHEMES = ["w8a8", "w4a16", "w3a16", "w2a16", "w4a4", "w3a4"]


def code_bits(model, arch, bits: int, linear_bits: int | None = None, layer_bits: dict | None = None) -> float:
    """The mean code width over every quantized weight of ``model`` (routed experts and the other linears of the
    decoder layers; routers, embeddings and the head stay unquantized), with the experts at ``bits``, the other
    linears at ``linear_bits`` and whole layers at ``layer_bits``; group scales and zeros excluded (the same for
    both tools at the same group size but for llm-compressor's symmetric grid, which has no zeros)."""
    layer_bits = layer_bits or {}
    routers = {id(p) for v in arch.moe_blocks(model) for m in (v.router, v.shared_gate) if m is not None
               for p in m.parameters()}
    total = weighted = 0
    for i, layer in enumerate(arch.decoder_layers(model)):
        experts = {id(p) for v in arch.moe_blocks(model) if v.index == i for p in v.experts.module.parameters()}
        for m in layer.modules():
            for p in m.parameters(recurse=False):
                if p.dim() < 2 or id(p) in routers or not (id(p) in experts or isinstance(m, torch.nn.Linear)):
                    continue
                b = layer_bits.get(i, bits if id(p) in experts else (linear_bits or bits))
                total, weighted = total + p.numel(), weighted + p.numel() * b
    return weighted / total


def held_out(tok, per_task: int | None = None):
    """The evaluation set: per bundled task its held-out windows of 256 tokens (the first ``per_task``, or all);
    returns (tasks, windows per task, all windows ``[N, 256]``, each window's task index ``[N]``)."""
    tasks = bundled_tasks()
    evw = {t: token_windows(tok, read_documents(t, "eval"), 256)[:per_task] for t in tasks}
    windows = torch.cat([evw[t] for t in tasks])
    owners = torch.cat([torch.full((len(evw[t]),), i) for i, t in enumerate(tasks)])
    return tasks, evw, windows, owners


def peer_nll(path, scheme: str, seed: int | None = None) -> torch.Tensor:
    """llm-compressor's per-window NLLs ``[N]`` at ``scheme`` from a quantize_demo JSON (``seed``: the calibration
    seed it must have been run with, else the script stops)."""
    peer = json.loads(Path(path).read_text())
    got = peer.get("calibration", {}).get("seed", 0)
    if seed is not None and got != seed:
        raise SystemExit(f"{path} was calibrated with seed {got}, not {seed}")
    return torch.tensor(next(r for r in peer["runs"] if r["scheme"] == scheme and r["method"] == PEER)["window_nll"])


@torch.no_grad()
def evaluate(model, arch, windows, batch=8):
    """Per-window mean NLL [N] and per-layer top-k index [N*S, K] over the evaluation windows."""
    nll, routes = [], {}
    with capture_routing(model, arch) as traces:
        for i in range(0, len(windows), batch):
            x = windows[i:i + batch]
            logits = model(input_ids=x).logits[:, :-1].float()
            nll.append(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1),
                                                         reduction="none").view(len(x), -1).mean(1))
    for layer, tr in traces.items():
        routes[layer] = torch.cat(tr.index).sort(-1).values
    return torch.cat(nll), routes


def compare(base, cand, owners, tasks):
    (bn, br), (cn, cr) = base, cand
    out = {"tasks": {}}
    for t in tasks:
        sel = owners == tasks.index(t)
        d = cn[sel] - bn[sel]
        half = 1.96 * float(d.std()) / len(d) ** 0.5
        out["tasks"][t] = {"ppl_ratio": float(d.mean().exp()), "ci95": [float((d.mean() - half).exp()),
                                                                      float((d.mean() + half).exp())]}
    out["routing_topk_agreement"] = [float((cr[layer] == br[layer]).all(-1).float().mean()) for layer in sorted(br)]
    return out


def paired(ours: torch.Tensor, theirs: torch.Tensor, base: torch.Tensor, owners, tasks) -> dict:
    """Per task: our perplexity over theirs from the per-window differences of log-perplexity (ours minus
    theirs, paired by window) with a 95 % interval, and each tool's gap to the original with the ratio of gaps."""
    out = {}
    for t in tasks:
        sel = owners == tasks.index(t)
        d = ours[sel] - theirs[sel]
        half = 1.96 * float(d.std()) / len(d) ** 0.5
        gap_ours = float((ours[sel] - base[sel]).mean().exp()) - 1
        gap_theirs = float((theirs[sel] - base[sel]).mean().exp()) - 1
        out[t] = {"ppl_ratio": float(d.mean().exp()),
                  "ci95": [float((d.mean() - half).exp()), float((d.mean() + half).exp())],
                  "gap_ours": gap_ours, "gap_theirs": gap_theirs,
                  "gap_ratio": gap_ours / gap_theirs if gap_theirs > 0 else None}
    return out


def result_row(res: dict, method: str, scheme: str) -> dict:
    """The last ``scheme`` row ``method`` of a results file that kept its per-window NLLs."""
    rows = [r for r in res["runs"] if r["scheme"] == scheme and r["method"] == method and "window_nll" in r]
    if not rows:
        raise SystemExit(f"no {scheme} row {method!r} with per-window NLLs in {res.get('model')}")
    return rows[-1]


def meets_half_gap(p: dict) -> bool:
    """The issue's rule for one task of `paired`: our gap at most half of theirs, the paired interval below 1."""
    return p["gap_ratio"] is not None and p["gap_ratio"] <= 0.5 and p["ci95"][1] < 1


def add_paired(results: dict) -> None:
    """``results["paired"][scheme]``: `paired` for every weight-only scheme with both tools' per-window NLLs."""
    tasks = list(results["eval_windows"])
    owners = torch.cat([torch.full((n,), i) for i, n in enumerate(results["eval_windows"].values())])
    base = torch.tensor(results["base_window_nll"])
    results["paired"] = {}
    results.pop("paired_more", None)
    for scheme in ("w4a16", "w3a16", "w2a16"):
        by = {r["method"]: r for r in results["runs"] if r["scheme"] == scheme and "window_nll" in r}
        for a, b in PAIRS:
            if a in by and b in by:
                got = paired(*(torch.tensor(by[m]["window_nll"]) for m in (a, b)), base, owners, tasks)
                if a == PAIRED:
                    results["paired"][scheme] = got
                else:  # "paired_more": {"ours vs theirs": {scheme: ...}}
                    results.setdefault("paired_more", {}).setdefault(f"{a} vs {b}", {})[scheme] = got


def combine(files: list[Path], out: Path) -> None:
    """Merge result files measured on the same evaluation windows (runs of several processes) into ``out``."""
    parts = [json.loads(f.read_text()) for f in files]
    first = parts[0]
    for p in parts[1:]:
        if p["base_window_nll"] != first["base_window_nll"]:
            raise SystemExit("the result files were evaluated on different windows")
    results = {k: v for k, v in first.items() if k not in ("runs", "paired", "partial")}
    results["runs"] = sorted((r for p in parts for r in p["runs"]), key=_order)
    add_paired(results)
    _save(out, results, partial=any(p.get("partial") for p in parts))


def ensure_venv() -> Path:
    py = VENV / "bin" / "python"
    if not py.exists():
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
        subprocess.run([str(py), "-m", "pip", "install", "-q", "torch==2.13.0"], check=True)
        subprocess.run([str(py), "-m", "pip", "install", "-q", "llmcompressor==0.14.0"], check=True)
    return py


def llmcompressor_model(py: Path, calib: Path, bits: int, work: Path, model: Path = DEMO_MODEL,
                        linear_bits: int | None = None) -> tuple[Path, dict]:
    out = work / f"llmc-w{bits}-l{linear_bits}"
    subprocess.run([str(py), str(ROOT / "benchmarks" / "peers" / "llmcompressor_worker.py"), str(model),
                    str(calib), str(out), str(bits), "128", *([str(linear_bits)] if linear_bits else [])],
                   check=True, capture_output=True)
    run = json.loads((out / "llmcompressor_run.json").read_text())
    # llm-compressor saves linearized experts (gate_proj/up_proj/down_proj) with its scales: rename to the
    # checkpoint's own names (Mixtral's w1/w3/w2; Qwen3-MoE's are already those), drop the scales and its
    # quantization config, keep the dense fake-quantized weights.
    sd = load_file(str(out / "model.safetensors"))
    with safe_open(str(model / "model.safetensors"), "pt") as f:
        mixtral_names = any(k.endswith(".w1.weight") for k in f.keys())
    names = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"} if mixtral_names else {}
    clean = {}
    for k, v in sd.items():
        if k.endswith(("weight_scale", "weight_zero_point", "weight_g_idx")):
            continue
        for a, b in names.items():
            k = k.replace(f".{a}.weight", f".{b}.weight") if ".experts." in k else k
        clean[k] = v
    dest = work / f"llmc-w{bits}-l{linear_bits}-dense"
    dest.mkdir()
    save_file(clean, str(dest / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((out / "config.json").read_text())
    cfg.pop("quantization_config", None)
    (dest / "config.json").write_text(json.dumps(cfg))
    for f in model.glob("tokenizer*"):
        shutil.copy(f, dest / f.name)
    return dest, run


def _order(row: dict) -> tuple[int, int]:
    names = [n for n, _ in ROWS]
    return SCHEMES.index(row["scheme"]), names.index(row["method"]) if row["method"] in names else len(names)


def _save(out: Path, results: dict, partial: bool) -> None:
    """Write the results so far (``partial`` marks an unfinished run) through a temporary file."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps({**results, "partial": partial}, indent=1) + "\n")
    tmp.replace(out)


def row_arguments(ap: argparse.ArgumentParser) -> None:
    """The options every script that runs rows of this one takes (`run_rows`'s arguments)."""
    ap.add_argument("--model", type=Path, default=DEMO_MODEL)
    ap.add_argument("--calib-seed", type=int, default=0)
    ap.add_argument("--peer-from", type=Path, default=None, help="llm-compressor's rows from this results file")
    ap.add_argument("--out", type=Path, required=True)


def run_rows(methods: str, model: Path, scheme: str, calib_seed: int, out: Path, peer_from: Path | None,
             note: str | None = None) -> dict:
    """Run this script's rows ``methods`` (comma-separated names) of ``scheme``, llm-compressor's rows read from
    ``peer_from`` (none without it); returns the results written to ``out``, with ``note`` added if given."""
    argv = sys.argv
    sys.argv = ["quantize_demo.py", "--model", str(model), "--schemes", scheme, "--methods", methods,
                "--calib-seed", str(calib_seed), "--out", str(out),
                *(["--peer-from", str(peer_from)] if peer_from else ["--no-peer"])]
    try:
        main()
    finally:
        sys.argv = argv
    res = json.loads(out.read_text())
    if note is not None:
        res["note"] = note
        out.write_text(json.dumps(res, indent=1) + "\n")
    return res


def default_row_with(patch, model: Path, scheme: str, calib_seed: int, out: Path,
                     peer_from: Path | None) -> dict:
    """Run this script's "all (default)" row of ``scheme`` with `layer_quant._quantize` replaced by
    ``patch(original)`` (a proxy benchmark's replacement of some linears' quantization; restored afterwards),
    llm-compressor's rows read from ``peer_from`` (none without it); returns the results written to ``out``."""
    import moecompress.runtime.layer_quant as lq
    original = lq._quantize
    lq._quantize = patch(original)
    try:
        return run_rows(PAIRED, model, scheme, calib_seed, out, peer_from)
    finally:
        lq._quantize = original


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=DEMO_MODEL, help="a Mixtral- or Qwen3-MoE-style checkpoint "
                    "directory (default: the bundled demo; e.g. a second model from scripts/train_demo_model.py)")
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--calib-seed", type=int, default=0, help="which calibration windows (ours and llm-compressor's; "
                    "--peer-from rows must come from the same seed)")
    ap.add_argument("--schemes", default=",".join(SCHEMES))
    ap.add_argument("--methods", default=None, help="comma-separated row names to run (default: all rows)")
    ap.add_argument("--merge", action="store_true", help="replace the matching rows of an existing --out file "
                    "and keep the others (re-measuring some rows after a change)")
    ap.add_argument("--no-peer", action="store_true")
    ap.add_argument("--peer-bits", default="4,3,2", help="weight widths llm-compressor runs at (comma-separated)")
    ap.add_argument("--peer-linear-bits", type=int, default=None, help="llm-compressor with its attention "
                    "projections at this width (the rows 'llm-compressor GPTQ + linears N-bit'), to compare with "
                    "'all + linears N-bit'")
    ap.add_argument("--peer-from", type=Path, default=None, help="take the llm-compressor rows from this results "
                    "file (same eval windows) instead of running llm-compressor")
    ap.add_argument("--eval-windows", type=int, default=None, help="only the first N held-out windows per task "
                    "(quick probes; the tables use every window)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "quantize_demo.json")
    ap.add_argument("--combine", type=Path, nargs="+", default=None, help="merge these result files (same eval "
                    "windows, e.g. from processes run side by side) into --out, with the paired comparison; runs nothing")
    args = ap.parse_args()
    if args.peer_from is not None and json.loads(args.peer_from.read_text())["calibration"].get("seed", 0) != \
            args.calib_seed:
        raise SystemExit("the --peer-from rows were calibrated on another --calib-seed: run llm-compressor on this "
                         "seed's windows (drop --peer-from) or pass --no-peer")
    if args.peer_from is not None and json.loads(args.peer_from.read_text()).get("model", "demo") != (
            "demo" if args.model.resolve() == DEMO_MODEL.resolve() else str(args.model)):
        raise SystemExit("--peer-from rows were measured on another model: drop --peer-from to run llm-compressor")
    if args.combine:
        combine(args.combine, args.out)
        return
    torch.set_num_threads(2)
    work = Path(tempfile.mkdtemp())
    model_dir = str(args.model)
    base_model = load_model(model_dir)
    tok, arch = base_model.tokenizer, base_model.arch
    tasks, evw, windows, owners = held_out(tok, args.eval_windows)
    base = evaluate(base_model.model, arch, windows)
    results = {"model": "demo" if args.model.resolve() == DEMO_MODEL.resolve() else str(args.model),
               "calibration": {"windows_per_task": args.samples, "seq_len": 256, "seed": args.calib_seed},
               "eval_windows": {t: len(w) for t, w in evw.items()},
               "base_ppl": {t: float(base[0][owners == i].mean().exp()) for i, t in enumerate(tasks)},
               "base_window_nll": [round(float(x), 6) for x in base[0]], "runs": []}
    methods = None if args.methods is None else set(args.methods.split(","))
    unknown = sorted((methods or set()) - {name for name, _ in ROWS})
    if unknown:
        raise SystemExit(f"unknown methods {unknown} (names are comma-separated); rows: {[n for n, _ in ROWS]}")
    peer_name = PEER if args.peer_linear_bits is None else f"{PEER} + linears {args.peer_linear_bits}-bit"
    if args.merge:
        old = json.loads(args.out.read_text())
        results["runs"] = [r for r in old["runs"] if methods is not None and r["method"] not in methods
                           or r["scheme"] not in args.schemes.split(",")]
        if not args.no_peer:
            results["runs"] = [r for r in results["runs"] if r["method"] != peer_name]
    calib_ctx = Context(base_model, CalibrationConfig(samples=args.samples, seq_len=256, seed=args.calib_seed), None)
    calib_ids = torch.cat(list(calib_ctx.windows("calib").values()))
    torch.save(calib_ids, work / "calib.pt")
    order = ROWS if methods is None else [r for m in args.methods.split(",") for r in ROWS if r[0] == m]
    for scheme in args.schemes.split(","):
        for name, over in order:
            loaded = load_model(model_dir)
            ctx = Context(loaded, CalibrationConfig(samples=args.samples, seq_len=256, seed=args.calib_seed), None)
            cfg = QuantizeConfig(scheme=scheme, **over)
            t0 = time.time()
            rep = STAGES.get("quantize").run(ctx, cfg)
            seconds = time.time() - t0
            got = evaluate(loaded.model, arch, windows)
            row = {"scheme": scheme, "method": name, "seconds": round(seconds, 1),
                   "code_bits": round(code_bits(base_model.model, arch, cfg.bits[0], cfg.linear_bits,
                                                cfg.layer_bits), 4),
                   "rtn_fallbacks": rep["rtn_fallback_experts_per_layer"],
                   "pooled_experts": rep.get("pooled_experts_per_layer", {}),
                   **compare(base, got, owners, tasks),
                   # per-window NLLs for paired comparisons (with llm-compressor, between rows: rows_report.py)
                   "window_nll": [round(float(x), 6) for x in got[0]]}
            results["runs"].append(row)
            results["runs"].sort(key=_order)
            print(json.dumps({k: v for k, v in row.items() if k != "window_nll"}), flush=True)
            _save(args.out, results, partial=True)
    if args.peer_from is not None:
        results["runs"] = [r for r in results["runs"] if not r["method"].startswith(PEER)]
        results["runs"] += [r for r in json.loads(args.peer_from.read_text())["runs"]
                            if r["method"].startswith(PEER)]
    elif not args.no_peer:
        py = ensure_venv()
        for bits in (int(b) for b in args.peer_bits.split(",")):
            dest, run = llmcompressor_model(py, work / "calib.pt", bits, work, args.model, args.peer_linear_bits)
            peer = load_model(str(dest))
            got = evaluate(peer.model, arch, windows)
            row = {"scheme": f"w{bits}a16", "method": peer_name, "seconds": round(run["seconds"], 1),
                   "code_bits": round(code_bits(base_model.model, arch, bits, args.peer_linear_bits), 4),
                   "peer_run": run, **compare(base, got, owners, tasks),
                   "window_nll": [round(float(x), 6) for x in got[0]]}
            results["runs"].append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "window_nll"}), flush=True)
            _save(args.out, results, partial=True)
    add_paired(results)
    _save(args.out, results, partial=False)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
