"""Test setup: no network, quiet transformers, zoo models built once per session on disk."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Generated data (the shapes world) and zoo copies go to a per-session folder, not ~/.cache,
# removed when the session that made it ends (child pytests and ranks inherit it).
if "VLMSCOPE_CACHE" not in os.environ:
    os.environ["VLMSCOPE_CACHE"] = tempfile.mkdtemp(prefix="vlmscope-test-")
    atexit.register(shutil.rmtree, os.environ["VLMSCOPE_CACHE"], ignore_errors=True)

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.utils import logging as hf_logging

from vlmscope.models import zoo

hf_logging.set_verbosity_error()
hf_logging.disable_progress_bar()
torch.use_deterministic_algorithms(True, warn_only=True)


@pytest.fixture(scope="session")
def zoo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One directory for the session's saved zoo models ($VLMSCOPE_TEST_ZOO reuses a folder)."""
    keep = os.environ.get("VLMSCOPE_TEST_ZOO")
    return Path(keep) if keep else tmp_path_factory.mktemp("zoo")


@pytest.fixture(scope="session")
def zoo_path(zoo_dir: Path):  # type: ignore[no-untyped-def]
    """Function name -> path of that zoo model saved with save_pretrained."""

    def get(name: str) -> Path:
        return zoo.cached_path(name, zoo_dir)

    return get


def random_image(h: int, w: int, seed: int = 0) -> Image.Image:
    """A noise image: distinct pixels so any mix-up of images changes activations."""
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((h, w, 3)) * 255).astype("uint8"))


@pytest.fixture()
def one_thread() -> Iterator[None]:
    """One intra-op thread for tests on tiny models: as fast alone, and much faster when other
    jobs share the cores (use with `pytestmark = pytest.mark.usefixtures("one_thread")`)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
