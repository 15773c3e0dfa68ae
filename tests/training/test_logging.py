"""MetricsLogger: resume keeps earlier steps, a full disk is a TrainingError."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest

from vlmscope.training.errors import TrainingError
from vlmscope.training.logging import MetricsLogger


def test_resume_drops_later_steps_and_keeps_earlier_ones(tmp_path: Path) -> None:
    log = MetricsLogger(tmp_path, "run", {})
    for step in range(1, 5):
        log.log({"step": step, "loss": 1.0 / step})
    log.close()
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write('{"step": 5, "lo')  # torn by a crash
    MetricsLogger(tmp_path, "run", {}, resume_step=2).close()
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [1, 2]
    assert not list(tmp_path.glob("*.tmp"))


class _FullDisk:
    def write(self, _text: str) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    def flush(self) -> None: ...

    def close(self) -> None: ...


def test_a_full_disk_is_a_training_error_naming_the_step(tmp_path: Path) -> None:
    log = MetricsLogger(tmp_path, "run", {})
    log._file.close()
    log._file = _FullDisk()  # type: ignore[assignment]
    with pytest.raises(TrainingError, match=r"metrics\.jsonl at step 7: .*No space left"):
        log.log({"step": 7, "loss": 0.5})
