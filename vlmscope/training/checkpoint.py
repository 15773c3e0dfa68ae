"""Training checkpoints: dictionaries, optimizer, counters, data position and RNG, no pickle.

A checkpoint is one folder written under a temporary name and swapped in by renames, so a crash
(or SIGKILL) at any moment leaves the previous checkpoint whole:

    <run>/checkpoint/dictionaries/   the bundle (JSON config + safetensors)
    <run>/checkpoint/optimizer.safetensors, rng.safetensors
    <run>/checkpoint/state.json      step, tokens, data position, skip counts, optimizer scalars
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import socket
import zlib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from vlmscope.files import apply_umask
from vlmscope.training.bundle import DictionaryBundle
from vlmscope.training.errors import CheckpointError

CHECKPOINT = "checkpoint"
DICTIONARIES = "dictionaries"
_OLD = f".{CHECKPOINT}.old"  # where write_folder_atomically moves the checkpoint it replaces
_TMP = ".tmp-"
_HOST = socket.gethostname().replace("/", "_")


def optimizer_to_flat(
    opt: torch.optim.Optimizer, names: Mapping[int, str]
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split an optimizer's state into tensors (for safetensors) and JSON scalars, keyed by
    parameter *name* (`names`: id(param) -> name), not by the optimizer's position index, so
    that state written by one layout of processes loads into another."""
    sd = opt.state_dict()
    order = [names.get(id(p), "") for g in opt.param_groups for p in g["params"]]
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {"param_groups": [], "state": {}, "keyed_by": "name"}
    for group in sd["param_groups"]:
        kept = [order[i] for i in group["params"] if order[i]]  # unnamed: placeholders
        scalars["param_groups"].append({**group, "params": kept})
    for pid, st in sd["state"].items():
        if not order[pid]:
            continue
        entry = {}
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"state.{order[pid]}.{k}"] = v.detach().cpu().contiguous()
            else:
                entry[k] = v
        scalars["state"][order[pid]] = entry
    return tensors, scalars


def optimizer_from_flat(
    opt: torch.optim.Optimizer,
    tensors: dict[str, torch.Tensor],
    scalars: dict[str, Any],
    names: Mapping[int, str],
    subset: bool = False,
) -> None:
    """Load state written by `optimizer_to_flat` (or by the older index-keyed format); with
    `subset`, only the parameters this optimiser holds (a rank's distributed modules)."""
    params = [p for g in opt.param_groups for p in g["params"]]
    if scalars.get("keyed_by") == "name":
        index = {names[id(p)]: i for i, p in enumerate(params) if id(p) in names}
        if subset:
            scalars = {**scalars, "state": {k: v for k, v in scalars["state"].items()
                                            if k in index}}  # fmt: skip
            tensors = {k: v for k, v in tensors.items() if k.split(".", 1)[1].rsplit(".", 1)[0]
                       in index}  # fmt: skip
        unknown = sorted(set(scalars["state"]) - set(index))
        if unknown:
            raise CheckpointError(f"optimizer state for parameters this run lacks: {unknown[:3]}")
    else:  # index-keyed (checkpoints written before the name keys)
        index = {str(i): i for i in range(len(params))}
    state: dict[int, dict[str, Any]] = {index[k]: dict(v) for k, v in scalars["state"].items()}
    for name, t in tensors.items():
        _, rest = name.split(".", 1)
        key_name, key = rest.rsplit(".", 1)
        if key_name not in index:
            raise CheckpointError(f"optimizer tensor {name!r} names no parameter of this run")
        i = index[key_name]
        if key != "step" and t.shape != params[i].shape:
            raise CheckpointError(
                f"optimizer tensor {name!r} has shape {tuple(t.shape)}, its parameter "
                f"{tuple(params[i].shape)}"
            )
        state.setdefault(i, {})[key] = t
    groups = []
    for saved, group in zip(scalars["param_groups"], opt.state_dict()["param_groups"], strict=True):
        groups.append({**saved, "params": group["params"]})
    opt.load_state_dict({"state": state, "param_groups": groups})


