"""vlmscope: find circuits inside vision-language models with sparse dictionaries."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"


class VlmscopeWarning(UserWarning):
    """vlmscope's own warnings (the CLI prints them as one line, as its errors)."""


if TYPE_CHECKING:
    from vlmscope.attribution.attribute import attribute
    from vlmscope.capture import ActivationStore
    from vlmscope.dictionaries import CrossLayerTranscoder, SparseCoder, SparseCoderConfig
    from vlmscope.models.hooked import HookedVLM
    from vlmscope.replacement.model import ReplacementModel
    from vlmscope.training.bundle import DictionaryBundle

# Heavy imports (torch, transformers) wait until a name is used.
_LAZY = {
    "ActivationStore": "vlmscope.capture",
    "HookedVLM": "vlmscope.models.hooked",
    "SparseCoder": "vlmscope.dictionaries",
    "SparseCoderConfig": "vlmscope.dictionaries",
    "CrossLayerTranscoder": "vlmscope.dictionaries",
    "DictionaryBundle": "vlmscope.training.bundle",
    "ReplacementModel": "vlmscope.replacement.model",
    "attribute": "vlmscope.attribution.attribute",
}

__all__ = [
    "ActivationStore",
    "CrossLayerTranscoder",
    "DictionaryBundle",
    "HookedVLM",
    "ReplacementModel",
    "SparseCoder",
    "SparseCoderConfig",
    "__version__",
    "attribute",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'vlmscope' has no attribute {name!r}")
