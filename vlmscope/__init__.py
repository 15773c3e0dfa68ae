"""vlmscope: find circuits inside vision-language models with sparse dictionaries."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from vlmscope.models.hooked import HookedVLM

# Heavy imports (torch, transformers) wait until a name is used, so `vlmscope --help` is quick.
_LAZY = {"HookedVLM": "vlmscope.models.hooked"}

__all__ = ["HookedVLM", "__version__"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'vlmscope' has no attribute {name!r}")
