"""Writing an activation store: tokens in capture order, cut into fixed-size shards.

The writer receives one batch at a time: every hook's activations at the batch's selected
tokens (row-major over sample and position, as `HookedVLM.run_with_cache` returns them) and
their `meta.*` tensors (`token_metadata`). It cuts the token stream into shards of exactly
`shard_tokens` tokens (the last may be shorter), so the shard boundaries depend on the stream
alone and a resumed capture writes the same files as an uninterrupted one.

Resuming. A shard boundary usually falls inside a batch. Each batch comes with the *cursor*
that regenerates it (the dataset row it starts from, its first sample's index, the stream
index of its first token, the skip counts so far). After shard k is written, the writer
records the cursor of the batch holding the next unwritten token and `drop`, how many of that
batch's tokens are already in shards. A resumed capture restarts the data at that cursor,
runs the batch again and drops its first `drop` tokens: the stream continues exactly at shard
k + 1's first token.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from vlmscope.capture.layout import (
    FORMAT,
    IMAGE,
    META,
    MODALITIES,
    SPECIAL,
    TEXT,
    VERSION,
    StoreError,
    sha256_file,
    shard_name,
)
from vlmscope.files import write_atomically, write_text_atomically
from vlmscope.models.masks import TokenMasks


def token_metadata(
    masks: TokenMasks, positions: torch.Tensor, first_sample: int, rows: Sequence[int]
) -> dict[str, torch.Tensor]:
    """`meta.*` tensors of the tokens `positions` ([batch, seq] bool) selects, in the order a
    masked activation cache lists them. `rows`: each sample's dataset row."""
    pos = positions.cpu().bool()
    b, s = pos.nonzero(as_tuple=True)
    modality = torch.full(pos.shape, TEXT, dtype=torch.uint8)
    modality[masks.special.cpu()] = SPECIAL
    modality[masks.image.cpu()] = IMAGE
    # Position within the sample's own tokens, so left padding does not shift it.
    within = masks.valid.cpu().long().cumsum(1) - 1
    return {
        "meta.sample": (first_sample + b).to(torch.int64),
        "meta.row": torch.tensor(list(rows), dtype=torch.int64)[b],
        "meta.position": within[b, s].to(torch.int32),
        "meta.token_id": masks.input_ids.cpu()[b, s].to(torch.int32),
        "meta.modality": modality[b, s],
        "meta.patch": masks.patch_map.cpu()[b, s].to(torch.int32),
    }


