"""`vlmscope attribute`: one prompt (text, or images and text) -> attribution graph files.

Writes the viewer JSON (`--out FILE`, or `--graph-dir DIR --slug NAME` for DIR/NAME.json plus
the folder's `graph-metadata.json` index, the layout circuit-tracer's frontend and
`vlmscope serve` open), the raw graph (`<stem>.safetensors`, to re-prune later), the prompt's
images once each under `images/`, and, when the prompt has images, a signed heatmap PNG
(`<stem>.heatmap.png`) of the patches' effect on the top (or `--target`) logit, against the
`--contrast` tokens' logits when given. Inputs are
checked before the model loads, so a typo costs seconds, not a model load.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from vlmscope.attribution.export import (
    center_crop_box,
    check_slug,
    patch_effect,
    public_model_name,
    save_json,
    save_raw,
    store_image,
    top_patches,
    write_graph_files,
)
from vlmscope.attribution.heatmap import heatmap_path, save_heatmap_png
from vlmscope.files import FolderLockedError, unwritable_reason


class AttributeInputError(ValueError):
    """A bad argument or input file, found before any model is loaded."""


def add_attribute_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of `vlmscope attribute` (the lead's cli.py calls this on its subparser)."""
    parser.add_argument(
        "--model", required=True, help="zoo entry name, `toy`, or a HF model name / local path"
    )
    parser.add_argument(
        "--dictionaries",
        required=True,
        help="folder of dictionaries saved by `vlmscope train` / DictionaryBundle.save",
    )
    parser.add_argument(
        "--image",
        dest="images",
        action="extend",
        nargs="+",
        default=[],
        metavar="IMG",
        help="image file(s) shown with the prompt, in order (repeatable)",
    )
    parser.add_argument("--prompt", required=True, help="the question or text to attribute")
    parser.add_argument(
        "--out",
        default=None,
        help="viewer JSON to write (default: graph.json; not with --graph-dir)",
    )
    parser.add_argument(
        "--graph-dir",
        default=None,
        metavar="DIR",
        help="write DIR/<slug>.json and add it to DIR/graph-metadata.json, as circuit-tracer's "
        "create_graph_files does: `circuit-tracer start-server --graph_file_dir DIR` and "
        "`vlmscope serve --graphs DIR` list it (needs --slug)",
    )
    parser.add_argument(
        "--slug",
        default=None,
        help="graph name in the viewers and, with --graph-dir, its file name: letters, digits, "
        "'.', '_', '-' (default: the --out file's stem)",
    )
    parser.add_argument(
        "--max-feature-nodes",
        type=int,
        default=4096,
        help="explore at most N features, most influential first; 0 explores every active "
        "feature. Host memory for the edge rows is about 4 bytes x N x (active features + "
        "(layers + 1) x positions) (default: 4096)",
    )
    parser.add_argument(
        "--node-threshold",
        type=float,
        default=0.8,
        help="keep nodes holding this share of influence on the logits (default: 0.8)",
    )
    parser.add_argument(
        "--edge-threshold",
        type=float,
        default=0.98,
        help="keep edges holding this share of influence (default: 0.98)",
    )
    parser.add_argument(
        "--desired-logit-prob",
        type=float,
        default=0.95,
        help="attribute the most likely next tokens until their probabilities sum to this "
        "(default: 0.95)",
    )
    parser.add_argument(
        "--max-n-logits",
        type=int,
        default=10,
        help="attribute at most this many next-token logits (default: 10)",
    )
    parser.add_argument(
        "--target",
        default=None,
        metavar="TOKEN",
        help="attribute this next token instead of the most likely ones: a token string "
        "(e.g. ' red'; it must be one token) or a token id (digits). The heatmap shows it",
    )
    parser.add_argument(
        "--contrast",
        nargs="+",
        default=None,
        metavar="TOKEN",
        help="with --target: also attribute these competing answers (e.g. ' blue' ' green'), "
        "and draw the heatmap for the target's logit minus the mean of theirs: what sets the "
        "answer apart, not what every answer of its kind shares (more of the map on the "
        "asked-about object: benchmarks/README.md, Grounding)",
    )
    parser.add_argument(
        "--batch-size",
        default="auto",
        help="targets per backward pass (copies of the prompt replayed at once), or auto: "
        "the largest batch the memory planner fits in the device's free memory (default: "
        "auto; the choice is printed)",
    )
    parser.add_argument(
        "--offload",
        default="auto",
        choices=["auto", "none", "cpu", "disk"],
        help="after the first forward, move what the replay never runs (MLPs, vision tower, "
        "embeddings) and the active features' decoder rows off the device: to host memory "
        "(cpu) or disk (disk: the rows are re-read from the memory-mapped dictionaries); "
        "edges are the same. auto: the least offloading the planner needs (default)",
    )
    parser.add_argument(
        "--reference",
        default="none",
        choices=["none", "blank"],
        help="blank: also record each edge from the embeddings of the prompt with a blank image "
        "(every pixel of every image and tile the first image's top-left colour), saved in "
        "the raw graph, and draw the heatmap "
        "as each patch's effect measured from that image rather than from a zero embedding "
        "(default: none; see benchmarks/README.md, Grounding)",
    )
    parser.add_argument(
        "--convention",
        default="vlmscope",
        choices=["vlmscope", "circuit-tracer"],
        help="special tokens: vlmscope (default) leaves the tokens the dictionaries were not "
        "trained on (BOS, chat-template markers) unreplaced, their MLP output an error node; "
        "circuit-tracer replaces every position and zeroes features and errors at position 0, "
        "as circuit-tracer does, to compare graphs 1:1",
    )
    parser.add_argument(
        "--memory-gb",
        type=float,
        default=None,
        help="device memory the planner may use, GB (default: what is free)",
    )
    parser.add_argument(
        "--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)"
    )
    parser.add_argument(
        "--dtype", default=None, help="float32, bfloat16 or float16 (default: checkpoint's)"
    )
    parser.add_argument(
        "--embed-images",
        action="store_true",
        help="embed the images in the JSON as PNG data (default: reference their paths)",
    )


