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

Several readers of one stream (`part=(rank, world)`, data-parallel training): the batches are
cut as above with global sizes and each reader materialises only its share of each, reading
only those rows from the memory-mapped shards; the cursor is the same for all.

A store written by several capture ranks keeps `meta.sample` per rank in its files; `read`
adds the rank's `first_sample` from the manifest, so every reader sees global sample indices.
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

#: safetensors' names of the dtypes a store and its metadata use
_SAFETENSORS_DTYPES = {
    torch.float32: "F32",
    torch.bfloat16: "BF16",
    torch.float16: "F16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.uint8: "U8",
}


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
    #: global index of its rank's first sample (`writers[rank].first_sample`): `meta.sample`
    #: in a shard counts within its rank, readers add this.
    sample_offset: int = 0

    def selected(self, modalities: set[int]) -> int:
        """Tokens of the selected modality codes in this shard (from the manifest)."""
        return sum(self.modality_tokens[MODALITIES[m]] for m in modalities)


@dataclass
class StoreBatch:
    """A batch of tokens: activations per hook (store dtype) and, if asked, `meta.*`."""

    tensors: dict[str, torch.Tensor]
    #: position in the epoch's stream after this batch (the cursor to save).
    end: int
    #: tokens of the whole batch, over every part (see `ActivationStore.batches`'s `part`).
    n_global: int = -1

    def __post_init__(self) -> None:
        if self.n_global < 0:
            self.n_global = self.n_tokens

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
        self._laid_out: set[Path] = set()
        m = self.manifest
        try:
            self.hooks: dict[str, int] = {k: int(v["width"]) for k, v in m["hooks"].items()}
            self.dtype: torch.dtype = DTYPES[m["dtype"]]
            offsets = {
                int(r): int(w.get("first_sample", 0)) for r, w in m.get("writers", {}).items()
            }
            self.shards = [
                Shard(
                    self.path / s["file"],
                    int(s["rank"]),
                    int(s["index"]),
                    int(s["tokens"]),
                    int(s["bytes"]),
                    str(s["sha256"]),
                    dict(s["modality_tokens"]),
                    offsets.get(int(s["rank"]), 0),
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

    def check_layout(self, shard: Shard) -> None:
        """Raise StoreError naming the shard and tensor when the shard's header disagrees with
        the manifest: a tensor missing, or not [tokens, width] (`meta.*`: [tokens, ...]) of
        the store's dtype. A store written by other tools passes its SHA-256 check whatever
        its tensors hold; this finds a wrong one before any row of it is used. Reads only the
        header, once per shard."""
        if shard.path in self._laid_out:
            return
        want = {h: ((shard.tokens, w), self.dtype) for h, w in self.hooks.items()}
        want |= {k: ((shard.tokens, *trail), dt) for k, (dt, trail, _) in META.items()}
        try:
            with safe_open(str(shard.path), framework="pt") as f:
                held = set(f.keys())
                for name, (shape, dtype) in want.items():
                    if name not in held:
                        raise StoreError(f"shard {shard.path} holds no tensor {name!r}")
                    piece = f.get_slice(name)
                    got_shape, got_dtype = tuple(piece.get_shape()), piece.get_dtype()
                    if got_shape != shape or got_dtype != _SAFETENSORS_DTYPES[dtype]:
                        raise StoreError(
                            f"shard {shard.path}: {name} is {list(got_shape)} {got_dtype}, the "
                            f"manifest says {list(shape)} {_SAFETENSORS_DTYPES[dtype]} "
                            f"({shard.tokens} tokens); capture it again (or restore the file)"
                        )
        except (OSError, RuntimeError) as e:  # safetensors' header errors
            raise StoreError(f"cannot read the header of shard {shard.path}: {e}") from e
        self._laid_out.add(shard.path)

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
        self.check_layout(shard)
        names = list(names) if names is not None else [*self.hooks, *META]
        out: dict[str, torch.Tensor] = {}
        try:
            with safe_open(str(shard.path), framework="pt") as f:
                for name in names:
                    t = f.get_tensor(name)
                    out[name] = t if rows is None else t[rows]
                    if name == "meta.sample" and shard.sample_offset:
                        out[name] = out[name] + shard.sample_offset
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
        off = shard.sample_offset
        return [(int(s) + off, int(r), str(i)) for s, r, i in header.get("samples", [])]

    def shards_of_sample(self, sample: int) -> list[Shard]:
        """The shards holding tokens of global sample index `sample` (a sample may straddle
        two); reads every shard's header, so for naming a culprit, not for loops."""
        return [s for s in self.shards if any(i == sample for i, _, _ in self.samples(s))]

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
        part: tuple[int, int] = (0, 1),
    ) -> Iterator[StoreBatch]:
        """One epoch of batches of hooks `names` (and `meta` tensors) from stream position
        `start`; see the module docstring for the orders. `batch_samples` (capture order only)
        groups by captured sample, else `batch_tokens` tokens make a batch; the epoch's short
        tail joins the batch before it (a batch of a token or two has no variance to explain).

        `part=(rank, world)`: the batches are cut from the one stream as above (sizes are
        global), and this reader gets only rank's share of each: the tokens of samples
        [rank * b, (rank + 1) * b) of every group of `batch_samples` = world * b samples, or
        positions [rank * n // world, (rank + 1) * n // world) of every batch of n =
        `batch_tokens` tokens. Only those rows are read; `end` stays the global position.
        """
        stream = self._stream(names, tokens, include_special, batch_tokens, batch_samples,
                              shuffle_buffer_mb, seed, epoch, start, shards, meta,
                              part)  # fmt: skip
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
        part: tuple[int, int],
    ) -> Iterator[StoreBatch]:
        missing = [n for n in names if n not in self.hooks]
        if missing:
            raise StoreError(f"{self.path} holds no {missing[:4]}; it holds {list(self.hooks)}")
        shuffled = shuffle_buffer_mb > 0
        if batch_samples and shuffled:
            raise ValueError("batch_samples needs capture order (shuffle_buffer_mb=0)")
        if not batch_samples and batch_tokens < 1:
            raise ValueError("give batch_tokens >= 1 or batch_samples >= 1")
        rank, world = part
        if not 0 <= rank < world:
            raise ValueError(f"part {part}: rank must be in 0..world - 1")
        if batch_samples % world:
            raise ValueError(f"batch_samples {batch_samples} is not a multiple of {world} parts")
        mods = selected_modalities(tokens, include_special)
        order = list(self.shards if shards is None else shards)
        keys = list(dict.fromkeys([*names, *meta]))
        width_bytes = (
            sum(self.hooks[n] for n in names) * torch.empty((), dtype=self.dtype).element_size()
        )
        windows = _windows(order, mods, shuffled, shuffle_buffer_mb, width_bytes, seed, epoch)
        # This part's positions [lo, hi) in every batch of batch_tokens tokens.
        lo, hi = batch_tokens * rank // world, batch_tokens * (rank + 1) // world
        pos = 0
        carry: dict[str, torch.Tensor] | None = None  # this part's rows of the pending batch
        carry_n, carry_group = 0, -1  # tokens of the pending batch over all parts; its group
        for w, window in enumerate(windows):
            n_w = sum(s.selected(mods) for s in window)
            if pos + n_w <= start or n_w == 0:
                pos += n_w
                continue
            kept = self._kept_rows(window, mods)
            perm = (
                torch.randperm(n_w, generator=_generator(seed, epoch, "window", w))
                if shuffled
                else None
            )
            skip = max(0, start - pos)
            pos += skip
            idx = (perm if perm is not None else torch.arange(n_w))[skip:]
            # The window's pieces: (this part's window rows, tokens over all parts, group,
            # whether the piece may go on in the next window).
            pieces: list[tuple[torch.Tensor, int, int, bool]] = []
            if batch_samples:
                sample = self._gather(kept, ["meta.sample"], None)[0]["meta.sample"][idx]
                groups = sample // batch_samples
                mine = (sample % batch_samples) // (batch_samples // world) == rank
                change = (groups[1:] != groups[:-1]).nonzero().squeeze(1) + 1
                bounds = [0, *change.tolist(), len(idx)]
                spans = list(itertools.pairwise(bounds))
                for i, (a, b) in enumerate(spans):
                    rows = idx[a:b][mine[a:b]]
                    pieces.append((rows, b - a, int(groups[a]), i == len(spans) - 1))
            else:
                a, fill = 0, carry_n
                while a < len(idx):
                    take = min(batch_tokens - fill, len(idx) - a)
                    s0, s1 = max(lo, fill) - fill, min(hi, fill + take) - fill
                    rows = idx[a + s0 : a + max(s0, s1)]
                    pieces.append((rows, take, 0, fill + take < batch_tokens))
                    a += take
                    fill = (fill + take) % batch_tokens
            wanted = torch.cat([p[0] for p in pieces]) if pieces else idx[:0]
            data, at = self._gather(kept, keys, wanted, in_memory=shuffled)
            off = 0
            for rows, n_glob, group, open_end in pieces:
                got = {k: data[k][at[off : off + len(rows)]] for k in keys}
                off += len(rows)
                if batch_samples:
                    if carry is not None:
                        if carry_group == group:
                            got = {k: torch.cat([carry[k], got[k]]) for k in keys}
                            n_glob += carry_n
                        else:
                            pos += carry_n
                            yield StoreBatch(carry, pos, carry_n)
                        carry = None
                    if open_end:
                        carry, carry_n, carry_group = got, n_glob, group
                        continue
                    pos += n_glob
                    yield StoreBatch(got, pos, n_glob)
                else:
                    if carry is not None:
                        got = {k: torch.cat([carry[k], got[k]]) for k in keys}
                    carry, carry_n = got, carry_n + n_glob
                    if carry_n == batch_tokens:
                        pos += carry_n
                        yield StoreBatch(carry, pos, carry_n)
                        carry, carry_n = None, 0
            del data
        if carry is not None and carry_n:
            pos += carry_n
            yield StoreBatch(carry, pos, carry_n)

    def _kept_rows(
        self, window: Sequence[Shard], mods: set[int]
    ) -> list[tuple[Shard, torch.Tensor | None, int]]:
        """(shard, its rows of the selected modalities or None for all, their count) of each
        shard of a window: the window's selected tokens, in order."""
        out = []
        for s in window:
            modality = self.read(s, ["meta.modality"])["meta.modality"]
            counts = torch.bincount(modality.long(), minlength=len(MODALITIES)).tolist()
            listed = [s.modality_tokens.get(m, 0) for m in MODALITIES]
            if counts != listed:
                found = ", ".join(f"{n} of code {c}" for c, n in enumerate(counts) if n)
                raise StoreError(
                    f"shard {s.path}: meta.modality holds {found} (codes: 0 text, 1 image, 2 "
                    f"special), the manifest says {listed[0]} text, {listed[1]} image, "
                    f"{listed[2]} special; capture it again (or restore the file)"
                )
            keep = torch.isin(modality, torch.tensor(sorted(mods), dtype=modality.dtype))
            rows = None if bool(keep.all()) else keep.nonzero().squeeze(1)
            out.append((s, rows, int(modality.shape[0]) if rows is None else len(rows)))
        return out

    def _gather(
        self,
        kept: list[tuple[Shard, torch.Tensor | None, int]],
        keys: Sequence[str],
        wanted: torch.Tensor | None,
        in_memory: bool = False,
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Tensors `keys` of a window's selected tokens at window indices `wanted` (None: all),
        read in file order: (data, at) with data[k][at[i]] the token wanted[i]. A shard whose
        selected rows are all wanted is read where it lies (memory-mapped; copied when
        `in_memory`, since its batches then gather rows from all over it), any other only at
        the wanted rows, so a reader of one part touches little more than its own rows."""
        total = sum(n for _, _, n in kept)
        if wanted is None:
            srt = at = torch.arange(total)
        else:
            order = torch.argsort(wanted, stable=True)
            srt = wanted[order]
            at = torch.empty_like(order)
            at[order] = torch.arange(len(order))
        parts, views, off = [], 0, 0
        for s, rows, n in kept:
            a, b = (int(torch.searchsorted(srt, v)) for v in (off, off + n))
            off += n
            if a == b:
                continue
            if b - a == n:  # every selected row of the shard
                shard_rows = rows
            else:
                local = srt[a:b] - (off - n)
                shard_rows = local if rows is None else rows[local]
            views += shard_rows is None
            parts.append(self.read(s, keys, shard_rows))  # rows given: already a copy
        if not parts:
            return self.read(kept[0][0], keys, torch.zeros(0, dtype=torch.long)), at
        if len(parts) == 1:
            data = parts[0]
            if in_memory and views:
                data = {k: v.clone() for k, v in data.items()}
            return data, at
        return {k: torch.cat([p[k] for p in parts]) for k in keys}, at

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
        if pending is not None and b.n_global < batch_tokens:
            merged = {k: torch.cat([pending.tensors[k], b.tensors[k]]) for k in b.tensors}
            pending = StoreBatch(merged, b.end, pending.n_global + b.n_global)
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