class StoreWriter:
    """Appends batches of captured tokens and writes them as shards of `shard_tokens` tokens.

    `shards` / `drop` continue an earlier capture of the same rank (from its manifest entry);
    `on_shard(writer)` runs after each shard is on disk (the caller rewrites the manifest).
    """

    def __init__(
        self,
        folder: str | Path,
        hooks: Mapping[str, int],
        dtype: torch.dtype,
        shard_tokens: int,
        *,
        rank: int = 0,
        shards: Sequence[Mapping[str, Any]] = (),
        drop: int = 0,
        on_shard: Callable[[StoreWriter], None] | None = None,
    ) -> None:
        if shard_tokens < 1:
            raise ValueError(f"shard_tokens must be >= 1, got {shard_tokens}")
        self.folder = Path(folder)
        self.hooks = dict(hooks)
        self.dtype = dtype
        self.shard_tokens = shard_tokens
        self.rank = rank
        self.shards: list[dict[str, Any]] = [dict(s) for s in shards]
        self.on_shard = on_shard
        #: cursor (plus `drop`) that regenerates the stream from the first unwritten token.
        self.resume: dict[str, Any] | None = None
        self._drop = drop
        self._parts: list[dict[str, torch.Tensor]] = []
        self._buffered = 0
        self._old = 0  # buffered tokens that came before the current batch
        self._batch_cursor: dict[str, Any] = {}
        self._batch_done = 0  # tokens of the current batch already in shards (or dropped)
        self._samples: dict[int, tuple[int, str]] = {}

    @property
    def tokens(self) -> int:
        """Tokens in this rank's complete shards."""
        return sum(int(s["tokens"]) for s in self.shards)

    def add(
        self,
        tensors: Mapping[str, torch.Tensor],
        samples: Sequence[tuple[int, int, str]],
        cursor: Mapping[str, Any],
    ) -> None:
        """One batch: `tensors` holds every hook ([n, width]) and every `meta.*` tensor ([n,
        ...]); `samples` lists (index, dataset row, row id) of its samples; `cursor`
        regenerates the batch (see the module docstring)."""
        missing = [k for k in [*self.hooks, *META] if k not in tensors]
        if missing:
            raise ValueError(f"batch lacks {missing[:4]}")
        n = int(tensors["meta.sample"].shape[0])
        drop = min(self._drop, n)
        self._drop -= drop
        self._batch_cursor = dict(cursor)
        self._batch_done = drop
        self._old = self._buffered
        for index, row, row_id in samples:
            self._samples[int(index)] = (int(row), str(row_id))
        if n - drop == 0:
            return
        part = {k: tensors[k][drop:].to(self.dtype) for k in self.hooks}
        for k, (dtype, _, _) in META.items():
            part[k] = tensors[k][drop:].to(dtype)
        for k, t in part.items():
            width = self.hooks.get(k)
            if width is not None and tuple(t.shape) != (n - drop, width):
                raise ValueError(f"{k}: expected [{n - drop}, {width}], got {tuple(t.shape)}")
        self._parts.append({k: t.contiguous() for k, t in part.items()})
        self._buffered += n - drop
        while self._buffered >= self.shard_tokens:
            self._write(self._take(self.shard_tokens))

    def finish(self) -> None:
        """Write the buffered tail as the last (shorter) shard; nothing is left to resume."""
        if self._buffered:
            self._write(self._take(self._buffered))
        self.resume = None

    # --- shards ----------------------------------------------------------------------------
    def _take(self, n: int) -> dict[str, torch.Tensor]:
        """The first n buffered tokens (the rest stay buffered)."""
        keys = list(self._parts[0])
        cat = {k: torch.cat([p[k] for p in self._parts]) for k in keys}
        rest = {k: v[n:].clone() for k, v in cat.items()}
        self._parts = [rest] if rest[keys[0]].shape[0] else []
        self._buffered -= n
        from_old = min(n, self._old)
        self._old -= from_old
        self._batch_done += n - from_old
        return {k: v[:n].contiguous() for k, v in cat.items()}

    def _write(self, tensors: dict[str, torch.Tensor]) -> None:
        index = len(self.shards)
        name = shard_name(self.rank, index)
        path = self.folder / name
        sample_ids = torch.unique(tensors["meta.sample"]).tolist()
        header = {"samples": [[s, *self._samples[s]] for s in sample_ids]}
        digest: dict[str, str] = {}

        def write(tmp: Path) -> None:
            # One metadata key: safetensors writes several in no fixed order.
            save_file(tensors, str(tmp), metadata={"vlmscope": json.dumps(header)})
            digest["sha256"] = sha256_file(tmp)

        try:
            write_atomically(path, write)
        except Exception as e:  # disk full surfaces as safetensors' own error type
            raise StoreError(
                f"cannot write shard {path} ({type(e).__name__}: {e}); the {len(self.shards)} "
                f"complete shards ({self.tokens} tokens) and the manifest are intact: make room "
                "and rerun the same command with --resume"
            ) from e
        counts = torch.bincount(tensors["meta.modality"].long(), minlength=len(MODALITIES))
        self.shards.append(
            {
                "file": name,
                "rank": self.rank,
                "index": index,
                "tokens": int(tensors["meta.sample"].shape[0]),
                "first_sample": int(sample_ids[0]),
                "last_sample": int(sample_ids[-1]),
                "modality_tokens": dict(zip(MODALITIES, counts.tolist(), strict=True)),
                "bytes": path.stat().st_size,
                "sha256": digest["sha256"],
            }
        )
        last = max(sample_ids)
        self._samples = {s: v for s, v in self._samples.items() if s >= last}
        self.resume = {**self._batch_cursor, "drop": self._batch_done}
        if self.on_shard is not None:
            self.on_shard(self)


def build_manifest(
    header: Mapping[str, Any], writers: Mapping[int, Mapping[str, Any]], complete: bool
) -> dict[str, Any]:
    """One manifest from the store's header and each rank's record (`shards`, `resume`,
    `samples`, `skips`, ...), with the totals over all ranks."""
    shards = sorted(
        (s for w in writers.values() for s in w["shards"]), key=lambda s: (s["rank"], s["index"])
    )
    modality = {m: sum(s["modality_tokens"][m] for s in shards) for m in MODALITIES}
    return {
        "format": FORMAT,
        "version": VERSION,
        "complete": complete,
        **header,
        "tokens": sum(s["tokens"] for s in shards),
        "samples": sum(int(w.get("samples", 0)) for w in writers.values()),
        "modality_tokens": modality,
        "bytes": sum(s["bytes"] for s in shards),
        "shards": shards,
        "writers": {
            str(r): {k: v for k, v in w.items() if k != "shards"}
            for r, w in sorted(writers.items())
        },
    }


def write_manifest(folder: str | Path, manifest: Mapping[str, Any]) -> None:
    """Replace the manifest atomically: a failed write leaves the previous one whole."""
    path = Path(folder) / "manifest.json"
    try:
        write_text_atomically(path, json.dumps(manifest, indent=1) + "\n")
    except OSError as e:
        raise StoreError(
            f"cannot write {path} ({e}); the previous manifest and its shards are intact: make "
            "room and rerun the same command with --resume"
        ) from e
