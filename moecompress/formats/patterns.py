"""The TAER pattern store: one routing pattern per task (PreMoe's task-adaptive expert retrieval).

A store is a directory with ``patterns.json``::

    {"format": "moecompress-patterns", "version": 1,
     "model": identity, "source_model": path,
     "signature": {"feature": "mean router logits", "layers": [0, 1], "distance": "cosine"},
     "threshold": {task: float},  # farther than this from the nearest pattern -> the generalist pattern
     "score": "tcess", "super_experts": [[layer, expert], ...],
     "patterns": {task: {"signature": [m * E floats], "ranking": [[expert ids, best first] per MoE layer],
                         "tokens": int}},
     "generalist": {"ranking": [...], "tasks": [...]}}

Unlike PreMoe's store (a first-layer key and a permutation per later layer) it keeps a multi-layer
signature and every layer's ranking explicitly; it is small (a few KB for the demo model).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moecompress.errors import MoecompressError

__all__ = ["PATTERNS_VERSION", "PatternStore"]

PATTERNS_VERSION = 1
_FORMAT = "moecompress-patterns"


@dataclass
class PatternStore:
    model: dict[str, Any]
    source_model: str | None
    signature_layers: list[int]
    threshold: dict[str, float]
    score: str
    super_experts: list[list[int]]
    patterns: dict[str, dict[str, Any]]
    generalist: dict[str, Any]
    calibration: dict[str, Any]

    def save(self, directory: Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "patterns.json").write_text(json.dumps({
            "format": _FORMAT, "version": PATTERNS_VERSION, "model": self.model, "source_model": self.source_model,
            "signature": {"feature": "mean router logits", "layers": self.signature_layers, "distance": "cosine"},
            "threshold": self.threshold, "score": self.score, "super_experts": self.super_experts,
            "patterns": self.patterns, "generalist": self.generalist, "calibration": self.calibration,
        }, indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> PatternStore:
        path = Path(path)
        f = path if path.name == "patterns.json" else path / "patterns.json"
        if not f.is_file():
            raise MoecompressError(f"no pattern store at {str(path)!r}", "create one with `moecompress patterns`")
        try:
            d = json.loads(f.read_text())
            if d.get("format") != _FORMAT or d.get("version") != PATTERNS_VERSION:
                raise ValueError("format")
            return cls(d["model"], d.get("source_model"), d["signature"]["layers"],
                       {t: float(v) for t, v in d["threshold"].items()},
                       d["score"], d["super_experts"], d["patterns"], d["generalist"], d.get("calibration", {}))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            raise MoecompressError(f"{str(f)!r} is not a version-{PATTERNS_VERSION} moecompress pattern store",
                                   "create it again with `moecompress patterns`") from None
