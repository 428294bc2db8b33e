"""What stages share during one pipeline run: the model, its adapter, calibration text, artifacts."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from moecompress.calib import resolve_tasks, task_windows
from moecompress.errors import MoecompressError
from moecompress.progress import NullProgress, Progress
from moecompress.recipe import CalibrationConfig
from moecompress.runtime.modelio import LoadedModel

__all__ = ["Context"]


@dataclass
class Context:
    loaded: LoadedModel
    calibration: CalibrationConfig
    out_dir: Path | None  # the run's temporary output directory (renamed into place at the end), if any
    progress: Progress = field(default_factory=NullProgress)
    artifacts: dict[str, Any] = field(default_factory=dict)  # handed from stage to stage (profile -> prune, ...)
    _windows: dict[tuple, dict[str, torch.Tensor]] = field(default_factory=dict, repr=False)

    @property
    def model(self):
        return self.loaded.model

    @property
    def arch(self):
        return self.loaded.arch

    @property
    def tokenizer(self):
        if self.loaded.tokenizer is None:
            raise MoecompressError(f"model {self.loaded.source!r} has no tokenizer",
                                   "save its tokenizer files into the model directory")
        return self.loaded.tokenizer

    def windows(self, split: str = "calib", samples: int | None = None, seq_len: int | None = None,
                tasks: list[str] | None = None) -> dict[str, torch.Tensor]:
        """``{task: [N, S] token ids}`` for the recipe's calibration tasks (cached per arguments).

        ``samples`` windows per task (default: the recipe's); 0 means every window of the split.
        """
        c = self.calibration
        seq_len = seq_len or c.seq_len
        limit = getattr(self.model.config, "max_position_embeddings", None)
        if limit and seq_len > limit:
            raise MoecompressError(f"sequence length {seq_len} is above the model's limit of {limit} tokens",
                                   f"use --seq-len {limit} or less")
        key = (split, samples if samples is not None else c.samples, seq_len, tuple(tasks or c.tasks or ()))
        if key not in self._windows:
            data = {k: Path(v) for k, v in c.data.items()}
            chosen = resolve_tasks(tasks or c.tasks, data)
            self._windows[key] = task_windows(self.tokenizer, chosen, split, seq_len, key[1] or None, c.seed)
        return self._windows[key]
