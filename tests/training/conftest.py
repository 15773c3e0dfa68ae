"""Fixtures shared by the training tests."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from vlmscope.models.hooked import HookedVLM


@pytest.fixture(scope="module")
def llava(zoo_path: Any) -> HookedVLM:
    """The zoo's tiny LLaVA in float32 on the CPU, loaded once per test module."""
    return HookedVLM.from_pretrained(zoo_path("llava"), device="cpu", dtype=torch.float32)