def _check_args(args: argparse.Namespace) -> list[Any]:
    """Validate flags and read the images; every problem names the flag or file at fault."""
    from PIL import Image

    from vlmscope.data.sources import to_rgb

    if not args.prompt.strip():
        raise AttributeInputError("--prompt is empty")
    for name in ("node_threshold", "edge_threshold"):
        v = getattr(args, name)
        if not 0.0 <= v <= 1.0:
            raise AttributeInputError(f"--{name.replace('_', '-')} must be in [0, 1], got {v}")
    if args.batch_size != "auto":
        if not str(args.batch_size).isdigit() or int(args.batch_size) < 1:
            raise AttributeInputError(f"--batch-size must be auto or >= 1, got {args.batch_size}")
        args.batch_size = int(args.batch_size)
    if not 0.0 < args.desired_logit_prob <= 1.0:
        raise AttributeInputError(
            f"--desired-logit-prob must be in (0, 1], got {args.desired_logit_prob}"
        )
    if args.max_n_logits < 1:
        raise AttributeInputError(f"--max-n-logits must be >= 1, got {args.max_n_logits}")
    if args.target is not None and args.target == "":
        raise AttributeInputError("--target is empty; give a token string or a token id")
    if args.max_feature_nodes < 0:
        raise AttributeInputError(f"--max-feature-nodes must be >= 0, got {args.max_feature_nodes}")
    if not Path(args.dictionaries).is_dir():
        raise AttributeInputError(f"--dictionaries: no folder at {args.dictionaries}")
    images = []
    for p in args.images:
        path = Path(p)
        if not path.is_file():
            raise AttributeInputError(f"--image: no such file: {path}")
        try:
            with Image.open(path) as im:
                im.load()
                images.append(to_rgb(im))
        except Exception as e:  # PIL raises several types for corrupt files
            raise AttributeInputError(f"--image: cannot read {path} as an image: {e}") from e
    if args.graph_dir is not None:
        if args.out is not None:
            raise AttributeInputError("give --out FILE or --graph-dir DIR, not both")
        if args.slug is None:
            raise AttributeInputError("--graph-dir needs --slug NAME (the graph's file name)")
        if Path(args.graph_dir).exists() and not Path(args.graph_dir).is_dir():
            raise AttributeInputError(f"--graph-dir {args.graph_dir} is a file, not a folder")
    if args.slug is not None:
        try:
            check_slug(args.slug)
        except ValueError as e:
            raise AttributeInputError(f"--slug: {e}") from e
    out = _json_path(args)
    if out.exists() and out.is_dir():
        raise AttributeInputError(f"--out {out} is a folder; give a file name such as graph.json")
    if out.suffix == ".safetensors":
        raise AttributeInputError(f"--out {out}: the raw graph takes that name; use a .json name")
    why = unwritable_reason(out.parent)
    if why is not None:
        flag = "--out" if args.graph_dir is None else "--graph-dir"
        raise AttributeInputError(f"{flag}: cannot write {out}: {why}")
    return images


