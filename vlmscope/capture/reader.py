"""Reading an activation store: shards, metadata, and batches in capture or shuffled order.

Order of an epoch. The tokens a run selects (by modality) form one *stream* per epoch, and a
batch is a slice of it; the cursor a trainer saves is the position in that stream, so a
resumed run reads exactly the batches it would have read.

- Capture order (`shuffle_buffer_mb=0`): shards in (rank, index) order, tokens as captured.
  With `batch_samples` a batch is every selected token of `batch_samples` consecutive captured
  samples, the batches on-the-fly training forms from the same data.
- Shuffled: each epoch permutes the shard order (seeded by seed and epoch), then groups
  consecutive shards into *windows* whose selected tokens fit the shuffle buffer, and permutes
  the tokens inside each window (seeded by seed, epoch and window). Only one window (plus one
  batch carried across its edge) is in memory at a time, so memory is bounded by the buffer
  whatever the store's size; shard files are opened, read and closed one at a time.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch.utils.data import IterableDataset, get_worker_info

from vlmscope.capture.layout import (
    DTYPES,
    META,
    MODALITIES,
    StoreError,
    read_manifest,
    selected_modalities,
    sha256_file,
)


@dataclass(frozen=True)
class Shard:
    """One shard file as the manifest lists it."""

    path: Path
    rank: int
    index: int
    tokens: int
    bytes: int
    sha256: str
    modality_tokens: Mapping[str, int]

    def selected(self, modalities: set[int]) -> int:
        """Tokens of the selected modality codes in this shard (from the manifest)."""
        return sum(self.modality_tokens[MODALITIES[m]] for m in modalities)


@dataclass
class StoreBatch:
    """A batch of tokens: activations per hook (store dtype) and, if asked, `meta.*`."""

    tensors: dict[str, torch.Tensor]
    #: position in the epoch's stream after this batch (the cursor to save).
    end: int

    @property
    def n_tokens(self) -> int:
        return int(next(iter(self.tensors.values())).shape[0])


class ActivationStore:
    """A store written by `vlmscope capture`: its manifest, shards, metadata and batches.

    Opening checks that every shard named in the manifest exists with its recorded size (a
    torn file is named); the content of a shard is checked against its SHA-256 the first time
    this object reads it (`verify=False` skips that, e.g. for a store on a trusted disk).
    """

    def __init__(self, path: str | os.PathLike[str], *, verify: bool = True) -> None:
        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        self.verify = verify
        self._verified: set[Path] = set()
        m = self.manifest
        try:
            self.hooks: dict[str, int] = {k: int(v["width"]) for k, v in m["hooks"].items()}
            self.dtype: torch.dtype = DTYPES[m["dtype"]]
            self.shards = [
                Shard(
                    self.path / s["file"],
                    int(s["rank"]),
                    int(s["index"]),
                    int(s["tokens"]),
                    int(s["bytes"]),
                    str(s["sha256"]),
                    dict(s["modality_tokens"]),
                )
                for s in m["shards"]
            ]
        except (KeyError, TypeError, ValueError) as e:
            raise StoreError(f"{self.path / 'manifest.json'} is malformed ({e!r})") from None
        for s in self.shards:
            if not s.path.is_file():
                raise StoreError(f"shard {s.path} named in the manifest is missing")
            size = s.path.stat().st_size
            if size != s.bytes:
                raise StoreError(
                    f"shard {s.path} is torn or altered: {size} bytes, the manifest says "
                    f"{s.bytes}; capture it again (or restore the file)"
                )

    # --- facts --------------------------------------------------------------------------------
    @property
    def complete(self) -> bool:
        """False while a capture is running or after one was interrupted (resume it)."""
        return bool(self.manifest.get("complete"))

    @property
    def n_tokens(self) -> int:
        return sum(s.tokens for s in self.shards)

    @property
    def model(self) -> dict[str, Any]:
        return dict(self.manifest.get("model", {}))

    def __len__(self) -> int:
        return self.n_tokens

    def __repr__(self) -> str:
        return (
            f"ActivationStore({str(self.path)!r}, {self.n_tokens} tokens, "
            f"{len(self.shards)} shards, {len(self.hooks)} hooks, {self.manifest['dtype']})"
        )

    def shards_for(self, rank: int = 0, world_size: int = 1) -> list[Shard]:
        """A disjoint subset of the shards for each of `world_size` readers (round robin)."""
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in 0..{world_size - 1}")
        return self.shards[rank::world_size]

    # --- reading ------------------------------------------------------------------------------
    def check(self, shard: Shard) -> None:
        """Raise StoreError naming the shard when its bytes do not hash to the manifest's."""
        if shard.path in self._verified:
            return
        digest = sha256_file(shard.path)
        if digest != shard.sha256:
            raise StoreError(
                f"shard {shard.path} is corrupted: its SHA-256 is {digest[:16]}..., the "
                f"manifest says {shard.sha256[:16]}...; capture it again (or restore the file)"
            )
        self._verified.add(shard.path)

    def read(
        self,
        shard: Shard | int,
        names: Sequence[str] | None = None,
        rows: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Tensors `names` (default: all hooks and metadata) of one shard, all of its tokens or
        those at `rows`. The file is memory-mapped while read and closed before returning."""
        if isinstance(shard, int):
            shard = self.shards[shard]
        if self.verify:
            self.check(shard)
        names = list(names) if names is not None else [*self.hooks, *META]
        out: dict[str, torch.Tensor] = {}
        try:
            with safe_open(str(shard.path), framework="pt") as f:
                for name in names:
                    t = f.get_tensor(name)
                    out[name] = t if rows is None else t[rows]
        except (OSError, RuntimeError, ValueError) as e:
            raise StoreError(f"cannot read {names} from shard {shard.path}: {e}") from e
        return out

    def metadata(self, shard: Shard | int | None = None) -> dict[str, torch.Tensor]:
        """The `meta.*` tensors of one shard, or of the whole store (concatenated)."""
        if shard is not None:
            return self.read(shard, list(META))
        parts = [self.read(s, list(META)) for s in self.shards]
        return {k: torch.cat([p[k] for p in parts]) for k in META}

    def samples(self, shard: Shard | int) -> list[tuple[int, int, str]]:
        """(sample index, dataset row, row id) of every sample with tokens in the shard."""
        if isinstance(shard, int):
            shard = self.shards[shard]
        with safe_open(str(shard.path), framework="pt") as f:
            header = json.loads((f.metadata() or {}).get("vlmscope", "{}"))
        return [(int(s), int(r), str(i)) for s, r, i in header.get("samples", [])]

    # --- batches ------------------------------------------------------------------------------
    def selected_tokens(
        self,
        tokens: str = "all",
        include_special: bool = False,
        shards: Sequence[Shard] | None = None,
    ) -> int:
        """Tokens an epoch over `shards` (default: all) yields for this selection."""
        mods = selected_modalities(tokens, include_special)
        return sum(s.selected(mods) for s in (self.shards if shards is None else shards))

    def batches(
        self,
        names: Sequence[str],
        *,
        tokens: str = "all",
        include_special: bool = False,
        batch_tokens: int = 0,
        batch_samples: int = 0,
        shuffle_buffer_mb: float = 0.0,
        seed: int = 0,
        epoch: int = 0,
        start: int = 0,
        shards: Sequence[Shard] | None = None,
        meta: Sequence[str] = (),
    ) -> Iterator[StoreBatch]:
        """One epoch of batches of hooks `names` (and `meta` tensors) from stream position
        `start`; see the module docstring for the orders. `batch_samples` (capture order only)
        groups by captured sample, else `batch_tokens` tokens make a batch; the epoch's short
        tail joins the batch before it (a batch of a token or two has no variance to explain).
        """
        stream = self._stream(names, tokens, include_special, batch_tokens, batch_samples,
                              shuffle_buffer_mb, seed, epoch, start, shards, meta)  # fmt: skip
        return stream if batch_samples else _merge_tail(stream, batch_tokens)

    def _stream(
        self,
        names: Sequence[str],
        tokens: str,
        include_special: bool,
        batch_tokens: int,
        batch_samples: int,
        shuffle_buffer_mb: float,
        seed: int,
        epoch: int,
        start: int,
        shards: Sequence[Shard] | None,
        meta: Sequence[str],
    ) -> Iterator[StoreBatch]:
        missing = [n for n in names if n not in self.hooks]
        if missing:
            raise StoreError(f"{self.path} holds no {missing[:4]}; it holds {list(self.hooks)}")
        shuffled = shuffle_buffer_mb > 0
        if batch_samples and shuffled:
            raise ValueError("batch_samples needs capture order (shuffle_buffer_mb=0)")
        if not batch_samples and batch_tokens < 1:
            raise ValueError("give batch_tokens >= 1 or batch_samples >= 1")
        mods = selected_modalities(tokens, include_special)
        order = list(self.shards if shards is None else shards)
        keys = list(dict.fromkeys([*names, *meta]))
        load_keys = list(dict.fromkeys([*keys, "meta.sample"])) if batch_samples else keys
        width_bytes = (
            sum(self.hooks[n] for n in names) * torch.empty((), dtype=self.dtype).element_size()
        )
        windows = _windows(order, mods, shuffled, shuffle_buffer_mb, width_bytes, seed, epoch)
        pos = 0
        carry: dict[str, torch.Tensor] | None = None
        for w, window in enumerate(windows):
            n_w = sum(s.selected(mods) for s in window)
            if pos + n_w <= start or n_w == 0:
                pos += n_w
                continue
            data = self._load_window(window, mods, load_keys, in_memory=shuffled)
            perm = (
                torch.randperm(n_w, generator=_generator(seed, epoch, "window", w))
                if shuffled
                else None
            )
            skip = max(0, start - pos)
            pos += skip
            idx = (perm if perm is not None else torch.arange(n_w))[skip:]
            if batch_samples:
                groups = data["meta.sample"][idx] // batch_samples
                change = (groups[1:] != groups[:-1]).nonzero().squeeze(1) + 1
                bounds = [0, *change.tolist(), len(idx)]
                spans = list(itertools.pairwise(bounds))
                for i, (a, b) in enumerate(spans):
                    part = {k: data[k][idx[a:b]] for k in load_keys}
                    if carry is not None:
                        if int(carry["meta.sample"][0]) // batch_samples == int(groups[a]):
                            part = {k: torch.cat([carry[k], part[k]]) for k in load_keys}
                        else:
                            pos += int(carry["meta.sample"].shape[0])
                            yield StoreBatch({k: carry[k] for k in keys}, pos)
                        carry = None
                    if i == len(spans) - 1:
                        carry = part  # its samples may go on in the next shard
                        continue
                    pos += int(part["meta.sample"].shape[0])
                    yield StoreBatch({k: part[k] for k in keys}, pos)
            else:
                a = 0
                if carry is not None:
                    need = batch_tokens - int(carry[keys[0]].shape[0])
                    take = idx[:need]
                    carry = {k: torch.cat([carry[k], data[k][take]]) for k in keys}
                    a = int(take.shape[0])
                    if carry[keys[0]].shape[0] < batch_tokens:
                        continue
                    pos += batch_tokens
                    yield StoreBatch(carry, pos)
                    carry = None
                while len(idx) - a >= batch_tokens:
                    take = idx[a : a + batch_tokens]
                    a += batch_tokens
                    pos += batch_tokens
                    yield StoreBatch({k: data[k][take] for k in keys}, pos)
                if a < len(idx):
                    carry = {k: data[k][idx[a:]] for k in keys}
            del data
        if carry is not None and carry[keys[0]].shape[0]:
            pos += int(carry[keys[0]].shape[0])
            yield StoreBatch({k: carry[k] for k in keys}, pos)

    def _load_window(
        self, window: Sequence[Shard], mods: set[int], keys: Sequence[str], in_memory: bool
    ) -> dict[str, torch.Tensor]:
        """The selected tokens of a window's shards. Capture order reads them where they lie
        (memory-mapped, read in order); a shuffled window is read into memory once, in order,
        since its batches then gather rows from all over it."""
        parts = []
        for s in window:
            modality = self.read(s, ["meta.modality"])["meta.modality"]
            keep = torch.isin(modality, torch.tensor(sorted(mods), dtype=modality.dtype))
            rows = None if bool(keep.all()) else keep.nonzero().squeeze(1)
            part = self.read(s, keys, rows)  # rows given: already a copy
            if in_memory and rows is None and len(window) == 1:
                part = {k: v.clone() for k, v in part.items()}
            parts.append(part)
        if len(parts) == 1:
            return parts[0]
        return {k: torch.cat([p[k] for p in parts]) for k in keys}

    def dataset(self, names: Sequence[str] | None = None, **kwargs: Any) -> StoreDataset:
        """A torch IterableDataset of batches (dicts of tensors); see `StoreDataset`."""
        return StoreDataset(self, names, **kwargs)


class StoreDataset(IterableDataset):  # type: ignore[type-arg]
    """Batches of a store as dicts `{hook: [n, width], meta.*: [n, ...]}` for a DataLoader.

    Use `DataLoader(ds, batch_size=None)`: items are already batches. With `num_workers > 0`
    each worker reads a disjoint subset of the shards (round robin); `set_epoch(e)` reshuffles.
    Arguments are those of `ActivationStore.batches` (default: every hook, 4096 tokens per
    batch, a 1 GiB shuffle buffer, all metadata).
    """

    def __init__(
        self,
        store: ActivationStore,
        names: Sequence[str] | None = None,
        *,
        tokens: str = "all",
        include_special: bool = False,
        batch_tokens: int = 4096,
        shuffle_buffer_mb: float = 1024.0,
        seed: int = 0,
        meta: Sequence[str] = tuple(META),
    ) -> None:
        super().__init__()
        self.store = store
        self.names = list(names) if names is not None else list(store.hooks)
        self.kwargs = {
            "tokens": tokens,
            "include_special": include_special,
            "batch_tokens": batch_tokens,
            "shuffle_buffer_mb": shuffle_buffer_mb,
            "seed": seed,
            "meta": tuple(meta),
        }
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = get_worker_info()
        shards = self.store.shards_for(info.id, info.num_workers) if info is not None else None
        for b in self.store.batches(self.names, epoch=self.epoch, shards=shards, **self.kwargs):
            yield b.tensors


def _merge_tail(stream: Iterator[StoreBatch], batch_tokens: int) -> Iterator[StoreBatch]:
    """The stream's batches, its last one joined to the one before when it is short."""
    pending: StoreBatch | None = None
    for b in stream:
        if pending is not None and b.n_tokens < batch_tokens:
            merged = {k: torch.cat([pending.tensors[k], b.tensors[k]]) for k in b.tensors}
            pending = StoreBatch(merged, b.end)
            continue
        if pending is not None:
            yield pending
        pending = b
    if pending is not None:
        yield pending


def _generator(seed: int, epoch: int, what: str, index: int = 0) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}/{epoch}/{what}/{index}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def _windows(
    shards: list[Shard],
    mods: set[int],
    shuffled: bool,
    buffer_mb: float,
    width_bytes: int,
    seed: int,
    epoch: int,
) -> list[list[Shard]]:
    """The epoch's shard windows: one shard each in capture order; else consecutive shards of
    a permuted order whose selected tokens fit the buffer (at least one shard per window)."""
    if not shuffled:
        return [[s] for s in shards]
    perm = torch.randperm(len(shards), generator=_generator(seed, epoch, "shards")).tolist()
    budget = buffer_mb * 2**20
    windows: list[list[Shard]] = []
    size = 0.0
    for i in perm:
        s = shards[i]
        need = s.selected(mods) * width_bytes
        if windows and size + need <= budget:
            windows[-1].append(s)
            size += need
        else:
            windows.append([s])
            size = need
    return windows
