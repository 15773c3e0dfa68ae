"""`vlmscope capture`: run the model over a dataset once and write what it reads to a store.

The model, data and token flags are `vlmscope train`'s own (generated from TrainConfig and
validated by it), and the data path is the live source's: the same reader, chat template,
batches, masks and bad-record counting, so the tokens captured are exactly those on-the-fly
training would select. Per batch, one forward pass with hooks records every stored hook at
the selected tokens; `capture/writer.py` cuts the stream into shards and the manifest is
rewritten (atomically, after each shard) to list the complete ones with the cursor that resumes
after them. The capture reads the dataset once (or until --max-tokens).

Phases: (1) the output folder (locked, empty, or a store to resume with the same settings),
(2) the data, then the model, (3) the hooks and their widths (a probe forward), (4) the loop.

Under torchrun each rank captures its own block of the dataset into its own shards, and rank 0
writes the complete manifest once every rank has finished (`capture_ranks.py`).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import shutil
import sys
import time
import warnings
from collections.abc import Callable, Mapping
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vlmscope import VlmscopeWarning
from vlmscope.capture import (
    DTYPES,
    MANIFEST,
    StoreError,
    StoreWriter,
    build_manifest,
    bytes_per_token,
    config_sha256,
    read_manifest,
    recipe_bytes_per_token,
    token_metadata,
    write_manifest,
)
from vlmscope.capture.layout import dtype_name
from vlmscope.data.processing import SkipCounter, SkipRecord
from vlmscope.data.sources import BadRecordError
from vlmscope.dictionaries import NonFiniteError, check_finite
from vlmscope.files import FolderLockedError, lock_folder
from vlmscope.models.hooked import HookedVLM
from vlmscope.models.masks import TokenMasks
from vlmscope.progress import progress_bar
from vlmscope.training.bundle import mlp_out, resid_mid
from vlmscope.training.capture_ranks import (
    check_ranks,
    finish_manifest,
    rank_rows,
    read_progress,
    write_progress,
)
from vlmscope.training.config import (
    _HELP,
    TrainConfig,
    _add_fields,
    config_from_args,
)
from vlmscope.training.distributed import Layout, collective_errors, leaving
from vlmscope.training.errors import TrainingError
from vlmscope.training.sources import LiveSource, TrainState, hookpoint_names, probe_inputs

__all__ = [
    "CaptureConfig",
    "CaptureResult",
    "add_capture_arguments",
    "capture",
    "run_capture_command",
]

#: TrainConfig fields that `vlmscope capture` shares with `vlmscope train`.
SHARED_FLAGS = (
    "layers",
    "hookpoints",
    "tokens",
    "include_special_tokens",
    "batch_size",
    "max_tokens",
    "ctx_len",
    "device",
    "seed",
    "schema",
    "split",
    "image_root",
    "columns",
    "strict",
    "workers",
    "dist_timeout",
)

_CAPTURE_HELP = {
    "layers": "LM layers to capture (default: all): their resid_mid and mlp.hook_out, what "
    "transcoders and CLTs read and write; with --hookpoints, keeps those layers' matches",
    "hookpoints": "hook-point patterns to store instead, lm.* per-token hooks, e.g. "
    "'lm.blocks.*.hook_resid_post' for SAEs (widths may differ)",
    "tokens": "which token positions to store; training can later select among them",
    "include_special_tokens": "also store BOS and chat-template control tokens",
    "seed": "seed of the generated shapes dataset (shapes / shapes:N)",
    "max_tokens": "stop after the batch that reaches this many stored tokens (0: the whole "
    "dataset, once)",
}

#: data settings that a resumed capture must share with the capture it continues.
_DATA_KEYS = (
    "dataset",
    "split",
    "schema",
    "columns",
    "image_root",
    "seed",
    "ctx_len",
    "batch_size",
    "tokens",
    "include_special_tokens",
)


@dataclass
class CaptureConfig:
    """`vlmscope capture`: `run` holds the flags shared with train (its dtype is the model's)."""

    run: TrainConfig
    out: str
    dtype: str = ""
    shard_mb: float = 256.0
    resume: bool = False

    def __post_init__(self) -> None:
        if self.dtype and self.dtype not in DTYPES:
            raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if not (self.shard_mb > 0 and math.isfinite(self.shard_mb)):
            raise ValueError(f"--shard-mb must be > 0, got {self.shard_mb}")
        if not self.out:
            raise ValueError("--out DIR is required: the folder the store is written to")


@dataclass
class CaptureResult:
    folder: Path
    manifest: dict[str, Any]
    seconds: float
    #: tokens this run captured, over all ranks (a resumed capture counts only its own).
    new_tokens: int
    skips: SkipCounter


# --- phases ------------------------------------------------------------------------------------
def _open_folder(cfg: CaptureConfig) -> dict[str, Any] | None:
    """The manifest to resume from (None: a fresh store); refuses to overwrite anything."""
    folder = Path(cfg.out)
    manifest = None
    if (folder / MANIFEST).exists():
        try:
            manifest = read_manifest(folder)
        except StoreError as e:
            raise TrainingError(str(e)) from None
    if manifest is not None and not cfg.resume:
        state = (
            "a complete store"
            if manifest["complete"]
            else f"an unfinished capture ({len(manifest['shards'])} shards)"
        )
        raise TrainingError(
            f"{folder} already holds {state}; pass --resume to continue it, or choose another --out"
        )
    if manifest is None:
        others = [p.name for p in folder.iterdir() if not p.name.startswith(".")]
        if others:
            raise TrainingError(
                f"--out {folder} is not empty and holds no store ({', '.join(sorted(others)[:3])}"
                f"{', ...' if len(others) > 3 else ''}): choose an empty or new folder"
            )
        if cfg.resume:
            warnings.warn(
                f"--resume: no store in {folder}; starting fresh",
                category=VlmscopeWarning,
                stacklevel=3,
            )
    return manifest


def _remove_leftovers(
    folder: Path, manifest: dict[str, Any] | None, rank: int | None = None
) -> None:
    """Temporaries of a killed writer, and shards it wrote after its last manifest (the
    resumed capture writes them again). `rank`: one rank of several, which tidies only its
    own shards and temporaries (and rank 0 the manifest's)."""
    listed = {s["file"] for s in (manifest or {}).get("shards", [])}
    own = f"shard-r{rank:04d}-" if rank is not None else "shard-"
    for p in folder.iterdir():
        others = rank is not None and f"-r{rank:04d}" not in p.name
        if others and not (rank == 0 and p.name.startswith(".manifest.json")):
            continue
        if p.name.startswith(".") and ".tmp-" in p.name:
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
        elif p.name.startswith(own) and p.name not in listed:
            p.unlink()


def _in_turn(lay: Layout, fn: Callable[[], Any]) -> Any:
    """`fn()` on rank 0, then on the other ranks (one process: `fn()`)."""
    first = lay.phase(fn, main_only=True)
    rest = lay.phase(fn, others_only=True)
    return first if lay.is_main else rest


def _own_record(folder: Path, old: dict[str, Any] | None, lay: Layout) -> dict[str, Any]:
    """The record this rank continues: its entry in the manifest (one process) or its
    progress file (several), with its complete shards; {} for a fresh start."""
    if old is None:
        return {}
    if lay.distributed:
        return read_progress(folder, lay.rank)
    record = dict(old.get("writers", {}).get("0", {}))
    record["shards"] = [s for s in old.get("shards", []) if s["rank"] == 0]
    return record


def capture_hooks(cfg: TrainConfig, vlm: HookedVLM) -> list[str]:
    """The hooks to store, in forward order: resid_mid and mlp.hook_out of --layers, or the
    --hookpoints matches (within --layers when given)."""
    if cfg.tower != "lm":
        raise TrainingError(
            f"--tower {cfg.tower}: the store keeps language-model token positions only; train "
            "vision-tower dictionaries on the fly (vlmscope train --tower vision ...)"
        )
    n = vlm.adapter.n_layers
    bad = [layer for layer in cfg.layers if layer >= n]
    if bad:
        raise TrainingError(f"--layers {bad} do not exist: the model has {n} layers (0..{n - 1})")
    layers = sorted(cfg.layers) if cfg.layers else list(range(n))
    if not cfg.hookpoints:
        return vlm.hook_names([h for i in layers for h in (resid_mid(i), mlp_out(i))])
    names = hookpoint_names(cfg.hookpoints, vlm, cfg.layers)
    vision = [h for h in names if not h.startswith("lm.")]
    if vision:
        raise TrainingError(
            f"--hookpoints {cfg.hookpoints} match {vision[:4]}: the store keeps language-model "
            "token positions only; train vision and projector dictionaries on the fly "
            "(vlmscope train --hookpoints ...)"
        )
    return names


def _hook_widths(vlm: HookedVLM, names: list[str]) -> dict[str, int]:
    """Per-token width of each hook (heads flattened), read off one tiny forward pass."""
    _, cache = vlm.run_with_cache(probe_inputs(vlm), names=names, mask="all")
    return {name: int(cache[name].flatten(1).shape[1]) for name in names}


def _header(
    cfg: CaptureConfig, vlm: HookedVLM, widths: dict[str, int], ranks: int = 1
) -> dict[str, Any]:
    """Everything the manifest says about the store besides its shards."""
    run = cfg.run
    store_dtype = DTYPES[cfg.dtype] if cfg.dtype else vlm.dtype
    if store_dtype not in DTYPES.values():
        store_dtype = torch.float32
    config = vlm.model.config
    per_token = bytes_per_token(widths, store_dtype)
    layers = sorted({int(h.split(".")[2]) for h in widths})
    sizes: dict[str, Any] = {"bytes_per_token": per_token}
    if not run.hookpoints:  # the transcoder pairs: compare with the per-layer recipe layout
        recipe = recipe_bytes_per_token(len(layers), vlm.adapter.d_model, store_dtype, 16)
        sizes["recipe_bytes_per_token_window16"] = recipe
    return {
        "model": {
            "name": run.model,
            "revision": getattr(config, "_commit_hash", None),
            "config_sha256": config_sha256(config.to_dict()),
            "family": vlm.adapter.family,
            "dims": vlm.adapter.dims(),
            "dtype": str(vlm.dtype).removeprefix("torch."),
        },
        "data": {k: getattr(run, k) for k in _DATA_KEYS} | {"max_tokens": run.max_tokens},
        "hooks": {h: {"width": w, "layer": int(h.split(".")[2])} for h, w in widths.items()},
        "layers": layers,
        "dtype": dtype_name(store_dtype),
        "shard_tokens": max(1, int(cfg.shard_mb * 2**20) // per_token),
        "sizes": sizes,
        "ranks": ranks,
    }


def _check_same_capture(old: Mapping[str, Any], new: Mapping[str, Any], folder: Path) -> None:
    """A resumed capture must write the same kind of tokens as the one it continues."""
    diff = []
    for key in ("model", "hooks", "dtype", "shard_tokens"):
        if old.get(key) != new[key]:
            diff.append(f"{key}: {_brief(old.get(key))} -> {_brief(new[key])}")
    for key in _DATA_KEYS:
        if old["data"].get(key) != new["data"][key]:
            diff.append(
                f"--{key.replace('_', '-')}: {old['data'].get(key)!r} -> {new['data'][key]!r}"
            )
    if diff:
        raise TrainingError(
            f"--resume with settings that differ from the capture in {folder}: "
            + "; ".join(diff)
            + " (use the original flags, or another --out)"
        )


def _brief(value: Any) -> str:
    text = repr(value)
    return text if len(text) < 80 else text[:77] + "..."


# --- the capture ---------------------------------------------------------------------------------
def capture(
    cfg: CaptureConfig,
    vlm: HookedVLM | None = None,
    progress: bool = True,
    layout: Layout | None = None,
) -> CaptureResult:
    """Capture a store as configured (see `vlmscope capture --help`); resumable. Under
    torchrun (`layout` from the environment) each rank captures its block of the data."""
    lay = layout or Layout.from_environment(cfg.run.dist_timeout, cfg.run.device)
    folder = Path(cfg.out)
    lock = None
    error = None
    if lay.is_main:  # one writer per folder: rank 0 holds the lock for all ranks
        try:
            folder.mkdir(parents=True, exist_ok=True)
            lock = lock_folder(folder, "activation store")
        except FolderLockedError as e:
            error = str(e)
        except OSError as e:
            error = f"cannot write to --out {folder}: {e}"
    try:
        with leaving(lay if layout is None else None):  # a group joined here is left here
            lay.agree(error)
            return _capture(cfg, folder, vlm, progress, lay)
    finally:
        if lock is not None:
            lock.release()


def _capture(
    cfg: CaptureConfig, folder: Path, vlm: HookedVLM | None, progress: bool, lay: Layout
) -> CaptureResult:
    # (1) the folder, checked by rank 0; every rank learns its verdict and the old manifest
    old, error = None, None
    if lay.is_main:
        try:
            old = _open_folder(cfg)
            check_ranks(old, lay.world, folder)
        except TrainingError as e:
            if not lay.distributed:
                raise
            error = str(e)
    lay.agree(error)
    old = lay.gather(old)[0] if lay.distributed else old
    if old is not None and old["complete"]:
        if lay.is_main:
            print(f"{folder} is already a complete store; nothing to capture")
        return CaptureResult(folder, old, 0.0, 0, SkipCounter())
    if not lay.distributed:
        _remove_leftovers(folder, old)
    if cfg.run.pack:
        raise TrainingError(
            "--pack: capture stores whole samples with their positions; capture without it "
            "(packed text trains on the fly: vlmscope train --pack)"
        )
    run = dataclasses.replace(cfg.run, epochs=1, pack=False)  # one pass, sample by sample

    # (2) the data, then the model: rank 0 first (it writes shared caches the others read)
    def open_source() -> LiveSource:
        source = LiveSource(run)
        source.open_data()
        source.bind_model(vlm)
        return source

    source = _in_turn(lay, open_source)
    model = source._model()
    names = capture_hooks(run, model)
    header = _header(cfg, model, _hook_widths(model, names), lay.world)
    # (3) rank 0 checks a resumed store's settings, or writes the first manifest of a new one
    error = None
    if lay.is_main:
        try:
            if old is not None:
                _check_same_capture(old, header, folder)
            elif lay.distributed:
                write_manifest(folder, build_manifest(header, {}, complete=False))
        except (TrainingError, StoreError) as e:
            if not lay.distributed:
                raise
            error = str(e)
    lay.agree(error)
    mine = _own_record(folder, old, lay)
    if lay.distributed:  # each rank tidies its own files only
        _remove_leftovers(folder, {"shards": mine.get("shards", [])}, rank=lay.rank)
        lo, hi = rank_rows(int(source.dataset.count_rows()), run.batch_size, lay.rank, lay.world)
        source.dataset = source.dataset.select(lambda p: lo <= p < hi)
    else:
        lo, hi = 0, 1
    resume = mine.get("resume") or {}
    # A rank that had finished before an interruption, or whose block is empty (fewer
    # batches than ranks), only takes part in the collectives.
    finished = bool(mine.get("done"))
    idle = finished or lo >= hi
    state = TrainState(rows=int(resume.get("rows", lo)))
    sample = int(resume.get("sample", 0))
    stream = int(resume.get("tokens", 0))  # index of the next token in this rank's stream
    source.skips = SkipCounter(
        dict(resume.get("skips", {})),
        {k: list(v) for k, v in resume.get("skip_examples", {}).items()},
    )

    def record(w: StoreWriter, done: bool = False) -> dict[str, Any]:
        if finished:  # this rank had finished before the capture was interrupted
            return dict(mine)
        cursor = w.resume or {}
        return {
            "shards": w.shards,
            "resume": w.resume,
            "done": done,
            "first_sample": 0,
            "samples": sample if done else int(cursor.get("sample", 0)),
            "skips": dict(source.skips.counts) if done else cursor.get("skips", {}),
            "skip_examples": (
                {k: list(v) for k, v in source.skips.examples.items()}
                if done
                else cursor.get("skip_examples", {})
            ),
        }

    def on_shard(w: StoreWriter) -> None:
        if lay.distributed:  # one progress file per rank; rank 0 merges them at the end
            write_progress(folder, lay.rank, record(w))
        else:
            write_manifest(folder, build_manifest(header, {0: record(w)}, complete=False))

    writer = StoreWriter(
        folder,
        {h: v["width"] for h, v in header["hooks"].items()},
        DTYPES[header["dtype"]],
        header["shard_tokens"],
        rank=lay.rank,
        shards=mine.get("shards", []),
        drop=int(resume.get("drop", 0)),
        on_shard=on_shard,
    )
    if old is None and not lay.distributed:
        write_manifest(folder, build_manifest(header, {0: record(writer)}, complete=False))
    names = list(header["hooks"])
    # Several ranks: --max-tokens is shared out, each rank stops at its part.
    budget = -(-run.max_tokens // lay.world)
    bar = progress_bar(
        total=budget or None,
        initial=stream,
        unit="tok",
        unit_scale=True,
        disable=not (progress and lay.is_main),
        # rank 0's own tokens and share of --max-tokens: a global count would cost a
        # collective per batch; the summary at the end gives the total
        desc=f"capture {folder.name}" + (f" (rank 0 of {lay.world})" if lay.distributed else ""),
        dynamic_ncols=True,
    )
    start, new_tokens = time.perf_counter(), 0
    # A rank reads its block of the data: the checks of a whole pass are the ranks' together
    batches = iter(source._model_batches(state, pass_checks=not lay.distributed))
    cursor = _cursor(state.rows, sample, stream, source.skips)
    working, error = not idle, None
    try:
        with collective_errors(lay, "capturing") if lay.distributed else nullcontext():
            while True:
                if working:
                    try:
                        item = next(batches, None)
                        if item is None:
                            working = False
                        elif item[0] is None:  # the data's end: the records skipped after
                            source.skips.add_all(item[2])  # its last batch
                            cursor = _cursor(cursor["rows"], sample, stream, source.skips)
                        else:
                            batch, after, skipped = item
                            n, stored = 0, 0
                            if not source.left_out(batch, names):  # Mllama's skipped layers
                                n = _capture_batch(model, run, names, writer, batch, sample, cursor)
                                stored = batch.size
                            source.skips.add_all(skipped)  # the rows the cursor now passes
                            sample += stored
                            stream += n
                            state.tokens = stream
                            new_tokens += n
                            bar.update(n)
                            cursor = _cursor(after["rows"], sample, stream, source.skips)
                            working = not (budget and stream >= budget)
                    except (TrainingError, StoreError, BadRecordError, SkipRecord) as e:
                        if not lay.distributed:
                            raise
                        error, working = f"{e}", False
                if not lay.distributed:
                    if not working:
                        break
                    continue
                # Every batch, the ranks say whether they go on or failed: a failure on any
                # rank stops all of them at once, naming it; ranks done early wait here.
                status = lay.sum([float(working), float(error is not None)])
                if status[1].item():
                    lay.agree(error)
                if status[0].item() == 0:
                    break
            if lay.distributed:  # what one process checks as its pass ends, over all ranks
                got = lay.sum([float(sample), float(stream)])
                problem = None
                if got[0].item() == 0:
                    problem = source.no_samples_message()
                elif got[1].item() == 0:
                    problem = source.no_tokens_message()
                lay.agree(problem)
            error = None
            try:
                if not finished:
                    writer.finish()
                if lay.distributed:
                    write_progress(folder, lay.rank, record(writer, done=True))
            except StoreError as e:
                if not lay.distributed:
                    raise
                error = str(e)
            lay.agree(error)
            manifest = finish_manifest(folder, header, record(writer, done=True), lay)
            if lay.distributed:  # the table reports the capture, not rank 0's part of it
                new_tokens = int(lay.sum([float(new_tokens)])[0].item())
    except StoreError as e:
        raise TrainingError(str(e)) from None
    finally:
        bar.close()
        source.close()  # a caller's model gets its flags back; --workers processes stop
    return CaptureResult(folder, manifest, time.perf_counter() - start, new_tokens, source.skips)


def _capture_batch(
    model: HookedVLM,
    run: TrainConfig,
    names: list[str],
    writer: StoreWriter,
    batch: Any,
    sample: int,
    cursor: dict[str, Any],
) -> int:
    """One batch's stored hooks and metadata handed to the writer; its token count."""
    masks = batch.masks if batch.masks is not None else model.masks(batch.inputs)
    positions = masks.select(run.tokens, include_special=run.include_special_tokens)
    tensors = _activations(model, batch.inputs, masks, positions, names)
    for h in names:
        try:
            check_finite(h, tensors[h])
        except NonFiniteError as e:
            raise TrainingError(
                f"{e} (batch rows {batch.row_ids[:4]}); the {len(writer.shards)} "
                "complete shards and the manifest are intact"
            ) from None
    tensors |= token_metadata(masks, positions, sample, batch.positions)
    samples = [(sample + i, batch.positions[i], batch.row_ids[i]) for i in range(batch.size)]
    writer.add(tensors, samples, cursor)
    return int(tensors["meta.sample"].shape[0])


def _activations(
    vlm: HookedVLM,
    inputs: Mapping[str, torch.Tensor],
    masks: TokenMasks,
    positions: torch.Tensor,
    names: list[str],
) -> dict[str, torch.Tensor]:
    """Every stored hook at the selected tokens, [n, width] on the CPU, in the order of a
    masked activation cache. The forward pass stops at the last stored hook: the later
    layers and the logits would be computed for nothing."""
    _, cache = vlm.run_with_cache(inputs, names=names, mask=positions, masks=masks,
                                  device="cpu", stop_early=True)  # fmt: skip
    return {h: cache[h].flatten(1) for h in names}


def _cursor(rows: int, sample: int, tokens: int, skips: SkipCounter) -> dict[str, Any]:
    """What regenerates the stream from the next batch on (see capture/writer.py)."""
    return {
        "rows": rows,
        "sample": sample,
        "tokens": tokens,
        "skips": dict(skips.counts),
        "skip_examples": {k: list(v) for k, v in skips.examples.items()},
    }


# --- command line -----------------------------------------------------------------------------
def add_capture_arguments(p: argparse.ArgumentParser) -> None:
    """`vlmscope capture` flags: train's model/data/token flags plus the store's own."""
    p.add_argument("model", help=_HELP["model"])
    p.add_argument("dataset", help=_HELP["dataset"])
    p.add_argument(
        "--out",
        required=True,
        help="folder the store is written to (new or empty, or a store to --resume)",
    )
    _add_fields(p, TrainConfig, only=SHARED_FLAGS, help_texts=_CAPTURE_HELP)
    p.add_argument(
        "--dtype",
        choices=tuple(DTYPES),
        default=argparse.SUPPRESS,
        help="dtype of the stored activations (default: the model's)",
    )
    p.add_argument(
        "--model-dtype",
        choices=tuple(DTYPES),
        default=argparse.SUPPRESS,
        help="dtype the model runs in (default: the checkpoint's own)",
    )
    p.add_argument(
        "--shard-mb",
        type=float,
        default=argparse.SUPPRESS,
        help="size of each shard file in MB (default: 256)",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue an interrupted capture in --out after its last complete "
        "shard (the finished store is the same as an uninterrupted one's)",
    )


def config_from_capture_args(ns: argparse.Namespace) -> CaptureConfig:
    """CaptureConfig from parsed flags; the shared flags are validated by TrainConfig."""
    own = {"out", "dtype", "shard_mb", "resume", "model_dtype"}
    values = {k: v for k, v in vars(ns).items() if k not in own and k in _train_fields()}
    values["dtype"] = getattr(ns, "model_dtype", "")
    run = config_from_args(argparse.Namespace(**values, max_steps=0, epochs=1))
    return CaptureConfig(
        run, ns.out, getattr(ns, "dtype", ""), getattr(ns, "shard_mb", 256.0), ns.resume
    )


def _train_fields() -> set[str]:
    return {f.name for f in dataclasses.fields(TrainConfig)}


def run_capture_command(args: argparse.Namespace) -> int:
    parser = args.parser
    try:
        cfg = config_from_capture_args(args)
    except ValueError as e:
        parser.error(str(e).replace("invalid training config", "invalid capture config"))
    from vlmscope.training.distributed import AgreedError

    main_rank = os.environ.get("RANK", "0") == "0"  # torchrun: only rank 0 reports
    try:
        res = capture(cfg)
    except (TrainingError, BadRecordError, SkipRecord) as e:  # the last two: --strict
        if main_rank or not isinstance(e, AgreedError):  # an agreed error is the same on all
            print(f"vlmscope capture: error: {e}", file=sys.stderr)
        return 1
    if not main_rank:
        return 0
    print_capture_table(res)
    return 0


def print_capture_table(res: CaptureResult) -> None:
    """The store's contents and the capture's speed as a short table."""
    m = res.manifest
    mb = m["bytes"] / 2**20
    per_tok = m["sizes"]["bytes_per_token"]
    rows = [
        ("store", str(res.folder)),
        (
            "model",
            f"{m['model']['name']} ({m['model']['family']}, config "
            f"{m['model']['config_sha256'][:12]})",
        ),
        ("hooks", f"{len(m['hooks'])} ({', '.join(list(m['hooks'])[:2])}, ...), {m['dtype']}"),
        (
            "tokens",
            f"{m['tokens']:,} ("
            + ", ".join(f"{v:,} {k}" for k, v in m["modality_tokens"].items())
            + f") from {m['samples']:,} samples",
        ),
        ("shards", f"{len(m['shards'])} files, {mb:,.1f} MB"),
        ("disk per token", f"{per_tok:,} bytes"),
    ]
    recipe = m["sizes"].get("recipe_bytes_per_token_window16")
    if recipe:
        rows.append(
            (
                "per-layer .pt recipe",
                f"{recipe:,} bytes per token "
                f"({recipe / per_tok:.1f}x ours; x + 16 stacked MLP outputs per layer)",
            )
        )
    if res.new_tokens and res.seconds > 0:
        rows.append(
            (
                "captured",
                f"{res.new_tokens:,} tokens in {res.seconds:.1f} s "
                f"({res.new_tokens / res.seconds:,.0f} tokens/s)",
            )
        )
    skipped = sum(sum(w.get("skips", {}).values()) for w in m["writers"].values())
    rows.append(("skipped records", str(skipped)))
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    if res.skips.total:
        print(res.skips.summary())
    print(f"\nmanifest: {res.folder / MANIFEST}")
