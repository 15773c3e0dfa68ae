"""The processed schema: rows holding a processor's outputs train exactly as the raw records
they were made from, are checked against the model, and a dataset made for another model
stops before the first batch."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from vlmscope.cli import main
from vlmscope.data.convert import process_dataset
from vlmscope.models import zoo
from vlmscope.models.hooked import HookedVLM
from vlmscope.training.bundle import DictionaryBundle
from vlmscope.training.config import parse_train_args
from vlmscope.training.sources import open_training_data
from vlmscope.training.trainer import TrainingError, train

SHAPES = "shapes:2"


def train_flags(model: Path, data: str | Path, out: Path, name: str, extra: str = "") -> Any:
    flags = (
        f"{model} {data} --sae.transcode --sae.expansion-factor 2 --sae.k 4 --layers 0 1 "
        f"--batch-size 2 --max-steps 1 --output-dir {out} --run-name {name} {extra}"
    )
    return parse_train_args(flags.split())


def cli_process(model: Path, data: str, out: Path, *extra: str) -> int:
    return main(["data", "process", str(model), data, "--out", str(out), "--no-progress", *extra])


@pytest.mark.parametrize("name", zoo.names(multimodal=True))
def test_processed_shapes_train_the_same_dictionaries_as_raw_shapes(
    name: str, tmp_path: Path, zoo_path: Any
) -> None:
    model = zoo_path(name)
    vlm = HookedVLM.from_pretrained(model, device="cpu", dtype=torch.float32)
    folder = tmp_path / "processed"
    if name == "llava":  # the command (weightless model), once; the function elsewhere
        assert cli_process(model, SHAPES, folder) == 0
    else:
        folder.mkdir()
        process_dataset(vlm, open_training_data(train_flags(model, SHAPES, tmp_path, "-")), folder)
    raw = train(train_flags(model, SHAPES, tmp_path, "raw"), vlm, progress=False)
    proc = train(train_flags(model, folder, tmp_path, "proc"), vlm, progress=False)
    a = DictionaryBundle.load(raw.dictionaries).state_dict()
    b = DictionaryBundle.load(proc.dictionaries).state_dict()
    assert a.keys() == b.keys() and raw.tokens == proc.tokens > 0
    for k in a:
        assert torch.equal(a[k], b[k]), k
