#!/usr/bin/env python
"""Expert pruning and retrieval on the demo model, on held-out text.

Pruning (random: geometric mean of the perplexity ratios over seeds 0-4): one profile of every bundled task (64 calibration windows x 256 tokens per task). For each
task, keep ratio (75 %, 50 %, 25 % of 8 experts = 6, 4, 2) and score, the ``prune`` stage runs on a
fresh copy of the model with that task's profile (task-specific) and with all tasks' profile (all-task);
each pruned model is scored on the held-out windows of every task (``--windows`` per task). Cells are
perplexity ratios against the unpruned model.

Retrieval: a pattern store built from the same profile (``moecompress patterns`` defaults); every
held-out 256-token window is matched to a task with the routing probe (first two MoE layers only);
accuracy, time per match, and bytes read by ``retrieve`` at each keep ratio.

Score chosen by evidence (``--auto``): the same profile; for each task, keep 4 of 8 experts with that task's
profile by each single score and by ``score: auto`` (which compares the single scores' expert sets on 32
held-out windows of the task's CALIBRATION text that the profile did not read). Each pruned model is scored on
the task's held-out EVAL windows; per-window paired differences give 95 % intervals for the perplexity ratio
to the unpruned model, and for auto against TCESS and against the best single score on the eval text.

Usage::

    python benchmarks/prune_demo.py        # about 15 minutes on 2 cores; writes benchmarks/results/prune_demo.json
    python benchmarks/prune_demo.py --auto # writes benchmarks/results/prune_auto_demo.json
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

from moecompress.calib import bundled_tasks, read_documents, token_windows
from moecompress.context import Context
from moecompress.eval.perplexity import score_windows
from moecompress.formats.patterns import PatternStore
from moecompress.pipeline import run
from moecompress.recipe import CalibrationConfig, validate_recipe
from moecompress.runtime.executor import LayerStream, ModelSource
from moecompress.io.model import DEMO_MODEL, LoadedModel
from moecompress.runtime.source import load_model
from moecompress.runtime.prompt_routing import cosine_distance, routing_signatures
from moecompress.stages import STAGES
from moecompress.stages.prune import PruneConfig

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "prune_demo.json"
AUTO_OUT = ROOT / "benchmarks" / "results" / "prune_auto_demo.json"  # --auto's file unless --out names one
SCORES = ["tcess", "tcess_prob", "frequency", "reap", "ean", "random"]
RATIOS = [0.75, 0.5, 0.25]


def ppl_table(model, windows) -> dict[str, float]:
    return {t: score_windows(model, w).mean_nll for t, w in windows.items()}


def window_nll(model, windows) -> dict[str, torch.Tensor]:
    return {t: score_windows(model, w).nll for t, w in windows.items()}


def ratio_ci(d: torch.Tensor) -> dict[str, float | list[float]]:
    """Mean paired NLL difference per window -> perplexity ratio with its 95 % interval over windows."""
    d = d.double()
    half = 1.96 * float(d.std()) / len(d) ** 0.5
    m = float(d.mean())
    return {"ratio": float(torch.tensor(m).exp()), "ci95": [float(torch.tensor(m - half).exp()),
                                                            float(torch.tensor(m + half).exp())]}


AUTO_SCORES = ["tcess", "reap", "frequency", "ean", "reap_freq", "consensus"]


def auto_experiment(base, profile: Path, windows, tasks, out: Path, ratio: float = 0.5) -> None:
    """Each task pruned with its own profile by each single score and by auto; eval perplexity with intervals."""
    t0 = time.time()
    base_nll = window_nll(base.model, windows)
    results = {"model": base.source, "keep_ratio": ratio, "windows": {t: len(w) for t, w in windows.items()},
               "base_ppl": {t: float(v.mean().exp()) for t, v in base_nll.items()}, "tasks": {}}
    if out.is_file():  # --tasks: keep the other tasks' rows
        old = json.loads(out.read_text())
        for k in ("windows", "base_ppl", "tasks"):
            results[k] = {**old.get(k, {}), **results[k]}
    for t in tasks:
        nll, row, seen = {}, {}, {}
        for score in AUTO_SCORES + ["auto"]:
            model = copy.deepcopy(base.model)
            loaded = LoadedModel(model, base.tokenizer, base.arch, base.source, base.path, base.disk_dtype)
            t1 = time.time()
            r = STAGES.get("prune").run(Context(loaded, CalibrationConfig(), None),
                                        PruneConfig(profile=str(profile), tasks=[t], keep_ratio=ratio, score=score))
            seconds = time.time() - t1
            kept = json.dumps(r["kept_experts"])  # the same experts make the same model: scored once
            nll[score] = seen[kept] if kept in seen else score_windows(model, windows[t]).nll
            seen[kept] = nll[score]
            row[score] = {**ratio_ci(nll[score] - base_nll[t]), "prune_seconds": round(seconds, 1)}
            row[score]["kept_experts"] = r["kept_experts"]
            if score == "auto":
                a = r["score_auto"]
                row[score]["chosen"] = a["chosen"]
                row[score]["heldout_calib_loss"] = {c: v["loss"] for c, v in a["candidates"].items()}
                row[score]["heldout_windows"] = a["heldout"][t]["windows"]
            del model
        best = min(AUTO_SCORES, key=lambda c: float(nll[c].mean()))
        row["best_single_on_eval"] = best
        row["auto_vs_best_single"] = ratio_ci(nll["auto"] - nll[best])
        row["auto_vs_tcess"] = ratio_ci(nll["auto"] - nll["tcess"])
        results["tasks"][t] = row
        print(t, json.dumps(row), flush=True)
        results["tasks"] = {k: results["tasks"][k] for k in sorted(results["tasks"])}
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=1) + "\n")  # after every task
    results["seconds"] = round(time.time() - t0, 1)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1) + "\n")


def auto_table(path: Path) -> str:
    """The markdown table of docs/BENCHMARKS.md from ``prune_auto_demo.json``."""
    r = json.loads(path.read_text())

    def cell(v: dict) -> str:
        return f"{v['ratio']:.3f} [{v['ci95'][0]:.3f}, {v['ci95'][1]:.3f}]"

    head = ["task", *AUTO_SCORES, "auto (chosen)", "auto / best single", "auto / tcess"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for t, row in r["tasks"].items():
        best = row["best_single_on_eval"]
        cells = [("**" + cell(row[c]) + "**") if c == best else cell(row[c]) for c in AUTO_SCORES]
        lines.append("| " + " | ".join([t, *cells, f"{cell(row['auto'])} ({row['auto']['chosen']})",
                                         cell(row["auto_vs_best_single"]), cell(row["auto_vs_tcess"])]) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="--auto: a Mixtral- or Qwen3-MoE-style checkpoint "
                    "directory (default: the bundled demo; e.g. a model from scripts/train_demo_model.py)")
    ap.add_argument("--windows", type=int, default=48, help="held-out windows per task for perplexity")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--retrieval-only", action="store_true", help="rerun only the retrieval part, keeping the "
                    "pruning results already in --out")
    ap.add_argument("--auto", action="store_true", help="run only the score-chosen-by-evidence comparison "
                    "(writes --out, default benchmarks/results/prune_auto_demo.json)")
    ap.add_argument("--table", action="store_true", help="print the --auto results (--out, default the demo's) as a "
                    "markdown table")
    ap.add_argument("--tasks", default=None, help="--auto: only these tasks (comma-separated; each task's numbers "
                    "do not depend on the others), merged into the results file")
    args = ap.parse_args()
    auto_out = args.out if args.out != DEFAULT_OUT else AUTO_OUT
    if args.table:
        print(auto_table(auto_out))
        return
    if args.model is not None and not args.auto:
        raise SystemExit("--model applies to --auto only")
    torch.set_num_threads(2)
    tasks = bundled_tasks()
    if args.auto and args.tasks:
        tasks = [t for t in args.tasks.split(",") if t]
    work = Path(tempfile.mkdtemp())
    t0 = time.time()
    run(validate_recipe({"model": args.model, "calibration": {"samples": 64, "seq_len": 256, "tasks": tasks},
                         "stages": [{"stage": "profile"}]}), output=work / "profile")
    base = load_model(args.model)
    tok = base.tokenizer
    windows = {}
    for t in tasks:  # up to --windows held-out windows per task (chat has 36 in all)
        every = token_windows(tok, read_documents(t, "eval"), 256)
        windows[t] = every if len(every) <= args.windows else token_windows(
            tok, read_documents(t, "eval"), 256, n=args.windows, seed=0)
    if args.auto:
        auto_experiment(base, work / "profile", windows, tasks, auto_out)
        shutil.rmtree(work, ignore_errors=True)
        return
    if args.retrieval_only:
        results = json.loads(args.out.read_text())
        RATIOS_RUN: list[float] = []
    else:
        base_nll = ppl_table(base.model, windows)
        results = {"windows_per_task": args.windows,
                   "base_ppl": {t: float(torch.tensor(v).exp()) for t, v in base_nll.items()}, "pruning": []}
        RATIOS_RUN = RATIOS
    def pruned_nll(ratio: float, score: str, target: str, seed: int = 0) -> dict[str, float]:
        model = copy.deepcopy(base.model)
        loaded = LoadedModel(model, tok, base.arch, "demo", DEMO_MODEL, base.disk_dtype)
        cfg = PruneConfig(profile=str(work / "profile"), tasks=None if target == "all" else [target],
                          keep_ratio=ratio, score=score, seed=seed)
        STAGES.get("prune").run(Context(loaded, CalibrationConfig(), None), cfg)
        return ppl_table(model, windows)

    for ratio in RATIOS_RUN:
        for score in SCORES:
            if score == "random":  # task-independent: the mean over 5 seeds, once per ratio
                runs = [pruned_nll(ratio, score, "all", seed) for seed in range(5)]
                nll = {t: sum(r[t] for r in runs) / len(runs) for t in tasks}
                targets = [("-", nll)]
            else:
                targets = [(target, pruned_nll(ratio, score, target)) for target in tasks + ["all"]]
            for target, nll in targets:
                row = {"keep_ratio": ratio, "score": score, "profile_tasks": target,
                       "ppl_ratio": {t: float(torch.tensor(nll[t] - base_nll[t]).exp()) for t in tasks}}
                results["pruning"].append(row)
                print(json.dumps(row), flush=True)
    if not args.retrieval_only:
        results["pruning_seconds"] = round(time.time() - t0, 1)

    # ---------------------------------------------------------------- retrieval
    run(validate_recipe({"calibration": {"samples": 64, "seq_len": 256},  # `moecompress patterns` defaults
                         "stages": [{"stage": "patterns", "profile": str(work / "profile")}]}), output=work / "store")
    store = PatternStore.load(work / "store")
    config = base.model.config

    def signatures(windows: torch.Tensor) -> torch.Tensor:  # the retrieve probe: streams the first layers only
        batches = [windows[i:i + 8] for i in range(0, len(windows), 8)]
        with LayerStream(ModelSource(config, base.arch, directory=DEMO_MODEL), batches) as stream:
            return routing_signatures(stream, store.signature_layers)

    names = list(store.patterns)
    cents = torch.tensor([store.patterns[t]["signature"] for t in names])
    per_task, hits, fallbacks, total = {}, 0, 0, 0
    for j, t in enumerate(names):
        ev = token_windows(tok, read_documents(t, "eval"), 256)
        d = cosine_distance(signatures(ev), cents)
        best = d.argmin(1)
        ok = int((best == j).sum())
        fb = int(sum(float(d[i, b]) > store.threshold[names[b]] for i, b in enumerate(best.tolist())))
        per_task[t] = {"windows": len(ev), "accuracy": ok / len(ev), "fallbacks": fb}
        hits, fallbacks, total = hits + ok, fallbacks + fb, total + len(ev)
    one = token_windows(tok, read_documents("math", "eval"), 256, n=40, seed=1)
    signatures(one[:1])  # warm-up
    t1 = time.time()
    for i in range(len(one)):  # each match reads the first layers from disk again, as one `retrieve` does
        d = cosine_distance(signatures(one[i:i + 1]), cents)
    per_match = (time.time() - t1) / len(one)
    reads = {}
    prompt = read_documents("math", "eval")[0][:1500]
    for ratio in RATIOS:
        out = work / f"ret-{ratio}"
        r = run(validate_recipe({"stages": [{"stage": "retrieve", "store": str(work / "store"), "prompt": prompt,
                                             "keep_ratio": ratio}]}), output=out).report["stages"][0]["result"]
        reads[str(ratio)] = {"expert_bytes_read_share": r["expert_bytes_read_share"], "matched": r["matched_task"],
                             "expert_bytes_read": r["expert_bytes_read"], "expert_bytes_total": r["expert_bytes_total"],
                             "bytes_read_total": r["bytes_read_total"]}
        shutil.rmtree(out)
    results["retrieval"] = {"signature_layers": store.signature_layers, "accuracy": hits / total, "windows": total,
                            "fallbacks": fallbacks, "per_task": per_task, "seconds_per_match": per_match,
                            "bytes": reads, "thresholds": store.threshold}
    results["seconds"] = round(time.time() - t0, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(results["retrieval"], indent=1))


if __name__ == "__main__":
    main()
