"""Calibration and evaluation text per task."""

from moecompress.calib.data import (
    SPLITS,
    TaskData,
    bundled_tasks,
    data_root,
    parse_data_specs,
    read_documents,
    resolve_tasks,
    task_windows,
    token_windows,
)

__all__ = [
    "SPLITS",
    "TaskData",
    "bundled_tasks",
    "data_root",
    "parse_data_specs",
    "read_documents",
    "resolve_tasks",
    "task_windows",
    "token_windows",
]
