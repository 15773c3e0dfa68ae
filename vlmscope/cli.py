"""The `vlmscope` command line: one entry point, one subcommand per job."""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from collections.abc import Callable, Sequence
from typing import Any, TextIO

from vlmscope.argparsing import SuggestingParser
from vlmscope.torch_env import prepare_torch_env

DEMO_PROMPT = "What colour is the circle?"


def _quiet_transformers() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


# --- vlmscope models -------------------------------------------------------------------------
def cmd_models(args: argparse.Namespace) -> int:
    from vlmscope.models.hook_points import HOOK_POINTS
    from vlmscope.models.registry import families
    from vlmscope.models.zoo import names

    fams = families()
    zoo_names = set(names())
    flags = list(next(iter(fams.values())).capabilities.to_dict())
    print("Supported families (adapter chosen by config.model_type / architectures):\n")
    head = f"{'family':<16} {'zoo':<4} {'model_type':<16} " + " ".join(
        f"{i + 1:>2}" for i in range(len(flags))
    )
    print(head)
    print("-" * len(head))
    for name, cls in sorted(fams.items()):
        caps = cls.capabilities.to_dict()
        row = (
            f"{name:<16} {'yes' if name in zoo_names else '-':<4} {','.join(cls.model_types):<16} "
        )
        print(row + " ".join(f"{'x' if caps[f] else '.':>2}" for f in flags))
    print("\nCapability flags (x = yes):")
    for i, f in enumerate(flags):
        print(f"  {i + 1:>2}  {f}")
    print("\nHook points ({i} = layer index; patterns accept * wildcards):")
    for p in HOOK_POINTS:
        print(f"  {p.template:<38} {p.doc}")
    print("\nOther decoders load through the generic adapter, found by structure (with a warning).")
    return 0


# --- vlmscope demo ---------------------------------------------------------------------------
def cmd_demo(args: argparse.Namespace) -> int:
    _quiet_transformers()
    from vlmscope.demo import DemoBudget, demo_image, run_demo, show_model

    if args.inspect:
        from vlmscope.models.hooked import HookedVLM
        from vlmscope.training.trainer import resolve_model_path

        path = resolve_model_path(args.model)
        print(f"Loading {args.model} from {path}")
        vlm = HookedVLM.from_pretrained(path, device=args.device, dtype=args.dtype)
        show_model(vlm, args.prompt, demo_image())
        return 0
    run_demo(args.model, args.out, args.device, DemoBudget.quick() if args.quick else None)
    return 0


# --- vlmscope train -------------------------------------------------------------------------
def cmd_train(args: argparse.Namespace) -> int:
    from vlmscope.training.config import config_from_args

    try:
        cfg = config_from_args(args)  # validated before any model is loaded
    except ValueError as e:
        args.parser.error(str(e))
    _quiet_transformers()
    from vlmscope.data.processing import SkipRecord
    from vlmscope.data.sources import BadRecordError
    from vlmscope.training.distributed import AgreedError
    from vlmscope.training.trainer import TrainingError, train

    main_rank = os.environ.get("RANK", "0") == "0"  # torchrun: only rank 0 reports
    try:
        result = train(cfg)
    except (TrainingError, BadRecordError, SkipRecord) as e:  # the last two: --strict
        if main_rank or not isinstance(e, AgreedError):  # an agreed error is the same on all
            print(f"vlmscope train: error: {e}", file=sys.stderr)
        return 1
    if not main_rank:
        return 0
    print_unit_table(result.fvu_per_unit, result.l0_per_unit, result.dead_per_unit)
    print(f"\n{result.step} steps, {result.tokens} tokens; dictionaries in {result.dictionaries}")
    return 0


def print_unit_table(fvu: dict[str, float], l0: dict[str, float], dead: dict[str, float]) -> None:
    """Per-unit FVU, L0 and dead % as a short table."""
    print(f"\n{'unit':<34} {'FVU':>8} {'L0':>8} {'dead %':>8}")
    for u in fvu:
        print(f"{u:<34} {fvu[u]:>8.4f} {l0[u]:>8.2f} {100 * dead[u]:>8.2f}")