def parameter_names(module: torch.nn.Module) -> dict[int, str]:
    """id(param) -> its name in `module` (the bundle, not a wrapper around it)."""
    return {id(p): n for n, p in module.named_parameters()}


def save_checkpoint(
    run_dir: Path,
    bundle: DictionaryBundle,
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
    rng_states: list[torch.Tensor] | None = None,
    optimizer_flat: tuple[dict[str, torch.Tensor], dict[str, Any]] | None = None,
) -> Path:
    """Write a checkpoint atomically; the previous one survives any failure of this call.
    `rng_states`: every rank's CPU RNG state (default: this process's); `optimizer_flat`: the
    optimiser state already flattened (merged from several ranks' shards)."""

    def write(tmp: Path) -> None:
        bundle.save(tmp / "dictionaries")
        tensors, scalars = optimizer_flat or optimizer_to_flat(optimizer, parameter_names(bundle))
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        ranks = rng_states if rng_states is not None else [torch.get_rng_state()]
        rng = {"torch": ranks[0]}
        rng.update({f"torch.rank{r}": s for r, s in enumerate(ranks) if r})
        if torch.cuda.is_available():
            for i, s in enumerate(torch.cuda.get_rng_state_all()):
                rng[f"cuda.{i}"] = s
        save_file(rng, str(tmp / "rng.safetensors"))
        # CRC-32 of each tensor file: flipped bytes in tensor data load silently otherwise
        # (the dictionaries record their own, per block).
        crcs = {
            name: file_crc32(tmp / name) for name in ("optimizer.safetensors", "rng.safetensors")
        }
        full = {**state, "optimizer": scalars, "crc32": crcs}
        (tmp / "state.json").write_text(json.dumps(full, indent=1))

    return write_folder_atomically(
        run_dir, CHECKPOINT, write, "checkpoint", "the previous checkpoint is intact"
    )


def save_final_dictionaries(run_dir: Path, bundle: DictionaryBundle) -> Path:
    """Write `<run>/dictionaries` atomically (a failed write leaves no half folder)."""
    return write_folder_atomically(
        run_dir,
        DICTIONARIES,
        bundle.save,
        "the final dictionaries",
        f"the checkpoint in {run_dir / CHECKPOINT} holds the trained state: make room and "
        "rerun the same command with --resume to write them",
    )


def write_folder_atomically(
    run_dir: Path, name: str, write: Callable[[Path], object], what: str, recovery: str
) -> Path:
    """Fill a temporary folder with `write(tmp)`, then swap it in as `run_dir/name` by renames.

    Any failure of `write` (disk full raises safetensors' own error type, not OSError) removes
    the temporary folder and raises CheckpointError; the folder it replaces stays whole.
    """
    tmp = run_dir / f".{name}{_TMP}{_HOST}-{os.getpid()}"
    final = run_dir / name
    old = run_dir / f".{name}.old"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
        write(tmp)
        apply_umask(tmp)
        if final.exists():  # else `old` may be the only whole copy (a crash between renames)
            shutil.rmtree(old, ignore_errors=True)
            final.rename(old)
        tmp.rename(final)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if not final.exists() and old.exists():
            old.rename(final)  # a failed swap puts the previous folder back
        if not isinstance(e, Exception):  # Ctrl-C, SystemExit: not a write error
            raise
        raise CheckpointError(
            f"cannot write {what} under {run_dir} ({type(e).__name__}: {e}); {recovery}"
        ) from e
    shutil.rmtree(old, ignore_errors=True)
    return final


