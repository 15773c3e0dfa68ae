"""Training configuration: dataclasses are the one source of truth; the CLI is generated.

Flags are the dataclass field names with dots for groups (`--sae.k`) and accept both
kebab-case and snake_case (`--batch-size`, `--batch_size`), so commands users already type for
this job work unchanged. Values are validated before any model is loaded.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from vlmscope.dictionaries.config import SparseCoderConfig

LOSSES = ("fvu", "ce", "kl")
TOKEN_KINDS = ("all", "image", "text")

#: SparseCoderConfig fields the trainer fills in from the model; not flags.
_DERIVED_SAE_FIELDS = {"d_in", "d_out", "n_layers", "metadata"}


@dataclass
class SaeArgs:
    """The `--sae.*` group: the dictionary architecture (see SparseCoderConfig) plus
    `transcode`, the familiar switch from reconstructing a hook point to predicting MLP
    outputs (a per-layer transcoder, or a CLT when n_targets > 1)."""

    kind: str = ""
    transcode: bool = False
    activation: str = "topk"
    expansion_factor: int = 32
    num_latents: int = 0
    k: int = 32
    n_targets: int = 0
    skip_connection: bool = False
    normalize_decoder: bool | None = None
    aux_k: int = 0
    aux_k_coeff: float = 1.0 / 32.0
    dead_tokens_threshold: int = 10_000_000
    jumprelu_init_threshold: float = 0.001
    jumprelu_bandwidth: float = 0.001
    sparsity_coeff: float = 0.0
    threshold_momentum: float = 0.0
    normalize_activations: str = "none"

    def resolved_kind(self) -> str:
        """`kind` if given; else clt for --transcode with n_targets > 1, transcoder, or sae."""
        if self.kind:
            return self.kind
        if self.transcode:
            return "clt" if self.n_targets > 1 else "transcoder"
        return "sae"

    def coder_config(self) -> SparseCoderConfig:
        """A SparseCoderConfig without model dimensions (validated now, filled in later)."""
        kind = self.resolved_kind()
        values = {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if f.name not in ("kind", "transcode")
        }
        if kind != "clt":
            values["n_targets"] = 0
        return SparseCoderConfig(kind=kind, **values)


@dataclass
class TrainConfig:
    """Everything `vlmscope train` needs. MODEL and DATASET are positional."""

    model: str = ""
    dataset: str = ""
    sae: SaeArgs = field(default_factory=SaeArgs)
    #: LM layers to train on (default: all). For a CLT, its source and target layers.
    layers: list[int] = field(default_factory=list)
    #: hook-point patterns to train SAEs on (kind sae; default: resid_post of `layers`).
    hookpoints: list[str] = field(default_factory=list)
    #: which tokens train the dictionaries; padding is always excluded.
    tokens: str = "all"
    #: also train on BOS and chat-template control tokens (excluded by default).
    include_special_tokens: bool = False
    loss_fn: str = "fvu"
    batch_size: int = 8
    grad_acc_steps: int = 1
    #: learning rate; 0 scales 2e-4 by 1/sqrt(num_latents / 2**14), as in the TopK-SAE work.
    lr: float = 0.0
    #: fraction of the token budget (or of max_steps) over which the learning rate warms up.
    lr_warmup_fraction: float = 0.05
    #: fraction of max_tokens at the end over which the learning rate decays linearly to 0.
    lr_decay_fraction: float = 0.2
    #: tokens over which k anneals from the input width down to sae.k (0: no annealing).
    k_anneal_tokens: int = 0
    max_tokens: int = 1_000_000
    max_steps: int = 0
    ctx_len: int = 2048
    save_every: int = 1000
    log_every: int = 10
    run_name: str = ""
    output_dir: str = "checkpoints"
    resume: bool = False
    device: str = ""
    dtype: str = ""
    seed: int = 0
    log_to_wandb: bool = False
    log_to_tensorboard: bool = False
    #: dataset schema (auto, llava, chat, text), split, image root for relative paths.
    schema: str = "auto"
    split: str = "train"
    image_root: str = ""
    #: stop at the first bad record instead of skipping and counting it.
    strict: bool = False
    #: processes that preprocess records (0: in the training process).
    workers: int = 0

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check values without touching any model: bad input fails before loading."""

        def bad(msg: str) -> ValueError:
            return ValueError(f"invalid training config: {msg}")

        if self.loss_fn not in LOSSES:
            raise bad(f"--loss-fn must be one of {LOSSES}, got {self.loss_fn!r}")
        if self.tokens not in TOKEN_KINDS:
            raise bad(f"--tokens must be one of {TOKEN_KINDS}, got {self.tokens!r}")
        for name in ("batch_size", "grad_acc_steps", "ctx_len", "save_every", "log_every"):
            if getattr(self, name) < 1:
                raise bad(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        for name in ("max_tokens", "max_steps", "k_anneal_tokens", "workers"):
            if getattr(self, name) < 0:
                raise bad(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        if self.max_tokens == 0 and self.max_steps == 0:
            raise bad("set --max-tokens or --max-steps")
        if self.lr < 0 or not math.isfinite(self.lr):
            raise bad(f"--lr must be a finite number >= 0, got {self.lr}")
        if not 0.0 <= self.lr_warmup_fraction <= 1.0:
            raise bad(f"--lr-warmup-fraction must be in [0, 1], got {self.lr_warmup_fraction}")
        if not 0.0 <= self.lr_decay_fraction <= 1.0:
            raise bad(f"--lr-decay-fraction must be in [0, 1], got {self.lr_decay_fraction}")
        if any(layer < 0 for layer in self.layers):
            raise bad(f"--layers must be >= 0, got {self.layers}")
        if len(set(self.layers)) != len(self.layers):
            raise bad(f"--layers has duplicates: {self.layers}")
        if self.dtype and self.dtype not in ("float32", "bfloat16", "float16", "fp32", "bf16"):
            raise bad(f"--dtype must be float32, bfloat16 or float16, got {self.dtype!r}")
        kind = self.sae.resolved_kind()
        if self.hookpoints and kind != "sae":
            raise bad("--hookpoints selects SAE hook points; transcoders and CLTs read resid_mid "
                      "and write mlp.hook_out of --layers")  # fmt: skip
        if self.loss_fn != "fvu" and kind == "sae":
            raise bad("--loss-fn ce/kl splice dictionaries in for MLP outputs: use transcoders "
                      "or a CLT (--sae.transcode)")  # fmt: skip
        try:
            self.sae.coder_config()
        except (TypeError, ValueError) as e:
            raise bad(str(e)) from None

    def lr_for(self, num_latents: int) -> float:
        return self.lr or 2e-4 / math.sqrt(num_latents / 2**14)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        values = dict(values)
        sae = SaeArgs(**values.pop("sae", {}))
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"unknown training config keys: {sorted(unknown)}")
        return cls(sae=sae, **values)


# --- CLI generation ----------------------------------------------------------------------------
_HELP = {
    "model": "HF model name or local path (a zoo name such as `toy` or `llava` also works)",
    "dataset": "Parquet/JSONL/JSON file or folder, a save_to_disk folder, or `shapes`",
    "sae.kind": "sae | transcoder | clt (default: from --sae.transcode / --sae.n_targets)",
    "sae.transcode": "predict MLP outputs from resid_mid (transcoder; CLT if n_targets > 1)",
    "sae.activation": "topk | batchtopk | jumprelu",
    "sae.expansion_factor": "latents per input dimension (when --sae.num-latents is 0)",
    "sae.num_latents": "dictionary size per layer (0: expansion_factor * d_model)",
    "sae.k": "active latents per token (topk, batchtopk)",
    "sae.n_targets": "CLT: later layers each source writes to (0: all later layers)",
    "sae.skip_connection": "learn a linear skip W_skip from input to output (transcoders)",
    "sae.normalize_decoder": "keep decoder rows unit-norm (default: yes for SAEs)",
    "sae.aux_k": "AuxK: dead latents used to model the residual (0: d_model / 2)",
    "sae.aux_k_coeff": "AuxK loss weight",
    "sae.dead_tokens_threshold": "a latent is dead after this many tokens without firing",
    "sae.jumprelu_init_threshold": "JumpReLU initial threshold",
    "sae.jumprelu_bandwidth": "JumpReLU pseudo-gradient kernel width",
    "sae.sparsity_coeff": "JumpReLU L0 penalty weight (must be > 0 for jumprelu)",
    "sae.threshold_momentum": "BatchTopK eval threshold EMA (0: plain mean)",
    "sae.normalize_activations": "none | mean_norm (scale inputs to mean norm sqrt(d))",
}


_CHOICES: dict[str, Sequence[str]] = {
    "sae.kind": ("sae", "transcoder", "clt"),
    "sae.activation": ("topk", "batchtopk", "jumprelu"),
    "sae.normalize_activations": ("none", "mean_norm"),
    "loss_fn": LOSSES,
    "tokens": TOKEN_KINDS,
    "schema": ("auto", "llava", "chat", "text"),
    "dtype": ("float32", "bfloat16", "float16"),
}


def _flag_names(path: str) -> list[str]:
    kebab = path.replace("_", "-")
    return [f"--{kebab}"] if kebab == path else [f"--{kebab}", f"--{path}"]


def _add_fields(parser: argparse.ArgumentParser, cls: type, prefix: str = "") -> None:
    hints = typing.get_type_hints(cls)
    doc_default = cls()  # type: ignore[call-arg]
    for f in dataclasses.fields(cls):
        path = prefix + f.name
        typ = hints[f.name]
        if dataclasses.is_dataclass(typ):
            _add_fields(parser, typ, prefix=f"{path}.")  # type: ignore[arg-type]
            continue
        if path in ("model", "dataset"):
            continue
        default = getattr(doc_default, f.name)
        help_text = _HELP.get(path, _field_doc(cls, f.name))
        kw: dict[str, Any] = {"dest": path, "default": argparse.SUPPRESS}
        args = typing.get_args(typ)
        origin = typing.get_origin(typ)
        if typ is bool or (origin in (typing.Union, types.UnionType) and bool in args):
            kw["action"] = argparse.BooleanOptionalAction
            kw["help"] = f"{help_text} (default: {default})"
        elif origin is list:
            kw["nargs"] = "+"
            kw["type"] = args[0]
            kw["help"] = f"{help_text} (default: {default or 'all'})"
        else:
            kw["type"] = typ
            if path in _CHOICES:
                kw["choices"] = _CHOICES[path]
            else:
                kw["metavar"] = {"str": "TEXT"}.get(typ.__name__, typ.__name__.upper())
            kw["help"] = f"{help_text} (default: {default!r})"
        parser.add_argument(*_flag_names(path), **kw)


def _field_doc(cls: type, name: str) -> str:
    """The `#:` comment above a field in the source, used as its --help text."""
    import inspect

    lines = inspect.getsource(cls).splitlines()
    for i, line in enumerate(lines):
        if line.strip().startswith(f"{name}:"):
            docs = []
            j = i - 1
            while j >= 0 and lines[j].strip().startswith("#:"):
                docs.insert(0, lines[j].strip()[2:].strip())
                j -= 1
            return " ".join(docs) or name.replace("_", " ")
    return name.replace("_", " ")


class SuggestingParser(argparse.ArgumentParser):
    """argparse that suggests the closest flag for an unknown one."""

    def _all_options(self) -> list[str]:
        """Option strings of this parser and of its subcommands' parsers."""
        out = []
        for a in self._actions:
            out += a.option_strings
            if isinstance(a, argparse._SubParsersAction):
                for sub in a.choices.values():
                    out += [s for b in sub._actions for s in b.option_strings]
        return out

    def error(self, message: str) -> typing.NoReturn:
        if "unrecognized arguments" in message:
            known = self._all_options()
            words = message.split(":", 1)[1].split()
            hints = []
            for w in words:
                if w.startswith("--"):
                    close = difflib.get_close_matches(w.split("=")[0], known, n=2)
                    if close:
                        hints.append(f"{w}: did you mean {' or '.join(close)}?")
            if hints:
                message += "\n  " + "\n  ".join(hints)
        super().error(message)


def build_train_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """The `vlmscope train` parser, generated from TrainConfig and SaeArgs."""
    p = parser or SuggestingParser(prog="vlmscope train")
    p.add_argument("model", help=_HELP["model"])
    p.add_argument("dataset", help=_HELP["dataset"])
    _add_fields(p, TrainConfig)
    return p


def config_from_args(ns: argparse.Namespace) -> TrainConfig:
    """TrainConfig from parsed flags (validation errors name the flag)."""
    values: dict[str, Any] = {}
    sae: dict[str, Any] = {}
    for key, v in vars(ns).items():
        if key.startswith("sae."):
            sae[key[4:]] = v
        elif key in {f.name for f in dataclasses.fields(TrainConfig)}:
            values[key] = v
    return TrainConfig(sae=SaeArgs(**sae), **values)


def parse_train_args(argv: Sequence[str]) -> TrainConfig:
    p = build_train_parser()
    ns = p.parse_args(argv)
    try:
        return config_from_args(ns)
    except ValueError as e:
        p.error(str(e))
