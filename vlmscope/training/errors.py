"""Errors of `vlmscope train` that the CLI prints as one line (no traceback): bad settings,
data or state, named so the user can fix them."""

from __future__ import annotations


class TrainingError(RuntimeError):
    """Training stopped on bad data or state; the message names the step, hook and batch."""


class CheckpointError(TrainingError):
    """A checkpoint or the final dictionaries cannot be written or read; the message says
    which folder and why (the previous checkpoint is intact)."""
