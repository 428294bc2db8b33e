#!/usr/bin/env python
"""Where the quantization error sits: the default `quantize` of a scheme, then one part of the quantized model
put back to the original's full-precision weights at a time, each evaluated on every held-out window.

Parts: the routed experts (every MoE layer), everything else quantized (the attention and other dense linears;
embedding, norms, routers and head are never quantized), and each decoder layer alone. A part restored after
the whole model was quantized in order: the other parts keep what the sequential pairing made of them, so the
rows attribute the final model's error, they are not separate quantizations. Cells: perplexity change against
the original per task (chat / code / math / multilingual / prose), mean over the task's held-out windows.

Usage::

    python benchmarks/where_error.py --scheme w2a16 --out benchmarks/results/where_error_w2.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from quantize_demo import compare, evaluate, held_out  # noqa: E402

from moecompress.context import Context  # noqa: E402
from moecompress.io.model import DEMO_MODEL  # noqa: E402
from moecompress.recipe import CalibrationConfig  # noqa: E402
from moecompress.runtime.source import load_model  # noqa: E402
from moecompress.stages import STAGES  # noqa: E402
from moecompress.stages.quantize import QuantizeConfig  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=DEMO_MODEL)
    ap.add_argument("--scheme", default="w2a16")
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "where_error.json")
    args = ap.parse_args()
    torch.set_num_threads(2)
    base = load_model(str(args.model))
    arch = base.arch
    tasks, _, windows, owners = held_out(base.tokenizer)
    ref = evaluate(base.model, arch, windows)
    original = {k: v.clone() for k, v in base.model.state_dict().items()}
    q = load_model(str(args.model))
    STAGES.get("quantize").run(Context(q, CalibrationConfig(samples=args.samples, seq_len=256), None),
                               QuantizeConfig(scheme=args.scheme))
    quantized = {k: v.clone() for k, v in q.model.state_dict().items()}
    changed = [k for k in quantized if not torch.equal(quantized[k], original[k])]
    layers = f"{arch.layers}."

    experts = [k for k in changed if f".{arch.experts}." in k]  # the routed experts' (fused) parameters
    groups = {"experts": experts, "other linears": [k for k in changed if k not in experts]}
    for i in range(q.model.config.num_hidden_layers):
        groups[f"layer {i}"] = [k for k in changed if k.startswith(f"{layers}{i}.")]
    rows = {"all quantized (default)": compare(ref, evaluate(q.model, arch, windows), owners, tasks)}
    print("all quantized", json.dumps(rows["all quantized (default)"]["tasks"]), flush=True)
    for name, keys in groups.items():
        sd = dict(quantized)
        sd.update({k: original[k] for k in keys})
        q.model.load_state_dict(sd)
        rows[f"{name} in full precision"] = compare(ref, evaluate(q.model, arch, windows), owners, tasks)
        rows[f"{name} in full precision"]["tensors_restored"] = len(keys)
        print(name, len(keys), json.dumps(rows[f"{name} in full precision"]["tasks"]), flush=True)
    q.model.load_state_dict(quantized)
    args.out.write_text(json.dumps({"model": str(args.model), "scheme": args.scheme, "changed_tensors": len(changed),
                                    "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
