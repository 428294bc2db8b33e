"""What a stage is: a strict, frozen pydantic config plus one ``run(ctx, cfg)`` function, registered by name."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import torch
from pydantic import BaseModel, ConfigDict

from moecompress.progress import Progress
from moecompress.registry import Registry

__all__ = ["STAGES", "StageConfig", "StageContext", "StageSpec", "register_stage"]


class StageContext(Protocol):
    """What a stage receives (``moecompress.context.Context`` implements it, one layer up).

    A stage reads the model through ``stream(batches)`` (one decoder layer at a time, on the run's device);
    a stage that changes it writes each layer to ``sink()`` and hands the result on with ``adopt``."""

    source: Any  # runtime.executor.ModelSource: the model as this stage sees it
    original: Any  # the model the run started from
    config: Any
    arch: Any
    tokenizer: Any
    placement: Any
    artifacts: dict[str, Any]
    out_dir: Path | None
    progress: Progress

    def windows(self, split: str = "calib", samples: int | None = None, seq_len: int | None = None,
                tasks: list[str] | None = None) -> dict[str, torch.Tensor]: ...

    def window_record(self, split: str = "calib", samples: int | None = None, seq_len: int | None = None,
                      tasks: list[str] | None = None) -> dict[str, dict[str, Any]]: ...

    def heldout(self, tasks: list[str], seq_len: int, samples: int,
                exclude: dict[str, list[tuple[int, int]]]) -> tuple[dict[str, torch.Tensor], dict[str, dict]]: ...

    def stream(self, batches: list[torch.Tensor], source: Any = None, **kw: Any) -> Any: ...

    def sink(self) -> Any: ...

    def adopt(self, sink: Any, config: Any = None, tokenizer: Any = None) -> None: ...


class StageConfig(BaseModel):
    """Base of every stage config: unknown keys are errors, values are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    stage: str

    def check(self, config: Any, arch: Any) -> None:
        """Cross-check against the model's config (before any weight is read). Raise MoecompressError."""


@dataclass(frozen=True)
class StageSpec:
    name: str
    config: type[StageConfig]
    run: Callable[[StageContext, StageConfig], dict[str, Any] | None]  # returns the stage's summary for the report
    modifies_model: bool  # the pipeline saves the model when any stage that ran modifies it
    summary: str  # one line for `moecompress list`
    writes_output: bool = True  # False: the stage only reports (an output directory is optional)
    uses_text: bool = False  # reads calibration / evaluation windows (their length is checked up front)
    # What the stage needs and what it changes; `moecompress.stages.order` checks a recipe's order with these.
    needs_original: bool = False  # needs the original (unquantized, unpacked) weights
    changes: Literal["experts", "weights"] | None = None  # the expert set, or the weights' representation
    needs_profile: bool = False  # reads a profile (its `profile` key, or an earlier profile stage's)
    makes_profile: bool = False
    needs_patterns: bool = False  # reads a pattern store (its `store` key, or an earlier patterns stage's)
    makes_patterns: bool = False


STAGES: Registry[StageSpec] = Registry("stage")


def register_stage(config: type[StageConfig], *, modifies_model: bool, writes_output: bool = True,
                   uses_text: bool = False, needs_original: bool = False,
                   changes: Literal["experts", "weights"] | None = None, needs_profile: bool = False,
                   makes_profile: bool = False, needs_patterns: bool = False,
                   makes_patterns: bool = False) -> Callable:
    """Decorator for a stage's run function; the name is the default of the config's ``stage`` field."""
    name = config.model_fields["stage"].default

    def deco(fn: Callable) -> Callable:
        doc = (fn.__doc__ or config.__doc__ or name).strip().splitlines()[0]
        STAGES.add(name, StageSpec(name, config, fn, modifies_model, doc, writes_output, uses_text, needs_original,
                                   changes, needs_profile, makes_profile, needs_patterns, makes_patterns))
        return fn

    return deco
