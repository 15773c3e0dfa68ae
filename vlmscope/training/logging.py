"""Per-step metrics: a JSONL file always, W&B and TensorBoard when asked and installed."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from vlmscope.training.errors import TrainingError


class MetricsLogger:
    """Appends one JSON object per logged step to `<run>/metrics.jsonl` (kept across resumes)."""

    def __init__(
        self,
        run_dir: Path,
        run_name: str,
        config: dict[str, Any],
        *,
        wandb: bool = False,
        tensorboard: bool = False,
        resume_step: int = 0,
        units: list[str] | None = None,
    ) -> None:
        #: unit names: per-unit lists in the metrics become one scalar per unit for W&B and
        #: TensorBoard (`fvu/<unit>`), which chart scalars only.
        self.units = list(units or [])
        self.path = run_dir / "metrics.jsonl"
        self._truncate_after(resume_step)
        self._file = self.path.open("a", encoding="utf-8")
        self._wandb: Any = None
        self._tb: Any = None
        if wandb:
            try:
                import wandb as wb
            except ImportError as e:
                raise RuntimeError(
                    "--log-to-wandb needs the wandb package: pip install wandb "
                    "(set WANDB_MODE=offline to log without a network)"
                ) from e
            self._wandb = wb.init(
                project="vlmscope",
                name=run_name,
                config=wandb_config(config),
                dir=str(run_dir),
                resume="allow",
            )
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise RuntimeError("--log-to-tensorboard needs: pip install tensorboard") from e
            self._tb = SummaryWriter(str(run_dir / "tensorboard"))

    def _truncate_after(self, step: int) -> None:
        """On resume, drop lines logged after the checkpoint, so no step appears twice."""
        if not self.path.exists():
            return
        keep = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    keep.append(line)
            except json.JSONDecodeError:
                continue  # a line torn by a crash
        # Atomically: a crash here must not lose the metrics of the steps being resumed.
        tmp = self.path.with_name(self.path.name + ".tmp")
        try:
            tmp.write_text("".join(k + "\n" for k in keep), encoding="utf-8")
            tmp.replace(self.path)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise TrainingError(f"cannot rewrite {self.path} for --resume: {e}") from e

    def log(self, metrics: dict[str, Any]) -> None:
        try:
            self._file.write(json.dumps(metrics, allow_nan=True) + "\n")
            self._file.flush()
        except OSError as e:  # e.g. the disk filled up; the last checkpoint is intact
            raise TrainingError(
                f"cannot write {self.path} at step {metrics.get('step')}: {e}; "
                "free space and continue with --resume"
            ) from e
        flat = dict(per_unit_scalars(dict(_flatten(metrics)), self.units))
        step = int(metrics.get("step", 0))
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in flat.items() if v is not None}, step=step)
        if self._tb is not None:
            for k, v in flat.items():
                if isinstance(v, (int, float)) and math.isfinite(v):
                    self._tb.add_scalar(k, v, step)

    def close(self) -> None:
        self._file.close()
        if self._wandb is not None:
            self._wandb.finish()
        if self._tb is not None:
            self._tb.close()


def _flatten(d: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    for k, v in d.items():
        if isinstance(v, dict):
            out += _flatten(v, f"{prefix}{k}/")
        else:
            out.append((f"{prefix}{k}", v))
    return out


#: metrics logged as one list per step (one value per unit) -> the scalar prefix per unit.
PER_UNIT = {"fvu_per_unit": "fvu", "l0_per_unit": "l0", "dead_pct": "dead_pct"}


def per_unit_scalars(flat: dict[str, Any], units: list[str]) -> list[tuple[str, Any]]:
    """`fvu_per_unit: [a, b]` -> `fvu/<unit 0>: a, fvu/<unit 1>: b` (lists of another length,
    or without unit names, become `fvu/0`, `fvu/1`, ...)."""
    out: list[tuple[str, Any]] = []
    for k, v in flat.items():
        if k in PER_UNIT and isinstance(v, list):
            names = units if len(units) == len(v) else [str(i) for i in range(len(v))]
            out += [(f"{PER_UNIT[k]}/{n}", x) for n, x in zip(names, v, strict=True)]
        else:
            out.append((k, v))
    return out


def wandb_config(config: dict[str, Any]) -> dict[str, Any]:
    """The run config for W&B with unset values (None) written as the string "null": W&B does
    not show a null config value, and "k: unset" is part of what a run was."""
    if isinstance(config, dict):
        return {k: wandb_config(v) for k, v in config.items()}  # type: ignore[return-value]
    if isinstance(config, list):
        return [wandb_config(v) for v in config]  # type: ignore[return-value]
    return "null" if config is None else config  # type: ignore[return-value]
