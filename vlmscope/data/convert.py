"""`vlmscope data process MODEL DATASET --out DIR`: process a dataset once, train many times.

Reads any dataset `vlmscope train` reads, runs every record through the model's processor and
chat template exactly as training does (the same SampleEncoder), and writes the `processed`
schema (vlmscope.data.processed) to DIR:

- ``{split}-00000.parquet``, ...: one row per sample. ``input_ids`` and the other per-token
  keys as ``[T]`` lists; ``pixel_values`` and the family's image keys at the processor's own
  rank; ``labels`` (-100 outside the answer) where the record has an answer; ``id``, the
  source row.
- ``processed.json``, the manifest: model, family, the fingerprint of its tokenizer and
  processor (training checks it), the source dataset, and the counts of written and skipped
  rows.

Training on DIR gives the batches that training on DATASET gives, so the same seed trains the
same dictionaries, without paying for the processor every epoch. It is the text-and-image
counterpart of the activation store. The model's weights are never read: its config and
processor say all that the rows need. DIR appears whole or not at all (it is written under a
temporary name and renamed).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from vlmscope.data.processed import MANIFEST, PER_TOKEN_KEYS, ProcessedSpec
from vlmscope.data.processing import Sample, SkipCounter, SkipRecord

if TYPE_CHECKING:
    from vlmscope.data.sources import Dataset
    from vlmscope.models.hooked import HookedVLM

#: Rows per Parquet row group: a reader holds about one group of images in memory.
ROW_GROUP_ROWS = 32


def _arrow_type(dtype: torch.dtype) -> Any:
    import pyarrow as pa

    if dtype == torch.bool:
        return pa.bool_()
    if dtype.is_floating_point:
        return pa.float16() if dtype == torch.float16 else pa.float32()
    return {torch.int32: pa.int32(), torch.int16: pa.int16(), torch.uint8: pa.uint8()}.get(
        dtype, pa.int64()
    )


def _numpy_dtype(dtype: torch.dtype) -> Any:
    """The numpy dtype a tensor is stored as (bfloat16 widens to float32, exactly)."""
    return torch.empty(0, dtype=torch.float32 if dtype == torch.bfloat16 else dtype).numpy().dtype


def arrow_schema(spec: ProcessedSpec) -> Any:
    """Parquet schema of the processed form for a model: per-token keys one level deep, the
    others at the processor's rank."""
    import pyarrow as pa

    fields = [pa.field("id", pa.string())]
    for key, ks in {**spec.keys, "labels": None}.items():
        typ = _arrow_type(ks.dtype if ks is not None else torch.long)
        for _ in range(1 if key in PER_TOKEN_KEYS else ks.rank):  # type: ignore[union-attr]
            typ = pa.list_(typ)
        fields.append(pa.field(key, typ))
    return pa.schema(fields)


def _nested(values: list[np.ndarray | None], depth: int, leaf: Any) -> Any:
    """Arrow nested lists (`depth` levels) of per-row arrays, built from one flat buffer and
    offsets, without a Python object per number; None rows are null."""
    import pyarrow as pa

    present = [v for v in values if v is not None]
    flat = np.concatenate([v.reshape(-1) for v in present]) if present else np.empty(0)
    arr = pa.array(flat, type=leaf)
    for level in range(depth - 1, 0, -1):
        lengths = [np.full(int(np.prod(v.shape[:level])), v.shape[level]) for v in present]
        offsets = np.concatenate([[0], np.cumsum(np.concatenate(lengths))]) if lengths else [0]
        arr = pa.ListArray.from_arrays(pa.array(np.asarray(offsets, np.int32)), arr)
    outer = np.cumsum([0] + [v.shape[0] if v is not None else 0 for v in values])
    mask = pa.array([v is None for v in values])
    return pa.ListArray.from_arrays(pa.array(outer.astype(np.int32)), arr, mask=mask)


