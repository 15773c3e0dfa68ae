"""Offline zoo of tiny, randomly initialised models with working processors, one per family.

Each entry builds a real transformers model class and processor from a tiny config, so tests and
demos exercise exactly the code a hub model takes: `save()` writes them with `save_pretrained`,
and `HookedVLM.from_pretrained(path)` loads them back through `from_pretrained`.
"""

from __future__ import annotations

import ast
import importlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

__all__ = ["ZooSpec", "build", "cached_path", "names", "register", "save", "spec"]

# Bump when a builder changes, so cached copies on disk are rebuilt.
ZOO_VERSION = "3"


@dataclass(frozen=True)
class ZooSpec:
    """One family in the zoo: what it is, and the module whose builder makes its tiny model.

    Listing reads these from the modules' source (see `_declared`), so it imports no model
    code; `builder` imports the family module (and its transformers classes) on first use.
    """

    name: str
    description: str
    multimodal: bool
    module: str

    @property
    def builder(self) -> Callable[[], tuple[Any, Any]]:
        if self.name not in _BUILDERS:
            importlib.import_module(f"{__name__}.{self.module}")
        if self.name not in _BUILDERS:
            raise RuntimeError(
                f"zoo module {self.module}.py declares {self.name!r} but registered no builder"
            )
        return _BUILDERS[self.name]


_BUILDERS: dict[str, Callable[[], tuple[Any, Any]]] = {}
_DECLARED: dict[str, ZooSpec] | None = None


def register(
    name: str, *, description: str, multimodal: bool = True
) -> Callable[[Callable[[], tuple[Any, Any]]], Callable[[], tuple[Any, Any]]]:
    """Decorator that adds a builder `() -> (model, processor)` to the zoo under `name`.

    Its arguments must be literals: `names()` reads them from the source without importing."""

    def deco(fn: Callable[[], tuple[Any, Any]]) -> Callable[[], tuple[Any, Any]]:
        if name in _BUILDERS:
            raise ValueError(f"zoo entry {name!r} registered twice")
        _BUILDERS[name] = fn
        return fn

    return deco


def _register_calls(path: Path) -> list[ast.Call]:
    """The `@register(...)` decorator calls of one module's top-level functions."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    return [
        d
        for node in tree.body
        if isinstance(node, ast.FunctionDef)
        for d in node.decorator_list
        if isinstance(d, ast.Call) and isinstance(d.func, ast.Name) and d.func.id == "register"
    ]


def _declared() -> dict[str, ZooSpec]:
    """Every entry, read from the `@register` decorators in this package's modules.

    Parsing ~20 small files takes milliseconds; importing them pulls in every family's
    transformers modules (seconds), which listing and name checks do not need."""
    global _DECLARED
    if _DECLARED is not None:
        return _DECLARED
    found: dict[str, ZooSpec] = {}
    for path in sorted(Path(__file__).parent.glob("*.py")):
        if path.stem in ("__init__", "common"):
            continue
        for call in _register_calls(path):
            try:
                args = [ast.literal_eval(a) for a in call.args]
                kw = {k.arg: ast.literal_eval(k.value) for k in call.keywords if k.arg}
            except ValueError as e:
                raise ValueError(
                    f"{path.name}:{call.lineno}: @register arguments must be literals, so the "
                    "zoo can be listed without importing its modules"
                ) from e
            name = args[0] if args else kw["name"]
            if name in found:
                raise ValueError(f"zoo entry {name!r} declared twice ({path.name})")
            found[name] = ZooSpec(
                name, kw["description"], bool(kw.get("multimodal", True)), path.stem
            )
    _DECLARED = found
    return found


def names(multimodal: bool | None = None) -> list[str]:
    """Zoo entry names, optionally only the multimodal or only the text-only ones."""
    return [n for n, s in _declared().items() if multimodal is None or s.multimodal == multimodal]


def spec(name: str) -> ZooSpec:
    """The zoo entry `name`, with the list of valid names in the error when it does not exist."""
    zoo = _declared()
    if name not in zoo:
        raise KeyError(f"no zoo model {name!r}; the zoo has: {', '.join(sorted(zoo))}")
    return zoo[name]


def _class_modules() -> dict[str, str]:
    """Class name -> zoo module that defines it (the processors saved zoo models name)."""
    out: dict[str, str] = {}
    for path in sorted(Path(__file__).parent.glob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in tree.body:
            if isinstance(node, ast.ClassDef):
                out[node.name] = path.stem
    return out


def import_saved_classes(folder: str | os.PathLike[str]) -> list[str]:
    """Import the zoo modules defining classes that a saved model folder names.

    Zoo models whose stock processor needs torchvision are saved with small subclasses defined
    here (no video processor, a PIL image processor); importing their module registers them
    with the Auto classes. Only those modules are imported, never the whole zoo. Returns the
    modules imported; a folder that names no zoo class (any hub model) imports nothing."""
    wanted: set[str] = set()
    for file in ("processor_config.json", "preprocessor_config.json", "tokenizer_config.json"):
        path = Path(folder) / file
        if not path.is_file():
            continue
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        stack: list[Any] = [data]
        while stack:
            item = stack.pop()
            if isinstance(item, dict):
                for k, v in item.items():
                    if isinstance(v, str) and k.endswith(("_class", "_type")):
                        wanted |= {v, v + "Pil"}  # PIL image processors are saved unsuffixed
                    elif isinstance(v, dict):
                        stack.append(v)
    classes = _class_modules()
    modules = sorted({classes[c] for c in wanted if c in classes})
    for m in modules:
        importlib.import_module(f"{__name__}.{m}")
    return modules


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