def cmd_capture(args: argparse.Namespace) -> int:
    _quiet_transformers()
    from vlmscope.training.capture import run_capture_command

    return run_capture_command(args)


def cmd_eval(args: argparse.Namespace) -> int:
    _quiet_transformers()
    from vlmscope.replacement.evaluate import run_eval_command

    return run_eval_command(args)


def cmd_data(args: argparse.Namespace) -> int:
    _quiet_transformers()
    from vlmscope.data.convert import run_process_command

    return run_process_command(args)


def cmd_plan(args: argparse.Namespace) -> int:
    from vlmscope.plan.cli import run_plan_command

    return run_plan_command(args)


def cmd_attribute(args: argparse.Namespace) -> int:
    _quiet_transformers()
    from vlmscope.attribution.cli import run_attribute_command

    return run_attribute_command(args)


def cmd_features(args: argparse.Namespace) -> int:
    _quiet_transformers()
    from vlmscope.features.cli import run_features_command

    return run_features_command(args)


def cmd_serve(args: argparse.Namespace) -> int:
    from vlmscope.viewer.cli import run_serve_command

    return run_serve_command(args)


def cmd_peft(args: argparse.Namespace) -> int:
    _quiet_transformers()
    from vlmscope.peft.cli import run_peft_command

    return run_peft_command(args)


# --- vlmscope zoo ----------------------------------------------------------------------------
def cmd_zoo(args: argparse.Namespace) -> int:
    _quiet_transformers()
    from vlmscope.models import zoo

    if args.zoo_cmd == "list":
        for n in zoo.names():
            s = zoo.spec(n)
            print(f"{n:<16} {'image+text' if s.multimodal else 'text':<11} {s.description}")
        return 0
    if args.zoo_cmd == "save":
        if args.name not in zoo.names():
            print(
                f"vlmscope zoo save: error: no zoo model {args.name!r}; the zoo has: "
                f"{', '.join(zoo.names())}",
                file=sys.stderr,
            )
            return 2
        out = zoo.save(args.name, args.out, seed=args.seed)
        print(f"saved {args.name} to {out}")
        return 0
    if args.zoo_cmd == "shapes-image":
        from vlmscope.data import shapes

        sample = shapes.example_with_one(args.shape)
        sample.image.save(args.out)
        print(f"wrote {args.out}: {sample.caption}")
        return 0
    from vlmscope.models.toy import train as toy_train

    if args.zoo_cmd == "train-toy":
        return toy_train.run_train(args)
    if args.zoo_cmd == "eval-toy":
        return toy_train.run_eval(args)
    return 2


# --- the parser --------------------------------------------------------------------------
# Each subcommand's flags come from its own module, which imports torch; they are added only
# for the subcommand being run, so `vlmscope --help` and a mistyped command answer at once.
def _demo_args(d: argparse.ArgumentParser) -> None:
    d.add_argument("--model", default="toy", help="toy (default), a zoo name or a HF name/path")
    d.add_argument("--out", default="demo_out", help="output folder (default: demo_out)")
    d.add_argument(
        "--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)"
    )
    d.add_argument(
        "--dtype", default=None, help="model dtype for --inspect (default: checkpoint's)"
    )
    d.add_argument("--quick", action="store_true", help="tiny budgets: a smoke run in seconds")
    d.add_argument(
        "--inspect", action="store_true", help="only load the model and show masks and activations"
    )
    d.add_argument("--prompt", default=DEMO_PROMPT, help="prompt for --inspect")
    d.set_defaults(func=cmd_demo)


def _train_args(t: argparse.ArgumentParser) -> None:
    from vlmscope.training.config import build_train_parser

    build_train_parser(t)
    t.set_defaults(func=cmd_train, parser=t)