def _processed_side(image_processor: Any, image: Any) -> int | None:
    """The shorter side, in pixels, that the image processor gives `image`. A Qwen-style
    dynamic resolution keeps each image's aspect ratio, within pixel-count bounds (its size's
    shortest_edge is min_pixels, an area): the processor itself says, by its patch grid.
    Otherwise the side it resizes every image towards."""
    grid_of = getattr(image_processor, "temporal_patch_size", None)
    patch = getattr(image_processor, "patch_size", None)
    if grid_of is not None and isinstance(patch, int):
        try:
            grid = image_processor(images=[image], return_tensors="pt")["image_grid_thw"][0]
        except (KeyError, ValueError, TypeError, RuntimeError):
            return None  # the model's own preprocessing will say what is wrong
        return int(min(grid[1:])) * patch
    return _processor_side(image_processor)


def _processor_side(image_processor: Any) -> int | None:
    """The side length, in pixels, that the image processor resizes images towards."""
    for attr in ("crop_size", "size"):
        size = getattr(image_processor, attr, None)
        if isinstance(size, int):
            return size
        if size is None:
            continue
        keys = ("height", "width", "shortest_edge")  # a dict, or transformers' SizeDict
        found = [size.get(k) if isinstance(size, dict) else getattr(size, k, None) for k in keys]
        sides = [v for v in found if isinstance(v, int)]
        if sides:
            return min(sides)
    return None


def input_warnings(processor: Any, images: list[Any], prompt: str) -> list[str]:
    """Inputs the model will accept but probably not read well: an image far below the
    processor's resolution (its patches are upsampled blur), or a prompt that places fewer
    image placeholders than there are images."""
    out = []
    image_processor = getattr(processor, "image_processor", None)
    for i, img in enumerate(images):
        w, h = img.size
        side = _processed_side(image_processor, img)
        if side is not None and min(w, h) * 4 <= side:
            out.append(
                f"image {i} is {w}x{h} px; the processor resizes it to about {side} px, so its "
                "patches hold little more than an upsampled blur"
            )
    token = getattr(processor, "image_token", None)
    if images and isinstance(token, str) and token and token in prompt:
        n = prompt.count(token)
        if n != len(images):
            out.append(
                f"the prompt places {n} image placeholder(s) {token!r} but {len(images)} "
                "image(s) were given; vlmscope adds one placeholder per image before the "
                f"prompt, so drop {token!r} from --prompt"
            )
    return out


