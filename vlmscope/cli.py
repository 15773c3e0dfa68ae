"""The `vlmscope` command line: one entry point, one subcommand per job."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any

from vlmscope.attribution.cli import add_attribute_arguments, run_attribute_command
from vlmscope.replacement.evaluate import add_eval_arguments, run_eval_command
from vlmscope.training.config import SuggestingParser, build_train_parser

DEMO_PROMPT = "What colour is the circle?"


def _quiet_transformers() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def _model_path(model: str) -> str:
    """A zoo entry name builds (once) and returns its saved folder; anything else passes through."""
    from vlmscope.models import zoo

    if model in zoo.names() and not os.path.exists(model):
        return str(zoo.cached_path(model))
    return model


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
def _token_strip(vlm: Any, inputs: Any, masks: Any, b: int = 0) -> str:
    """The prompt as tokens, with each run of image tokens folded into one [IMG xN] marker."""
    tok = vlm.tokenizer
    ids = inputs["input_ids"][b].tolist()
    parts: list[str] = []
    run = 0
    for s, t in enumerate(ids):
        if not masks.valid[b, s]:
            continue
        if masks.image[b, s]:
            run += 1
            continue
        if run:
            parts.append(f"[IMG x{run}]")
            run = 0
        text = tok.convert_ids_to_tokens(t)
        parts.append(f"<{text}>" if masks.special[b, s] and not text.startswith("<") else text)
    if run:
        parts.append(f"[IMG x{run}]")
    return " ".join(p.replace("Ġ", "_").replace("Ċ", "\\n") for p in parts)


def cmd_demo(args: argparse.Namespace) -> int:
    _quiet_transformers()
    import torch

    from vlmscope.models.hooked import HookedVLM

    path = _model_path(args.model)
    print(f"Loading {args.model} from {path}")
    vlm = HookedVLM.from_pretrained(path, device=args.device, dtype=args.dtype)
    a = vlm.adapter
    print(f"adapter: {a.family}; dims: {a.dims()}")
    images = None
    if a.capabilities.has_vision:
        images = [_demo_image()]
    inputs = vlm.prepare(args.prompt, images=images)
    masks = vlm.masks(inputs)
    names = [
        "lm.blocks.*.hook_resid_post",
        "lm.blocks.0.attn.hook_pattern",
        "lm.blocks.0.mlp.hook_out",
    ]
    if a.projector is not None:
        names.append("projector.hook_out")
    out, cache = vlm.run_with_cache(inputs, names=names)
    print(
        f"\nPrompt tokens ({inputs['input_ids'].shape[1]}):\n  {_token_strip(vlm, inputs, masks)}"
    )
    print(
        f"\nToken mask: {int(masks.image.sum())} image, {int(masks.text.sum())} text, "
        f"{int(masks.special.sum())} special, {int(masks.pad.sum())} padding"
    )
    row = "".join(
        "I" if i else ("S" if s else "t")
        for i, s in zip(masks.image[0], masks.special[0], strict=True)
    )
    print(f"  per position (I image, S special, t text): {row}")
    if bool(masks.image.any()):
        pm = masks.patch_map[0][masks.image[0]]
        cells = pm[pm[:, 3] >= 0]
        rows, cols = int(cells[:, 2].max()) + 1, int(cells[:, 3].max()) + 1
        print(
            f"  patch map: {len(pm)} image tokens on a {rows}x{cols} grid (image, view, row, col)"
        )
    print("\nCached activations:")
    for k, v in cache.items():
        print(f"  {k:<38} {tuple(v.shape)}")
    top = torch.softmax(out.logits[0, -1].float(), -1).topk(3)
    guesses = ", ".join(
        f"{vlm.tokenizer.decode([int(i)])!r} {p:.2f}"
        for p, i in zip(top.values, top.indices, strict=True)
    )
    print(f"\nNext-token top 3: {guesses}")
    return 0


def _demo_image() -> Any:
    """A small picture of a red circle and a blue square (no files needed)."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (64, 64), "white")
    d = ImageDraw.Draw(img)
    d.ellipse((6, 6, 30, 30), fill="red")
    d.rectangle((36, 36, 58, 58), fill="blue")
    return img


# --- vlmscope train -------------------------------------------------------------------------
def cmd_train(args: argparse.Namespace) -> int:
    from vlmscope.training.config import config_from_args

    try:
        cfg = config_from_args(args)  # validated before any model is loaded
    except ValueError as e:
        args.parser.error(str(e))
    _quiet_transformers()
    from vlmscope.training.trainer import TrainingError, train

    try:
        result = train(cfg)
    except TrainingError as e:
        print(f"vlmscope train: error: {e}", file=sys.stderr)
        return 1
    print_unit_table(result.fvu_per_unit, result.l0_per_unit, result.dead_per_unit)
    print(f"\n{result.step} steps, {result.tokens} tokens; dictionaries in {result.dictionaries}")
    return 0


