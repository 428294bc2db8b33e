"""The profile file: per task, per MoE layer, per expert routing statistics (see algorithms/expert_scores).

A profile is a directory (or the path of its ``profile.json``) holding:

* ``profile.safetensors``: float64 tensors ``"<task>/<stat>"`` of shape ``[L, E]`` (L = MoE layers in
  order, E = routed experts) for every stat in ``STATS``, and ``"<task>/tokens"`` ``[L]``;
* ``profile.json``: ``{"format": "moecompress-profile", "version": 1, "model": identity, "tasks": {...},
  "settings": {...}, "summary": {...}}``.

Statistics are sums, so profiles of the same model can be merged and any score or budget derived later.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from moecompress.algorithms.expert_scores import STATS, expert_scores
from moecompress.errors import MoecompressError

__all__ = ["PROFILE_VERSION", "Profile"]

PROFILE_VERSION = 1
_FORMAT = "moecompress-profile"


@dataclass
class Profile:
    model: dict[str, Any]  # identity (models.identity.model_identity)
    stats: dict[str, dict[str, torch.Tensor]]  # task -> stat -> [L, E]
    tokens: dict[str, int]  # task -> tokens profiled
    settings: dict[str, Any] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None

    @property
    def tasks(self) -> list[str]:
        return list(self.stats)

    def combined(self, tasks: list[str] | None = None) -> tuple[dict[str, torch.Tensor], int]:
        """Statistics summed over ``tasks`` (default all) and the token count: an all-task profile."""
        tasks = tasks or self.tasks
        for t in tasks:
            if t not in self.stats:
                raise MoecompressError(f"task {t!r} is not in the profile",
                                       f"the profile has {', '.join(self.tasks)}; profile that task first")
        out = {}
        for s in STATS:
            stack = torch.stack([self.stats[t][s] for t in tasks])
            out[s] = stack.amax(0) if s.endswith("_max") else stack.sum(0)
        return out, sum(self.tokens[t] for t in tasks)

    def scores(self, score: str, tasks: list[str] | None = None, seed: int = 0) -> torch.Tensor:
        stats, tokens = self.combined(tasks)
        return expert_scores(stats, tokens, score, seed)

    def save(self, directory: Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {f"{t}/{s}": v.contiguous() for t, d in self.stats.items() for s, v in d.items()}
        save_file(tensors, str(directory / "profile.safetensors"), metadata={"format": _FORMAT})
        meta = {"format": _FORMAT, "version": PROFILE_VERSION, "model": self.model, "tokens": self.tokens,
                "tasks": self.tasks, "stats": list(STATS), "settings": self.settings, "summary": self.summary}
        (directory / "profile.json").write_text(json.dumps(meta, indent=1) + "\n")

    @staticmethod
    def _paths(path: str | Path) -> tuple[Path, Path, Path]:
        path = Path(path)
        directory = path.parent if path.name == "profile.json" else path
        meta_path, tensor_path = directory / "profile.json", directory / "profile.safetensors"
        if not meta_path.is_file() or not tensor_path.is_file():
            raise MoecompressError(f"no profile at {str(path)!r} (profile.json and profile.safetensors)",
                                   "create one with `moecompress profile MODEL -o DIR`")
        return directory, meta_path, tensor_path

    @classmethod
    def peek(cls, path: str | Path) -> dict[str, Any]:
        """The checked header (``profile.json``) of a profile, without reading its tensors."""
        directory, meta_path, _ = cls._paths(path)
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, OSError, UnicodeDecodeError) as e:
            raise MoecompressError(f"the profile header {str(meta_path)!r} is corrupt ({e.__class__.__name__})",
                                   "profile the model again") from None
        if not isinstance(meta, dict) or meta.get("format") != _FORMAT or meta.get("version") != PROFILE_VERSION:
            raise MoecompressError(f"{str(directory)!r} is not a version-{PROFILE_VERSION} moecompress profile",
                                   "profile the model again with this moecompress")
        ok = (isinstance(meta.get("tasks"), list) and all(isinstance(t, str) for t in meta["tasks"])
              and isinstance(meta.get("model"), dict) and isinstance(meta.get("tokens"), dict)
              and all(isinstance(meta["tokens"].get(t), int) for t in meta["tasks"]))
        if not ok:
            raise MoecompressError(f"the profile header {str(meta_path)!r} lacks its tasks, model or token counts",
                                   "profile the model again")
        return meta

    @classmethod
    def load(cls, path: str | Path) -> Profile:
        directory, _, tensor_path = cls._paths(path)
        meta = cls.peek(directory)
        try:
            tensors = load_file(str(tensor_path))
        except (SafetensorError, OSError, ValueError) as e:
            raise MoecompressError(f"the profile statistics {str(tensor_path)!r} are corrupt ({e.__class__.__name__})",
                                   "profile the model again") from None
        stats: dict[str, dict[str, torch.Tensor]] = {}
        shape = (len(meta["model"].get("moe_layers", [])), meta["model"].get("num_experts"))
        for t in meta["tasks"]:
            try:
                stats[t] = {s: tensors[f"{t}/{s}"] for s in STATS}
            except KeyError as e:
                raise MoecompressError(f"profile {str(directory)!r} lacks tensor {e.args[0]!r}",
                                       "profile the model again") from None
            for s, v in stats[t].items():
                if tuple(v.shape) != shape:
                    raise MoecompressError(f"profile tensor {t}/{s} in {str(directory)!r} has shape {list(v.shape)}, "
                                           f"not [{shape[0]}, {shape[1]}] (MoE layers x experts)",
                                           "profile the model again")
                if not bool(torch.isfinite(v).all()):
                    raise MoecompressError(f"profile tensor {t}/{s} in {str(directory)!r} holds NaN or infinite "
                                           "values", "profile the model again (and check the model's weights)")
        return cls(meta["model"], stats, {k: int(v) for k, v in meta["tokens"].items()}, meta.get("settings", {}),
                   meta.get("summary", {}), directory)
