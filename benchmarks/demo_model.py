#!/usr/bin/env python
"""Held-out perplexity per task of the bundled demo MoE, and how well routing alone tells the tasks apart.

* Perplexity: every held-out window of ``--seq-len`` tokens per task (``calib_data/<task>/eval.jsonl``),
  scored independently; a 95 % interval from the spread of per-window NLL.
* Task from routing: each window's per-layer expert histogram (share of top-k picks per expert,
  L x E numbers). Two protocols, chance = 1 / #tasks:
    - calib -> eval: task centroids from calibration windows, each held-out window assigned to the
      nearest centroid (L1);
    - leave-one-out on held-out windows (centroids without the window being classified).

Usage::

    python benchmarks/demo_model.py                # writes benchmarks/results/demo_model.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from moecompress.calib import bundled_tasks, read_documents, token_windows
from moecompress.eval.perplexity import score_windows
from moecompress.eval.routing import histograms_from_traces, nearest_centroid_accuracy, routing_histograms
from moecompress.runtime.hooks import capture_routing
from moecompress.runtime.source import load_model

ROOT = Path(__file__).resolve().parents[1]


def leave_one_out(hists: dict[str, torch.Tensor]) -> dict[str, float]:
    tasks = list(hists)
    sums = {t: h.flatten(1).sum(0) for t, h in hists.items()}
    acc, hits, total = {}, 0, 0
    for t, h in hists.items():
        ok = 0
        for i, x in enumerate(h.flatten(1)):
            cents = torch.stack([(sums[u] - x) / (len(hists[u]) - 1) if u == t else sums[u] / len(hists[u])
                                 for u in tasks])
            ok += int(torch.cdist(x[None], cents, p=1).argmin() == tasks.index(t))
        acc[t], hits, total = ok / len(h), hits + ok, total + len(h)
    acc["all"] = hits / total
    return acc


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--calib-windows", type=int, default=64)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "demo_model.json")
    args = ap.parse_args()
    torch.set_num_threads(2)
    loaded = load_model(args.model)
    model, arch, tok = loaded.model, loaded.arch, loaded.tokenizer
    tasks = bundled_tasks()
    result = {"model": loaded.source, "seq_len": args.seq_len, "tasks": {}}
    eval_h, calib_h = {}, {}
    t0 = time.time()
    for t in tasks:
        ev = token_windows(tok, read_documents(t, "eval"), args.seq_len)
        ca = token_windows(tok, read_documents(t, "calib"), args.seq_len, n=args.calib_windows, seed=0)
        with capture_routing(model, arch) as traces:  # one pass: perplexity and routing together
            s = score_windows(model, ev)
        eval_h[t] = histograms_from_traces(traces, len(ev), arch.num_experts(model.config))
        half = 1.96 * float(s.nll.std()) / len(s.nll) ** 0.5
        result["tasks"][t] = {"eval_windows": len(ev), "eval_tokens": len(ev) * s.tokens, "ppl": s.ppl,
                              "ppl_ci95": [float(torch.exp(torch.tensor(s.mean_nll - half))),
                                           float(torch.exp(torch.tensor(s.mean_nll + half)))],
                              "nll": s.mean_nll}
        calib_h[t] = routing_histograms(model, arch, ca)
        print(t, json.dumps(result["tasks"][t]), flush=True)
    result["task_from_routing"] = {
        "chance": 1 / len(tasks),
        "calib_centroids_to_eval": nearest_centroid_accuracy(calib_h, eval_h),
        "leave_one_out_eval": leave_one_out(eval_h),
    }
    result["seconds"] = round(time.time() - t0, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result["task_from_routing"], indent=1))
    print("\n| task | held-out windows | tokens | perplexity (95% CI) |\n|---|---|---|---|")
    for t, r in result["tasks"].items():
        print(f"| {t} | {r['eval_windows']} | {r['eval_tokens']:,} | {r['ppl']:.2f} "
              f"({r['ppl_ci95'][0]:.2f} to {r['ppl_ci95'][1]:.2f}) |")


if __name__ == "__main__":
    main()