def _row_arrays(sample: Sample, spec: ProcessedSpec) -> dict[str, np.ndarray | None]:
    """One sample's stored arrays: per-token keys without the sample dim, labels if any."""
    extra = set(sample.tensors) - set(spec.keys)
    if any("video" in k for k in extra):
        raise ValueError(
            f"row {sample.row_id} holds a video, which the processed schema does not store "
            "yet: train on the raw rows (the data readers take video frames)"
        )
    if extra:
        raise ValueError(
            f"row {sample.row_id}: the processor made {sorted(extra)}, which its probe did not: "
            "this processor's outputs vary by record in a way the processed schema cannot hold"
        )
    out: dict[str, np.ndarray | None] = {}
    for key in spec.keys:
        t = sample.tensors.get(key)
        if t is not None:
            t = t[0] if key in PER_TOKEN_KEYS else t
            out[key] = t.to(torch.float32 if t.dtype == torch.bfloat16 else t.dtype).numpy()
        else:
            out[key] = None
    out["labels"] = None
    if sample.n_answer:
        ids = sample.tensors["input_ids"][0]
        labels = torch.full_like(ids, -100)
        labels[-sample.n_answer :] = ids[-sample.n_answer :]
        out["labels"] = labels.numpy()
    return out


class ProcessedWriter:
    """Writes samples as Parquet files of `rows_per_file` rows, in row groups of
    ROW_GROUP_ROWS, under a folder; `close()` returns the files written."""

    def __init__(self, folder: Path, spec: ProcessedSpec, split: str, rows_per_file: int) -> None:
        self.folder, self.spec, self.split = folder, spec, split
        self.rows_per_file = rows_per_file
        self.schema = arrow_schema(spec)
        self.files: list[Path] = []
        self.rows = 0
        self._writer: Any = None
        self._in_file = 0
        self._group: list[tuple[str, dict[str, np.ndarray | None]]] = []

    def add(self, sample: Sample, source_id: str) -> None:
        self._group.append((source_id, _row_arrays(sample, self.spec)))
        if len(self._group) >= ROW_GROUP_ROWS or self._in_file + len(self._group) >= (
            self.rows_per_file
        ):
            self._flush()

    def _flush(self) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        if not self._group:
            return
        if self._writer is None:
            path = self.folder / f"{self.split}-{len(self.files):05d}.parquet"
            self._writer = pq.ParquetWriter(path, self.schema)
            self.files.append(path)
        columns = [pa.array([sid for sid, _ in self._group], pa.string())]
        for f in self.schema:
            if f.name == "id":
                continue
            depth, leaf = 0, f.type
            while pa.types.is_list(leaf):
                depth, leaf = depth + 1, leaf.value_type
            values = [arrays[f.name] for _, arrays in self._group]
            values = [v.astype(leaf.to_pandas_dtype()) if v is not None else None for v in values]
            columns.append(_nested(values, depth, leaf))
        self._writer.write_table(pa.Table.from_arrays(columns, schema=self.schema))
        self.rows += len(self._group)
        self._in_file += len(self._group)
        self._group = []
        if self._in_file >= self.rows_per_file:
            self._writer.close()
            self._writer, self._in_file = None, 0

    def close(self) -> list[Path]:
        self._flush()
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        return self.files


def write_processed(
    samples: Iterable[Sample],
    spec: ProcessedSpec,
    folder: Path,
    *,
    split: str = "train",
    rows_per_file: int = 2000,
    manifest: dict[str, Any] | None = None,
    source_ids: Callable[[Sample], str] | None = None,
) -> dict[str, Any]:
    """Write samples (from a SampleEncoder of the model `spec` describes) in the processed
    schema into `folder`, with its manifest; returns the manifest."""
    writer = ProcessedWriter(folder, spec, split, rows_per_file)
    for s in samples:
        writer.add(s, source_ids(s) if source_ids is not None else s.row_id)
    files = writer.close()
    info = {
        "format": "vlmscope-processed",
        "version": 1,
        "model": spec.name,
        "family": spec.family,
        "fingerprint": spec.fingerprint,
        "vocab_size": spec.vocab_size,
        "image_token_ids": list(spec.image_token_ids),
        "split": split,
        "rows": writer.rows,
        "files": [f.name for f in files],
        "columns": {f.name: str(f.type) for f in writer.schema},
        **(manifest or {}),
    }
    (folder / MANIFEST).write_text(json.dumps(info, indent=1) + "\n")
    return info


