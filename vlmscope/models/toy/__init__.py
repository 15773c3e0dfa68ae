"""The shipped toy VLM: a small LLaVA (CLIP-style vision tower, MLP projector, Llama decoder)
trained from scratch on the shapes world (`vlmscope.data.shapes`).

Unlike the random zoo models it has learned structure (it answers colour, shape, existence,
position, relation and counting-by-shape or by-colour questions about 64x64 shape images, 64
image tokens each), so demos, tests and docs can look for real circuits. Its weights
(safetensors) and processor ship in `TOY_DIR` and load through the same `from_pretrained` path
as a hub model: ``HookedVLM.from_pretrained(toy_path())``. Rebuild it with
``vlmscope zoo train-toy``; ``vlmscope zoo eval-toy`` measures its held-out accuracy.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["TOY_DIR", "ToyModelMissingError", "toy_path"]

TOY_DIR: Path = Path(__file__).resolve().parent / "shapes_llava"
"""Folder of the shipped toy model (config, model.safetensors, processor files)."""

_REQUIRED = ("config.json", "model.safetensors", "tokenizer.json")


class ToyModelMissingError(FileNotFoundError):
    """The toy model's files are not where they should be (not trained, or not installed)."""


def toy_path() -> Path:
    """Folder of the shipped toy model, ready for `from_pretrained`; raises if it is missing."""
    missing = [f for f in _REQUIRED if not (TOY_DIR / f).is_file()]
    if missing:
        raise ToyModelMissingError(
            f"the toy model is missing from {TOY_DIR} (no {', '.join(missing)}); "
            "train it with `vlmscope zoo train-toy` "
            "(or `python -m vlmscope.models.toy.train`)"
        )
    return TOY_DIR
