"""Sharded checkpoints and final dictionaries: every rank writes what it holds, so that a run
over many GPUs never funnels its dictionaries (a 7B model's CLT decoders alone are ~140 GB)
through rank 0's memory.

A checkpoint is one folder, written by all ranks into the same temporary folder and swapped in
by rank 0 (`write_folder_together`; the run folder must be on a filesystem every rank sees):

    <run>/checkpoint/shard-{r}-of-{W}.safetensors   what rank r of W holds: the model state
        and optimiser statistics of its parameters, under the names one process uses
        (`coders.3.W_enc`, `state.coders.3.W_enc.exp_avg`), so a file means the same whatever
        the layout. A CLT's decoder W_dec_s is held by target (clt_shards.py): column c of it,
        held alone, is `clt.layers.{s}.W_dec#c` (its statistics `state.clt.layers.{s}.W_dec.
        exp_avg#c`). A rank that holds nothing (data parallel: ranks > 0) writes no file.
    <run>/checkpoint/rng.safetensors   every rank's CPU RNG state (gathered: a few KB each)
    <run>/checkpoint/state.json        written last: counters, data cursor, skip counts, the
        optimiser's JSON scalars (merged over ranks), the dictionaries' bindings, "shards"
        (file -> its tensor names) and "crc32" (file -> CRC-32 of its bytes)

`checkpoint.load_checkpoint` reads it at any world size: each rank verifies its share of the
files' CRCs (all agree before anything changes), then reads, memory-mapped, only the tensors
and columns it holds now, whole or assembled from columns. The final dictionaries
(`<run>/dictionaries`) are the ordinary bundle format, written the same way: per-layer owners
write their coders' folders; a CLT's layer file is written by the owner of its layer, which
streams W_dec_s in row blocks, receiving the other owners' columns of each block
point-to-point (`stream_safetensors`): no rank holds a whole W_dec_s.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor

from vlmscope.dictionaries.io import (
    FORMAT,
    _check_hookpoint,
    save_sparse_coder,
    stream_safetensors,
    write_clt_config,
    write_coders_config,
)
from vlmscope.training.bundle import BUNDLE_KEY, DictionaryBundle
from vlmscope.training.checkpoint import (
    CHECKPOINT,
    DICTIONARIES,
    PIECE,
    file_crc32,
    optimizer_to_flat,
    parameter_names,
    write_folder_together,
)
from vlmscope.training.distributed import Layout, collective_errors
from vlmscope.training.modules import ModuleShards, state_of_units

__all__ = [
    "bindings",
    "owned_tensors",
    "read_checkpoint_state",
    "save_checkpoint",
    "save_final_dictionaries",
    "shard_name",
]

#: bytes of one row block of W_dec_s sent to its file's writer
STREAM_BLOCK = 64 << 20


def shard_name(rank: int, world: int) -> str:
    return f"shard-{rank}-of-{world}.safetensors"


def _piece(name: str, column: int | None) -> str:
    return name if column is None else f"{name}{PIECE}{column}"


def owned_tensors(
    bundle: DictionaryBundle,
    optimizer: torch.optim.Optimizer,
    shards: ModuleShards | None,
    layout: Layout,
) -> tuple[dict[str, Tensor], dict[str, Any] | None]:
    """What this rank writes: its tensors (model state and optimiser statistics) under the
    checkpoint's names, and its optimiser's JSON scalars keyed by full parameter name (None
    for a data-parallel rank > 0, whose copy rank 0 writes)."""
    shard = shards.checkpoint_view() if shards is not None else None
    if shards is None:
        if not layout.is_main:
            return {}, None
        model = dict(bundle.state_dict())
        tensors, scalars = optimizer_to_flat(optimizer, parameter_names(bundle))
    elif shard is None:  # per-layer units
        model = state_of_units(bundle.state_dict(), shards.mine)
        tensors, scalars = optimizer_to_flat(optimizer, parameter_names(bundle))
    else:  # a CLT shard: decoder columns keyed name#column
        model = {_piece(*k) if isinstance(k, tuple) else k: v
                 for k, v in shard.full_state().items()}  # fmt: skip
        local, scalars = optimizer_to_flat(optimizer, parameter_names(shard))
        tensors = {}
        for key, value in local.items():
            name, stat = key[len("state.") :].rsplit(".", 1)
            full, column = shard.full_name(name)
            tensors[_piece(f"state.{full}.{stat}", column)] = value
        scalars["state"] = {shard.full_name(n)[0]: v for n, v in scalars["state"].items()}
        scalars["param_groups"] = [
            {**g, "params": list(dict.fromkeys(shard.full_name(n)[0] for n in g["params"]))}
            for g in scalars["param_groups"]
        ]
    out = {k: v.detach().cpu().contiguous() for k, v in {**model, **tensors}.items()}
    return out, scalars


def _merge_scalars(parts: list[dict[str, Any] | None]) -> dict[str, Any]:
    """The ranks' optimiser scalars as one name-keyed record (the hyperparameters and
    schedule-free counters are the same on every rank; each names its own parameters)."""
    held = [p for p in parts if p is not None]
    base = held[0]
    names = list(dict.fromkeys(n for p in held for g in p["param_groups"] for n in g["params"]))
    state: dict[str, Any] = {}
    for p in held:
        state.update(p["state"])
    return {**base, "state": state, "param_groups": [{**base["param_groups"][0], "params": names}]}


def bindings(bundle: DictionaryBundle) -> dict[str, Any]:
    """What a resumed run's dictionaries must match, recorded in state.json."""
    return {"kind": bundle.kind, "reads": list(bundle.reads), "writes": list(bundle.writes),
            "num_latents": bundle.cfg.num_latents}  # fmt: skip


