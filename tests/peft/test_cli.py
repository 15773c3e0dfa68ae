"""`vlmscope peft export | import` round trip, and its one-line errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from vlmscope.cli import main
from vlmscope.dictionaries import SparseCoderConfig
from vlmscope.models.hooked import HookedVLM
from vlmscope.training.bundle import DictionaryBundle


def test_export_then_import_gives_the_run_back(
    toy: HookedVLM, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = SparseCoderConfig(kind="transcoder", k=4, num_latents=64)
    reads = [f"vision.blocks.{i}.mlp.hook_in" for i in (0, 2)]
    writes = [f"vision.blocks.{i}.mlp.hook_out" for i in (0, 2)]
    info = {"name": "toy", "family": "llava", "dims": toy.adapter.dims(), "tokens": "all"}
    run = DictionaryBundle.create(cfg, reads, writes, 128, 128, info)
    with torch.no_grad():
        for p in run.parameters():
            p.normal_()
    run.save(tmp_path / "run")
    assert main(["peft", "export", "toy", str(tmp_path / "run"), str(tmp_path / "ad")]) == 0
    assert (tmp_path / "ad" / "adapter_model.safetensors").is_file()
    assert main(["peft", "import", "toy", str(tmp_path / "ad"), str(tmp_path / "back")]) == 0
    table = capsys.readouterr().out
    assert (
        "model.vision_tower.encoder.layers.2.mlp" in table
        and "vision.blocks.2.mlp.hook_out" in table
    )
    back = DictionaryBundle.load(tmp_path / "back")
    assert back.reads == reads and back.writes == writes
    want, got = run.state_dict(), back.state_dict()
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    assert not list(tmp_path.glob(".*")), "no temporary or lock file is left behind"


def test_a_run_without_an_adapter_form_is_one_error_line(
    toy: HookedVLM, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = SparseCoderConfig(kind="transcoder", k=2, num_latents=16)
    info = {"name": "toy", "family": "llava", "dims": toy.adapter.dims()}
    run = DictionaryBundle.create(
        cfg, ["lm.blocks.1.hook_resid_mid"], ["lm.blocks.1.mlp.hook_out"], 128, 128, info
    )
    run.save(tmp_path / "run")
    assert main(["peft", "export", "toy", str(tmp_path / "run"), str(tmp_path / "ad")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "hook_resid_mid" in err[0] and err[0].startswith("vlmscope peft")
    assert not (tmp_path / "ad").exists()
