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
    ) -> None:
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
                project="vlmscope", name=run_name, config=config, dir=str(run_dir), resume="allow"
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
        flat = dict(_flatten(metrics))
        step = int(metrics.get("step", 0))
        if self._wandb is not None:
            self._wandb.log(flat, step=step)
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
