"""Training checkpoints: dictionaries, optimizer, counters, data position and RNG, no pickle.

A checkpoint is one folder written under a temporary name and swapped in by renames, so a crash
(or SIGKILL) at any moment leaves the previous checkpoint whole:

    <run>/checkpoint/dictionaries/   the bundle (JSON config + safetensors)
    <run>/checkpoint/optimizer.safetensors, rng.safetensors
    <run>/checkpoint/state.json      step, tokens, data position, skip counts, optimizer scalars
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
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


def optimizer_to_flat(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split an optimizer state_dict into tensors (for safetensors) and JSON scalars."""
    sd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {"param_groups": sd["param_groups"], "state": {}}
    for pid, st in sd["state"].items():
        entry = {}
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"state.{pid}.{k}"] = v.detach().cpu().contiguous()
            else:
                entry[k] = v
        scalars["state"][str(pid)] = entry
    return tensors, scalars


def optimizer_from_flat(
    opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], scalars: dict[str, Any]
) -> None:
    state: dict[int, dict[str, Any]] = {int(k): dict(v) for k, v in scalars["state"].items()}
    for name, t in tensors.items():
        _, pid, key = name.split(".", 2)
        state.setdefault(int(pid), {})[key] = t
    opt.load_state_dict({"state": state, "param_groups": scalars["param_groups"]})


def save_checkpoint(
    run_dir: Path,
    bundle: DictionaryBundle,
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
) -> Path:
    """Write a checkpoint atomically; the previous one survives any failure of this call."""

    def write(tmp: Path) -> None:
        bundle.save(tmp / "dictionaries")
        tensors, scalars = optimizer_to_flat(optimizer)
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            for i, s in enumerate(torch.cuda.get_rng_state_all()):
                rng[f"cuda.{i}"] = s
        save_file(rng, str(tmp / "rng.safetensors"))
        (tmp / "state.json").write_text(json.dumps({**state, "optimizer": scalars}, indent=1))

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
    tmp = run_dir / f".{name}{_TMP}{os.getpid()}"
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
    """Delete temporary folders left by a process that died while writing (one run per folder,
    so a temporary of another live process can only be a user's mistake; those are kept)."""
    removed = []
    for name in (CHECKPOINT, DICTIONARIES):
        for tmp in run_dir.glob(f".{name}{_TMP}*"):
            pid = tmp.name.rsplit("-", 1)[-1]
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


def load_checkpoint(
    path: Path, bundle: DictionaryBundle, optimizer: torch.optim.Optimizer
) -> dict[str, Any]:
    """Restore dictionaries, optimizer and RNG in place; return the JSON training state."""
    try:
        saved = DictionaryBundle.load(path / "dictionaries", device=_device_of(bundle))
        state = json.loads((path / "state.json").read_text())
        opt_tensors = load_file(str(path / "optimizer.safetensors"))
        rng = load_file(str(path / "rng.safetensors"))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read checkpoint {path}: {e}") from e
    if saved.reads != bundle.reads or saved.cfg.num_latents != bundle.cfg.num_latents:
        raise CheckpointError(
            f"checkpoint {path} holds dictionaries for {saved.reads} with "
            f"{saved.cfg.num_latents} latents; this run has {bundle.reads} with "
            f"{bundle.cfg.num_latents}"
        )
    bundle.load_state_dict(saved.state_dict())
    optimizer_from_flat(optimizer, opt_tensors, state.pop("optimizer"))
    torch.set_rng_state(rng["torch"])
    cuda = [rng[k] for k in sorted(rng) if k.startswith("cuda.")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    return state


def _device_of(bundle: DictionaryBundle) -> torch.device:
    return next(bundle.parameters()).device
