"""The activation store: a model's activations captured to disk once, read back many times.

`layout` defines the files (sharded safetensors plus a manifest), `writer` writes them in
capture order with resumable shard boundaries, `reader` (`ActivationStore`) gives shards,
metadata and batches in capture or shuffled order, and a torch IterableDataset. The store
depends on `models/` and `data/` only; `vlmscope capture` (training/capture.py) fills it from
a model, and training reads it through a source (training/store_source.py).
"""

from __future__ import annotations

from vlmscope.capture.layout import (
    DTYPES,
    MANIFEST,
    META,
    MODALITIES,
    StoreError,
    bytes_per_token,
    config_sha256,
    read_manifest,
    recipe_bytes_per_token,
    shard_name,
)
from vlmscope.capture.reader import ActivationStore, Shard, StoreBatch, StoreDataset
from vlmscope.capture.writer import StoreWriter, build_manifest, token_metadata, write_manifest

__all__ = [
    "DTYPES",
    "MANIFEST",
    "META",
    "MODALITIES",
    "ActivationStore",
    "Shard",
    "StoreBatch",
    "StoreDataset",
    "StoreError",
    "StoreWriter",
    "build_manifest",
    "bytes_per_token",
    "config_sha256",
    "read_manifest",
    "recipe_bytes_per_token",
    "shard_name",
    "token_metadata",
    "write_manifest",
]