def _capture_args(c: argparse.ArgumentParser) -> None:
    from vlmscope.training.capture import add_capture_arguments

    add_capture_arguments(c)
    c.set_defaults(func=cmd_capture, parser=c)


def _eval_args(e: argparse.ArgumentParser) -> None:
    from vlmscope.replacement.evaluate import add_eval_arguments

    add_eval_arguments(e)
    e.set_defaults(func=cmd_eval)


def _attribute_args(a: argparse.ArgumentParser) -> None:
    from vlmscope.attribution.cli import add_attribute_arguments

    add_attribute_arguments(a)
    a.set_defaults(func=cmd_attribute)


def _data_args(data: argparse.ArgumentParser) -> None:
    from vlmscope.data.convert import add_process_arguments

    ds = data.add_subparsers(dest="data_cmd", required=True, metavar="DATA_COMMAND")
    add_process_arguments(
        ds.add_parser(
            "process",
            help="run a model's processor over a dataset once and write the processed form",
            description="Write DATASET as MODEL's processor sees it (input_ids, pixel_values "
            "and the family's extras, one Parquet row per sample, plus processed.json) into "
            "DIR, so that `vlmscope train MODEL DIR` trains without running the processor "
            "every epoch, to the same dictionaries. The model's weights are not loaded.",
        )
    )
    data.set_defaults(func=cmd_data)


def _features_args(f: argparse.ArgumentParser) -> None:
    from vlmscope.features.cli import add_features_arguments

    add_features_arguments(f)
    f.set_defaults(func=cmd_features)


def _serve_args(s: argparse.ArgumentParser) -> None:
    from vlmscope.viewer.cli import add_serve_arguments

    add_serve_arguments(s)
    s.set_defaults(func=cmd_serve)


def _plan_args(pl: argparse.ArgumentParser) -> None:
    from vlmscope.plan.cli import add_plan_arguments

    add_plan_arguments(pl)
    pl.set_defaults(func=cmd_plan)


def _peft_args(pe: argparse.ArgumentParser) -> None:
    from vlmscope.peft.cli import add_peft_arguments

    add_peft_arguments(pe)
    pe.set_defaults(func=cmd_peft)


def _zoo_args(z: argparse.ArgumentParser) -> None:
    from vlmscope.data.shapes import SHAPES
    from vlmscope.models.toy import train as toy_train

    zs = z.add_subparsers(dest="zoo_cmd", required=True, metavar="ZOO_COMMAND")
    zs.add_parser(
        "list",
        help="list zoo entries",
        description="The zoo's entries: one tiny randomly initialised model per supported "
        "family, with its modalities and what it is made of; `vlmscope zoo save NAME DIR` "
        "writes one, and any command takes a zoo name where it takes a model.",
    )
    save = zs.add_parser("save", help="build a zoo model and save it with save_pretrained")
    save.add_argument("name", help="zoo entry name (see `vlmscope zoo list`)")
    save.add_argument("out", help="output folder")
    save.add_argument("--seed", type=int, default=0, help="initialisation seed")
    img = zs.add_parser(
        "shapes-image",
        help="write a held-out shapes-world image to attribute (the demo's, by default)",
        description="Writes a held-out shapes-world scene with exactly one object of --shape "
        "(default: the circle scene the demo attributes) as a PNG, and prints its caption.",
    )
    img.add_argument("out", nargs="?", default="shapes.png", help="PNG path (default: shapes.png)")
    img.add_argument(
        "--shape",
        default="circle",
        choices=SHAPES,
        help="the scene holds exactly one of these (default: circle)",
    )
    toy_train.add_train_args(
        zs.add_parser(
            "train-toy",
            help="train a toy shapes-world LLaVA from scratch on the v2 world (at most 20 "
            "CPU-minutes)",
            description="Train a toy VLM on the v2 shapes world (8x8 patches, up to 5 objects, "
            "relations, counting, paraphrased questions): a 1.7M-parameter LLaVA (CLIP tower, "
            "Llama decoder), one question per picture and 13 pictures per step by default, a "
            "curriculum from two-object scenes; saves it with save_pretrained and prints its "
            "held-out accuracy per question type with training and held-out phrasings. The "
            "defaults (seed 0) make the shipped toy; see benchmarks/README.md.",
        )
    )
    toy_train.add_eval_args(
        zs.add_parser(
            "eval-toy",
            help="held-out accuracy of the toy VLM per question type",
            description="Greedy answers to held-out shapes-world questions of the world the "
            "model was trained on (another split and seed than training; v2 also in held-out "
            "phrasings), exact match per question type.",
        )
    )
    z.set_defaults(func=cmd_zoo)


