"""Shared setup for the PEFT adapter tests: one thread, a fresh toy VLM, a shapes image."""

from __future__ import annotations

import pytest
from PIL import Image

import vlmscope.peft.model  # noqa: F401  (registers the SAE with peft)
from vlmscope.data.shapes import ShapeObject, ShapesConfig, render, shape_box
from vlmscope.models.hooked import HookedVLM


@pytest.fixture(autouse=True)
def _one_thread(one_thread: None) -> None:
    """Tiny models and tensors: see tests/conftest.py."""


@pytest.fixture()
def toy() -> HookedVLM:
    """A fresh toy VLM (adapters modify the model in place, so every test gets its own)."""
    from vlmscope.models.toy import toy_path

    return HookedVLM.from_pretrained(toy_path(), device="cpu")


@pytest.fixture()
def circle() -> Image.Image:
    """A shapes-world image: one large red circle in row 1, column 2 of the 4x4 grid."""
    obj = ShapeObject("circle", "red", "large", (1, 2), shape_box((1, 2), "large", 16))
    return render([obj], ShapesConfig())
