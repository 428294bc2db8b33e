"""Perplexity on fixed token windows: every window is scored independently (no cross-window context)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moecompress.progress import NullProgress, Progress

__all__ = ["WindowScores", "score_windows"]


@dataclass
class WindowScores:
    """Per-window mean next-token NLL (nats) and token counts; ``ppl`` pools tokens over windows."""

    nll: torch.Tensor  # [N] mean NLL per window
    tokens: int  # predicted tokens per window

    @property
    def mean_nll(self) -> float:
        return float(self.nll.mean())

    @property
    def ppl(self) -> float:
        return float(torch.exp(self.nll.mean()))


@torch.no_grad()
def score_windows(model, windows: torch.Tensor, batch_size: int = 8, progress: Progress | None = None,
                  label: str = "perplexity") -> WindowScores:
    """Mean NLL of tokens 2..S of each window ``[N, S]`` given the tokens before it (same window)."""
    progress = progress or NullProgress()
    out = []
    with progress.task(label, total=len(windows)) as bar:
        for i in range(0, len(windows), batch_size):
            x = windows[i:i + batch_size]
            logits = model(input_ids=x).logits[:, :-1].float()  # [B, S-1, V]
            nll = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="none").view(len(x), -1)
            out.append(nll.mean(dim=1))
            bar.advance(len(x))
    return WindowScores(torch.cat(out), windows.shape[1] - 1)
