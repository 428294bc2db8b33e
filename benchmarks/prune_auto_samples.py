#!/usr/bin/env python
"""Does `prune --score auto` choose differently with more held-out calibration windows? One profile of a task
(64 calibration windows x 256 tokens, seed 0, as `prune_demo.py --auto`), then `score: auto` keeping 4 of 8
experts with ``auto_samples`` = each of ``--samples``; prints and writes the chosen score and every candidate's
held-out calibration loss (nats).

Usage::

    python benchmarks/prune_auto_samples.py --task math --samples 32,128,512   # about 2 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch

from moecompress.context import Context
from moecompress.io.model import DEMO_MODEL, LoadedModel
from moecompress.pipeline import run
from moecompress.recipe import CalibrationConfig, validate_recipe
from moecompress.runtime.source import load_model
from moecompress.stages import STAGES
from moecompress.stages.prune import PruneConfig

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", default="math")
    ap.add_argument("--samples", default="32,128,512", help="comma-separated auto_samples values")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "prune_auto_samples.json")
    args = ap.parse_args()
    torch.set_num_threads(2)
    work = Path(tempfile.mkdtemp())
    run(validate_recipe({"calibration": {"samples": 64, "seq_len": 256, "tasks": [args.task]},
                         "stages": [{"stage": "profile"}]}), output=work / "profile")
    base = load_model()
    rows = []
    for n in (int(x) for x in args.samples.split(",")):
        model = copy.deepcopy(base.model)
        loaded = LoadedModel(model, base.tokenizer, base.arch, "demo", DEMO_MODEL, base.disk_dtype)
        t0 = time.time()
        r = STAGES.get("prune").run(Context(loaded, CalibrationConfig(), None),
                                    PruneConfig(profile=str(work / "profile"), tasks=[args.task], keep_ratio=0.5,
                                                score="auto", auto_samples=n))
        a = r["score_auto"]
        row = {"auto_samples": n, "heldout_windows": a["heldout"][args.task]["windows"], "chosen": a["chosen"],
               "loss": {c: round(v["loss"], 4) for c, v in a["candidates"].items()},
               "seconds": round(time.time() - t0, 1)}
        rows.append(row)
        print(json.dumps(row), flush=True)
        del model
    shutil.rmtree(work, ignore_errors=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"task": args.task, "keep_ratio": 0.5, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