def save_checkpoint(
    run_dir: Path,
    layout: Layout,
    bundle: DictionaryBundle,
    optimizer: torch.optim.Optimizer,
    shards: ModuleShards | None,
    state: dict[str, Any],
) -> Path:
    """Every rank writes its shard; rank 0 the RNG states and state.json, last. Called on
    every rank together; a failure anywhere is a CheckpointError on every rank and the
    previous checkpoint is intact."""
    rngs = layout.gather(torch.get_rng_state())
    tensors, scalars = owned_tensors(bundle, optimizer, shards, layout)

    def write_mine(tmp: Path) -> dict[str, Any]:
        if not tensors:
            return {"file": None, "scalars": scalars}
        name = shard_name(layout.rank, layout.world)
        save_file(tensors, str(tmp / name))
        return {"file": name, "names": sorted(tensors), "crc": file_crc32(tmp / name),
                "scalars": scalars}  # fmt: skip

    def write_last(tmp: Path, results: list[dict[str, Any]]) -> None:
        rng = {"torch": rngs[0]}
        rng.update({f"torch.rank{r}": s for r, s in enumerate(rngs) if r})
        if torch.cuda.is_available():
            for i, s in enumerate(torch.cuda.get_rng_state_all()):
                rng[f"cuda.{i}"] = s
        save_file(rng, str(tmp / "rng.safetensors"))
        files = [r for r in results if r["file"] is not None]
        # CRC-32 of each tensor file: flipped bytes in tensor data load silently otherwise.
        crcs = {r["file"]: r["crc"] for r in files}
        crcs["rng.safetensors"] = file_crc32(tmp / "rng.safetensors")
        full = {**state, "optimizer": _merge_scalars([r["scalars"] for r in results]),
                "dictionaries": bindings(bundle), "shards": {r["file"]: r["names"] for r in files},
                "crc32": crcs}  # fmt: skip
        (tmp / "state.json").write_text(json.dumps(full, indent=1))

    return write_folder_together(
        run_dir, CHECKPOINT, layout, write_mine, write_last, "checkpoint",
        "the previous checkpoint is intact",
    )  # fmt: skip


def save_final_dictionaries(
    run_dir: Path, layout: Layout, bundle: DictionaryBundle, shards: ModuleShards | None
) -> Path:
    """Write `<run>/dictionaries` (the ordinary bundle format) atomically, every rank writing
    the files of what it holds; called on every rank together."""
    meta = bundle.metadata()
    shard = shards.checkpoint_view() if shards is not None else None

    def write_mine(tmp: Path) -> Any:
        if shards is None:  # one process or data parallel: rank 0 holds it all
            if layout.is_main:
                bundle.save(tmp)
            return None
        if shard is not None:
            return _write_clt_layers(tmp, shard, layout)
        for i in shards.mine:
            coder = bundle.coders[i]
            coder.cfg.metadata = {BUNDLE_KEY: meta}  # type: ignore[union-attr]
            save_sparse_coder(coder, tmp / _check_hookpoint(bundle.reads[i]))  # type: ignore[arg-type]
        return None

    def write_last(tmp: Path, results: list[Any]) -> None:
        if shards is None:
            return
        if shard is None:
            write_coders_config(tmp, bundle.reads, {BUNDLE_KEY: meta})
            return
        sums = {k: v for part in results for k, v in part.items()}
        shard.cfg.metadata = {BUNDLE_KEY: meta}
        layers = [f"layer_{s}.safetensors" for s in range(shard.cfg.n_layers)]
        write_clt_config(tmp, shard.cfg, {name: sums[name] for name in layers})

    return write_folder_together(
        run_dir,
        DICTIONARIES,
        layout,
        write_mine,
        write_last,
        "the final dictionaries",
        f"the checkpoint in {run_dir / CHECKPOINT} holds the trained state: make room and "
        "rerun the same command with --resume to write them",
    )


