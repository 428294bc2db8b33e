"""Profile per-task expert activation in one pass, one decoder layer at a time.

For every calibration task, MoE layer and routed expert: routed-token and top-1 counts, summed gate
weights, TCESS (raw-logit and probability variants), REAP and EAN sums, and the largest activations
(super-expert guard); see ``algorithms/expert_scores``. Only routed tokens run through each expert.
The statistics are budget-free sums written to ``profile.json`` + ``profile.safetensors``.
"""

from __future__ import annotations

import time
from typing import Any, Literal

import torch
from pydantic import Field

from moecompress.algorithms.expert_scores import STATS, js_divergence, routing_statistics, super_experts
from moecompress.algorithms.moe_math import routed_output_stats
from moecompress.errors import MoecompressError
from moecompress.formats.profile import Profile
from moecompress.models.identity import identity_from_parts
from moecompress.runtime.hooks import capture_routing
from moecompress.stages.base import StageConfig, StageContext, register_stage

__all__ = ["ProfileConfig", "profile_summary"]


class ProfileConfig(StageConfig):
    """Collect per-task routing statistics (the recipe's calibration tasks, samples and length).

    Example recipe entry::

        - stage: profile
          tcess_k: 2          # TCESS's top-k (default: the model's top-k)
          tcess_r: 0.0        # TCESS's confidence threshold on the softmax of the top-k logits
    """

    stage: Literal["profile"] = "profile"
    tcess_k: int | None = Field(None, ge=1)
    tcess_r: float = Field(0.0, ge=0.0, le=1.0)
    batch_size: int = Field(8, ge=1)

    def check(self, config: Any, arch: Any) -> None:
        if self.tcess_k is not None and self.tcess_k > arch.num_experts(config):
            raise MoecompressError(f"tcess_k={self.tcess_k} is above the {arch.num_experts(config)} experts",
                                   "lower --tcess-k")


def profile_summary(profile: Profile, top: int = 3) -> dict[str, Any]:
    """Most and least used experts per task and layer, usage entropy, task-vs-task JS divergence."""
    layers = profile.model["moe_layers"]
    out: dict[str, Any] = {"tasks": {}, "js_divergence": {}}
    freqs = {}
    for t in profile.tasks:
        f = profile.stats[t]["count"] / profile.stats[t]["count"].sum(-1, keepdim=True)  # [L, E] shares
        freqs[t] = f
        ent = -(f * f.clamp(min=1e-12).log()).sum(-1) / torch.log(torch.tensor(float(f.shape[-1])))
        out["tasks"][t] = {
            "tokens": profile.tokens[t],
            "layers": {str(layer): {
                "most_used": [[int(e), round(float(f[j, e]), 4)] for e in f[j].argsort(descending=True)[:top]],
                "least_used": [[int(e), round(float(f[j, e]), 4)] for e in f[j].argsort()[:top]],
                "entropy": round(float(ent[j]), 4)} for j, layer in enumerate(layers)},
        }
    tasks = profile.tasks
    per_layer = torch.zeros(len(layers))
    pairs = 0
    for a in range(len(tasks)):
        for b in range(a + 1, len(tasks)):
            jsd = js_divergence(freqs[tasks[a]], freqs[tasks[b]])  # [L]
            out["js_divergence"][f"{tasks[a]}|{tasks[b]}"] = [round(float(v), 4) for v in jsd]
            per_layer += jsd.float()
            pairs += 1
    if pairs:
        out["js_divergence_mean_per_layer"] = [round(float(v), 4) for v in per_layer / pairs]
    combined, _ = profile.combined()
    flags = super_experts(combined["act_max"])
    out["super_experts"] = [[layers[j], int(e)] for j, e in flags.nonzero().tolist()]
    return out


