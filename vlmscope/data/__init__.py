"""Data layer: dataset readers that yield normalised Records, and the synthetic shapes world.

`open_dataset` reads Parquet, JSON/JSONL, `datasets` save_to_disk folders and (with the
optional `datasets` package) hub names; `vlmscope.data.shapes` generates the shapes world.
"""

from __future__ import annotations

from vlmscope.data.sources import (
    DEFAULT_MAX_IMAGE_PIXELS,
    REASONS,
    BadRecord,
    BadRecordError,
    BadRecordStats,
    ColumnMap,
    Dataset,
    Reason,
    Record,
    detect_schema,
    open_dataset,
)

__all__ = [
    "DEFAULT_MAX_IMAGE_PIXELS",
    "REASONS",
    "BadRecord",
    "BadRecordError",
    "BadRecordStats",
    "ColumnMap",
    "Dataset",
    "Reason",
    "Record",
    "detect_schema",
    "open_dataset",
]
