"""`vlmscope peft export | import` round trip, and its one-line errors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from vlmscope.cli import main
from vlmscope.dictionaries import SparseCoderConfig
from vlmscope.models.hooked import HookedVLM
from vlmscope.training.bundle import DictionaryBundle


@pytest.mark.parametrize("name", ["default", "vision_mlps"])
def test_export_then_import_gives_the_run_back(
    toy: HookedVLM, tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str
) -> None:
    cfg = SparseCoderConfig(kind="transcoder", k=4, num_latents=64)
    reads = [f"vision.blocks.{i}.mlp.hook_in" for i in (0, 2)]
    writes = [f"vision.blocks.{i}.mlp.hook_out" for i in (0, 2)]
    info = {
        "name": "toy",
        "family": "llava",
        "dims": toy.adapter.dims(),
        "tokens": "image",
        "include_special_tokens": True,
    }
    run = DictionaryBundle.create(cfg, reads, writes, 128, 128, info)
    with torch.no_grad():
        for p in run.parameters():
            p.normal_()
    run.save(tmp_path / "run")
    named = ["--adapter-name", name]
    ad, back_dir = str(tmp_path / "ad"), str(tmp_path / "back")
    assert main(["peft", "export", "toy", str(tmp_path / "run"), ad, *named]) == 0
    # the folder it names holds the adapter, whatever its name (PEFT itself nests others)
    assert (tmp_path / "ad" / "adapter_model.safetensors").is_file()
    assert main(["peft", "import", "toy", ad, back_dir, *named]) == 0
    table = capsys.readouterr().out
    assert (
        "model.vision_tower.encoder.layers.2.mlp" in table
        and "vision.blocks.2.mlp.hook_out" in table
    )
    back = DictionaryBundle.load(back_dir)
    assert back.reads == reads and back.writes == writes
    want, got = run.state_dict(), back.state_dict()
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    # the positions the run was trained on come back too: the replacement model reads them
    assert back.model_info["tokens"] == "image" and back.model_info["include_special_tokens"]
    assert not list(tmp_path.glob(".*")), "no temporary or lock file is left behind"

    flags = ["--tokens", "text", "--no-include-special-tokens"]
    assert main(["peft", "import", "toy", ad, str(tmp_path / "told"), *named, *flags]) == 0
    told = DictionaryBundle.load(tmp_path / "told").model_info
    assert told["tokens"] == "text" and told["include_special_tokens"] is False


def test_import_reads_an_adapter_peft_saved_in_its_subfolder(
    toy: HookedVLM, tmp_path: Path
) -> None:
    """PEFT's save_pretrained writes adapters not named default to OUT/NAME: import finds
    them there when given OUT, and records "all" for an adapter that records no tokens."""
    from vlmscope.peft import TopKSaeConfig, get_peft_sae_model

    hook = "lm.blocks.1.mlp.hook_out"
    config = TopKSaeConfig(k=4, num_latents=64, target_modules=["language_model.layers.1.mlp"])
    model = get_peft_sae_model(toy.model, config, "mine")
    model.save_pretrained(tmp_path / "saved", selected_adapters=["mine"])
    assert (tmp_path / "saved" / "mine" / "adapter_config.json").is_file()
    args = ["--adapter-name", "mine", "--device", "cpu"]
    assert main(["peft", "import", "toy", str(tmp_path / "saved"), str(tmp_path / "b"), *args]) == 0
    back = DictionaryBundle.load(tmp_path / "b")
    assert back.reads == [hook] and back.model_info["tokens"] == "all"
    assert back.model_info["include_special_tokens"] is False


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


def test_import_of_an_adapter_made_for_another_model_is_one_error_line(
    toy: HookedVLM, tmp_path: Path, zoo_path: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """An exported adapter records its widths (d_in, d_out), so PEFT builds it at those
    widths on any model with modules of the same names: what import would write is refused
    before it is written."""
    hook = "lm.blocks.1.mlp.hook_out"
    info = {"name": "toy", "family": "llava", "dims": toy.adapter.dims()}  # d_model 128
    cfg = SparseCoderConfig(kind="sae", k=4, num_latents=64)
    DictionaryBundle.create(cfg, [hook], [hook], 128, 128, info).save(tmp_path / "run")
    assert main(["peft", "export", "toy", str(tmp_path / "run"), str(tmp_path / "ad")]) == 0
    argv = ["peft", "import", str(zoo_path("llava")), str(tmp_path / "ad"), str(tmp_path / "b")]
    assert main([*argv, "--device", "cpu"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert f"its dictionary is 128 wide where {hook} of this model is 64" in err[0]
    assert not (tmp_path / "b").exists()
