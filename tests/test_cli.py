"""The CLI end to end, in process: models table and the demo on zoo models."""

from __future__ import annotations

from typing import Any

import pytest

from vlmscope.cli import main
from vlmscope.models.hook_points import HOOK_POINTS
from vlmscope.models.registry import families


def test_models_lists_families_hooks_and_flags(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    for fam in families():
        assert f"\n{fam} " in out
    for p in HOOK_POINTS:
        assert p.template in out
    assert "strict_residual_stream" in out


@pytest.mark.parametrize("model", ["llava", "qwen2_vl", "llama"])
def test_demo_prints_shapes_and_mask(
    model: str, zoo_path: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["demo", "--inspect", "--model", str(zoo_path(model)), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "lm.blocks.0.hook_resid_post" in out
    assert "token mask:" in out
    if model != "llama":
        assert "[IMG x" in out and "patch map:" in out
        assert "projector.hook_out" in out


def test_unknown_subcommand_is_an_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["bogus"])
    assert e.value.code == 2
