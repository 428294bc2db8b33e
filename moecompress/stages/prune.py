"""Expert pruning from a profile (PreMoe's PEP; Pei et al. 2025, arXiv:2505.17639).

Per MoE layer, keep the best experts for the chosen tasks by the chosen score (TCESS, frequency, REAP,
REAP x frequency, EAN, gate, the rank consensus of these, random), protecting super experts. ``score: auto``
(the default) lets evidence choose: every candidate score's expert set at the budget is evaluated, in one streamed pass
(`eval.expert_sets`), on held-out windows of the tasks' CALIBRATION text that the profile (and this run's
calibration) did not read, and the set with the lowest next-token loss is kept. A further candidate,
``layerwise``, is built in the same pass: each MoE layer takes whichever candidate's set keeps that layer's
outputs closest to the unpruned model's, so layers may follow different scores (which score is best changes
with the model, and within one model with depth). Structural surgery through the adapters, so the result
is a standard checkpoint plain transformers loads, written one decoder layer at a time (reading only the kept
experts' tensors). Optionally recalibrate the kept routers layer by layer (`runtime.router_refit`): each pruned
block is fitted to reproduce its unpruned output on its inputs.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from pydantic import Field, field_validator, model_validator

from moecompress.algorithms.expert_scores import SCORES, super_experts
from moecompress.algorithms.pruning import cumulative_counts, pick_lowest, select_experts
from moecompress.errors import MoecompressError
from moecompress.eval.expert_sets import LAYERWISE, UNPRUNED, expert_set_losses
from moecompress.formats.profile import Profile
from moecompress.io.model import compose_kept
from moecompress.models.identity import check_identity, config_identity
from moecompress.runtime.identity import source_identity
from moecompress.runtime.router_refit import RouterRefit
from moecompress.stages.base import StageConfig, StageContext, register_stage
from moecompress.stages.keep_experts import apply_keep

__all__ = ["PruneConfig"]

Score = Literal["tcess", "tcess_prob", "frequency", "reap", "reap_freq", "ean", "gate", "consensus", "random"]
assert set(Score.__args__) == set(SCORES)
CANDIDATES = ("tcess", "reap", "frequency", "ean", "reap_freq", "consensus")  # what `score: auto` compares


class PruneConfig(StageConfig):
    """Keep the best experts per layer for some tasks, by a profile's scores.

    Example recipe entry::

        - stage: prune
          profile: out/demo-profile   # or omit after a `profile` stage in the same recipe
          tasks: [math]               # omit for every task in the profile
          keep_ratio: 0.5             # or keep: 4, or cumulative: 0.9
          score: auto                 # or one score: tcess, reap, frequency, ...
          candidates: [tcess, reap, frequency, ean, reap_freq, consensus]   # what auto compares
          auto_samples: 32            # held-out calibration windows per task for auto
          layerwise: true             # auto also compares the per-layer mix of the candidates' sets
    """

    stage: Literal["prune"] = "prune"
    profile: str | None = None
    tasks: list[str] | None = None
    keep: int | None = Field(None, ge=1)
    keep_ratio: float | None = Field(None, gt=0.0, le=1.0)
    cumulative: float | None = Field(None, gt=0.0, le=1.0)
    score: Score | Literal["auto"] = "auto"
    candidates: list[str] = list(CANDIDATES)  # score auto: the scores whose expert sets are compared
    auto_samples: int = Field(32, ge=1)  # score auto: held-out windows per task (the profile's window length)
    layerwise: bool = True  # score auto: also a model whose layers each take the candidate set closest to the
    # unpruned model's outputs
    seed: int = 0  # for score: random
    protect_super: bool = True
    uneven: Literal["fill", "mask"] = "fill"  # cumulative: pad layers with next-best experts, or with dead ones
    regroup: bool = False
    recalibrate_router: bool = False  # refit each kept router to its block's unpruned output (runtime.router_refit)
    recalibrate_steps: int = Field(100, ge=1)  # full-batch Adam steps per MoE layer (the best step is kept)
    recalibrate_lr: float = Field(1e-3, gt=0.0)

    @field_validator("candidates")
    @classmethod
    def _known_candidates(cls, v: list[str]) -> list[str]:
        bad = [c for c in v if c not in SCORES]
        if bad:
            raise ValueError(f"unknown score {bad[0]!r} among the candidates; use some of {', '.join(SCORES)}")
        if not v or len(set(v)) != len(v):
            raise ValueError("give at least one candidate score, each once")
        return v

    @model_validator(mode="after")
    def _one_budget(self) -> PruneConfig:
        if sum(x is not None for x in (self.keep, self.keep_ratio, self.cumulative)) != 1:
            raise ValueError("give exactly one budget: keep, keep_ratio or cumulative")
        if self.cumulative is not None and self.score == "auto":
            raise ValueError("cumulative coverage sets per-layer counts from one named score, not 'auto': "
                             "use score tcess_prob, frequency, reap, reap_freq, ean or gate")
        if self.cumulative is not None and self.score in ("tcess", "random", "consensus"):
            raise ValueError(f"cumulative coverage needs a score measured in shares, not {self.score!r}: "
                             "use tcess_prob, frequency, reap, reap_freq, ean or gate")
        return self

    def count(self, num_experts: int) -> int | None:
        if self.keep is not None:
            return self.keep
        if self.keep_ratio is not None:
            return max(1, round(self.keep_ratio * num_experts))
        return None

    def check(self, config: Any, arch: Any) -> None:
        if self.profile is not None:  # a profile of another model is refused before any weight is read
            check_identity(Profile.peek(self.profile).get("model", {}), config_identity(config, arch),
                           f"the profile {self.profile!r}", "profile this model first: moecompress profile MODEL -o PROFILE")
        E = arch.num_experts(config)
        rule = arch.routing(config, arch.moe_layer_indices(config)[0])
        n = self.count(E)
        if n is None:
            return
        what = f"--keep {self.keep}" if self.keep is not None else f"--keep-ratio {self.keep_ratio}"
        if n > E:
            raise MoecompressError(f"{what} keeps more than the model's {E} experts", f"keep at most {E}")
        if n < rule.top_k:
            raise MoecompressError(
                f"{what} keeps {n} of {E} experts but top_k is {rule.top_k}",
                f"keep at least {rule.top_k} (--keep {rule.top_k} or --keep-ratio {math.ceil(rule.top_k / E * 100) / 100})")
        if rule.group_score and rule.n_group > 1 and not self.regroup and n % rule.n_group:
            raise MoecompressError(
                f"{what} keeps {n} experts, not a multiple of the {rule.n_group} routing groups",
                f"keep a multiple of {rule.n_group}, or pass --regroup")


def _resolve_profile(ctx: StageContext, cfg: PruneConfig) -> Profile:
    if cfg.profile is not None:
        return Profile.load(cfg.profile)
    if "profile" in ctx.artifacts:
        return ctx.artifacts["profile"]
    raise MoecompressError("prune needs a profile", "pass --profile DIR (from `moecompress profile`)")


@register_stage(PruneConfig, modifies_model=True, needs_original=True, changes="experts", needs_profile=True)
def run(ctx: StageContext, cfg: PruneConfig) -> dict[str, Any]:
    """Keep the best experts per layer for given tasks by a profile score (TCESS, frequency, REAP, ...)."""
    arch, config = ctx.arch, ctx.config
    profile = _resolve_profile(ctx, cfg)
    # the router weights alone are read for this check, before anything is written
    check_identity(profile.model, source_identity(ctx.source, ctx.placement), "the profile",
                   "profile this model first: moecompress profile MODEL -o PROFILE")
    tasks = cfg.tasks or profile.tasks
    layers = arch.moe_layer_indices(config)
    stats, _ = profile.combined(tasks)  # raises for unknown tasks
    E = arch.num_experts(config)
    rule = arch.routing(config, layers[0])
    groups = rule.n_group if rule.group_score and not cfg.regroup else 1
    protect = super_experts(stats["act_max"]) if cfg.protect_super else None
    n = cfg.count(E)
    auto = None
    score = cfg.score
    if score == "auto":
        each = {c: _scores(profile, c, tasks, cfg.seed, layers) for c in cfg.candidates}  # [L, E] per candidate
        sets = {c: select_experts(v, n, protect, groups) for c, v in each.items()}
        auto = _choose(ctx, cfg, profile, tasks, {c: dict(zip(layers, v)) for c, v in sets.items()})
        score = auto["chosen"]
        if score == LAYERWISE:  # each layer's row from the score its layer chose (selection is row by row)
            by = auto["candidates"][LAYERWISE]["layers"]
            scores = torch.stack([each[by[str(i)]][j] for j, i in enumerate(layers)])
        else:
            scores = each[score]
    else:
        scores = _scores(profile, score, tasks, cfg.seed, layers)  # [L, E]
    needed = None
    if n is None:  # cumulative: per-layer counts, rounded up to whole groups
        needed = [max(rule.top_k, c) for c in cumulative_counts(scores, cfg.cumulative, rule.top_k)]
        needed = [min(E, math.ceil(c / groups) * groups) for c in needed]
        n = max(needed)
    selection = select_experts(scores, n, protect, groups)
    dead: dict[int, list[int]] = {}
    if needed is not None and cfg.uneven == "mask":
        if arch.router_bias is None and arch.correction_bias is None:
            raise MoecompressError(
                f"{arch.name} routers have no bias, so a layer cannot hold never-chosen padding experts",
                "use uneven=fill (pad with the next-best experts) or a uniform --keep / --keep-ratio")
        own = select_experts(scores, needed, protect, groups)
        for j, (ids, mine) in enumerate(zip(selection, own)):
            dead[layers[j]] = [pos for pos, e in enumerate(ids) if e not in set(mine)]
    keep = {layer: ids for layer, ids in zip(layers, selection)}
    refit = None
    if cfg.recalibrate_router:
        windows = ctx.windows("calib")
        batches = [w[i:i + 8] for w in windows.values() for i in range(0, len(w), 8)]
        with ctx.progress.task("pruning, recalibrating routers", total=cfg.recalibrate_steps * len(layers)) as bar:
            refit = RouterRefit(arch, batches, steps=cfg.recalibrate_steps, lr=cfg.recalibrate_lr, bar=bar)
            plan, before, after = apply_keep(ctx, keep, cfg.regroup, dead, work=refit)
    else:
        plan, before, after = apply_keep(ctx, keep, cfg.regroup, dead)
    # an earlier prune in this recipe: map ids back to the input's
    ctx.artifacts["kept_experts"] = compose_kept(plan, ctx.artifacts.get("kept_experts"))
    if auto is not None:  # the choice and its figures, at the top of moecompress.json
        ctx.artifacts.setdefault("sidecar", {})["prune_score"] = {
            "chosen": auto["chosen"], "tasks": tasks,
            "heldout_loss": {c: round(v["loss"], 6) for c, v in auto["candidates"].items()},
            "unpruned_loss": round(auto["unpruned"]["loss"], 6)}
    positive = scores.clamp(min=0)
    coverage = [float(positive[j, ids].sum() / positive[j].sum()) if positive[j].sum() > 0 else 1.0
                for j, ids in enumerate(selection)]
    return {
        "profile": str(profile.path) if profile.path else "(this recipe)", "tasks": tasks, "score": score,
        "score_note": {"tcess": "PreMoe TCESS on raw router logits", "tcess_prob": "TCESS on routing probabilities",
                       "reap_freq": "REAP x routing frequency",
                       "consensus": "each expert's rank averaged over tcess, frequency, reap, reap_freq and ean",
                       LAYERWISE: "per MoE layer, the candidate score whose experts keep that layer's outputs "
                                  "closest to the unpruned model's (score_auto.candidates.layerwise.layers)"
                       }.get(score, score),
        "score_auto": auto,
        "experts_before": E, "experts_after": n, "params_before": before["params"], "params_after": after["params"],
        "needed_per_layer": needed, "dead_padding": {str(k): v for k, v in dead.items()} or None,
        "score_coverage_per_layer": [round(c, 4) for c in coverage],
        "protected_super_experts": [] if protect is None else
        [[layers[j], e] for j, e in protect.nonzero().tolist()],
        "kept_experts": {str(k): v for k, v in plan.items()},
        "router_recalibration": refit.report() if refit is not None else None,
    }


def _scores(profile: Profile, score: str, tasks: list[str], seed: int, layers: list[int]) -> torch.Tensor:
    """``[L, E]`` importance by ``score``; one line for scores that are not finite."""
    scores = profile.scores(score, tasks, seed)
    bad = (~torch.isfinite(scores)).any(-1).nonzero().flatten().tolist()
    if bad:
        raise MoecompressError(f"the {score} scores of MoE layer {layers[bad[0]]} "
                               "are not finite (NaN or infinite)", "profile the model again, or use another --score")
    return scores


def _choose(ctx: StageContext, cfg: PruneConfig, profile: Profile, tasks: list[str],
            sets: dict[str, dict[int, list[int]]]) -> dict[str, Any]:
    """``score: auto``: every candidate's expert set on held-out calibration windows; the lowest loss wins.

    Held out: windows of each task's calibration text (never its evaluation split), as long as the profile's,
    overlapping none of the windows the profile read (its ``settings.windows``) nor this run's calibration
    windows. The loss of a set is
    the mean over ``tasks`` of each task's mean next-token NLL; candidates whose sets coincide are evaluated once.
    """
    recorded = profile.settings.get("windows")
    if not isinstance(recorded, dict) or any(t not in recorded for t in tasks):
        raise MoecompressError("the profile does not record which calibration windows it read, so --score auto "
                               "cannot hold out the rest",
                               "profile again with this moecompress (moecompress profile MODEL -o DIR), "
                               "or name a --score")
    own = ctx.window_record("calib", tasks=tasks)
    exclude: dict[str, list[tuple[int, int]]] = {}
    for t in tasks:
        rec = recorded[t]
        if rec.get("digest") != own[t]["digest"]:
            raise MoecompressError(f"the profile read other calibration text for task {t!r} than this run has",
                                   "give the --data the profile was made with, or name a --score")
        exclude[t] = [(s, s + rec["seq_len"]) for s in rec["starts"]] + \
            [(s, s + own[t]["seq_len"]) for s in own[t]["starts"]]
    seq_len = recorded[tasks[0]]["seq_len"]  # the profile's window length (checked against the model's limit)
    windows, heldout = ctx.heldout(tasks, seq_len, cfg.auto_samples, exclude)
    batches, owner = [], []
    for t in tasks:
        for i in range(0, len(windows[t]), 8):
            batches.append(windows[t][i:i + 8])
            owner += [t] * len(batches[-1])
    distinct: dict[tuple, str] = {}
    same = {c: distinct.setdefault(tuple(tuple(v) for v in plan.values()), c) for c, plan in sets.items()}
    with ctx.stream(batches) as stream, \
            ctx.progress.task("pruning, comparing scores", total=stream.num_layers) as bar:
        lw: dict[int, dict[str, Any]] | None = {} if cfg.layerwise and len(distinct) > 1 else None
        nll = expert_set_losses(stream, {c: sets[c] for c in sets if same[c] == c}, cfg.regroup, bar, lw)
    owner_t = {t: torch.tensor([o == t for o in owner]) for t in tasks}

    def figures(v: torch.Tensor) -> dict[str, Any]:
        per = {t: float(v[owner_t[t]].mean()) for t in tasks}
        out = {"loss": sum(per.values()) / len(per), "per_task": {}}
        for t in tasks:
            d = (v - nll[UNPRUNED])[owner_t[t]].double()  # paired with the unpruned model, per window
            half = 1.96 * float(d.std()) / len(d) ** 0.5 if len(d) > 1 else float("nan")
            out["per_task"][t] = {"loss": per[t], "ppl": math.exp(per[t]),
                                  "ppl_ratio": math.exp(float(d.mean())),
                                  "ppl_ratio_ci95": [math.exp(float(d.mean()) - half), math.exp(float(d.mean()) + half)]}
        return out

    cands = {c: {**figures(nll[same[c]]), "same_experts_as": same[c] if same[c] != c else None} for c in sets}
    if lw is not None:  # the layerwise model: its NLL, and per layer the candidate taken and each one's error
        mixed = tuple(tuple(sets[lw[i]["chosen"]][i]) for i in next(iter(sets.values())))
        cands[LAYERWISE] = {**figures(nll[LAYERWISE]), "same_experts_as": distinct.get(mixed),
                            "layers": {str(i): v["chosen"] for i, v in lw.items()},
                            "layer_error": {str(i): {c: round(e, 6) for c, e in v["error"].items()}
                                            for i, v in lw.items()}}
    chosen = pick_lowest({c: v["loss"] for c, v in cands.items()})
    return {"chosen": chosen, "candidates": cands, "unpruned": figures(nll[UNPRUNED]),
            "heldout": {t: {**r, "windows": len(r["starts"])} for t, r in heldout.items()},
            "heldout_note": "windows of each task's calibration text (never its eval split) disjoint from the "
                            "windows the profile read and from this run's calibration windows; loss = mean over "
                            "tasks of the mean next-token NLL (nats); ppl_ratio_ci95: 95 % interval over windows "
                            "of the ratio to the unpruned model",
            "objective": "lowest held-out loss among the candidates (first listed among equals); layerwise: per "
                         "MoE layer the candidate set whose outputs on the layerwise model's own hidden states are "
                         "closest to the unpruned model's (mean relative squared error per token), chosen on the "
                         "same held-out windows"}
