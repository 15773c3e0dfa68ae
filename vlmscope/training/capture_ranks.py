"""`vlmscope capture` on several processes (torchrun): who captures what, and how the ranks'
records become one manifest.

Rows. Rank r captures one contiguous block of the dataset's rows, cut at multiples of
--batch-size (`rank_rows`), so without bad rows each rank forms the very batches one process
forms over its block and stores the same activations. Its shards are
`shard-r{rank}-{index}` (the writer's own numbering, no clash) and its stream is one process's
stream over its block: the blocks in rank order are the dataset in order, so the shards in
(rank, index) order are one process's capture order.

Sample indices. A rank cannot know how many good samples the ranks before it found until they
finish, so `meta.sample` in a rank's shards counts from 0 (as `META` says: the index in the
writing rank's capture order) and the manifest gives each rank's `first_sample` (the samples of
the ranks before it); `ActivationStore` adds it when reading, so a store written by N ranks reads
as the one process's store: same tokens, same activations, same sample indices, same order.

Progress and the manifest. While capturing, rank r rewrites its own record (its shards and the
cursor that resumes after the last one, as the manifest's `writers` entry) to
`writer-r{rank}.json` atomically after each shard; the manifest rank 0 wrote first says
`complete: false`. The ranks exchange one small status per batch, so a failure on one (a bad
record under --strict, NaN activations, a full disk) stops all of them at once, naming it, and a
dead rank breaks that exchange within --dist-timeout. Only when every rank has finished
(its last shard and its `done` record on disk, agreed by a collective) does rank 0 merge the
records into the complete manifest, atomically, and remove the progress files: a folder whose
manifest says complete was finished by every rank. `--resume` with the same number of
processes continues each rank from its own record (a rank that had finished stays finished);
another number of processes is refused, since the blocks would be cut differently.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from vlmscope.capture import build_manifest, write_manifest
from vlmscope.files import write_text_atomically
from vlmscope.training.distributed import Layout
from vlmscope.training.errors import TrainingError

__all__ = ["check_ranks", "finish_manifest", "progress_name", "rank_rows", "read_progress",
           "write_progress"]  # fmt: skip


def rank_rows(total: int, batch_size: int, rank: int, world: int) -> tuple[int, int]:
    """Rows [lo, hi) of a `total`-row dataset that `rank` of `world` captures: contiguous
    blocks of whole batches, as equal as batches allow."""
    units = -(-total // batch_size)
    lo, hi = units * rank // world, units * (rank + 1) // world
    return min(lo * batch_size, total), min(hi * batch_size, total)


def progress_name(rank: int) -> str:
    return f"writer-r{rank:04d}.json"


def write_progress(folder: Path, rank: int, record: Mapping[str, Any]) -> None:
    """This rank's writer record (shards, resume cursor, counts), replaced atomically."""
    write_text_atomically(folder / progress_name(rank), json.dumps(record, indent=1) + "\n")


def read_progress(folder: Path, rank: int) -> dict[str, Any]:
    """The record a rank of an interrupted capture left ({} if it wrote none)."""
    path = folder / progress_name(rank)
    if not path.exists():
        return {}
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise TrainingError(f"cannot read {path} to resume rank {rank}: {e}") from None
    if not isinstance(record, dict) or not isinstance(record.get("shards"), list):
        raise TrainingError(f"{path} is not a capture rank's record: remove --out and capture anew")
    return record


def check_ranks(old: Mapping[str, Any] | None, world: int, folder: Path) -> None:
    """A capture resumes with the number of processes that started it."""
    if old is None or old.get("complete"):
        return
    started = int(old.get("ranks", 1))
    if started != world:
        raise TrainingError(
            f"--resume with {world} process(es) a capture into {folder} started with "
            f"{started}: each rank continues its own block of the data, so resume with "
            f"torchrun --nproc_per_node {started}"
            + (" (or without torchrun)" if started == 1 else "")
        )


def finish_manifest(
    folder: Path, header: Mapping[str, Any], mine: Mapping[str, Any], lay: Layout
) -> dict[str, Any]:
    """Every rank's final record gathered; rank 0 writes the complete manifest (each rank's
    `first_sample`, its shards' sample ranges made global) and removes the progress files.
    Every rank returns the manifest once rank 0 has written it."""
    records = [dict(r) for r in lay.gather(dict(mine))]
    offset = 0
    for r in records:
        r["first_sample"] = offset
        r["shards"] = [
            {
                **s,
                "first_sample": s["first_sample"] + offset,
                "last_sample": s["last_sample"] + offset,
            }
            for s in r["shards"]
        ]
        offset += int(r["samples"])
    manifest = build_manifest(header, dict(enumerate(records)), complete=True)
    error = None
    if lay.is_main:
        try:
            write_manifest(folder, manifest)
            if lay.distributed:
                for r in range(lay.world):
                    (folder / progress_name(r)).unlink(missing_ok=True)
        except (OSError, ValueError) as e:
            if not lay.distributed:
                raise
            error = str(e)
    lay.agree(error)
    return manifest
