"""Replacement models (dictionaries spliced in for MLP outputs or hook points) and their
evaluation: reconstruction, CE-loss score, KL and top-1 agreement against the original."""

from __future__ import annotations

from vlmscope.replacement.evaluate import EvalReport, evaluate
from vlmscope.replacement.model import ActiveFeatures, ReplacementModel

__all__ = ["ActiveFeatures", "EvalReport", "ReplacementModel", "evaluate"]
