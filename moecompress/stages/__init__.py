"""Pipeline stages. Importing this package registers every stage."""

from moecompress.stages import keep_experts  # noqa: F401  (registers the stage)
from moecompress.stages.base import STAGES, StageConfig, StageSpec, register_stage

__all__ = ["STAGES", "StageConfig", "StageSpec", "register_stage"]
