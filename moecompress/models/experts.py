"""Expert views: one 2-D per-expert API over every expert storage.

Algorithms only see ``[O, C]`` matrices per expert (``weight(e, proj)``) or ``[E, O, C]`` stacks
(``stacked(proj)``), in nn.Linear's convention, whatever the storage:

* `FusedExperts`: transformers 5 fused 3-D parameters ``gate_up_proj [E, 2I, H]`` (gate rows, then up
  rows) and ``down_proj [E, H, I]``; with ``transposed=True, interleaved=True, has_bias=True`` the gpt-oss
  layout ``gate_up_proj [E, H, 2I]`` (gate/up interleaved by column), ``down_proj [E, I, H]`` and biases.
* `ListExperts`: a ModuleList of MLP modules with three nn.Linear children (older checkpoints, remote
  code, and shared experts, which are viewed as a list of one).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from moecompress.algorithms.moe_math import ExpertWeights
from moecompress.types import Proj

__all__ = ["ExpertView", "FusedExperts", "ListExperts"]


class ExpertView:
    """Common interface. Subclasses implement `_get`, `_set`, `bias`, `bias_tensors` and `keep`."""

    module: nn.Module

    @property
    def num_experts(self) -> int:
        raise NotImplementedError

    def stacked(self, proj: Proj) -> torch.Tensor:
        """``[E, O, C]`` (a copy when the storage is transposed; treat as read-only)."""
        raise NotImplementedError

    def set_stacked(self, proj: Proj, w: torch.Tensor, start: int = 0) -> None:
        """Write ``w [E', O, C]`` back into the storage of experts ``start .. start + E' - 1`` (in place, keeping
        dtype and device)."""
        raise NotImplementedError

    def bias(self, proj: Proj) -> torch.Tensor | None:
        """``[E, O]`` or None."""
        raise NotImplementedError

    def bias_tensors(self) -> list[torch.Tensor]:
        """Every bias tensor of the storage (for tests that randomise them)."""
        raise NotImplementedError

    def keep(self, ids: Sequence[int]) -> None:
        """Keep only experts ``ids`` (in that order), renumbered 0..len(ids)-1."""
        raise NotImplementedError

    def weight(self, e: int, proj: Proj) -> torch.Tensor:
        """``[O, C]`` of expert ``e``."""
        return self.stacked(proj)[e]

    def weights(self) -> ExpertWeights:
        return ExpertWeights(
            self.stacked(Proj.GATE), self.stacked(Proj.UP), self.stacked(Proj.DOWN),
            self.bias(Proj.GATE), self.bias(Proj.UP), self.bias(Proj.DOWN),
        )

    @property
    def dtype(self) -> torch.dtype:
        return next(self.module.parameters()).dtype

    def numel(self) -> int:
        return sum(p.numel() for p in self.module.parameters())


def _replace(module: nn.Module, name: str, data: torch.Tensor) -> None:
    old = getattr(module, name)
    setattr(module, name, nn.Parameter(data.contiguous(), requires_grad=old.requires_grad))


class FusedExperts(ExpertView):
    GATE_UP, DOWN = "gate_up_proj", "down_proj"

    def __init__(self, module: nn.Module, transposed: bool = False, interleaved: bool = False) -> None:
        self.module, self.transposed, self.interleaved = module, transposed, interleaved
        self.has_bias = hasattr(module, self.GATE_UP + "_bias")

    @property
    def num_experts(self) -> int:
        return getattr(self.module, self.GATE_UP).shape[0]

    def _gate_up_cols(self, proj: Proj, width: int) -> slice:
        """Where gate / up live along the fused 2I axis."""
        if self.interleaved:
            return slice(0, None, 2) if proj == Proj.GATE else slice(1, None, 2)
        half = width // 2
        return slice(0, half) if proj == Proj.GATE else slice(half, None)

    def stacked(self, proj: Proj) -> torch.Tensor:
        proj = Proj(proj)
        if proj == Proj.DOWN:
            w = getattr(self.module, self.DOWN)
            return w.transpose(1, 2) if self.transposed else w  # [E, H, I]
        w = getattr(self.module, self.GATE_UP)
        if self.transposed:  # [E, H, 2I]
            return w[:, :, self._gate_up_cols(proj, w.shape[2])].transpose(1, 2)  # [E, I, H]
        return w[:, self._gate_up_cols(proj, w.shape[1])]  # [E, I, H]

    @torch.no_grad()
    def set_stacked(self, proj: Proj, w: torch.Tensor, start: int = 0) -> None:
        proj = Proj(proj)
        rows = slice(start, start + w.shape[0])
        if proj == Proj.DOWN:
            p = getattr(self.module, self.DOWN)[rows]
            p.copy_(w.transpose(1, 2) if self.transposed else w)
            return
        p = getattr(self.module, self.GATE_UP)[rows]
        if self.transposed:
            p[:, :, self._gate_up_cols(proj, p.shape[2])] = w.transpose(1, 2).to(p.dtype)
        else:
            p[:, self._gate_up_cols(proj, p.shape[1])] = w.to(p.dtype)

    def bias(self, proj: Proj) -> torch.Tensor | None:
        proj = Proj(proj)
        if not self.has_bias:
            return None
        if proj == Proj.DOWN:
            return getattr(self.module, self.DOWN + "_bias")  # [E, H]
        b = getattr(self.module, self.GATE_UP + "_bias")  # [E, 2I]
        return b[:, self._gate_up_cols(proj, b.shape[1])]

    def bias_tensors(self) -> list[torch.Tensor]:
        if not self.has_bias:
            return []
        return [getattr(self.module, self.GATE_UP + "_bias"), getattr(self.module, self.DOWN + "_bias")]

    @torch.no_grad()
    def keep(self, ids: Sequence[int]) -> None:
        ids = list(ids)
        names = [self.GATE_UP, self.DOWN] + ([self.GATE_UP + "_bias", self.DOWN + "_bias"] if self.has_bias else [])
        for name in names:
            t = getattr(self.module, name).data
            _replace(self.module, name, t.index_select(0, torch.as_tensor(ids, dtype=torch.long, device=t.device)))
        if hasattr(self.module, "num_experts"):
            self.module.num_experts = len(ids)


class ListExperts(ExpertView):
    """A ModuleList (or a single module, as a list of one) of MLPs with gate/up/down nn.Linear children."""

    def __init__(self, module: nn.Module, names: dict[Proj, str] | None = None) -> None:
        self.module = module
        self.names = names or {Proj.GATE: "gate_proj", Proj.UP: "up_proj", Proj.DOWN: "down_proj"}

    @property
    def mlps(self) -> list[nn.Module]:
        return list(self.module) if isinstance(self.module, nn.ModuleList) else [self.module]

    @property
    def num_experts(self) -> int:
        return len(self.mlps)

    def _linear(self, e: int, proj: Proj) -> nn.Linear:
        return getattr(self.mlps[e], self.names[Proj(proj)])

    def weight(self, e: int, proj: Proj) -> torch.Tensor:
        return self._linear(e, proj).weight

    def stacked(self, proj: Proj) -> torch.Tensor:
        return torch.stack([self._linear(e, proj).weight for e in range(self.num_experts)])

    @torch.no_grad()
    def set_stacked(self, proj: Proj, w: torch.Tensor, start: int = 0) -> None:
        for e in range(w.shape[0]):
            self._linear(start + e, proj).weight.copy_(w[e])

    def bias(self, proj: Proj) -> torch.Tensor | None:
        if self._linear(0, proj).bias is None:
            return None
        return torch.stack([self._linear(e, proj).bias for e in range(self.num_experts)])

    def bias_tensors(self) -> list[torch.Tensor]:
        return [lin.bias for e in range(self.num_experts) for p in Proj
                if (lin := self._linear(e, p)).bias is not None]

    def keep(self, ids: Sequence[int]) -> None:
        if not isinstance(self.module, nn.ModuleList):
            raise TypeError("a single MLP cannot be pruned")
        kept = [self.module[i] for i in ids]
        for i in range(len(self.module) - 1, -1, -1):
            del self.module[i]
        for m in kept:
            self.module.append(m)
