"""Pipeline stages. Importing this package registers every stage."""

from moecompress.stages import evaluate, keep_experts, profile, prune, quantize, ternary  # noqa: F401  (registers stages)
from moecompress.stages.base import STAGES, StageConfig, StageSpec, register_stage

__all__ = ["STAGES", "StageConfig", "StageSpec", "register_stage"]