def remove_stale_temporaries(run_dir: Path) -> list[Path]:
    """Delete temporary folders left by a process that died while writing. A temporary is
    named by its writer's host and pid: one from this host whose pid is gone is stale; one
    from another host cannot be judged from here (a pid means nothing across hosts) and is
    kept, as is one of a live process here."""
    removed = []
    for name in (CHECKPOINT, DICTIONARIES):
        for tmp in run_dir.glob(f".{name}{_TMP}*"):
            host, _, pid = tmp.name[len(f".{name}{_TMP}") :].rpartition("-")
            if host and host != _HOST:
                continue
            if pid.isdigit() and int(pid) != os.getpid() and _alive(int(pid)):
                continue
            shutil.rmtree(tmp, ignore_errors=True)
            removed.append(tmp)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. another user's process
        return True
    return True


def find_checkpoint(run_dir: Path) -> Path | None:
    """The run's checkpoint, or the previous one if a crash hit between the two renames."""
    for name in (CHECKPOINT, _OLD):
        p = run_dir / name
        if (p / "state.json").is_file():
            return p
    return None


def file_crc32(path: Path, chunk: int = 1 << 24) -> int:
    """CRC-32 of a file's bytes, read in chunks."""
    crc = 0
    with open(path, "rb") as f:
        while block := f.read(chunk):
            crc = zlib.crc32(block, crc)
    return crc


