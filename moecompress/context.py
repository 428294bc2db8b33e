"""What stages share during one pipeline run: the model's source, its adapter, where to compute, calibration
text, where a changed model goes, and artifacts handed from stage to stage."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from moecompress.calib import heldout_windows, resolve_tasks, stream_digest, task_windows, window_starts
from moecompress.calib.data import token_stream
from moecompress.errors import MoecompressError
from moecompress.io.model import LoadedModel
from moecompress.progress import NullProgress, Progress
from moecompress.recipe import CalibrationConfig
from moecompress.runtime.dist import Dist
from moecompress.runtime.executor import LayerStream, ModelSource, Placement
from moecompress.runtime.sink import LayerSink

__all__ = ["Context"]


@dataclass
class Context:
    """``loaded``: the model to compress, as a `ModelSource` (a directory, streamed one layer at a time) or a
    `LoadedModel` held in memory (tests, the Python API: stages then change it in place)."""

    loaded: LoadedModel | ModelSource
    calibration: CalibrationConfig
    out_dir: Path | None  # the run's temporary output directory (renamed into place at the end), if any
    progress: Progress = field(default_factory=NullProgress)
    artifacts: dict[str, Any] = field(default_factory=dict)  # handed from stage to stage (profile -> prune, ...)
    placement: Placement = field(default_factory=Placement)
    write_to: Path | None = None  # where the next stage that changes the model writes it (None: in place)
    dist: Dist = field(default_factory=Dist)  # this process's share of the experts under torchrun
    _windows: dict[tuple, dict[str, torch.Tensor]] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.loaded, LoadedModel):
            lm = self.loaded
            self.source = ModelSource(lm.model.config, lm.arch, model=lm.model, tokenizer=lm.tokenizer,
                                      stored_dtype=lm.disk_dtype, label=lm.source, path=lm.path)
        else:
            self.source = self.loaded
        self.original = self.source  # the model the run started from (the baseline "original")

    # ------------------------------------------------------------------ the model
    @property
    def model(self):
        """The model itself, when it is held in memory (a streamed run has none: use `stream`)."""
        if self.source.model is None:
            raise RuntimeError("this run streams the model from disk: use ctx.stream()")
        return self.source.model

    @property
    def config(self):
        return self.source.config

    @property
    def arch(self):
        return self.source.arch

    @property
    def tokenizer(self):
        if self.source.tokenizer is None:
            raise MoecompressError(f"model {self.source.label!r} has no tokenizer",
                                   "save its tokenizer files into the model directory")
        return self.source.tokenizer

    def stream(self, batches: list[torch.Tensor], source: ModelSource | None = None, **kw: Any) -> LayerStream:
        """A layer stream of ``batches`` through the current model (or ``source``) on the run's device."""
        return LayerStream(source or self.source, batches, self.placement, **kw)

    def sink(self) -> LayerSink:
        """Where a stage that changes the model writes it (see `adopt`). Under torchrun only rank 0 writes."""
        return LayerSink(self.source, self.write_to, writer=self.dist.writer)

    def adopt(self, sink: LayerSink, config=None, tokenizer=None) -> None:
        """Finish ``sink`` and make what it wrote the model the next stages see (every rank reads what rank 0
        wrote, once it is complete)."""
        new = sink.close(config if config is not None else self.config, self.arch, tokenizer)
        self.dist.barrier()
        if getattr(sink, "reread_config", False):  # written by rank 0 (packed: its quantization_config)
            from transformers import AutoConfig

            new.config = AutoConfig.from_pretrained(new.directory, local_files_only=True)
        if new is not self.source:
            new.label = f"{self.original.label} (compressed in this run)"
        self.source = new

    # ------------------------------------------------------------------ text
    def windows(self, split: str = "calib", samples: int | None = None, seq_len: int | None = None,
                tasks: list[str] | None = None) -> dict[str, torch.Tensor]:
        """``{task: [N, S] token ids}`` for the recipe's calibration tasks (cached per arguments).

        ``samples`` windows per task (default: the recipe's); 0 means every window of the split.
        """
        c = self.calibration
        seq_len = seq_len or c.seq_len
        limit = getattr(self.config, "max_position_embeddings", None)
        if limit and seq_len > limit:
            raise MoecompressError(f"sequence length {seq_len} is above the model's limit of {limit} tokens",
                                   f"use --seq-len {limit} or less")
        key = (split, samples if samples is not None else c.samples, seq_len, tuple(tasks or c.tasks or ()))
        if key not in self._windows:
            data = {k: Path(v) for k, v in c.data.items()}
            chosen = resolve_tasks(tasks or c.tasks, data)
            self._windows[key] = task_windows(self.tokenizer, chosen, split, seq_len, key[1] or None, c.seed)
        return self._windows[key]

    def _texts(self, tasks: list[str] | None) -> dict[str, Any]:
        c = self.calibration
        chosen = resolve_tasks(tasks or c.tasks, {k: Path(v) for k, v in c.data.items()})
        return {t.task: t for t in chosen if not tasks or t.task in tasks}

    def window_record(self, split: str = "calib", samples: int | None = None, seq_len: int | None = None,
                      tasks: list[str] | None = None) -> dict[str, dict[str, Any]]:
        """Which tokens `windows` (same arguments) takes per task: ``{task: {"seq_len", "starts", "digest"}}``
        (token offsets in the task's token stream, and a hash of that stream), so that later runs can hold out
        the rest of the text."""
        c = self.calibration
        seq_len = seq_len or c.seq_len
        n = (samples if samples is not None else c.samples) or None
        out = {}
        for name, text in self._texts(tasks).items():
            ids = token_stream(self.tokenizer, text.documents(split))
            out[name] = {"split": split, "seq_len": seq_len, "starts": window_starts(len(ids), seq_len, n, c.seed),
                         "digest": stream_digest(ids)}
        return out

    def heldout(self, tasks: list[str], seq_len: int, samples: int,
                exclude: dict[str, list[tuple[int, int]]]) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
        """Up to ``samples`` windows per task of its CALIBRATION text (never the evaluation split) that overlap
        none of the token spans ``exclude[task]``; and their record (as `window_record` writes it)."""
        windows, record = {}, {}
        for name, text in self._texts(tasks).items():
            docs = text.documents("calib")
            label = f"the calib text of {name!r}" if text.path is None else f"{str(text.path)!r}"
            windows[name], starts = heldout_windows(self.tokenizer, docs, seq_len, samples, exclude.get(name, []),
                                                    self.calibration.seed + 1, label)
            record[name] = {"split": "calib", "seq_len": seq_len, "starts": starts,
                            "digest": stream_digest(token_stream(self.tokenizer, docs))}
        return windows, record
