"""Task-adaptive expert retrieval (PreMoe's TAER, Pei et al. 2025, arXiv:2505.17639).

``build_patterns``: one pattern per profiled task (a routing signature over the first MoE layers and
every layer's expert ranking), plus a generalist pattern (all tasks), and a distance threshold
calibrated on the calibration text. ``retrieve``: route a prompt through the first MoE layers only,
take the nearest pattern (or the generalist one when the prompt is far from all of them), and write a
pruned checkpoint reading only the kept experts' tensors from the original safetensors.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from moecompress.algorithms.pruning import select_experts
from moecompress.calib import resolve_tasks, task_windows
from moecompress.errors import MoecompressError
from moecompress.formats.patterns import PatternStore
from moecompress.formats.profile import Profile
from moecompress.models import find_arch
from moecompress.models.identity import check_identity, identity_from_parts
from moecompress.runtime.checkpoint_io import CheckpointReader, classify, reduced_state_dict, write_checkpoint
from moecompress.runtime.modelio import SIDECAR, model_dir, load_config, load_model
from moecompress.runtime.outdir import atomic_output, check_output
from moecompress.runtime.prompt_routing import RoutingProbe, cosine_distance

__all__ = ["build_patterns", "retrieve"]


def _open(spec: str | None):
    if spec and str(spec).startswith("tiny:"):
        raise MoecompressError("retrieval reads expert tensors from files", "save the model to a directory first")
    path = model_dir(spec)
    config = load_config(spec)
    arch = find_arch(config)
    reader = CheckpointReader(path)
    classified = classify(reader, config, arch)
    layers = arch.moe_layer_indices(config)
    routers = [reader.get(k) for k in classified.router_weight_keys(arch, layers)]
    return path, config, arch, reader, classified, identity_from_parts(config, arch, routers)


def build_patterns(spec: str | None, profile_path: str | Path, output: str | Path, *, score: str = "tcess",
                   signature_layers: int = 2, samples: int = 64, seq_len: int = 256, seed: int = 0,
                   margin: float = 1.0, force: bool = False) -> dict[str, Any]:
    """Write a pattern store; returns its summary (tasks, threshold, calibration accuracy)."""
    out = check_output(output, force, [spec or "demo", profile_path])
    path, config, arch, reader, classified, identity = _open(spec)
    profile = Profile.load(profile_path)
    check_identity(profile.model, identity, "the profile", "profile this model first: moecompress profile MODEL")
    layers = arch.moe_layer_indices(config)
    if not 1 <= signature_layers <= len(layers):
        raise MoecompressError(f"--signature-layers {signature_layers} is not between 1 and {len(layers)}",
                               "use a number of MoE layers the model has")
    sig = layers[:signature_layers]
    patterns: dict[str, Any] = {}
    for t in profile.tasks:
        stats, tokens = profile.combined([t])
        mean_logits = stats["logit_sum"][:signature_layers] / tokens  # [m, E]
        ranking = profile.scores(score, [t]).argsort(dim=1, descending=True, stable=True)
        patterns[t] = {"signature": mean_logits.flatten().tolist(), "ranking": ranking.tolist(), "tokens": tokens}
    generalist = {"ranking": profile.scores(score).argsort(dim=1, descending=True, stable=True).tolist(),
                  "tasks": profile.tasks}
    # Threshold: how far calibration windows of every task lie from their own pattern.
    probe = RoutingProbe(reader, classified, config, arch, sig)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    centroids = torch.tensor([patterns[t]["signature"] for t in profile.tasks])
    own, hits, total = [], 0, 0
    for j, (t, w) in enumerate(task_windows(tokenizer, resolve_tasks(profile.tasks), "calib", seq_len,
                                            samples, seed + 1).items()):
        d = cosine_distance(probe.signatures(w), centroids)  # [N, tasks]
        own.append(d[:, j])
        hits += int((d.argmin(1) == j).sum())
        total += len(w)
    # Per task: the 99th percentile of its own calibration windows' distances (times a margin).
    threshold = {t: margin * float(torch.quantile(d, 0.99)) for t, d in zip(profile.tasks, own)}
    own_d = torch.cat(own)
    from moecompress.algorithms.expert_scores import super_experts

    combined, _ = profile.combined()
    flags = super_experts(combined["act_max"])
    store = PatternStore(identity, str(path), sig, threshold, score,
                         [[layers[j], e] for j, e in flags.nonzero().tolist()], patterns, generalist,
                         {"windows": total, "seq_len": seq_len, "accuracy": hits / total,
                          "own_distance_q50": float(own_d.median()), "own_distance_q99": float(torch.quantile(own_d, 0.99)),
                          "margin": margin, "profile": str(profile.path)})
    with atomic_output(out, replace=force) as tmp:
        store.save(tmp)
    return {"output": str(out), "tasks": profile.tasks, "signature_layers": sig, "threshold": threshold,
            **store.calibration}


def retrieve(spec: str | None, store_path: str | Path, output: str | Path, *, prompt: str, keep: int | None = None,
             keep_ratio: float | None = None, max_distance: float | None = None, force: bool = False) -> dict[str, Any]:
    """Match ``prompt`` to a stored pattern and write the pruned model (reading only kept experts)."""
    out = check_output(output, force, [spec or "demo", store_path])
    if (keep is None) == (keep_ratio is None):
        raise MoecompressError("give exactly one of --keep or --keep-ratio", "e.g. --keep-ratio 0.5")
    if not prompt or not prompt.strip():
        raise MoecompressError("the prompt is empty", "give text with --prompt or --prompt-file")
    store = PatternStore.load(store_path)
    path, config, arch, reader, classified, identity = _open(spec)
    check_identity(store.model, identity, "the pattern store", "build it for this model: moecompress patterns MODEL")
    layers = arch.moe_layer_indices(config)
    E = arch.num_experts(config)
    rule = arch.routing(config, layers[0])
    n = keep if keep is not None else max(1, round(keep_ratio * E))
    groups = rule.n_group if rule.group_score else 1
    if n < rule.top_k or n > E or n % groups:
        raise MoecompressError(f"keeping {n} of {E} experts is impossible (top_k {rule.top_k}, {groups} routing groups)",
                               f"keep between {rule.top_k} and {E} experts, a multiple of {groups}")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    limit = getattr(config, "max_position_embeddings", 4096)
    ids = tokenizer(prompt, return_tensors="pt", verbose=False).input_ids[:, :limit]
    t0 = time.time()
    probe = RoutingProbe(reader, classified, config, arch, store.signature_layers)
    sig = probe.signatures(ids)
    tasks = list(store.patterns)
    d = cosine_distance(sig, torch.tensor([store.patterns[t]["signature"] for t in tasks]))[0]
    match_seconds = time.time() - t0
    best = int(d.argmin())
    limit_d = store.threshold[tasks[best]] if max_distance is None else max_distance
    fallback = float(d[best]) > limit_d
    ranking = store.generalist["ranking"] if fallback else store.patterns[tasks[best]]["ranking"]
    rank_score = torch.zeros(len(layers), E, dtype=torch.float64)
    for j, order in enumerate(ranking):
        rank_score[j, torch.as_tensor(order)] = -torch.arange(E, dtype=torch.float64)
    protect = torch.zeros(len(layers), E, dtype=torch.bool)
    for layer, e in store.super_experts:
        protect[layers.index(layer), e] = True
    kept = dict(zip(layers, select_experts(rank_score, n, protect, groups)))
    sd = reduced_state_dict(reader, classified, kept)
    with atomic_output(out, replace=force) as tmp:
        write_checkpoint(sd, tmp)
        cfg = json.loads((path / "config.json").read_text())
        for key in arch.num_experts_keys:
            cfg[key] = n
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        for f in path.iterdir():
            if f.is_file() and not f.name.endswith(".safetensors") and f.name not in (
                    "config.json", "model.safetensors.index.json", SIDECAR):
                shutil.copyfile(f, tmp / f.name)
        expert_keys = set(classified.expert_keys())
        all_expert = sum(reader.nbytes(k) for k in expert_keys)
        read_expert = sum(min(b, reader.nbytes(k)) for k, b in reader.read_log.items() if k in expert_keys)
        report = {
            "source_model": str(path), "store": str(Path(store_path)), "prompt_tokens": int(ids.shape[1]),
            "matched_task": None if fallback else tasks[best], "nearest_task": tasks[best],
            "distance": float(d[best]), "threshold": limit_d, "fallback_to_generalist": fallback,
            "distances": {t: float(v) for t, v in zip(tasks, d)}, "match_seconds": round(match_seconds, 3),
            "experts_before": E, "experts_after": n, "kept_experts": {str(k): v for k, v in kept.items()},
            "expert_bytes_read": read_expert, "expert_bytes_total": all_expert,
            "expert_bytes_read_share": read_expert / all_expert, "bytes_read_total": reader.bytes_read,
            "expert_tensors_read": sorted(k for k in reader.read_log if k in expert_keys),
        }
        (tmp / SIDECAR).write_text(json.dumps(report, indent=2) + "\n")
        load_model(str(tmp))  # the result must load with every weight present
    return report
