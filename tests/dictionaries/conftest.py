"""Shared setup for the dictionary tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_intra_op_thread() -> Iterator[None]:
    """These tests use tiny tensors: one thread is as fast alone and, measured on a shared
    2-core machine, 20x faster when other jobs compete for the cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
