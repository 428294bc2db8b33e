"""Calibration and evaluation text per task."""

from moecompress.calib.data import (
    SPLITS,
    TaskData,
    bundled_tasks,
    data_root,
    heldout_windows,
    parse_data_specs,
    read_documents,
    resolve_tasks,
    stream_digest,
    task_windows,
    token_windows,
    window_starts,
)

__all__ = [
    "SPLITS",
    "TaskData",
    "bundled_tasks",
    "data_root",
    "heldout_windows",
    "parse_data_specs",
    "read_documents",
    "resolve_tasks",
    "stream_digest",
    "task_windows",
    "token_windows",
    "window_starts",
]
