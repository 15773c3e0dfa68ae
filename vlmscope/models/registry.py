"""Adapter registry: a loaded model's config (model_type, architectures) picks its adapter.

Names of checkpoints are never consulted: a fine-tune called "my-llava" with a Qwen2-VL config
is a Qwen2-VL. Models of unknown type fall back to the structural GenericAdapter, with a warning.
"""

from __future__ import annotations

import importlib
import pkgutil
import warnings
from typing import Any, TypeVar

from torch import nn

from vlmscope import VlmscopeWarning
from vlmscope.models.adapter import ModelAdapter

A = TypeVar("A", bound=type[ModelAdapter])

_BY_MODEL_TYPE: dict[str, type[ModelAdapter]] = {}
_BY_ARCHITECTURE: dict[str, type[ModelAdapter]] = {}
_FAMILIES: dict[str, type[ModelAdapter]] = {}


def register_adapter(cls: A) -> A:
    """Class decorator: make `cls` the adapter for its model_types and architectures."""
    if cls.family in _FAMILIES:
        raise ValueError(f"adapter family {cls.family!r} registered twice")
    _FAMILIES[cls.family] = cls
    for mt in cls.model_types:
        if mt in _BY_MODEL_TYPE:
            raise ValueError(
                f"model_type {mt!r} claimed by {_BY_MODEL_TYPE[mt].family} and {cls.family}"
            )
        _BY_MODEL_TYPE[mt] = cls
    for arch in cls.architectures:
        _BY_ARCHITECTURE[arch] = cls
    return cls


_LOADED = False


def _load_adapters() -> None:
    """Import every adapter module once (importing one of them directly registers only its
    own families, so that is no sign that all are loaded)."""
    global _LOADED
    if _LOADED:
        return
    _LOADED = True
    from vlmscope.models import adapters

    for info in pkgutil.iter_modules(adapters.__path__):
        importlib.import_module(f"{adapters.__name__}.{info.name}")


def families() -> dict[str, type[ModelAdapter]]:
    """Every registered adapter class by family name (the generic fallback excluded)."""
    _load_adapters()
    return {k: v for k, v in _FAMILIES.items() if k != "generic"}


def adapter_class_for(config: Any) -> type[ModelAdapter] | None:
    """The registered adapter for a config, by model_type then architectures; None if unknown."""
    _load_adapters()
    cls = _BY_MODEL_TYPE.get(getattr(config, "model_type", None) or "")
    if cls is not None:
        return cls
    for arch in getattr(config, "architectures", None) or ():
        if arch in _BY_ARCHITECTURE:
            return _BY_ARCHITECTURE[arch]
    return None


def resolve_adapter(model: nn.Module, processor: Any = None) -> ModelAdapter:
    """Instantiate the adapter for `model`, falling back to a structural search with a warning."""
    cls = adapter_class_for(model.config)
    if cls is not None:
        return cls(model, processor)
    from vlmscope.models.adapters.generic import GenericAdapter

    adapter = GenericAdapter(model, processor)
    warnings.warn(
        f"no vlmscope adapter for model_type={model.config.model_type!r}; using the generic "
        f"adapter, which found the decoder at {adapter.language_model!r} by its structure. "
        "Hook names work; image-token layouts come from the vision config (a guess is "
        "announced), and family-specific attention details (M-RoPE, soft-capping, unusual "
        "RoPE) are not checked for this model.",
        category=VlmscopeWarning,
        stacklevel=2,
    )
    return adapter
