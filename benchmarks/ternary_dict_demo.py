#!/usr/bin/env python
"""Sub-1-bit experts (QMoE): bits per weight against zero fraction, and perplexity against bits, on the demo model.

Part 1, storage (no calibration): the routed experts of (a) the demo model and (b) a synthetic Gaussian expert at
Mixtral-8x7B row lengths (gate/up rows of 4096, down rows of 14336; N(0, 0.02) weights) are ternarized by
round-to-nearest on QMoE's per-row ``{min, 0, max}`` grid at zero thresholds 0.3 .. 0.9 x max, and encoded with
``ternary-dict`` and with ``ternary-b3`` (two fp16 scales per row for both). Bits per weight count everything
stored per weight (codewords, row index, dictionary header, scales; base 3: bytes and scales), i.e. the packed
file's bytes for those weights.

Part 2, quality (demo model): ``moecompress ternary --grid qmoe`` (GPTQ on gate-weighted Hessians, QMoE's grid,
``--codec auto``) at several thresholds, GPTQ-ternary on the TWN grid in base 3, and GPTQ W2A16 / W3A16 / W4A16
(group 128), each written packed and evaluated from the written directory on every held-out window of every task:
perplexity per task, the ratio to the original with a 95 % interval from the paired per-window log-perplexity
differences (benchmarks/quantize_demo.py's helpers), and the routed experts' bits per weight from the files
(`moecompress inspect`'s figure).

Usage::

    python benchmarks/ternary_dict_demo.py [--samples 16] [--eval-windows N] [--part storage|quality|all]
    # writes benchmarks/results/ternary_dict_demo.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quantize_demo import compare, evaluate, held_out  # noqa: E402

from moecompress.algorithms.quant_grid import TernaryGrid, rtn_quantize  # noqa: E402
from moecompress.formats.codecs import encode, encoded_bits_per_weight  # noqa: E402
from moecompress.formats.inspect import inspect_dir  # noqa: E402
from moecompress.pipeline import run  # noqa: E402
from moecompress.recipe import validate_recipe  # noqa: E402
from moecompress.runtime.source import load_model  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
THRESHOLDS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def storage_point(weights: list[torch.Tensor], threshold: float) -> dict:
    """Zero fraction and bits per weight (dict, base 3) of QMoE-grid RTN codes of ``weights`` ([E, O, C] each)."""
    n = zeros = 0
    bits = {"ternary-dict": 0.0, "ternary-b3": 0.0}
    for W in weights:
        res = rtn_quantize(W.float(), TernaryGrid("qmoe", -1, threshold))
        zeros += int((res.codes == 1).sum())
        n += res.codes.numel()
        for codec in bits:
            enc = encode(codec, res.codes, res.scales, res.zeros, False, res.neg_scales)
            bits[codec] += encoded_bits_per_weight(enc) * res.codes.numel()
    return {"threshold": threshold, "zero_fraction": zeros / n, "weights": n,
            **{f"bits_{k}": v / n for k, v in bits.items()}}


def storage(out: dict, thresholds, models=("gaussian", "demo")) -> None:
    """Storage points of ``models`` at ``thresholds``, merged into ``out`` (a point measured again replaces the old
    one at its threshold)."""
    g = torch.Generator().manual_seed(0)
    sources = {"gaussian": lambda: [torch.randn(1, 1024, 4096, generator=g) * 0.02,
                                    torch.randn(1, 1024, 4096, generator=g) * 0.02,
                                    torch.randn(1, 512, 14336, generator=g) * 0.02],
               "demo": lambda: [v.experts.stacked(p).detach() for m in [load_model()]
                                for v in m.arch.moe_blocks(m.model) for p in ("gate", "up", "down")]}
    for name in models:
        ws = sources[name]()
        old = {p["threshold"]: p for p in out["storage"].get(name, {}).get("points", [])}
        for th in thresholds:
            t0 = time.time()
            old[th] = {**storage_point(ws, th), "seconds": round(time.time() - t0, 1)}
            print(name, json.dumps(old[th]), flush=True)
        out["storage"][name] = {"weights": sum(w.numel() for w in ws), "shapes": [list(w.shape) for w in ws],
                                "points": [old[t] for t in sorted(old)]}


CONFIGS = [  # (label, stage), in the order they run
    ("qmoe t=0.5 (GPTQ, auto)", {"stage": "ternary", "grid": "qmoe", "codec": "auto"}),
    ("W4A16 GPTQ g128", {"stage": "quantize", "scheme": "w4a16"}),
    ("W2A16 GPTQ g128", {"stage": "quantize", "scheme": "w2a16"}),
    ("GPTQ-ternary twn (b3)", {"stage": "ternary", "codec": "ternary-b3"}),
    ("qmoe t=0.7 (GPTQ, auto)", {"stage": "ternary", "grid": "qmoe", "threshold": 0.7, "codec": "auto"}),
    ("qmoe t=0.9 (GPTQ, auto)", {"stage": "ternary", "grid": "qmoe", "threshold": 0.9, "codec": "auto"}),
    ("W3A16 GPTQ g128", {"stage": "quantize", "scheme": "w3a16"}),
    ("qmoe t=0.6 (GPTQ, auto)", {"stage": "ternary", "grid": "qmoe", "threshold": 0.6, "codec": "auto"}),
    ("qmoe t=0.5 (RTN, auto)", {"stage": "ternary", "method": "rtn", "grid": "qmoe", "codec": "auto"}),
    ("qmoe t=0.6 (RTN, auto)", {"stage": "ternary", "method": "rtn", "grid": "qmoe", "threshold": 0.6, "codec": "auto"}),
    ("qmoe t=0.8 (RTN, auto)", {"stage": "ternary", "method": "rtn", "grid": "qmoe", "threshold": 0.8, "codec": "auto"}),
]


def quality(out: dict, samples: int, only: set[str] | None, path: Path, per_task: int) -> None:
    base_model = load_model()
    tok, arch = base_model.tokenizer, base_model.arch
    tasks, evw, windows, owners = held_out(tok, per_task)
    base = evaluate(base_model.model, arch, windows)
    out["quality"]["base_ppl"] = {t: float(base[0][owners == i].mean().exp()) for i, t in enumerate(tasks)}
    out["quality"]["eval_windows"] = {t: len(w) for t, w in evw.items()}
    out["quality"]["calibration"] = {"windows_per_task": samples, "seq_len": 256}
    out["quality"]["command"] = " ".join(sys.argv)
    work = Path(tempfile.mkdtemp())
    runs = out["quality"].setdefault("runs", [])
    for label, stage in CONFIGS:
        if only and label not in only:
            continue
        d = work / label.replace(" ", "_").replace("(", "").replace(")", "").replace(",", "").replace("=", "")
        t0 = time.time()
        rep = run(validate_recipe({"calibration": {"samples": samples, "seq_len": 256}, "stages": [stage]}), output=d)
        seconds = time.time() - t0
        info = inspect_dir(d)
        res = rep.report["stages"][0]["result"]
        model = load_model(str(d))
        row = {"config": label, "stage": stage, "seconds": round(seconds, 1),
               "expert_bits_per_weight": info["expert_bits_per_weight"], "bits_per_param": info["bits_per_param"],
               "codecs": sorted({r["codec"] for r in info["modules"] if r["type"] == "experts"}),
               "zero_fraction": res.get("zero_fraction"), "per_layer": res.get("per_layer"),
               **compare(base, evaluate(model.model, model.arch, windows), owners, tasks)}
        row["ppl"] = {t: out["quality"]["base_ppl"][t] * row["tasks"][t]["ppl_ratio"] for t in tasks}
        runs[:] = [r for r in runs if r["config"] != label] + [row]
        print(json.dumps({k: v for k, v in row.items() if k != "per_layer"}), flush=True)
        path.write_text(json.dumps(out, indent=1) + "\n")
        del model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--thresholds", default=",".join(map(str, THRESHOLDS)), help="storage part: QMoE thresholds")
    ap.add_argument("--eval-windows", type=int, default=10 ** 9, help="held-out windows per task (default: all)")
    ap.add_argument("--part", choices=("storage", "quality", "all"), default="all")
    ap.add_argument("--models", default="gaussian,demo", help="storage part: gaussian and/or demo")
    ap.add_argument("--configs", default=None, help="config labels to (re)run, separated by ';'")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "ternary_dict_demo.json")
    args = ap.parse_args()
    torch.set_num_threads(2)
    out = json.loads(args.out.read_text()) if args.out.exists() else {}
    out.setdefault("storage", {})
    out.setdefault("quality", {})
    if args.part in ("storage", "all"):
        storage(out, [float(v) for v in args.thresholds.split(",")], args.models.split(","))
        args.out.write_text(json.dumps(out, indent=1) + "\n")
    if args.part in ("quality", "all"):
        quality(out, args.samples, None if args.configs is None else set(args.configs.split(";")), args.out,
                args.eval_windows)
    args.out.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
