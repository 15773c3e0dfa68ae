"""`vlmscope plan attribute`: a table, JSON, and the exit status says whether it fits."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest


def test_plan_command(tmp_path: Path, capsys: Any) -> None:
    from vlmscope.cli import main

    out = tmp_path / "plan.json"
    argv = ["plan", "attribute", "toy", "clt:512:8", "--positions", "40", "--gpu-mem", "1"]
    assert main([*argv, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "attention patterns" in printed and "fits" in printed
    data = json.loads(out.read_text())
    assert data["fits"] and data["plan"]["batch"] >= 1
    assert main([*argv[:-1], "0.000001"]) == 1
    assert "does NOT fit" in capsys.readouterr().out
    assert "total <0.1 s (on a device at 300 TFLOP/s" in printed  # a toy's 40 positions


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["train", "toy", "--gpus", "0"], "--gpus must be >= 1, got 0"),
        (["train", "toy", "--gpu-mem", "-80"], "--gpu-mem must be > 0, got -80"),
        (["train", "toy", "--gpu-mem", "nan"], "--gpu-mem must be > 0, got nan"),
        (["attribute", "toy", "clt:512:8", "--positions", "4", "--gpu-mem", "0"],
         "--gpu-mem must be > 0, got 0"),
        (["attribute", "toy", "clt:512:8", "--positions", "4", "--unique-fraction", "2"],
         "--unique-fraction must be <= 1, got 2"),
        (["attribute", "toy", "clt:512:8", "--positions", "4", "--tflops", "0"],
         "--tflops must be > 0, got 0"),
    ],
)  # fmt: skip
def test_numbers_out_of_range_name_their_flag(argv: list[str], says: str, capsys: Any) -> None:
    from vlmscope.cli import main

    assert main(["plan", *argv]) == 2
    captured = capsys.readouterr()
    assert captured.err.strip() == f"vlmscope plan: error: {says}" and captured.out == ""
