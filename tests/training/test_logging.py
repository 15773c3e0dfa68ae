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


class _FakeWandb:
    """Records what MetricsLogger hands W&B (the calls wandb.init / run.log receive)."""

    def __init__(self) -> None:
        self.config: dict = {}
        self.logged: list[tuple[dict, int]] = []

    def init(self, **kw: object) -> _FakeWandb:
        self.config = kw["config"]  # type: ignore[assignment]
        return self

    def log(self, data: dict, step: int) -> None:
        self.logged.append((data, step))

    def finish(self) -> None: ...


def test_wandb_gets_one_scalar_per_unit_and_keeps_null_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sys

    fake = _FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    units = ["lm.blocks.0.hook_resid_mid", "lm.blocks.1.hook_resid_mid"]
    config = {"sae": {"k": None, "expansion_factor": 4}, "layers": [0, 1], "lr": None}
    log = MetricsLogger(tmp_path, "run", config, wandb=True, units=units)
    metrics = {"step": 3, "loss": 0.5, "fvu_per_unit": [0.1, 0.2], "l0_per_unit": [8.0, 7.5],
               "dead_pct": [0.0, 12.5], "k": None}  # fmt: skip
    log.log(metrics)
    log.close()
    assert fake.config == {"sae": {"k": "null", "expansion_factor": 4}, "layers": [0, 1],
                           "lr": "null"}  # fmt: skip
    ((data, step),) = fake.logged
    assert step == 3
    assert data == {
        "step": 3, "loss": 0.5,
        "fvu/lm.blocks.0.hook_resid_mid": 0.1, "fvu/lm.blocks.1.hook_resid_mid": 0.2,
        "l0/lm.blocks.0.hook_resid_mid": 8.0, "l0/lm.blocks.1.hook_resid_mid": 7.5,
        "dead_pct/lm.blocks.0.hook_resid_mid": 0.0, "dead_pct/lm.blocks.1.hook_resid_mid": 12.5,
    }  # fmt: skip
    assert all(isinstance(v, (int, float)) for v in data.values())  # every one a chartable scalar
    # metrics.jsonl keeps the lists, as before.
    line = json.loads((tmp_path / "metrics.jsonl").read_text())
    assert line["fvu_per_unit"] == [0.1, 0.2] and line["k"] is None