def print_unit_table(fvu: dict[str, float], l0: dict[str, float], dead: dict[str, float]) -> None:
    """Per-unit FVU, L0 and dead % as a short table."""
    print(f"\n{'unit':<34} {'FVU':>8} {'L0':>8} {'dead %':>8}")
    for u in fvu:
        print(f"{u:<34} {fvu[u]:>8.4f} {l0[u]:>8.2f} {100 * dead[u]:>8.2f}")


def cmd_eval(args: argparse.Namespace) -> int:
    _quiet_transformers()
    return run_eval_command(args)


def cmd_attribute(args: argparse.Namespace) -> int:
    _quiet_transformers()
    return run_attribute_command(args)


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
        out = zoo.save(args.name, args.out, seed=args.seed)
        print(f"saved {args.name} to {out}")
        return 0
    return 2


def build_parser() -> argparse.ArgumentParser:
    p = SuggestingParser(
        prog="vlmscope",
        description="Find circuits inside vision-language models: hooks, sparse dictionaries, "
        "replacement models and attribution graphs.",
    )
    sub = p.add_subparsers(
        dest="cmd", required=True, metavar="COMMAND", parser_class=SuggestingParser
    )

    m = sub.add_parser("models", help="list supported model families, hook points and flags")
    m.set_defaults(func=cmd_models)

    d = sub.add_parser(
        "demo",
        help="run an image+text prompt through a model and show activations and token masks",
        description="Load a model (a zoo name or a HF path), run an image+text prompt, and print "
        "the cached activation shapes and the image-token mask.",
    )
    d.add_argument(
        "--model", default="llava", help="zoo entry name or HF name/path (default: llava)"
    )
    d.add_argument("--prompt", default=DEMO_PROMPT, help="question asked about the demo image")
    d.add_argument(
        "--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)"
    )
    d.add_argument(
        "--dtype", default=None, help="float32, bfloat16 or float16 (default: checkpoint's)"
    )
    d.set_defaults(func=cmd_demo)

    t = sub.add_parser(
        "train",
        help="train SAEs, transcoders or a cross-layer transcoder on a model's activations",
        description="Train sparse dictionaries on a VLM while it reads a dataset: one model "
        "forward per batch feeds every layer. Outputs go to OUTPUT_DIR/RUN_NAME/ "
        "(dictionaries/, checkpoint/, metrics.jsonl). Example: vlmscope train toy shapes "
        "--sae.transcode --sae.n_targets 4 --sae.expansion-factor 4 --sae.k 8",
    )
    build_train_parser(t)
    t.set_defaults(func=cmd_train, parser=t)

    e = sub.add_parser(
        "eval",
        help="evaluate dictionaries as a replacement for the model's MLPs (FVU, CE score, KL)",
        description="Evaluate trained dictionaries on a dataset: reconstruction (FVU, normalised "
        "MSE, L0, dead latents) per layer for image and text tokens, and the replacement "
        "model's CE-loss score, KL and top-1 agreement with one layer and all layers replaced. "
        "Writes metrics.json next to the dictionaries.",
    )
    add_eval_arguments(e)
    e.set_defaults(func=cmd_eval)

    a = sub.add_parser(
        "attribute",
        help="build an attribution graph (image patches, words, features, logits) for a prompt",
        description="Attribution graph of one prompt through the local replacement model: "
        "writes the graph JSON (circuit-tracer / Neuronpedia layout with image-patch nodes), "
        "the raw graph (graph.safetensors) and a heatmap of each image's patch influence.",
    )
    add_attribute_arguments(a)
    a.set_defaults(func=cmd_attribute)

    z = sub.add_parser("zoo", help="the offline zoo of tiny models (list, save)")
    zs = z.add_subparsers(dest="zoo_cmd", required=True, metavar="ZOO_COMMAND")
    zs.add_parser("list", help="list zoo entries")
    save = zs.add_parser("save", help="build a zoo model and save it with save_pretrained")
    save.add_argument("name", help="zoo entry name (see `vlmscope zoo list`)")
    save.add_argument("out", help="output folder")
    save.add_argument("--seed", type=int, default=0, help="initialisation seed")
    z.set_defaults(func=cmd_zoo)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except BrokenPipeError:  # output piped into `head` and closed early
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
