"""Whether a recipe's stages make sense in their order, decided before any weight is read.

Every stage declares what it needs and what it changes (`StageSpec`): the original weights
(``needs_original``), a profile of the current experts (``needs_profile``), and whether it changes the expert
set or the weights' representation (``changes``). Walking the stages with the state of the model they will
see refuses, with the order that works:

* anything that needs the original weights after a stage that quantized them (``quantize`` then ``prune``
  would keep the packed experts in their old order while the router is cut; ``quantize`` twice compounds
  rounding and records only the last scheme), or on an input that is already quantized or packed (the fix
  names the original recorded in its ``moecompress.json``);
* ``prune`` with no profile, or with a profile taken before an earlier stage changed the experts;
* ``keep_experts`` after another expert change (its ids would mean renumbered experts);
* ``prune`` tasks that its profile does not have (checked against the recipe's calibration tasks or the
  profile file's header, not after a long profiling pass);
* ``retrieve`` with no pattern store, or with one (its own, or an earlier ``patterns`` stage's) that describes the
  experts before an earlier stage changed them.

The working order is: profile, then patterns, then prune / keep_experts / retrieve, then quantize / ternary, then
evaluate.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from moecompress.errors import MoecompressError
from moecompress.stages.base import StageConfig, StageSpec

__all__ = ["InputState", "check_order", "working_order"]


@dataclass(frozen=True)
class InputState:
    """What the input model already is, read from its config and ``moecompress.json`` (no weights)."""

    label: str
    representation: Literal["original", "quantized", "packed", "foreign"] = "original"
    scheme: str | None = None  # e.g. "w4a16" (moecompress) or the foreign quant_method
    original: str | None = None  # the model it was made from, as recorded in its moecompress.json


def _rank(spec: StageSpec) -> int:
    if spec.makes_profile:
        return 0
    if spec.makes_patterns:
        return 1
    if spec.changes == "experts":
        return 2
    if spec.changes == "weights":
        return 3
    return 4


def working_order(specs: Sequence[StageSpec]) -> list[str]:
    """The stages sorted into the order that works (stable: equal ranks keep the recipe's order)."""
    return [s.name for s in sorted(specs, key=_rank)]


def _where(i: int, spec: StageSpec, n: int) -> str:
    return spec.name if n == 1 else f"stage {i + 1} ({spec.name})"


def _input_problem(state: InputState, spec: StageSpec) -> MoecompressError:
    what = {"quantized": f"a fake-quantized {state.scheme or ''} model".replace("  ", " "),
            "packed": f"a packed {state.scheme or ''} checkpoint".replace("  ", " "),
            "foreign": f"quantized by {state.scheme}"}[state.representation]
    # a stage that changes the expert set runs on the original and its result is quantized; the others (quantize,
    # ternary, profile) run on the original instead: "then quantize the result" would quantize twice
    then = ", then quantize the result" if spec.changes == "experts" else " instead"
    fix = (f"run {spec.name} on the original model ({state.original}){then}"
           if state.original else f"run {spec.name} on the unquantized model{then}")
    return MoecompressError(f"{state.label} is {what}; {spec.name} needs the original (unquantized) weights", fix)


def check_order(configs: Sequence[StageConfig], specs: Sequence[StageSpec], state: InputState,
                calibration_tasks: Sequence[str], num_experts: int) -> None:
    """Raise a one-line `MoecompressError` when the stages cannot run in this order on this input.

    ``calibration_tasks``: the recipe's resolved task names (what a profile stage in it records).
    """
    n = len(specs)
    order = ", ".join(working_order(specs))
    weights_by: int | None = None  # index of the stage that quantized the weights in this recipe
    experts_by: int | None = None  # index of the last stage that changed the expert set
    profile_at: int | None = None  # index of the last profile stage
    patterns_at: int | None = None  # index of the last patterns stage
    for i, (cfg, spec) in enumerate(zip(configs, specs)):
        here = _where(i, spec, n)
        if spec.needs_original:
            if weights_by is not None:
                first = _where(weights_by, specs[weights_by], n)
                if spec.changes == "weights":
                    raise MoecompressError(
                        f"{here} would quantize weights that {first} already quantized",
                        "quantize once: keep a single quantize or ternary stage (each starts from the original "
                        "weights)")
                raise MoecompressError(f"{here} needs the original weights, but {first} quantized them before it",
                                       f"put {spec.name} before {specs[weights_by].name}: {order}")
            if state.representation != "original":
                raise _input_problem(state, spec)
        if spec.name == "keep_experts" and experts_by is not None:
            raise MoecompressError(
                f"{here} comes after {_where(experts_by, specs[experts_by], n)}, which already renumbered the experts",
                "choose the experts in one stage (a single keep_experts or prune)")
        if spec.needs_profile:
            _check_profile(cfg, here, i, specs, profile_at, experts_by, calibration_tasks, num_experts)
        if spec.needs_patterns:
            _check_patterns(cfg, here, i, specs, patterns_at, experts_by)
        if getattr(cfg, "baseline", None) == "original" and not state.original and not any(
                s.modifies_model for s in specs[:i]):
            raise MoecompressError(f"{here} compares with the original, but {state.label} records none (it was not "
                                   "written by moecompress) and nothing before it changes the model",
                                   "give a baseline model (--baseline PATH), or evaluate alone (--no-baseline)")
        if spec.makes_profile:
            profile_at = i
        if spec.makes_patterns:
            patterns_at = i
        if spec.changes == "experts":
            experts_by = i
        elif spec.changes == "weights":
            weights_by = i


def _check_profile(cfg: Any, here: str, i: int, specs: Sequence[StageSpec], profile_at: int | None,
                   experts_by: int | None, calibration_tasks: Sequence[str], num_experts: int) -> None:
    n = len(specs)
    path = getattr(cfg, "profile", None)
    if path is None:
        if profile_at is None:
            raise MoecompressError(f"{here} needs a profile and none comes before it",
                                   "add '- stage: profile' before it, or give a profile directory (--profile DIR)")
        if experts_by is not None and experts_by > profile_at:
            raise MoecompressError(
                f"{here} would use the profile of {_where(profile_at, specs[profile_at], n)}, taken before "
                f"{_where(experts_by, specs[experts_by], n)} changed the experts",
                f"add another '- stage: profile' right before {specs[i].name}")
        tasks = list(calibration_tasks)
        source = "the profile this recipe takes"
    else:
        from moecompress.formats.profile import Profile

        meta = Profile.peek(path)
        if experts_by is not None:
            raise MoecompressError(
                f"{here}: the profile {str(path)!r} describes the model before "
                f"{_where(experts_by, specs[experts_by], n)} changed its experts",
                f"profile in the recipe instead: add '- stage: profile' right before {specs[i].name} and drop "
                "'profile:'")
        recorded = meta.get("model", {}).get("num_experts")
        if recorded is not None and recorded != num_experts:
            raise MoecompressError(f"the profile {str(path)!r} was taken on a model with {recorded} experts per "
                                   f"layer, this one has {num_experts}",
                                   "profile this model first: moecompress profile MODEL -o PROFILE")
        tasks = list(meta.get("tasks", []))
        source = f"the profile {str(Path(path))!r}"
    wanted = getattr(cfg, "tasks", None) or []
    missing = [t for t in wanted if t not in tasks]
    if missing:
        raise MoecompressError(f"{here}: task {missing[0]!r} is not in {source} (it has {', '.join(tasks)})",
                               f"use one of {', '.join(tasks)}, or profile {missing[0]!r} too")


def _check_patterns(cfg: Any, here: str, i: int, specs: Sequence[StageSpec], patterns_at: int | None,
                    experts_by: int | None) -> None:
    n = len(specs)
    name = specs[i].name
    if getattr(cfg, "store", None) is None:
        if patterns_at is None:
            raise MoecompressError(f"{here} needs a pattern store and none comes before it",
                                   f"add '- stage: patterns' (after a profile) before {name}, or give a pattern "
                                   "store (--store DIR)")
        if experts_by is not None and experts_by > patterns_at:
            raise MoecompressError(
                f"{here} would use the patterns of {_where(patterns_at, specs[patterns_at], n)}, taken before "
                f"{_where(experts_by, specs[experts_by], n)} changed the experts",
                f"choose the experts in one stage, or add '- stage: profile' and '- stage: patterns' right before "
                f"{name}")
    elif experts_by is not None:
        raise MoecompressError(
            f"{here}: the pattern store {str(cfg.store)!r} describes the model before "
            f"{_where(experts_by, specs[experts_by], n)} changed its experts",
            f"choose the experts in one stage, or add '- stage: profile' and '- stage: patterns' right before {name} "
            "and drop 'store:'")
