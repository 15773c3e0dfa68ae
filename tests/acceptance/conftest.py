"""Shared by the acceptance tests: one loaded copy of each zoo family per session (the same
copy the replacement and attribution tests use), and the family parameter."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from tests.replacement.test_model import vlm_for
from vlmscope.models import zoo
from vlmscope.models.hooked import HookedVLM

FAMILIES = zoo.names()
_EAGER: dict[str, HookedVLM] = {}


@pytest.fixture(params=FAMILIES)
def family(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def load(zoo_path: Callable[[str], Path]) -> Callable[..., HookedVLM]:
    def get(name: str, attn: str | None = None) -> HookedVLM:
        """attn None: transformers' default (SDPA where the family supports it)."""
        if attn is None:
            return vlm_for(name, zoo_path)
        if name not in _EAGER:
            _EAGER[name] = HookedVLM.from_pretrained(
                zoo_path(name), device="cpu", dtype=torch.float32, attn_implementation=attn
            )
        return _EAGER[name]

    return get
