"""Offline zoo of tiny, randomly initialised models with working processors, one per family.

Each entry builds a real transformers model class and processor from a tiny config, so tests and
demos exercise exactly the code a hub model takes: `save()` writes them with `save_pretrained`,
and `HookedVLM.from_pretrained(path)` loads them back through `from_pretrained`.
"""

from __future__ import annotations

import importlib
import os
import pkgutil
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

__all__ = ["ZooSpec", "build", "cached_path", "names", "register", "save", "spec"]

# Bump when a builder changes, so cached copies on disk are rebuilt.
ZOO_VERSION = "2"


@dataclass(frozen=True)
class ZooSpec:
    """One family in the zoo: what it is and how to build its tiny model and processor."""

    name: str
    description: str
    multimodal: bool
    builder: Callable[[], tuple[Any, Any]]


_ZOO: dict[str, ZooSpec] = {}
_LOADED = False


def register(
    name: str, *, description: str, multimodal: bool = True
) -> Callable[[Callable[[], tuple[Any, Any]]], Callable[[], tuple[Any, Any]]]:
    """Decorator that adds a builder `() -> (model, processor)` to the zoo under `name`."""

    def deco(fn: Callable[[], tuple[Any, Any]]) -> Callable[[], tuple[Any, Any]]:
        if name in _ZOO:
            raise ValueError(f"zoo entry {name!r} registered twice")
        _ZOO[name] = ZooSpec(name=name, description=description, multimodal=multimodal, builder=fn)
        return fn

    return deco


def _load_entries() -> None:
    """Import every family module of this package once; importing one registers its builders."""
    global _LOADED
    if _LOADED:
        return
    _LOADED = True
    for info in pkgutil.iter_modules(__path__):
        if info.name != "common":
            importlib.import_module(f"{__name__}.{info.name}")


def names(multimodal: bool | None = None) -> list[str]:
    """Zoo entry names, optionally only the multimodal or only the text-only ones."""
    _load_entries()
    return [n for n, s in _ZOO.items() if multimodal is None or s.multimodal == multimodal]


def spec(name: str) -> ZooSpec:
    """The zoo entry `name`, with the list of valid names in the error when it does not exist."""
    _load_entries()
    if name not in _ZOO:
        raise KeyError(f"no zoo model {name!r}; the zoo has: {', '.join(sorted(_ZOO))}")
    return _ZOO[name]


def build(name: str, seed: int = 0) -> tuple[Any, Any]:
    """Build the tiny model (fp32, eval mode) and its processor in memory, seeded."""
    s = spec(name)
    torch.manual_seed(seed)
    model, processor = s.builder()
    return model.eval(), processor


def save(name: str, path: str | os.PathLike[str], seed: int = 0) -> Path:
    """Build entry `name` and write model and processor to `path` with save_pretrained."""
    model, processor = build(name, seed)
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def default_cache_dir() -> Path:
    """Where built zoo models are kept: $VLMSCOPE_CACHE or ~/.cache/vlmscope."""
    root = os.environ.get("VLMSCOPE_CACHE") or Path.home() / ".cache" / "vlmscope"
    return Path(root) / "zoo" / ZOO_VERSION


def cached_path(name: str, cache_dir: str | os.PathLike[str] | None = None, seed: int = 0) -> Path:
    """A directory holding entry `name` saved to disk, built once and then reused.

    The build goes to a temporary directory that is renamed into place, so an interrupted build
    never leaves a half-written model behind.
    """
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = root / f"{name}-seed{seed}"
    if (target / "config.json").exists():
        return target
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=root))
    try:
        save(name, tmp, seed)
        try:
            tmp.rename(target)
        except OSError:
            # Another process won the race; its copy is as good as ours.
            if not (target / "config.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
