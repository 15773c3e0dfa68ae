"""Training checkpoints: dictionaries, optimizer, counters, data position and RNG, no pickle.

A checkpoint is one folder written under a temporary name and swapped in by renames, so a crash
(or SIGKILL) at any moment leaves the previous checkpoint whole. Every rank writes what it holds
into the same temporary folder (training/sharded.py; `write_folder_together`), rank 0 writes
state.json last and does the renames:

    <run>/checkpoint/shard-{r}-of-{W}.safetensors  rank r's tensors: model state and optimiser
                                     statistics of its parameters, under one process's names
    <run>/checkpoint/rng.safetensors every rank's CPU RNG state
    <run>/checkpoint/state.json      step, tokens, data position, skip counts, optimizer scalars,
                                     the bindings, "shards" (file -> tensor names), "crc32"

`load_checkpoint` reads that layout at any world size, and the one written before it (still
loaded, never written): `dictionaries/` (the bundle), `optimizer.safetensors`, rng, state.json.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import socket
import zlib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from vlmscope.files import apply_umask
from vlmscope.training.bundle import DictionaryBundle
from vlmscope.training.distributed import Layout
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
) -> None:
    """Load state written by `optimizer_to_flat` (or by the older index-keyed format)."""
    params = [p for g in opt.param_groups for p in g["params"]]
    if scalars.get("keyed_by") == "name":
        index = {names[id(p)]: i for i, p in enumerate(params) if id(p) in names}
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


def write_folder_atomically(
    run_dir: Path, name: str, write: Callable[[Path], object], what: str, recovery: str
) -> Path:
    """Fill a temporary folder with `write(tmp)`, then swap it in as `run_dir/name` by renames.

    Any failure of `write` (disk full raises safetensors' own error type, not OSError) removes
    the temporary folder and raises CheckpointError; the folder it replaces stays whole.
    """
    tmp, final, old = _folder_names(run_dir, name, _HOST, os.getpid())
    try:
        _make_temporary(run_dir, tmp)
        write(tmp)
        _swap_in(tmp, final, old)
    except BaseException as e:
        _undo(tmp, final, old)
        if not isinstance(e, Exception):  # Ctrl-C, SystemExit: not a write error
            raise
        raise CheckpointError(f"cannot write {what} under {run_dir} ({_why(e)}); {recovery}") from e
    shutil.rmtree(old, ignore_errors=True)
    return final


def write_folder_together(
    run_dir: Path,
    name: str,
    layout: Layout,
    write_mine: Callable[[Path], Any],
    write_last: Callable[[Path, list[Any]], object],
    what: str,
    recovery: str,
) -> Path:
    """`write_folder_atomically` with every rank writing: each rank's `write_mine(tmp)` fills
    its part of one temporary folder (on a filesystem every rank sees) and returns something
    small; once all have, rank 0 calls `write_last(tmp, [every rank's result])` (the file that
    marks the folder whole goes last) and swaps the folder in by renames. A failure on any rank
    is a CheckpointError on every rank, and the folder it would replace stays whole; a crash
    at any moment leaves the previous folder whole (the temporary is named by rank 0's host and
    pid, so `remove_stale_temporaries` removes it later). Collectives: four small gathers."""
    if not layout.distributed:
        return write_folder_atomically(
            run_dir, name, lambda tmp: write_last(tmp, [write_mine(tmp)]), what, recovery
        )
    main = layout.is_main
    tmp, final, old = _folder_names(run_dir, name, _HOST, os.getpid())

    def agree(error: str | None) -> None:  # every rank raises the same error, or none does
        culprits = [f"rank {r}: {m}" for r, m in enumerate(layout.gather(error)) if m]
        if culprits:
            raise CheckpointError(
                f"cannot write {what} under {run_dir} ({'; '.join(culprits[:3])}); {recovery}"
            )

    def attempt(fn: Callable[[], Any]) -> tuple[Any, str | None]:
        try:
            return fn(), None
        except Exception as e:  # reported to every rank by `agree`
            return None, _why(e)

    try:
        _, error = attempt(lambda: _make_temporary(run_dir, tmp)) if main else (None, None)
        where, error = layout.gather((str(tmp), error))[0]  # rank 0's name, on every rank
        if error is not None:
            raise CheckpointError(
                f"cannot write {what} under {run_dir} (rank 0: {error}); {recovery}"
            )
        result, error = attempt(lambda: write_mine(Path(where)))
        results = layout.gather(result)
        agree(error)
        if main:
            _, error = attempt(lambda: (write_last(tmp, results), _swap_in(tmp, final, old)))
        agree(error)
    except BaseException:
        if main:  # a rank failed or died: the previous folder stays (or comes back)
            _undo(tmp, final, old)
        raise
    if main:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _folder_names(run_dir: Path, name: str, host: str, pid: int) -> tuple[Path, Path, Path]:
    """(temporary, final, previous) folders of `run_dir/name` written by `host`'s `pid`."""
    return run_dir / f".{name}{_TMP}{host}-{pid}", run_dir / name, run_dir / f".{name}.old"


def _make_temporary(run_dir: Path, tmp: Path) -> None:
    shutil.rmtree(tmp, ignore_errors=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp.mkdir()


def _swap_in(tmp: Path, final: Path, old: Path) -> None:
    apply_umask(tmp)
    if final.exists():  # else `old` may be the only whole copy (a crash between renames)
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
    tmp.rename(final)


def _undo(tmp: Path, final: Path, old: Path) -> None:
    shutil.rmtree(tmp, ignore_errors=True)
    if not final.exists() and old.exists():
        old.rename(final)  # a failed swap puts the previous folder back


def _why(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"


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
        raise _unreadable(path, e) from None
    if crc is not None and (got := file_crc32(path)) != crc:
        raise _bad_checksum(path, got, crc)
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
    scale = ts.get("lr_scale", 1.0)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 0 < scale < math.inf:
        raise CheckpointError(f"checkpoint file {path}: train_state.lr_scale must be > 0")
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


#: `name#c`: column c of a tensor stored by slices (a CLT decoder W_dec_s cut by target)
PIECE = "#"


class _Tensors:
    """A checkpoint's tensors by name, read on demand: `get(name, column)` is the tensor, or
    its column `column` (dim 1; scalars have none), whether it was stored whole or by
    columns (`name#c`, one tensor per column)."""

    def __init__(self) -> None:
        self.whole: dict[str, Callable[[], Any]] = {}  # name -> opens its slice reader
        self.pieces: dict[str, dict[int, Callable[[], Any]]] = {}

    def add(self, stored: str, opener: Callable[[], Any]) -> None:
        name, _, column = stored.partition(PIECE)
        if column:
            self.pieces.setdefault(name, {})[int(column)] = opener
        else:
            self.whole[name] = opener

    def names(self) -> set[str]:
        return set(self.whole) | set(self.pieces)

    def get(self, name: str, column: int | None = None) -> torch.Tensor:
        if name in self.whole:
            part = self.whole[name]()
            if column is None or len(part.get_shape()) < 2:
                return part[...]  # type: ignore[no-any-return]
            return part[:, column : column + 1].squeeze(1).contiguous()  # type: ignore[no-any-return]
        pieces = self.pieces.get(name)
        if pieces is None:
            raise KeyError(f"the checkpoint holds no tensor {name!r}")
        if column is not None:
            if column not in pieces:
                raise KeyError(f"the checkpoint holds no column {column} of {name!r}")
            return _whole(pieces[column]())
        if sorted(pieces) != list(range(len(pieces))):
            raise KeyError(f"the checkpoint holds columns {sorted(pieces)} of {name!r}")
        parts = [_whole(pieces[c]()) for c in range(len(pieces))]
        return parts[0] if parts[0].dim() == 0 else torch.stack(parts, dim=1)


def _whole(part: Any) -> torch.Tensor:
    return part[...]  # type: ignore[no-any-return]


class _InMemory:
    """A loaded tensor behind the slice interface of safetensors' `get_slice`."""

    def __init__(self, t: torch.Tensor) -> None:
        self.t = t

    def get_shape(self) -> list[int]:
        return list(self.t.shape)

    def __getitem__(self, index: Any) -> torch.Tensor:
        return self.t[index]


def _sharded_tensors(path: Path, state: dict[str, Any], layout: Layout | None) -> _Tensors:
    """The tensors of a sharded checkpoint, memory-mapped. Every shard file is verified
    against its recorded CRC-32 first (with several ranks, each verifies its share of the
    files and all agree), so that a bad file stops the run before anything in it changed."""
    from safetensors import safe_open

    index, crcs = state["shards"], state.get("crc32", {})
    files = sorted(index)
    rank, world = (layout.rank, layout.world) if layout is not None else (0, 1)
    error = None
    for name in files[rank::world]:
        try:
            _verify_file(path / name, crcs.get(name))
        except CheckpointError as e:
            error = str(e)
            break
    errors = layout.gather(error) if layout is not None and layout.distributed else [error]
    if any(errors):
        raise CheckpointError(next(e for e in errors if e))
    opened: dict[str, Any] = {}
    out = _Tensors()
    for name in files:

        def get_slice(tensor: str, file: str = name) -> Any:
            if file not in opened:
                opened[file] = safe_open(str(path / file), framework="pt", device="cpu")
            return opened[file].get_slice(tensor)

        for stored in index[name]:
            out.add(stored, lambda f=get_slice, t=stored: f(t))
    return out


def _verify_file(path: Path, crc: int | None) -> None:
    """A shard file exists, parses and has the CRC-32 recorded when it was written."""
    from safetensors import safe_open

    if not path.is_file():
        raise CheckpointError(
            f"checkpoint file {path} is missing: the checkpoint is incomplete; restore the file "
            "or start a new --run-name"
        )
    try:
        with safe_open(str(path), framework="pt", device="cpu"):
            pass
    except Exception as e:  # safetensors raises its own types for torn files and bad headers
        raise _unreadable(path, e) from None
    if crc is None:
        raise CheckpointError(f"checkpoint file {path}: state.json records no crc32 for it")
    if (got := file_crc32(path)) != crc:
        raise _bad_checksum(path, got, crc)


def _unreadable(path: Path, e: Exception) -> CheckpointError:
    first = str(e).splitlines()[0] if str(e) else type(e).__name__
    return CheckpointError(
        f"checkpoint file {path} is unreadable ({first}): it is truncated or corrupt; "
        "restore it or start a new --run-name"
    )


def _bad_checksum(path: Path, got: int, crc: int) -> CheckpointError:
    return CheckpointError(
        f"checkpoint file {path} fails its checksum (crc32 {got:08x}, recorded {crc:08x}): its "
        "bytes changed since it was written; restore it or start a new --run-name"
    )


def _legacy_tensors(path: Path, state: dict[str, Any]) -> tuple[_Tensors, dict[str, Any]]:
    """A checkpoint written before sharding (dictionaries/ + optimizer.safetensors): its
    tensors under the same names as a sharded one's, and its bindings."""
    try:
        saved = DictionaryBundle.load(path / "dictionaries", mmap=True)
        saved.check_all()
    except Exception as e:  # DictionaryFormatError (a ValueError), OSError, safetensors errors
        raise CheckpointError(f"cannot read checkpoint {path / 'dictionaries'}: {e}") from None
    crcs = state.get("crc32", {})
    opt = _read_tensors(path / "optimizer.safetensors", crcs.get("optimizer.safetensors"))
    out = _Tensors()
    for name, t in {**saved.state_dict(), **opt}.items():
        out.add(name, lambda t=t: _InMemory(t))
    info = {"reads": saved.reads, "num_latents": saved.cfg.num_latents}
    return out, info


def load_checkpoint(
    path: Path,
    bundle: DictionaryBundle,
    optimizer: torch.optim.Optimizer,
    rank: int = 0,
    units: list[int] | None = None,
    local: Any = None,
    layout: Layout | None = None,
) -> dict[str, Any]:
    """Restore dictionaries, optimizer and this rank's RNG in place; return the JSON state.
    Reads both layouts: sharded (shard-{r}-of-{W}.safetensors, training/sharded.py) and the
    whole bundle of older checkpoints (dictionaries/ + optimizer.safetensors), at any world
    size. Every file is checked first; a bad one is a CheckpointError naming it, and nothing
    in the run has been changed when it is raised. `units`: the bundle's units this rank owns
    (--distribute-modules); `local`: a CLT shard (training/clt_shards.py) to restore instead
    of the bundle, its decoder slices cut from the checkpoint's by name. Tensors are read
    memory-mapped, each rank only the ones (and slices) it holds. `layout`: ranks share the
    verification of a sharded checkpoint's files."""
    state = _read_state(path / "state.json")
    if "shards" in state:
        tensors = _sharded_tensors(path, state, layout)
        info = state.get("dictionaries", {})
    else:
        tensors, info = _legacy_tensors(path, state)
    rng_path = path / "rng.safetensors"
    rng = _read_tensors(rng_path, state.get("crc32", {}).get("rng.safetensors"))
    if info.get("reads") != bundle.reads or info.get("num_latents") != bundle.cfg.num_latents:
        raise CheckpointError(
            f"checkpoint {path} holds dictionaries for {info.get('reads')} with "
            f"{info.get('num_latents')} latents; this run has {bundle.reads} with "
            f"{bundle.cfg.num_latents}"
        )
    mine = rng.get(f"torch.rank{rank}", rng.get("torch"))
    if mine is None or mine.dtype != torch.uint8 or mine.shape != torch.get_rng_state().shape:
        raise CheckpointError(f"checkpoint file {rng_path} holds no valid CPU RNG state")
    module: torch.nn.Module = local if local is not None else bundle
    naming = local.full_name if local is not None else (lambda n: (n, None))

    def held(name: str) -> bool:  # this rank's: every name but other ranks' units
        return local is not None or units is None or _unit_of(name) in units

    scalars = state.pop("optimizer")
    targets = [k for k in module.state_dict() if held(k)]
    params = [n for n, _ in module.named_parameters() if held(n)]
    try:
        model = {k: tensors.get(*naming(k)) for k in targets}
        opt_tensors, opt_scalars = _optimizer_part(tensors, scalars, params, naming)
    except (KeyError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"checkpoint {path} does not fit this run: {e}") from None
    step = state["train_state"].get("step", 0)
    steps = {float(t) for k, t in opt_tensors.items() if k.endswith(".step")}
    # schedule-free optimisers count their steps per parameter group ("k")
    groups = scalars.get("param_groups", [])
    steps |= {float(g["k"]) for g in groups if isinstance(g, dict) and "k" in g}
    if steps and steps != {float(step)}:
        raise CheckpointError(
            f"checkpoint {path}: state.json says step {step} but the optimiser state has "
            f"taken {sorted(steps)[:3]} steps; the files do not belong together"
        )
    names = parameter_names(module)
    before = ({k: v.clone() for k, v in module.state_dict().items() if held(k)},
              optimizer.state_dict())  # fmt: skip
    try:
        missing = set(module.load_state_dict(model, strict=False).missing_keys) & set(targets)
        if missing:
            raise KeyError(f"no tensors for {sorted(missing)[:3]}")
        optimizer_from_flat(optimizer, opt_tensors, opt_scalars, names)
    except (CheckpointError, KeyError, ValueError, RuntimeError) as e:
        module.load_state_dict(before[0], strict=False)
        optimizer.load_state_dict(before[1])
        raise CheckpointError(f"checkpoint {path} does not fit this run: {e}") from None
    torch.set_rng_state(mine)
    cuda = [rng[k] for k in sorted(rng) if k.startswith("cuda.")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    return state


def _optimizer_part(
    tensors: _Tensors, scalars: dict[str, Any], params: list[str], naming: Callable[[str], Any]
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The optimiser state of `params` (this rank's parameter names), cut from a checkpoint's
    name-keyed state (`naming`: a local name -> its name in the checkpoint and column)."""
    if scalars.get("keyed_by") != "name":  # index-keyed: one process, whole, as written
        raw = {n: tensors.get(n) for n in tensors.names() if n.startswith("state.")}
        return raw, scalars
    stats: dict[str, list[str]] = {}
    for key in tensors.names():
        if key.startswith("state."):
            param, stat = key[len("state.") :].rsplit(".", 1)
            stats.setdefault(param, []).append(stat)
    out: dict[str, torch.Tensor] = {}
    state: dict[str, Any] = {}
    for name in params:
        full, column = naming(name)
        if full in scalars["state"]:
            state[name] = scalars["state"][full]
        for stat in stats.get(full, []):
            # A tensor each: slices of one W_dec must not share their `step` counter (Adam
            # would advance it once per slice).
            out[f"state.{name}.{stat}"] = tensors.get(f"state.{full}.{stat}", column).clone()
    groups = [{**g, "params": params} for g in scalars["param_groups"]]
    return out, {**scalars, "param_groups": groups, "state": state}


def _unit_of(key: str) -> int:
    """`coders.3.W_enc` -> 3 (-1 for a name outside the per-layer coders)."""
    parts = key.split(".")
    return int(parts[1]) if len(parts) > 1 and parts[0] == "coders" else -1


def _device_of(bundle: DictionaryBundle) -> torch.device:
    return next(bundle.parameters()).device