def target_token(tokenizer: Any, target: str, flag: str = "--target") -> int:
    """The token id `--target` (or `flag`) names: an id (digits), else a string that must
    encode to exactly one token (no special tokens added)."""
    vocab = len(tokenizer)
    if target.strip().isdigit() and target == target.strip():
        tid = int(target)
        if tid >= vocab:
            raise AttributeInputError(f"{flag} {tid}: the vocabulary has {vocab} tokens")
        return tid
    ids = tokenizer.encode(target, add_special_tokens=False)
    if len(ids) != 1:
        pieces = tokenizer.convert_ids_to_tokens(ids)
        raise AttributeInputError(
            f"{flag} {target!r} is {len(ids)} tokens {pieces}, not one; give a single token "
            "(mind the leading space) or a token id"
        )
    return int(ids[0])


def _json_path(args: argparse.Namespace) -> Path:
    if args.graph_dir is not None:
        return Path(args.graph_dir) / f"{args.slug}.json"
    return Path(args.out if args.out is not None else "graph.json")


def run_attribute_command(args: argparse.Namespace) -> int:
    """Run `vlmscope attribute`; 0 on success, 2 for bad input, 1 when the run fails."""
    try:
        images = _check_args(args)
    except AttributeInputError as e:
        print(f"vlmscope attribute: error: {e}", file=sys.stderr)
        return 2
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()

    from vlmscope.attribution.attribute import attribute
    from vlmscope.attribution.graph import graph_scores, prune
    from vlmscope.models.hooked import HookedVLM
    from vlmscope.training.bundle import DictionaryBundle, ModelMismatchError
    from vlmscope.training.trainer import resolve_model_path

    try:
        # The dictionaries are memory-mapped first (nothing is read but their configs and
        # headers): a bad folder fails before the model loads, and a 7B model's CLT never
        # has to fit in host or device memory; attribution reads the rows it needs.
        try:
            bundle = DictionaryBundle.load(args.dictionaries, mmap=True)
        except (OSError, ValueError) as e:
            raise AttributeInputError(f"--dictionaries {args.dictionaries}: {e}") from e
        if bundle.kind == "sae":
            raise AttributeInputError(
                f"--dictionaries {args.dictionaries} holds SAEs; attribution needs transcoders "
                "or a CLT that replace MLP outputs"
            )
        path = resolve_model_path(args.model)
        print(f"Loading {args.model} ({path})")
        vlm = HookedVLM.from_pretrained(path, device=args.device, dtype=args.dtype)
        if images and not vlm.adapter.capabilities.has_vision:
            raise AttributeInputError(
                f"{args.model} is a text-only model ({vlm.adapter.family}); drop --image"
            )
        bundle.check_model(vlm.adapter)
        for warning in input_warnings(vlm.processor, images, args.prompt):
            print(f"vlmscope attribute: warning: {warning}", file=sys.stderr)
        target = None if args.target is None else [target_token(vlm.tokenizer, args.target)]
        if args.contrast and target is None:
            raise AttributeInputError("--contrast needs --target (the answer to set apart)")
        against = [target_token(vlm.tokenizer, t, "--contrast") for t in args.contrast or []]
        if target is not None and target[0] in against:
            raise AttributeInputError(f"--contrast repeats the --target token {args.target!r}")
        if target is not None:
            target += list(dict.fromkeys(against))
        inputs = vlm.prepare(args.prompt, images=images or None)
        graph = attribute(
            vlm,
            bundle,
            inputs,
            max_feature_nodes=args.max_feature_nodes or None,
            desired_logit_prob=args.desired_logit_prob,
            max_n_logits=args.max_n_logits,
            logit_targets=target,
            batch_size=args.batch_size,
            progress=True,
            convention=args.convention,
            offload=None if args.offload == "none" else args.offload,
            memory_gb=args.memory_gb,
            reference=None if args.reference == "none" or not images else args.reference,
        )
    except (AttributeInputError, ModelMismatchError, OSError, ValueError, MemoryError) as e:
        print(f"vlmscope attribute: error: {e}", file=sys.stderr)
        return 2 if isinstance(e, AttributeInputError) else 1

    pr = prune(graph, args.node_threshold, args.edge_threshold)
    replacement, completeness = graph_scores(graph)
    n_img = sum(k == "image" for k in graph.input_kinds)
    covered = graph.metadata.get("layers", [])
    partial = f" (dictionaries on {covered})" if len(covered) < graph.n_layers else ""
    kept = int(pr.node_mask[: graph.n_features].sum())
    print(
        f"\nGraph: {graph.n_pos} positions ({n_img} image), {graph.n_features} features "
        f"explored, {graph.n_layers} layers{partial}; kept {kept} features and "
        f"{int(pr.edge_mask.sum())} edges after pruning"
    )
    print(f"replacement score  {replacement:.4f}\ncompleteness score {completeness:.4f}")
    print(f"\n{'logit':<20} {'prob':>7}")
    for t in graph.logit_targets[:5]:
        print(f"{t.token!r:<20} {t.probability:>7.4f}")

    try:
        written = _write_outputs(args, vlm, graph, pr, images)
    except (OSError, ValueError, FolderLockedError) as e:
        print(f"vlmscope attribute: error: cannot write the graph: {e}", file=sys.stderr)
        return 1
    print("\nWrote " + ", ".join(str(p) for p in written))
    return 0


