"""`vlmscope features MODEL DICTIONARIES DATASET --out DIR`: the flags and the command."""

from __future__ import annotations

import argparse
import os
import sys

from vlmscope.features.run import FeaturesError, FeaturesOptions, collect_features


def add_features_arguments(p: argparse.ArgumentParser) -> None:
    """Flags of `vlmscope features` (cli.py calls this on its subparser)."""
    d = FeaturesOptions()
    p.add_argument("model", help="zoo entry name, `toy`, or a HF model name / local path")
    p.add_argument("dictionaries", help="folder of dictionaries saved by `vlmscope train`")
    p.add_argument("dataset", help="dataset (as for `vlmscope train`: files, `shapes`, ...)")
    p.add_argument("--out", required=True, help="output folder (resumed when it holds an "
                   "unfinished run with the same settings)")  # fmt: skip
    p.add_argument(
        "--examples",
        type=int,
        default=d.examples,
        help=f"top-activating examples kept per feature (default: {d.examples})",
    )
    p.add_argument(
        "--before",
        type=int,
        default=d.before,
        help=f"tokens of context before each example's token (default: {d.before})",
    )
    p.add_argument(
        "--after",
        type=int,
        default=d.after,
        help=f"tokens of context after it (default: {d.after})",
    )
    p.add_argument(
        "--max-tokens",
        type=int,
        default=d.max_tokens,
        help="stop at the first batch that reaches this many tokens (default: 0 = one pass "
        "over the data)",
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=d.batch_size,
        help=f"samples per forward pass (default: {d.batch_size})",
    )
    p.add_argument(
        "--ctx-len",
        type=int,
        default=d.ctx_len,
        help=f"truncate samples to this many tokens (default: {d.ctx_len})",
    )
    p.add_argument("--split", default=d.split, help=f"dataset split (default: {d.split})")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of a generated dataset")
    p.add_argument("--schema", default=d.schema, help="dataset schema (default: auto)")
    p.add_argument("--image-root", default=d.image_root, help="folder image paths are relative to")
    p.add_argument(
        "--columns",
        nargs="*",
        default=[],
        metavar="KEY=NAME",
        help="dataset columns named otherwise, e.g. messages=conversation",
    )
    p.add_argument(
        "--include-special-tokens",
        action="store_true",
        help="count BOS and chat-template tokens too (default: left out)",
    )
    p.add_argument(
        "--shard-size",
        type=int,
        default=d.shard_size,
        help=f"feature cards per JSON file (default: {d.shard_size})",
    )
    p.add_argument(
        "--top-logits",
        type=int,
        default=d.top_logits,
        help=f"output tokens listed per sign (default: {d.top_logits})",
    )
    p.add_argument(
        "--checkpoint-every",
        type=int,
        default=d.checkpoint_every,
        help=f"batches between checkpoints (default: {d.checkpoint_every})",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the cards of a finished run in --out (without it such a folder is refused; "
        "an unfinished run there resumes)",
    )
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    p.add_argument("--dtype", default=None, help="model dtype (default: the checkpoint's)")


def run_features_command(args: argparse.Namespace) -> int:
    """0 on success, 2 for bad input."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    opts = FeaturesOptions(
        examples=args.examples, before=args.before, after=args.after, batch_size=args.batch_size,
        ctx_len=args.ctx_len, max_tokens=args.max_tokens, split=args.split, seed=args.seed,
        schema=args.schema, image_root=args.image_root, columns=list(args.columns),
        include_special_tokens=args.include_special_tokens, shard_size=args.shard_size,
        top_logits=args.top_logits, checkpoint_every=args.checkpoint_every,
    )  # fmt: skip
    try:
        res = collect_features(args.model, args.dictionaries, args.dataset, args.out, opts,
                               device=args.device, dtype=args.dtype,
                               overwrite=args.overwrite)  # fmt: skip
    except FeaturesError as e:
        print(f"vlmscope features: error: {e}", file=sys.stderr)
        return 2
    print(f"\n{'unit':<8} {'hook':<34} {'features':>9} {'alive':>7}")
    for u in res.units:
        print(f"{u['key']:<8} {u['hook']:<34} {u['n_features']:>9} {u['alive']:>7}")
    resumed = f" (resumed at {res.resumed_from_tokens})" if res.resumed_from_tokens else ""
    print(f"\n{res.tokens} tokens{resumed} in {res.seconds:.1f} s: {res.tokens_per_s:.0f} tokens/s")
    print(f"cards in {res.out} (open with: vlmscope serve --features {res.out})")
    return 0
