"""`vlmscope plan`: predict a job's peak memory and time before running it (no GPU needed).

    vlmscope plan attribute MODEL DICTIONARIES --positions N --gpu-mem GB
    vlmscope plan train MODEL --gpus N --gpu-mem GB [training flags]

MODEL is a zoo name, `toy`, a local model folder or config.json, or a hub name (only its config
is read; the model is built on the meta device). For `attribute`, DICTIONARIES is a dictionary
folder (only its config) or a spec of hypothetical dictionaries on every layer:
`clt:LATENTS:K[:N_TARGETS][:DTYPE]` or `transcoder:LATENTS:K[:DTYPE]`. Each planner prints the
parts on the device and the host and whether they fit, and writes them as JSON with --out. The
exit status is 0 when the job fits, 1 when it does not, 2 for bad input. A new planner adds a
subcommand here and a module beside `attribution.py` and `training.py`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from pathlib import Path
from typing import Any

from vlmscope.training.config import SaeArgs, TrainConfig, add_config_flags


def add_plan_arguments(parser: argparse.ArgumentParser) -> None:
    """The subcommands of `vlmscope plan` and their flags."""
    sub = parser.add_subparsers(dest="plan_cmd", required=True, metavar="PLAN")
    a = sub.add_parser(
        "attribute",
        help="memory and time of `vlmscope attribute`, and the batch and offloading that fit",
        description="Plan `vlmscope attribute` of MODEL with DICTIONARIES from configs alone.",
    )
    _add_attribute_arguments(a)
    t = sub.add_parser(
        "train",
        help="per-GPU memory and tokens per step of `vlmscope train` on N GPUs",
        description="Plan `vlmscope train MODEL ...` on --gpus GPUs: per-GPU memory of the "
        "model (replicated or FSDP-sharded), the dictionaries, optimiser state and "
        "activations, and what to change when it does not fit. Takes train's flags.",
    )
    _add_train_arguments(t)


def _add_attribute_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "model", help="zoo name, toy, folder or hub name of the model (its config is read)"
    )
    parser.add_argument(
        "dictionaries",
        help="a dictionary folder (its config is read), or a spec such as clt:32768:32 for a "
        "CLT on every layer with 32768 latents, k = 32, all later targets; "
        "clt:F:K:N_TARGETS:bfloat16 sets the window and dtype",
    )
    a = parser.add_argument_group("attribution")
    a.add_argument("--positions", type=int, default=None, help="prompt length in tokens")
    a.add_argument(
        "--replaced",
        type=int,
        default=None,
        help="positions the dictionaries replace (default: all of them, the worst case)",
    )
    a.add_argument(
        "--unique-fraction",
        type=float,
        default=1.0,
        help="distinct active features per layer as a fraction of min(latents, active "
        "features); 1 (default) is the worst case, trained CLTs repeat features far more",
    )
    a.add_argument(
        "--max-feature-nodes", type=int, default=4096, help="features explored (default 4096)"
    )
    a.add_argument("--max-n-logits", type=int, default=10, help="logit targets (default 10)")
    a.add_argument(
        "--dtype", default=None, help="model dtype (default: the config's, else float32)"
    )
    a.add_argument(
        "--batch-size",
        default="auto",
        help="copies per backward batch, or auto: the largest that fits (default)",
    )
    a.add_argument(
        "--offload",
        default="auto",
        choices=["auto", "none", "cpu", "disk"],
        help="what the replay does not run (MLPs, vision tower, embeddings) and the decoder "
        "rows go to the host (cpu) or disk; auto: the least that fits (default)",
    )
    r = parser.add_argument_group("budget and rates")
    r.add_argument(
        "--gpu-mem",
        type=float,
        default=80.0,
        help="memory of one device, GB (default 80)",
    )
    r.add_argument("--host-mem", type=float, default=None, help="host memory, GB (default: any)")
    r.add_argument(
        "--tflops",
        type=float,
        default=300.0,
        help="sustained matmul TFLOP/s for the time estimate (default 300: H100-class bf16)",
    )
    r.add_argument(
        "--link-gbs", type=float, default=20.0, help="host-device GB/s (default 20: PCIe)"
    )
    parser.add_argument("--out", default=None, help="write the plan as JSON here")


def _seconds(s: float) -> str:
    """A time estimate to the precision it has: '<0.1 s' below a tenth of a second."""
    return "<0.1 s" if s < 0.05 else f"{s:.1f} s" if s < 100 else f"{s:,.0f} s"


def _add_train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "model",
        help="a model folder or its config.json (no weights needed), or a "
        "zoo name; the model is built on the meta device to count its parameters",
    )
    p.add_argument("--gpus", type=int, default=1, help="GPUs (ranks) in total (default: 1)")
    p.add_argument(
        "--gpu-mem",
        type=float,
        default=80.0,
        help="memory of one GPU, GB (default: 80)",
    )
    p.add_argument(
        "--tokens-per-sample",
        type=int,
        default=0,
        help="average tokens of one sample (default: --ctx-len, the worst case)",
    )
    p.add_argument("--out", default="", help="also write the plan as JSON to this file")
    add_config_flags(p)


#: numeric flags and the least value each may take: (flag, attribute, minimum, inclusive)
_LIMITS = {
    "train": [("--gpus", "gpus", 1, True), ("--gpu-mem", "gpu_mem", 0, False),
              ("--tokens-per-sample", "tokens_per_sample", 0, True)],
    "attribute": [("--gpu-mem", "gpu_mem", 0, False), ("--host-mem", "host_mem", 0, False),
                  ("--tflops", "tflops", 0, False), ("--link-gbs", "link_gbs", 0, False),
                  ("--unique-fraction", "unique_fraction", 0, False),
                  ("--max-feature-nodes", "max_feature_nodes", 1, True),
                  ("--max-n-logits", "max_n_logits", 1, True)],
}  # fmt: skip


def _out_of_range(args: argparse.Namespace) -> str | None:
    """The first numeric flag outside its range, as an error line (None: all are fine)."""
    for flag, name, least, inclusive in _LIMITS[args.plan_cmd]:
        value = getattr(args, name)
        if value is None:
            continue
        ok = math.isfinite(value) and (value >= least if inclusive else value > least)
        if not ok:
            return f"{flag} must be {'>=' if inclusive else '>'} {least}, got {value:g}"
    if args.plan_cmd == "attribute" and args.unique_fraction > 1:
        return f"--unique-fraction must be <= 1, got {args.unique_fraction:g}"
    return None


def run_plan_command(args: argparse.Namespace) -> int:
    """Run `vlmscope plan`; 0 when the job fits, 1 when it does not, 2 for bad input."""
    bad = _out_of_range(args)
    if bad is not None:
        print(f"vlmscope plan: error: {bad}", file=sys.stderr)
        return 2
    if args.plan_cmd == "train":
        return _plan_training(args)
    return _plan_attribution(args)


def _plan_training(args: argparse.Namespace) -> int:
    from vlmscope.plan.memory import GB, GiB
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
        plan = plan_training(
            args.model, cfg, args.gpus, args.gpu_mem * GB / GiB, args.tokens_per_sample
        )
    except (ValueError, OSError) as e:
        print(f"vlmscope plan: error: {e}", file=sys.stderr)
        return 2
    print(plan.report())
    if args.out:
        from vlmscope.files import write_text_atomically

        write_text_atomically(Path(args.out), json.dumps(plan.to_dict(), indent=1) + "\n")
    return 0 if plan.fits else 1


def _plan_attribution(args: argparse.Namespace) -> int:
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", os.environ.get("HF_HUB_OFFLINE", "0"))
    from transformers.utils import logging as hf_logging

    from vlmscope.plan.attribution import Rates, choose, shape_from_config
    from vlmscope.plan.memory import GB
    from vlmscope.training.trainer import resolve_model_path

    model, dictionaries = args.model, args.dictionaries
    if args.positions is None or args.positions < 1:
        print("vlmscope plan: error: --positions N (>= 1) is required", file=sys.stderr)
        return 2
    batch = args.batch_size
    if batch != "auto" and (not str(batch).isdigit() or int(batch) < 1):
        print(f"vlmscope plan: error: --batch-size {batch}: give auto or N >= 1", file=sys.stderr)
        return 2
    hf_logging.set_verbosity_error()
    try:
        shape = shape_from_config(
            resolve_model_path(model),
            dictionaries,
            args.positions,
            dtype=args.dtype,
            max_feature_nodes=args.max_feature_nodes,
            n_logits=args.max_n_logits,
            replaced=args.replaced,
            unique_fraction=args.unique_fraction,
        )
    except (OSError, ValueError, KeyError) as e:
        print(f"vlmscope plan: error: {e}", file=sys.stderr)
        return 2
    offload = None if args.offload == "none" else args.offload
    rates = Rates(flops=args.tflops * 1e12, link_bandwidth=args.link_gbs * 1e9)
    c = choose(
        shape,
        args.gpu_mem * GB,
        batch=batch,
        offload=offload,
        host_budget=None if args.host_mem is None else args.host_mem * GB,
        rates=rates,
    )
    print(
        f"attribution of {shape.positions:,} positions: {shape.n_layers} layers, "
        f"{shape.n_units} dictionary layers of {shape.latents:,} latents, "
        f"{shape.n_active:,} active features ({sum(shape.unique):,} distinct), "
        f"{min(shape.max_feature_nodes, shape.n_active):,} explored"
    )
    print(c.plan.table())
    total_s = sum(c.seconds.values())
    print(
        f"\npeak device {c.device_peak / GB:.1f} GB of {args.gpu_mem:g} GB "
        f"({'fits' if c.fits else 'does NOT fit'}); host {c.host_peak / GB:.1f} GB; "
        f"batch {c.batch}, offload {c.offload or 'none'}"
    )
    print(
        "expected time: "
        + ", ".join(f"{k} {_seconds(v)}" for k, v in c.seconds.items())
        + f"; total {_seconds(total_s)} (on a device at {args.tflops:g} TFLOP/s, "
        f"{args.link_gbs:g} GB/s from the host: --tflops, --link-gbs)"
    )
    if args.out:
        from vlmscope.files import write_text_atomically

        out = {
            "mode": "attribute",
            "model": model,
            "dictionaries": dictionaries,
            "shape": shape.to_dict(),
            "plan": c.plan.to_dict(),
            "device_peak_gb": c.device_peak / GB,
            "host_peak_gb": c.host_peak / GB,
            "fits": c.fits,
            "seconds": c.seconds,
        }
        write_text_atomically(Path(args.out), json.dumps(out, indent=2) + "\n")
        print(f"wrote {args.out}")
    return 0 if c.fits else 1
