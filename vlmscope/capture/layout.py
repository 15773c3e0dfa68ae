"""The activation store's files: names, manifest, checksums, and sizes per token.

A store is one folder:

    manifest.json                          what the folder holds (written last, atomically)
    shard-r0000-000000.safetensors         tokens 0 .. T-1 written by rank 0
    shard-r0000-000001.safetensors         tokens T .. 2T-1, ...

Every shard is a plain safetensors file. Each hook point it holds is one `[tokens, width]`
tensor named after the hook (`lm.blocks.3.hook_resid_mid`), stored once whatever reads it: a
CLT over L layers needs L resid_mid inputs and L MLP outputs, not L x n_targets copies. Next to
them, per-token metadata tensors (`meta.*`, see `META`) say where each token came from. The
manifest names the model, the data, the hooks, the dtype, the token counts and each shard's
size and SHA-256; a folder without a manifest is not a store, and a shard whose bytes do not
hash to the manifest's value is refused by name.

Shard names carry the writing rank, so several processes can write one store without clashing
(each keeps its own cursor under `writers` in the manifest, merged into one file).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

FORMAT = "vlmscope-activation-store"
VERSION = 1
MANIFEST = "manifest.json"

#: Per-token metadata tensors: name -> (dtype, trailing shape, meaning).
META: dict[str, tuple[torch.dtype, tuple[int, ...], str]] = {
    "meta.sample": (torch.int64, (), "sample index in the writing rank's capture order"),
    "meta.row": (torch.int64, (), "the sample's row in the dataset (bad rows counted)"),
    "meta.position": (torch.int32, (), "token position within the sample (padding excluded)"),
    "meta.token_id": (torch.int32, (), "input token id (an image placeholder for image tokens)"),
    "meta.modality": (torch.uint8, (), "0 text, 1 image, 2 special (BOS, chat-template marker)"),
    "meta.patch": (torch.int32, (4,), "image, view, row, col of an image token; -1 elsewhere"),
}
MODALITIES = ("text", "image", "special")
TEXT, IMAGE, SPECIAL = 0, 1, 2

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class StoreError(ValueError):
    """A folder that is not a usable store, or a shard that fails its checks; names the file."""


def shard_name(rank: int, index: int) -> str:
    """File name of shard `index` written by `rank` (ranks never clash)."""
    return f"shard-r{rank:04d}-{index:06d}.safetensors"


def dtype_name(dtype: torch.dtype) -> str:
    return next(k for k, v in DTYPES.items() if v == dtype)


def meta_bytes_per_token() -> int:
    """Disk bytes of the `meta.*` tensors per token."""
    total = 0
    for dtype, shape, _ in META.values():
        n = 1
        for s in shape:
            n *= s
        total += n * torch.empty((), dtype=dtype).element_size()
    return total


def bytes_per_token(widths: Mapping[str, int], dtype: torch.dtype) -> int:
    """Disk bytes per token of a shard holding these hooks (activations plus metadata)."""
    size = torch.empty((), dtype=dtype).element_size()
    return sum(widths.values()) * size + meta_bytes_per_token()


def recipe_bytes_per_token(n_layers: int, d_model: int, dtype: torch.dtype, window: int) -> int:
    """Bytes per token of the per-layer recipe layout (one file per layer and batch: x = the
    residual stream, y = the MLP outputs of the next `window` layers stacked), for the same
    layers: layer l stores 1 + min(window, n_layers - l) vectors of d_model."""
    size = torch.empty((), dtype=dtype).element_size()
    vectors = sum(1 + min(window, n_layers - layer) for layer in range(n_layers))
    return vectors * d_model * size


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


#: config keys that say how a model was loaded, not which model it is.
_VOLATILE_CONFIG_KEYS = {"transformers_version", "dtype", "torch_dtype", "use_cache"}


def config_sha256(config: Mapping[str, Any]) -> str:
    """Hash of a model config (`config.to_dict()`) without load-time keys, so the same model
    hashes the same whether it was loaded in float32 or bfloat16, from a path or the hub."""

    def clean(v: Any) -> Any:
        if isinstance(v, Mapping):
            return {
                k: clean(x)
                for k, x in v.items()
                if not str(k).startswith("_") and k not in _VOLATILE_CONFIG_KEYS
            }
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        return v

    text = json.dumps(clean(config), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def read_manifest(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """The manifest of a store folder, or a StoreError that says what the folder is instead."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not folder.is_dir():
        raise StoreError(f"activation store {folder} does not exist")
    if not path.is_file():
        shards = sorted(folder.glob("shard-*.safetensors"))
        extra = (
            f" ({len(shards)} shard files but no manifest: a capture that never wrote one)"
            if shards
            else ""
        )
        raise StoreError(
            f"{folder} is not an activation store: it has no {MANIFEST}{extra}; write one "
            "with `vlmscope capture MODEL DATASET --out DIR`"
        )
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise StoreError(f"cannot read {path}: {e}") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise StoreError(f"{path} is not a vlmscope activation-store manifest")
    if manifest.get("version", 0) > VERSION:
        raise StoreError(
            f"{path} has store format version {manifest['version']}; this vlmscope reads "
            f"version {VERSION}: upgrade vlmscope"
        )
    return manifest


def selected_modalities(tokens: str, include_special: bool) -> set[int]:
    """The modality codes `--tokens` / `--include-special-tokens` select, as TokenMasks.select
    does: image tokens alone, or text (and special) tokens, or both."""
    if tokens == "image":
        return {IMAGE}
    base = {TEXT, SPECIAL} if include_special else {TEXT}
    if tokens == "text":
        return base
    if tokens == "all":
        return base | {IMAGE}
    raise ValueError(f"tokens must be 'all', 'image' or 'text', not {tokens!r}")