#: name -> (one-line help, description, the function that adds its flags)
COMMANDS: dict[str, tuple[str, str | None, Callable[[argparse.ArgumentParser], None]]] = {
    "models": (
        "list supported model families, hook points and flags",
        "The model families vlmscope hooks (chosen by a checkpoint's model_type), each with "
        "its zoo entry and capability flags (vision tower, patch grid, sliding window, MoE "
        "MLP, ...), and the stable hook point names they share. Other decoders load through "
        "the generic adapter, found by structure.",
        lambda m: m.set_defaults(func=cmd_models),
    ),
    "demo": (
        "the whole pipeline on the toy VLM: masks, CLT training, evaluation, attribution",
        "Runs the main job end to end on the shipped toy VLM and the shapes world: "
        "shows a prompt's token masks and activations, trains a cross-layer transcoder (and "
        "per-layer transcoders of the same budget for comparison), evaluates the CLT as a "
        "replacement model and attributes 'What colour is the circle?' to image patches. "
        "Takes about a minute and a half on a 2-core CPU; --inspect does only the first step.",
        _demo_args,
    ),
    "train": (
        "train SAEs, transcoders or a cross-layer transcoder on a model's activations",
        "Train sparse dictionaries on a VLM while it reads a dataset: one model "
        "forward per batch feeds every layer (or, with --activations DIR, from a store written "
        "by `vlmscope capture`, without the model). Outputs go to OUTPUT_DIR/RUN_NAME/ "
        "(dictionaries/, checkpoint/, metrics.jsonl). Example: vlmscope train toy shapes "
        "--sae.transcode --sae.n_targets 4 --sae.expansion-factor 4 --sae.k 8",
        _train_args,
    ),
    "capture": (
        "run a model over a dataset once and store its activations for offline training",
        "Capture a model's activations to an activation store (sharded "
        "safetensors, per-token metadata, a manifest): resid_mid and mlp.hook_out of --layers "
        "by default, or --hookpoints. `vlmscope train --activations DIR` then trains SAEs, "
        "transcoders and CLTs from it without the model. Example: vlmscope capture toy "
        "shapes:200 --out store_toy --max-tokens 20000",
        _capture_args,
    ),
    "eval": (
        "evaluate dictionaries as a replacement for the model's MLPs (FVU, CE score, KL)",
        "Evaluate trained dictionaries on a dataset: reconstruction (FVU, normalised "
        "MSE, L0, dead latents) per layer for image and text tokens, and the replacement "
        "model's CE-loss score, KL and top-1 agreement with one layer and all layers replaced. "
        "Writes metrics.json next to the dictionaries.",
        _eval_args,
    ),
    "attribute": (
        "build an attribution graph (image patches, words, features, logits) for a prompt",
        "Attribution graph of one prompt through the local replacement model: "
        "writes the graph JSON (circuit-tracer / Neuronpedia layout with image-patch nodes), "
        "the raw graph (graph.safetensors) and a heatmap of each image's patch influence.",
        _attribute_args,
    ),
    "data": (
        "prepare datasets: `data process` writes a model's processed form once",
        None,
        _data_args,
    ),
    "features": (
        "feature dashboards: top examples (with image patches), density, logit effects",
        "For every feature of a dictionary run: its top-activating examples "
        "(text context with per-token activations; for image tokens the image with the patch "
        "outlined), activation density and histogram, and top output logits. Each image is "
        "stored once; memory is bounded by the examples kept; an interrupted run resumes. "
        "Example: vlmscope features toy checkpoints/clt/dictionaries shapes --out features",
        _features_args,
    ),
    "serve": (
        "local web app: graphs by layer and position, feature cards, patch heatmaps",
        "A local graph explorer on 127.0.0.1: the graphs of --graphs DIR (nodes by "
        "layer and position, weighted edges, a pruning threshold), feature cards from "
        "--features DIR, the input image with a signed patch heatmap, pins and supernodes "
        "saved next to the graph, and an intervention panel with --model/--dictionaries. "
        "It also opens circuit-tracer's own graph JSON.",
        _serve_args,
    ),
    "plan": (
        "predict a job's peak memory per device and host, and what fits (attribute, train)",
        "Plan a job before running it, from configs only (no weights are read, no "
        "GPU needed): the memory it holds on each device and the host, part by part, whether "
        "it fits and what to change when it does not. Examples: vlmscope plan attribute "
        "llava-hf/llava-1.5-7b-hf clt:32768:32 --positions 1000 --gpu-mem 80; vlmscope plan "
        "train ./Qwen2.5-VL-72B/config.json --gpus 8 --gpu-mem 80 --sae.kind clt "
        "--shard-model fsdp --distribute-modules",
        _plan_args,
    ),
    "peft": (
        "convert between dictionary runs and PEFT SAE adapters (export, import)",
        "Dictionary runs <-> PEFT SAE adapters (adapter_config.json + "
        "adapter_model.safetensors) with identical weights; the adapters load with "
        "vlmscope.peft.PeftSaeModel.from_pretrained.",
        _peft_args,
    ),
    "zoo": (
        "the offline zoo of tiny models (list, save) and the trained toy VLM",
        None,
        _zoo_args,
    ),
}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The `vlmscope` parser: every subcommand with its flags, or (`only`) the flags of that
    one subcommand alone, the others listed by name and help (`""`: none)."""
    p = SuggestingParser(
        prog="vlmscope",
        description="Find circuits inside vision-language models: hooks, sparse dictionaries, "
        "replacement models and attribution graphs.",
    )
    sub = p.add_subparsers(
        dest="cmd", required=True, metavar="COMMAND", parser_class=SuggestingParser
    )
    for name, (help_, description, add_flags) in COMMANDS.items():
        parser = sub.add_parser(name, help=help_, description=description)
        if only is None or name == only:
            add_flags(parser)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    prepare_torch_env()  # before any command imports torch
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), "")
    args = build_parser(only=command if command in COMMANDS else "").parse_args(argv)
    shown = warnings.showwarning
    warnings.showwarning = _own_warnings(command, shown)
    try:
        return int(args.func(args))
    except BrokenPipeError:  # output piped into `head` and closed early
        sys.stderr.close()
        return 0
    finally:
        warnings.showwarning = shown


def _own_warnings(command: str, other: Callable[..., None]) -> Callable[..., None]:
    """A showwarning that prints vlmscope's own warnings (VlmscopeWarning) as one line,
    `vlmscope COMMAND: WARNING: ...` like its errors (not Python's file:line and source line),
    and other packages' through `other`, whatever file they point at."""
    from vlmscope import VlmscopeWarning

    def show(
        message: Warning | str,
        category: type[Warning],
        filename: str,
        lineno: int,
        file: TextIO | None = None,
        line: str | None = None,
    ) -> Any:
        if issubclass(category, VlmscopeWarning):
            print(f"vlmscope {command}: WARNING: {message}", file=file or sys.stderr)
            return None
        return other(message, category, filename, lineno, file, line)

    return show


if __name__ == "__main__":
    sys.exit(main())