def _write_clt_layers(folder: Path, shard: Any, layout: Layout) -> dict[str, Any]:
    """Write `layer_{s}.safetensors` for every layer s this rank owns, and send this rank's
    columns of the other layers' W_dec_s to their writers; returns the written files'
    checksum records. All ranks walk the layers in the same order, so every send meets its
    receive. A writer that fails still receives every block sent to it, so that no sender
    waits for it; the error is raised after the walk."""
    sums: dict[str, Any] = {}
    error: Exception | None = None
    for s in range(shard.cfg.n_layers):
        stream = _DecoderStream(shard, layout, s)
        if layout.rank != stream.writer:
            stream.send()
            continue
        local = {k: v.detach().cpu() for k, v in shard.layers[str(s)].state_dict().items()}
        specs = {  # in the whole layer's state-dict order, as `save_clt` records checksums
            k: (stream.dtype, stream.shape) if k == "W_dec" else (local[k].dtype, local[k].shape)
            for k in shard.meta.layers[s].state_dict()
        }

        def pieces(name: str, local: dict[str, Tensor] = local, stream: Any = stream) -> Any:
            return stream.blocks() if name == "W_dec" else [local[name]]

        name = f"layer_{s}.safetensors"
        try:
            if error is None:
                sums[name] = stream_safetensors(folder / name, specs, pieces, {"format": FORMAT})
        except Exception as e:  # raised once every block sent here has been received
            error = e
        stream.drain()
    if error is not None:
        raise error
    return sums


class _DecoderStream:
    """W_dec_s [F, n_out, d_out] of one CLT layer in blocks of rows, each block's columns
    coming from the ranks that hold them (blocks of targets: contiguous columns), sent
    point-to-point to the owner of layer s, which writes its file."""

    def __init__(self, shard: Any, layout: Layout, s: int) -> None:
        meta = shard.meta.layers[s].W_dec  # on the meta device: shape and dtype only
        self.shard, self.layout, self.s = shard, layout, s
        self.shape, self.dtype = tuple(meta.shape), meta.dtype
        n_rows, n_out, width = self.shape
        self.holders: dict[int, list[int]] = {}  # rank -> its columns
        for c in range(n_out):
            self.holders.setdefault(shard.owner[s + c], []).append(c)
        self.step = max(1, STREAM_BLOCK // max(1, n_out * width * meta.element_size()))
        self.starts = range(0, n_rows, self.step)
        self.writer = shard.owner[s]
        self.remote = [h for h in sorted(self.holders) if h != self.writer]
        self.got: set[tuple[int, int]] = set()
        distributed = layout.distributed
        self.comm = layout._comm_device() if distributed else torch.device("cpu")

    def _columns(self, r0: int) -> Tensor:
        cols = self.holders[self.layout.rank]
        decs = self.shard.decoders
        return torch.stack(
            [decs[f"{self.s}_{self.s + c}"][r0 : r0 + self.step].detach() for c in cols], dim=1
        )

    def send(self) -> None:
        """This rank's columns of every block, to the writer (nothing if it holds none)."""
        import torch.distributed as dist

        if self.layout.rank not in self.holders:
            return
        with collective_errors(self.layout, "sending CLT decoder columns to their writer"):
            for r0 in self.starts:
                dist.send(self._columns(r0).to(self.comm).contiguous(), dst=self.writer)

    def _receive(self, r0: int, h: int) -> Tensor:
        import torch.distributed as dist

        rows = min(self.step, self.shape[0] - r0)
        buf = torch.empty(rows, len(self.holders[h]), self.shape[2], dtype=self.dtype,
                          device=self.comm)  # fmt: skip
        with collective_errors(self.layout, "receiving CLT decoder columns"):
            dist.recv(buf, src=h)
        self.got.add((r0, h))
        return buf.cpu()

    def blocks(self) -> Iterator[Tensor]:
        """The writer's whole rows of W_dec_s, block by block, in file order."""
        for r0 in self.starts:
            parts = {h: self._receive(r0, h) for h in self.remote}
            if self.writer in self.holders:
                parts[self.writer] = self._columns(r0).cpu()
            yield torch.cat([parts[h] for h in sorted(self.holders)], dim=1)

    def drain(self) -> None:
        """Receive (and drop) every block not yet received: after a failed write."""
        for r0 in self.starts:
            for h in self.remote:
                if (r0, h) not in self.got:
                    self._receive(r0, h)


def read_checkpoint_state(path: Path, optimizer: bool = False) -> dict[str, Tensor]:
    """The dictionaries' whole state dict in a checkpoint of either layout (decoder columns
    assembled; with `optimizer`, the optimiser's tensors `state.<param>.<stat>` too), for
    tools and tests; a resume reads only what each rank holds instead."""
    from vlmscope.training.checkpoint import _legacy_tensors, _read_state, _sharded_tensors

    state = _read_state(path / "state.json")
    if "shards" in state:
        tensors = _sharded_tensors(path, state, None)
    else:
        tensors = _legacy_tensors(path, state)[0]
    names = [n for n in sorted(tensors.names()) if optimizer or not n.startswith("state.")]
    return {n: tensors.get(n) for n in names}