def _write_outputs(
    args: argparse.Namespace, vlm: Any, graph: Any, pr: Any, images: list[Any]
) -> list[Path]:
    """The viewer JSON (or graph folder entry), the raw graph, the images and heatmaps;
    returns the paths written."""
    out = _json_path(args)
    slug = args.slug or out.stem
    # Images are copied next to the graph (once each, named by content) and referenced by a
    # relative path: the graph folder is self-contained and carries no path of the author's.
    stored = (
        [] if args.embed_images else [out.parent / store_image(im, out.parent) for im in images]
    )
    image_kw: dict[str, Any] = {"images": images} if args.embed_images else {"image_paths": stored}
    kwargs = dict(
        prune_result=pr,
        node_threshold=args.node_threshold,
        edge_threshold=args.edge_threshold,
        prompt_text=args.prompt,
        scan=public_model_name(args.model),
        relative_to=out.parent,
        **image_kw,
    )
    if args.graph_dir is not None:
        json_path, _ = write_graph_files(graph, args.graph_dir, slug, **kwargs)
        written = [json_path, Path(args.graph_dir) / "graph-metadata.json"]
    else:
        written = [save_json(graph, out, slug=slug, **kwargs)]
    written.append(save_raw(graph, out.with_suffix(".safetensors")))
    written += list(dict.fromkeys(stored))  # the images the JSON points to
    vs = list(range(1, graph.n_logits)) if args.contrast else []
    heat = patch_effect(graph, 0, against=vs)
    proc = getattr(vlm.processor, "image_processor", None)
    for i, img in enumerate(images):
        if 0 not in heat.get(i, {}):
            continue  # the processor dropped this image's base view (nothing to draw)
        region = center_crop_box(img.size, proc) if proc is not None else None
        png = heatmap_path(out, i, len(images))
        written.append(
            save_heatmap_png(graph, img, png, 0, 0, image_index=i, region=region, against=vs)
        )
        cells = ", ".join(f"({r},{c}) {v:+.3f}" for r, c, v in top_patches(heat[i][0]))
        print(f"image {i}: top patches (row, col) on {graph.logit_targets[0].token!r}: {cells}")
    return written


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry point (`python -m vlmscope.attribution.cli`) until cli.py wires it."""
    parser = argparse.ArgumentParser(prog="vlmscope attribute", description=__doc__)
    add_attribute_arguments(parser)
    return run_attribute_command(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