@register_stage(ProfileConfig, modifies_model=False, uses_text=True, needs_original=True, makes_profile=True)
def run(ctx: StageContext, cfg: ProfileConfig) -> dict[str, Any]:
    """Profile per-task expert activation (TCESS, frequency, REAP, EAN, super experts) in one pass."""
    arch, config = ctx.arch, ctx.config
    windows = ctx.windows("calib")
    batches = [(task, w[i:i + cfg.batch_size]) for task, w in windows.items() for i in range(0, len(w), cfg.batch_size)]
    layers = arch.moe_layer_indices(config)
    E = arch.num_experts(config)
    tcess_k = cfg.tcess_k or arch.routing(config, layers[0]).top_k
    acc = {t: {s: torch.zeros(len(layers), E, dtype=torch.float64) for s in STATS} for t in windows}
    tokens = {t: int(w.numel()) for t, w in windows.items()}
    total = sum(tokens.values())
    t0 = time.time()
    call = {"b": 0}
    routers: list[torch.Tensor] = []
    view = None

    def on_route(layer: int, x, logits, index, weights) -> None:
        j = layers.index(layer)
        task = batches[call["b"]][0]
        call["b"] += 1
        probs = logits.sigmoid() if view.routing.score == "sigmoid" else logits.softmax(dim=-1)
        with torch.no_grad():  # expert parallel: each process runs its own experts, the slots are summed
            norm, act_max, out_max = (ctx.dist.all_sum(t) for t in routed_output_stats(
                x, index, view.experts.weights(), view.activation, ctx.dist.experts(E) if ctx.dist.active else None))
        stats = routing_statistics(logits, probs, index, weights, norm, act_max, out_max, tcess_k, cfg.tcess_r)
        for s, v in stats.items():
            v = v.to("cpu", torch.float64)
            acc[task][s][j] = torch.maximum(acc[task][s][j], v) if s.endswith("_max") else acc[task][s][j] + v

    with ctx.stream([x for _, x in batches]) as stream, \
            ctx.progress.task("profiling", total=total * stream.num_layers) as bar:
        for i, layer in stream.layers_in_order():
            call["b"] = 0
            if i in layers:
                view = arch.block(stream.model, i)
                routers.append(view.router_weight.detach().to("cpu", torch.float32).clone())
                with capture_routing(stream.model, arch, layers=[i], on_route=on_route, store=False):
                    stream.run_layer(i)
            else:
                stream.run_layer(i)
            done = (i + 1) * total
            bar.advance(total, rate=f"{done / max(time.time() - t0, 1e-9):,.0f} tok·layer/s")
    seconds = time.time() - t0
    for t, d in acc.items():
        for s, v in d.items():
            bad = (~torch.isfinite(v)).any(-1).nonzero().flatten().tolist()
            if bad:
                raise MoecompressError(f"profiling {t!r} gave non-finite {s} statistics in MoE layer {layers[bad[0]]}",
                                       "the model's activations overflow: try --dtype float32, and check its weights")
    rule = arch.routing(config, layers[0])
    profile = Profile(
        model=identity_from_parts(config, arch, routers), stats=acc, tokens=tokens,
        settings={"samples": {t: len(w) for t, w in windows.items()}, "seq_len": int(next(iter(windows.values())).shape[1]),
                  "tcess_k": tcess_k, "tcess_r": cfg.tcess_r, "router_scoring": rule.score,
                  "windows": ctx.window_record("calib"),  # the tokens profiled: `prune --score auto` holds out the rest
                  "tcess_note": "tcess = raw router logits (PreMoe); tcess_prob = routing probabilities "
                                "(softmax, or sigmoid for sigmoid routers)"},
    )
    profile.summary = profile_summary(profile)
    profile.summary["seconds"] = round(seconds, 2)
    profile.summary["tokens_per_second"] = round(total / seconds, 1)
    if ctx.out_dir is not None and ctx.dist.writer:
        profile.save(ctx.out_dir)
    ctx.artifacts["profile"] = profile
    return {"tasks": list(windows), "tokens": total, "seconds": round(seconds, 2),
            "tokens_per_second": round(total / seconds, 1),
            "js_divergence_mean_per_layer": profile.summary.get("js_divergence_mean_per_layer"),
            "super_experts": profile.summary["super_experts"]}
