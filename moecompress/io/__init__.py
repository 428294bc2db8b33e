"""Reading and checking model directories on disk (safetensors shards, their index, config and sidecar)."""

from moecompress.io.validate import check_finite, check_weight_files

__all__ = ["check_finite", "check_weight_files"]
