"""Pipeline stages. Importing this package registers every stage."""

from moecompress.stages import (evaluate, keep_experts, patterns, profile, prune, quantize,  # noqa: F401  (registers)
                               retrieve, ternary)
from moecompress.stages.base import STAGES, StageConfig, StageSpec, register_stage

__all__ = ["STAGES", "StageConfig", "StageSpec", "register_stage"]
