"""Router-only distillation after expert pruning (after "Router KD", arXiv:2603.02217).

Before pruning, the model's next-token distributions on calibration windows are recorded (top-``k``
log-probabilities per position, so no second copy of the model is needed). After pruning, only the
routers' weights (and biases) are trained to minimise KL(original || pruned) restricted to those
top-``k`` tokens; experts, attention and embeddings stay frozen.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moecompress.models.base import MoEArch
from moecompress.progress import NullProgress, Progress

__all__ = ["Targets", "recalibrate_routers", "teacher_targets"]


@dataclass
class Targets:
    windows: torch.Tensor  # [N, S] token ids
    logp: torch.Tensor  # [N, S-1, k] teacher log-probabilities of its top-k tokens
    index: torch.Tensor  # [N, S-1, k] those tokens


@torch.no_grad()
def teacher_targets(model, windows: torch.Tensor, top: int = 64, batch_size: int = 8) -> Targets:
    logps, idxs = [], []
    for i in range(0, len(windows), batch_size):
        logits = model(input_ids=windows[i:i + batch_size]).logits[:, :-1].float()
        v, ix = logits.log_softmax(-1).topk(top, dim=-1)
        logps.append(v)
        idxs.append(ix)
    return Targets(windows, torch.cat(logps), torch.cat(idxs))


def _kl(model, targets: Targets, rows: torch.Tensor) -> torch.Tensor:
    x = targets.windows[rows]
    logq = model(input_ids=x).logits[:, :-1].float().log_softmax(-1).gather(-1, targets.index[rows])
    logp = targets.logp[rows]
    return (logp.exp() * (logp - logq)).sum(-1).mean()


def recalibrate_routers(model, arch: MoEArch, targets: Targets, steps: int = 100, lr: float = 1e-3,
                        batch_size: int = 8, seed: int = 0, progress: Progress | None = None) -> dict[str, float]:
    """Train the routers towards the recorded distributions; returns the KL before and after (held fixed
    evaluation batch: the first ``batch_size`` windows)."""
    progress = progress or NullProgress()
    params = []
    for view in arch.moe_blocks(model):
        for t in (view.router_weight, view.router_bias):
            if t is not None:
                params.append(t)
    frozen = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in frozen:
        p.requires_grad_(False)
    dtypes = [p.dtype for p in params]
    for p in params:
        p.data = p.data.float()
        p.requires_grad_(True)
    probe = torch.arange(min(batch_size, len(targets.windows)))
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(params, lr=lr)
    try:
        with torch.no_grad():
            before = float(_kl(model, targets, probe))
        with progress.task("recalibrating routers", total=steps) as bar:
            for _ in range(steps):
                rows = torch.randint(0, len(targets.windows), (batch_size,), generator=g)
                loss = _kl(model, targets, rows)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                bar.advance(1, rate=f"KL {float(loss.detach()):.4f}")
        with torch.no_grad():
            after = float(_kl(model, targets, probe))
    finally:
        for p, dt in zip(params, dtypes):
            p.data = p.data.to(dt)
        for p, flag in frozen:
            p.requires_grad_(flag)
    return {"kl_before": before, "kl_after": after}
