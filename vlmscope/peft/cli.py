"""`vlmscope peft export | import`: dictionary runs <-> PEFT SAE adapters, weights unchanged.

    vlmscope peft export toy checkpoints/run/dictionaries adapters/run   # run -> PEFT adapter
    vlmscope peft import toy adapters/run checkpoints/from-peft         # PEFT adapter -> run

This module only declares the flags; peft loads when a command runs. Output folders are
written under a temporary name and swapped in, with the parent folder locked meanwhile.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

MODEL_HELP = "HF model name or local path (a zoo name such as `toy`)"


def add_peft_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The `export` and `import` subcommands of `vlmscope peft`."""
    sub = parser.add_subparsers(dest="peft_cmd", required=True, metavar="PEFT_COMMAND")
    ex = sub.add_parser(
        "export",
        help="write a run's SAEs / transcoders as a PEFT adapter folder",
        description="Put the dictionaries of a `vlmscope train` run on the model as a PEFT "
        "adapter and save it (adapter_config.json + adapter_model.safetensors). An SAE goes on "
        "the module whose output its hook point reads, a transcoder on the module whose input "
        "and output it reads and writes (e.g. a vision block's MLP); CLTs and transcoders that "
        "read hook_resid_mid have no adapter form and are refused.",
    )
    ex.add_argument("model", help=MODEL_HELP)
    ex.add_argument("dictionaries", help="folder written by `vlmscope train` (run/dictionaries)")
    ex.add_argument("out", help="adapter folder to write")
    ex.add_argument(
        "--mode",
        choices=("replace", "observe"),
        default="replace",
        help="replace: the module's output becomes the reconstruction; observe: it passes "
        "through while the adapter reads it (default: replace)",
    )
    im = sub.add_parser(
        "import",
        help="write a PEFT SAE adapter folder as a vlmscope dictionary run",
        description="Load a PEFT SAE adapter onto the model and write its dictionaries as a "
        "run folder that `vlmscope eval`, ReplacementModel and attribution read, bound to the "
        "hook points at the adapted modules.",
    )
    im.add_argument("model", help=MODEL_HELP)
    im.add_argument(
        "adapter",
        help="PEFT adapter folder: adapter_config.json inside, or in its subfolder named "
        "--adapter-name (where PEFT's save_pretrained puts adapters not named default)",
    )
    im.add_argument("out", help="dictionaries folder to write")
    im.add_argument(
        "--tokens",
        choices=("all", "image", "text"),
        default=None,
        help="the token positions the adapter was trained on; the replacement model replaces "
        "those (default: what the adapter records, as `vlmscope peft export` writes the run's; "
        "all if it records none)",
    )
    im.add_argument(
        "--include-special-tokens",
        "--include_special_tokens",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="whether BOS and chat-template markers were among those positions (default: what "
        "the adapter records; no if it records nothing)",
    )
    for p in (ex, im):
        p.add_argument(
            "--adapter-name",
            "--adapter_name",
            default="default",
            help="name of the adapter (default: default)",
        )
        p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if any)")
    return parser


def run_peft_command(args: argparse.Namespace) -> int:
    """Run `vlmscope peft export|import`; bad input ends in one error line (exit code 1)."""
    from vlmscope.files import FolderLockedError, lock_folder
    from vlmscope.models.hooked import HookedVLM
    from vlmscope.training.errors import CheckpointError, TrainingError
    from vlmscope.training.sources import resolve_model_path

    command = f"vlmscope peft {args.peft_cmd}"
    out = Path(args.out)
    try:
        vlm = HookedVLM.from_pretrained(resolve_model_path(args.model), device=args.device)
        with lock_folder(out.parent, "output folder"):
            summary = (
                _export(args, vlm, out) if args.peft_cmd == "export" else _import(args, vlm, out)
            )
    except (OSError, ValueError, TrainingError, CheckpointError, FolderLockedError) as e:
        print(f"{command}: error: {e}", file=sys.stderr)
        return 1
    print(f"{'module':<44} {'hook read':<32} {'hook written':<32}")
    for module, read, write in summary:
        print(f"{module:<44} {read:<32} {write:<32}")
    print(f"\nwritten to {out}")
    return 0


def _export(args: argparse.Namespace, vlm: Any, out: Path) -> list[tuple[str, str, str]]:
    from vlmscope.peft.convert import from_bundle
    from vlmscope.training.bundle import DictionaryBundle
    from vlmscope.training.checkpoint import write_folder_atomically

    bundle = DictionaryBundle.load(args.dictionaries)
    model = from_bundle(vlm.model, bundle, args.adapter_name, mode=args.mode, vlm=vlm)

    def save(tmp: Path) -> None:
        model.save_pretrained(tmp, selected_adapters=[args.adapter_name])
        # PEFT puts an adapter not named "default" in a subfolder of that name; OUT is to
        # hold the adapter itself, as `peft import` and PeftModel.from_pretrained read it
        nested = tmp / args.adapter_name
        if args.adapter_name != "default" and (nested / "adapter_config.json").is_file():
            for f in nested.iterdir():
                f.replace(tmp / f.name)
            nested.rmdir()

    write_folder_atomically(out.parent, out.name, save, "the PEFT adapter", f"{out} is unchanged")
    return _rows(bundle, vlm)


def _import(args: argparse.Namespace, vlm: Any, out: Path) -> list[tuple[str, str, str]]:
    from vlmscope.peft.convert import to_bundle
    from vlmscope.peft.model import PeftSaeModel
    from vlmscope.training.checkpoint import write_folder_atomically

    folder, config = Path(args.adapter), "adapter_config.json"
    if not (folder / config).is_file() and (folder / args.adapter_name / config).is_file():
        folder = folder / args.adapter_name
    model = PeftSaeModel.from_pretrained(vlm.model, str(folder), adapter_name=args.adapter_name)
    bundle = to_bundle(
        model,
        args.adapter_name,
        vlm=vlm,
        model_name=args.model,
        tokens=args.tokens,
        include_special_tokens=args.include_special_tokens,
    )
    write_folder_atomically(
        out.parent, out.name, bundle.save, "the dictionaries", f"{out} is unchanged"
    )
    return _rows(bundle, vlm)


def _rows(bundle: Any, vlm: Any) -> list[tuple[str, str, str]]:
    names = {id(m): n for n, m in vlm.adapter.model.named_modules()}
    rows = []
    for read, write in zip(bundle.reads, bundle.writes, strict=True):
        module, _ = vlm.hook_module(write)
        rows.append(
            (getattr(module, "sae_module_name", None) or names.get(id(module), "?"), read, write)
        )
    return rows


__all__ = ["add_peft_arguments", "run_peft_command"]
