"""Small types shared by every layer, and the shape legend.

Shape legend (used in comments and docstrings everywhere):
    T tokens, H hidden size, I expert width (intermediate size), E routed experts, K top-k,
    O / C rows / columns of a weight matrix ([O, C] = nn.Linear's [out, in]), G quantization groups,
    L decoder layers, B batch, S sequence length.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Literal

__all__ = ["Activation", "Proj", "Routing"]


class Proj(str, Enum):
    """The three projections of a gated expert MLP: y = down(act(gate(x)) * up(x))."""

    GATE = "gate"  # [I, H]
    UP = "up"  # [I, H]
    DOWN = "down"  # [H, I]



@dataclass(frozen=True)
class Activation:
    """How an expert combines its gate and up projections.

    ``glu``: ``act(gate) * up`` with ``act`` a transformers ACT2FN name (silu for every family but gpt-oss).
    ``clamped_swiglu`` (gpt-oss): ``g = min(gate, limit)``, ``u = clamp(up, -limit, limit)``,
    ``(u + 1) * g * sigmoid(alpha * g)``.
    """

    kind: Literal["glu", "clamped_swiglu"] = "glu"
    fn: str = "silu"
    alpha: float = 1.702
    limit: float = 7.0


@dataclass(frozen=True)
class Routing:
    """One layer's routing rule, with the config values resolved. ``algorithms.routing.route`` applies it.

    score:
      * ``softmax``: p = softmax(logits); choose top-k of p (+ correction bias if any); weights = p.
      * ``sigmoid``: s = sigmoid(logits); choose top-k of s + correction bias; weights = s (DeepSeek-V3).
      * ``topk_softmax``: choose top-k of the logits; weights = softmax over those K logits (gpt-oss, Granite).
      * ``sparsemixer``: PhiMoE's masked top-2 (``jitter_eps`` is the masking threshold, also in eval).
    group_score: group-limited routing over ``n_group`` contiguous groups, keeping ``topk_group`` groups:
      ``max`` (DeepSeek-V2: best expert per group; other groups' scores set to 0) or ``top2_sum``
      (DeepSeek-V3: sum of the two best per group; other groups set to -inf).
    renormalize: divide the K weights by their sum (+ ``renorm_eps``; or by ``max(sum, renorm_min)``).
    scaling: multiply the final weights (``routed_scaling_factor``).
    fp32: the family computes router logits in float32 whatever the model dtype.
    """

    score: Literal["softmax", "sigmoid", "topk_softmax", "sparsemixer"]
    top_k: int
    renormalize: bool = False
    renorm_eps: float = 0.0
    renorm_min: float | None = None
    scaling: float = 1.0
    group_score: Literal["max", "top2_sum"] | None = None
    n_group: int = 1
    topk_group: int = 1
    jitter_eps: float = 0.0
    fp32: bool = False