def process_dataset(
    vlm: HookedVLM,
    dataset: Dataset,
    folder: Path,
    *,
    name: str = "",
    ctx_len: int = 0,
    split: str = "train",
    workers: int = 0,
    strict: bool = False,
    max_rows: int = 0,
    rows_per_file: int = 2000,
    source: dict[str, Any] | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Encode every record of `dataset` with `vlm`'s processor, as training does, and write the
    processed form into `folder` (which exists); returns the manifest, with the rows read and
    skipped. `ctx_len` 0 keeps every token (each training run truncates to its own)."""
    import itertools

    from vlmscope.data.processing import SampleEncoder, SkipJournal, encode_stream
    from vlmscope.progress import progress_bar

    spec = ProcessedSpec(vlm, name)
    # --workers read records ahead of the ones written: a skipped record is counted only if
    # the rows written reach past it, so --max-rows reports the rows it consumed.
    journal = SkipJournal()
    dataset.on_bad_record = journal.note_bad
    encoder = SampleEncoder(
        vlm.processor,
        ctx_len or 1 << 30,
        vlm.adapter.image_token_ids(),
        videos=vlm.adapter.capabilities.video,
    )
    ids: dict[str, str] = {}

    def records() -> Iterator[Any]:
        for r in dataset:
            ids[r.row_id] = r.source_id or r.row_id
            yield r

    bar = progress_bar(dataset.num_rows, unit="row", disable=not progress, desc="processing")

    def source_id(s: Sample) -> str:
        bar.update(dataset.stats.rows - bar.n)  # rows read so far, skipped ones included
        return ids.pop(s.row_id, s.row_id)

    samples: Iterator[Sample] = encode_stream(
        records(), encoder, journal, strict=strict, workers=workers
    )
    if max_rows:
        samples = itertools.islice(samples, max_rows)
    end: list[int] = []  # the row after the last sample written

    def written(samples: Iterator[Sample]) -> Iterator[Sample]:
        for s in samples:
            end[:] = [s.position + 1]
            yield s

    try:
        extra = {"source": source or {"dataset": dataset.description}, "ctx_len": ctx_len or None}
        info = write_processed(
            written(samples),
            spec,
            folder,
            split=split,
            rows_per_file=rows_per_file,
            manifest=extra,
            source_ids=source_id,
        )
    finally:
        bar.update(dataset.stats.rows - bar.n)
        bar.close()
    skips = SkipCounter()
    stopped = bool(max_rows) and info["rows"] == max_rows
    skips.add_all(journal.take((0, end[0]) if stopped else None))
    info["rows_read"] = info["rows"] + skips.total
    info["skipped"] = dict(skips.counts)
    (folder / MANIFEST).write_text(json.dumps(info, indent=1) + "\n")
    return info


# --- the command ---------------------------------------------------------------------------------
def add_process_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Flags of `vlmscope data process MODEL DATASET --out DIR`."""
    p.add_argument("model", help="HF model name or local path (a zoo name such as `toy` works)")
    p.add_argument(
        "dataset",
        help="what `vlmscope train` reads: Parquet/JSONL/JSON file or folder, a save_to_disk "
        "folder, a hub name, or `shapes` / `shapes:N`",
    )
    p.add_argument(
        "--out",
        required=True,
        metavar="DIR",
        help="folder to write (must not exist or be empty, unless --overwrite)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace DIR if it already holds files (swapped in only when complete)",
    )
    p.add_argument(
        "--ctx-len",
        "--ctx_len",
        type=int,
        default=0,
        metavar="C",
        help="truncate samples to C tokens as training would (default 0: keep every token, so "
        "each training run truncates to its own --ctx-len)",
    )
    p.add_argument("--split", default="train", help="dataset split (default: train)")
    p.add_argument(
        "--schema",
        default="auto",
        choices=("auto", "llava", "chat", "text"),
        help="record schema of DATASET (default: auto, from the columns)",
    )
    p.add_argument(
        "--image-root",
        "--image_root",
        default="",
        metavar="DIR",
        help="folder that relative image paths resolve against; paths must stay "
        "inside it unless --allow-outside-image-root (default: the dataset's "
        "folder)",
    )
    p.add_argument(
        "--allow-outside-image-root",
        "--allow_outside_image_root",
        action="store_true",
        help="read image paths that lead outside --image-root "
        "(absolute paths, '..', links); only for datasets you trust",
    )
    p.add_argument(
        "--columns",
        nargs="+",
        default=[],
        metavar="KEY=NAME",
        help="source column names that differ from the schema's, e.g. "
        "messages=conversation (as in `vlmscope train`)",
    )
    p.add_argument(
        "--strict",
        action="store_true",
        help="stop at the first bad record instead of skipping and counting it",
    )
    p.add_argument(
        "--max-rows",
        "--max_rows",
        type=int,
        default=0,
        metavar="N",
        help="stop after N written rows (default 0: the whole split)",
    )
    p.add_argument(
        "--rows-per-file",
        "--rows_per_file",
        type=int,
        default=2000,
        metavar="N",
        help="rows per Parquet file (default 2000)",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=0,
        metavar="N",
        help="processes that run the processor (default 0: this process)",
    )
    p.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of a generated shapes world (as `vlmscope train --seed`; default 0)",
    )
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    return p