def _read_tensors(path: Path, crc: int | None = None) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint file: a torn or garbled file is unreadable; one that parses
    but whose bytes changed fails the CRC-32 recorded when it was written."""
    try:
        tensors = load_file(str(path))
    except Exception as e:  # safetensors raises its own types for torn files and bad headers
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(
            f"checkpoint file {path} is unreadable ({first}): it is truncated or corrupt; "
            "restore it or start a new --run-name"
        ) from None
    if crc is not None and (got := file_crc32(path)) != crc:
        raise CheckpointError(
            f"checkpoint file {path} fails its checksum (crc32 {got:08x}, recorded "
            f"{crc:08x}): its bytes changed since it was written; restore it or start a new "
            "--run-name"
        )
    return tensors


def _read_state(path: Path) -> dict[str, Any]:
    """state.json, checked: the counters a resumed run continues from must make sense."""
    from vlmscope.training.sources import TrainState

    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint file {path} is unreadable: {e}") from None
    ts = raw.get("train_state") if isinstance(raw, dict) else None
    if not isinstance(ts, dict) or not isinstance(raw.get("optimizer"), dict):
        raise CheckpointError(f"checkpoint file {path} lacks train_state or optimizer")
    known = {f.name: f for f in dataclasses.fields(TrainState)}
    unknown = sorted(set(ts) - set(known))
    if unknown:
        raise CheckpointError(f"checkpoint file {path}: unknown train_state keys {unknown}")
    for key in ("step", "tokens", "epoch", "rows"):
        v = ts.get(key, 0)
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise CheckpointError(
                f"checkpoint file {path}: train_state.{key} must be an integer >= 0, got {v!r}"
            )
    if not isinstance(ts.get("initialized", False), bool):
        raise CheckpointError(f"checkpoint file {path}: train_state.initialized is not a bool")
    skips = ts.get("skips", {})
    if not isinstance(skips, dict) or not all(
        isinstance(n, int) and n >= 0 for n in skips.values()
    ):
        raise CheckpointError(f"checkpoint file {path}: train_state.skips must map to counts")
    crcs = raw.get("crc32", {})
    if not isinstance(crcs, dict) or not all(
        isinstance(c, int) and not isinstance(c, bool) for c in crcs.values()
    ):
        raise CheckpointError(f"checkpoint file {path}: crc32 must map file names to integers")
    world = raw.get("world_size", 1)
    if not isinstance(world, int) or world < 1:
        raise CheckpointError(f"checkpoint file {path}: world_size must be >= 1, got {world!r}")
    return raw  # type: ignore[no-any-return]


def load_checkpoint(
    path: Path,
    bundle: DictionaryBundle,
    optimizer: torch.optim.Optimizer,
    rank: int = 0,
    units: list[int] | None = None,
    local: Any = None,
) -> dict[str, Any]:
    """Restore dictionaries, optimizer and this rank's RNG in place; return the JSON state.
    Every file is checked first; a bad one is a CheckpointError naming it, and nothing in the
    run has been changed when it is raised. `local`: a CLT shard (training/clt_shards.py) to
    restore instead of the bundle, cut from the checkpoint's whole CLT by name (the files are
    memory-mapped, so only its slices are read into memory)."""
    try:
        if local is not None:
            saved = DictionaryBundle.load(path / "dictionaries", mmap=True)
            saved.check_all()
        else:
            device = "cpu" if units is not None else _device_of(bundle)
            saved = DictionaryBundle.load(path / "dictionaries", device=device)
    except Exception as e:  # DictionaryFormatError (a ValueError), OSError, safetensors errors
        raise CheckpointError(f"cannot read checkpoint {path / 'dictionaries'}: {e}") from None
    state = _read_state(path / "state.json")
    crcs = state.get("crc32", {})
    opt_tensors = _read_tensors(path / "optimizer.safetensors", crcs.get("optimizer.safetensors"))
    rng_path = path / "rng.safetensors"
    rng = _read_tensors(rng_path, crcs.get("rng.safetensors"))
    if saved.reads != bundle.reads or saved.cfg.num_latents != bundle.cfg.num_latents:
        raise CheckpointError(
            f"checkpoint {path} holds dictionaries for {saved.reads} with "
            f"{saved.cfg.num_latents} latents; this run has {bundle.reads} with "
            f"{bundle.cfg.num_latents}"
        )
    step = state["train_state"].get("step", 0)
    steps = {float(t) for k, t in opt_tensors.items() if k.endswith(".step")}
    # schedule-free optimisers count their steps per parameter group ("k")
    groups = state["optimizer"].get("param_groups", [])
    steps |= {float(g["k"]) for g in groups if isinstance(g, dict) and "k" in g}
    if steps and steps != {float(step)}:
        raise CheckpointError(
            f"checkpoint {path}: state.json says step {step} but optimizer.safetensors has "
            f"taken {sorted(steps)[:3]} steps; the files do not belong together"
        )
    mine = rng.get(f"torch.rank{rank}", rng.get("torch"))
    if mine is None or mine.dtype != torch.uint8 or mine.shape != torch.get_rng_state().shape:
        raise CheckpointError(f"checkpoint file {rng_path} holds no valid CPU RNG state")
    names = parameter_names(bundle)
    real = [i for i in range(len(bundle.coders))] if units is None else units
    opt_scalars = state.pop("optimizer")
    if local is not None:
        targets: list[torch.nn.Module] = [local]
        sources = [local.local_state(saved.state_dict())]
        names = parameter_names(local)
        opt_tensors, opt_scalars = local.local_optimizer(opt_tensors, opt_scalars)
    elif bundle.clt is not None:
        targets, sources = [bundle], [saved.state_dict()]
    else:
        targets = [bundle.coders[i] for i in real]
        sources = [saved.coders[i].state_dict() for i in real]
    before = ([{k: v.clone() for k, v in m.state_dict().items()} for m in targets],
              optimizer.state_dict())  # fmt: skip
    try:
        for m, src in zip(targets, sources, strict=True):
            m.load_state_dict(src)
        optimizer_from_flat(optimizer, opt_tensors, opt_scalars, names, units is not None)
    except (CheckpointError, KeyError, ValueError, RuntimeError) as e:
        for m, sd in zip(targets, before[0], strict=True):
            m.load_state_dict(sd)
        optimizer.load_state_dict(before[1])
        raise CheckpointError(
            f"checkpoint file {path / 'optimizer.safetensors'} does not fit this run: {e}"
        ) from None
    torch.set_rng_state(mine)
    cuda = [rng[k] for k in sorted(rng) if k.startswith("cuda.")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    return state


def _device_of(bundle: DictionaryBundle) -> torch.device:
    return next(bundle.parameters()).device
