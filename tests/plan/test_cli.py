"""`vlmscope plan attribute`: a table, JSON, and the exit status says whether it fits."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


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