def run_process_command(args: argparse.Namespace) -> int:
    """`vlmscope data process`: check the flags, the output folder and the data first, then
    process and write DIR atomically; prints a table of counts. Returns the exit code."""
    from vlmscope.files import FolderLockedError, lock_folder
    from vlmscope.models.hooked import HookedVLM, load_hf
    from vlmscope.training.checkpoint import write_folder_atomically
    from vlmscope.training.config import TrainConfig
    from vlmscope.training.errors import CheckpointError
    from vlmscope.training.sources import open_training_data, resolve_model_path

    def fail(msg: str, code: int = 1) -> int:
        print(f"vlmscope data process: error: {msg}", file=sys.stderr)
        return code

    for flag in ("ctx_len", "max_rows", "workers"):
        if getattr(args, flag) < 0:
            return fail(f"--{flag.replace('_', '-')} must be >= 0, got {getattr(args, flag)}", 2)
    if args.rows_per_file < 1:
        return fail(f"--rows-per-file must be >= 1, got {args.rows_per_file}", 2)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        return fail(f"--out {out} is a file, not a folder")
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        return fail(
            f"--out {out} already exists and is not an empty folder; pass --overwrite "
            "to replace it or choose another folder"
        )
    try:
        cfg = TrainConfig(
            model=args.model,
            dataset=args.dataset,
            split=args.split,
            schema=args.schema,
            image_root=args.image_root,
            allow_outside_image_root=args.allow_outside_image_root,
            columns=list(args.columns),
            strict=args.strict,
            seed=args.seed,
        )
    except ValueError as e:
        return fail(str(e), 2)
    try:
        dataset = open_training_data(cfg)
    except (OSError, ValueError, ImportError, RuntimeError) as e:
        return fail(f"cannot open dataset {args.dataset!r}: {e}")
    if dataset.schema == "processed":
        return fail(f"{args.dataset} is already in the processed schema (it has input_ids)")
    try:
        model, processor = load_hf(resolve_model_path(args.model), weights=False)
    except (OSError, ValueError) as e:
        return fail(f"cannot load model {args.model!r}: {e}")
    vlm = HookedVLM(model, processor)
    result: dict[str, Any] = {}

    def write(folder: Path) -> None:
        source = {"dataset": args.dataset, "split": args.split, "schema": dataset.schema,
                  "seed": args.seed if cfg.is_shapes_dataset() else None}  # fmt: skip
        result.update(
            process_dataset(
                vlm,
                dataset,
                folder,
                name=args.model,
                ctx_len=args.ctx_len,
                split=args.split,
                workers=args.workers,
                strict=args.strict,
                max_rows=args.max_rows,
                rows_per_file=args.rows_per_file,
                source=source,
                progress=args.progress,
            )
        )

    # The lock lives beside DIR, which is swapped in whole at the end: one writer per DIR.
    lock_dir = out.parent / f".{out.name}.lock"
    try:
        lock = lock_folder(lock_dir, "output folder")
    except FolderLockedError as e:
        return fail(str(e).replace(str(lock_dir), str(out)))
    try:
        write_folder_atomically(
            out.parent, out.name, write, f"processed dataset {out}", "nothing was written"
        )
    except CheckpointError as e:
        cause = e.__cause__
        # --strict's bad record, or a processor output the schema cannot hold: say that.
        return fail(str(cause) if isinstance(cause, ValueError | SkipRecord) else str(e))
    finally:
        lock.release()
        with contextlib.suppress(OSError):
            lock_dir.rmdir()
    print(f"\n{'rows read':<28} {result['rows_read']:>10}")
    print(f"{'rows written':<28} {result['rows']:>10}")
    for reason, n in sorted(result["skipped"].items(), key=lambda kv: -kv[1]):
        print(f"{'skipped: ' + reason:<28} {n:>10}")
    size = sum(f.stat().st_size for f in out.glob("*.parquet"))
    print(f"{'files':<28} {len(result['files']):>10}")
    print(f"{'MB':<28} {size / 2**20:>10.1f}")
    print(
        f"\nwrote {out} (manifest: {out / MANIFEST}); train on it with "
        f"`vlmscope train {args.model} {out} ...`"
    )
    return 0
