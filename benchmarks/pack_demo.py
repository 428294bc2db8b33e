#!/usr/bin/env python
"""Packed checkpoints of the demo model: size on disk, bits per parameter, perplexity per task.

For 8/4/3/2-bit GPTQ (weight-only, group 128, everything but embeddings, norms and routers quantized) and
for ternary experts by absmean, TWN and GPTQ-ternary (attention kept in bf16), each in the 2-bit layout
(``ternary2``) and in base 3 (``ternary-b3``): the checkpoint is written in the packed format, loaded back
through ``AutoModelForCausalLM.from_pretrained`` (experts stay packed, dequantized on the fly) and scored on
48 held-out windows of 256 tokens per task (chat: all 36). Calibration: 32 windows per task.

Usage::

    python benchmarks/pack_demo.py        # writes benchmarks/results/pack_demo.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import torch

from moecompress.calib import bundled_tasks, read_documents, token_windows
from moecompress.eval.perplexity import score_windows
from moecompress.formats.inspect import inspect_dir
from moecompress.pipeline import run
from moecompress.recipe import validate_recipe
from moecompress.io.model import DEMO_MODEL
from moecompress.runtime.source import load_model

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = [("bf16 (original)", None)] + [
    (f"w{b} GPTQ g128", {"stage": "quantize", "scheme": f"w{b}a16", "group_size": 128}) for b in (8, 4, 3, 2)
] + [
    (f"ternary {m}, {codec}", {"stage": "ternary", "method": m, "codec": codec})
    for m in ("absmean", "twn", "gptq") for codec in ("ternary2", "ternary-b3")
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--windows", type=int, default=48)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "pack_demo.json")
    args = ap.parse_args()
    torch.set_num_threads(2)
    tok = load_model().tokenizer
    windows = {}
    for t in bundled_tasks():
        every = token_windows(tok, read_documents(t, "eval"), 256)
        windows[t] = every if len(every) <= args.windows else token_windows(tok, read_documents(t, "eval"), 256,
                                                                           n=args.windows, seed=0)
    work = Path(tempfile.mkdtemp())
    rows = []
    for name, stage in CONFIGS:
        if stage is None:
            path = DEMO_MODEL
        else:
            path = work / name.replace(" ", "_").replace(",", "")
            recipe = validate_recipe({"calibration": {"samples": 32, "seq_len": 256}, "stages": [stage]})
            res = run(recipe, output=path)
        info = inspect_dir(path)
        loaded = load_model(str(path))
        ppl = {t: score_windows(loaded.model, w).ppl for t, w in windows.items()}
        row = {"config": name, "file_bytes": info["file_bytes"], "params": info["params"],
               "bits_per_param": info["bits_per_param"], "packed_bits_per_weight": info["packed_bits_per_weight"],
               "expert_bits_per_weight": None, "ppl": ppl}
        experts = [m for m in info["modules"] if m["type"] == "experts"]
        if experts:
            row["expert_bits_per_weight"] = 8 * sum(m["bytes"] for m in experts) / sum(m["weights"] for m in experts)
        if stage is not None and stage["stage"] == "ternary":
            row["zero_fraction"] = res.report["stages"][0]["result"]["zero_fraction"]
        rows.append(row)
        print(json.dumps(row), flush=True)
        if stage is not None:
            shutil.rmtree(path)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"windows": {t: len(w) for t, w in windows.items()}, "rows": rows}, indent=1) + "\n")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
