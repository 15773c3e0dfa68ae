"""`vlmscope plan`: predict per-GPU memory and tokens per step before renting the GPUs."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

from vlmscope.training.config import SaeArgs, TrainConfig, add_config_flags


def add_plan_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "model",
        help="a model folder or its config.json (no weights needed), or a "
        "zoo name; the model is built on the meta device to count its parameters",
    )
    p.add_argument("--gpus", type=int, default=1, help="GPUs (ranks) in total (default: 1)")
    p.add_argument(
        "--gpu-mem", type=float, default=80.0, help="memory of one GPU in GiB (default: 80)"
    )
    p.add_argument(
        "--tokens-per-sample",
        type=int,
        default=0,
        help="average tokens of one sample (default: --ctx-len, the worst case)",
    )
    p.add_argument("--json", default="", help="also write the plan as JSON to this file")
    add_config_flags(p)


def run_plan_command(args: argparse.Namespace) -> int:
    from vlmscope.plan.training import plan_training

    values: dict[str, Any] = {}
    sae: dict[str, Any] = {}
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    for key, v in vars(args).items():
        if key.startswith("sae."):
            sae[key[4:]] = v
        elif key in fields and key not in ("model", "dataset"):
            values[key] = v
    try:
        cfg = TrainConfig(model=args.model, sae=SaeArgs(**sae), **values)
        plan = plan_training(args.model, cfg, args.gpus, args.gpu_mem, args.tokens_per_sample)
    except (ValueError, OSError) as e:
        print(f"vlmscope plan: error: {e}", file=sys.stderr)
        return 2
    print(plan.report())
    if args.json:
        Path(args.json).write_text(json.dumps(plan.to_dict(), indent=1))
    return 0 if plan.fits else 1
