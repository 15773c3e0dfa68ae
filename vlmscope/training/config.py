"""Training configuration: dataclasses are the one source of truth; the CLI is generated.

Flags are the dataclass field names with dots for groups (`--sae.k`) and accept both
kebab-case and snake_case (`--batch-size`, `--batch_size`), so commands users already type for
this job work unchanged. Values are validated before any model is loaded.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import types
import typing
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from vlmscope.argparsing import SuggestingParser
from vlmscope.data.sources import ColumnMap
from vlmscope.dictionaries.config import SparseCoderConfig
from vlmscope.models.vision import is_vision_hook
from vlmscope.training.optim import OPTIMIZERS, default_lr

LOSSES = ("fvu", "ce", "kl")
TOKEN_KINDS = ("all", "image", "text")
#: --max-tokens when neither it nor --epochs is given
DEFAULT_MAX_TOKENS = 1_000_000
TOWERS = ("lm", "vision")

#: SparseCoderConfig fields the trainer fills in from the model; not flags.
_DERIVED_SAE_FIELDS = {"d_in", "d_out", "n_layers", "metadata"}


COLUMN_KEYS = tuple(f.name for f in dataclasses.fields(ColumnMap))
"""The ColumnMap fields `--columns KEY=NAME` can rename."""


def column_map(pairs: Sequence[str]) -> ColumnMap:
    """`--columns` pairs as a ColumnMap; a bad pair names itself."""
    out: dict[str, str] = {}
    for pair in pairs:
        key, sep, name = pair.partition("=")
        if not sep or not name:
            raise ValueError(f"--columns {pair!r}: expected KEY=NAME, e.g. messages=conversation")
        if key not in COLUMN_KEYS:
            raise ValueError(f"--columns {pair!r}: KEY must be one of {', '.join(COLUMN_KEYS)}")
        out[key] = name
    return ColumnMap(**out)


def trainable_hook(name: str) -> bool:
    """Hook points (or patterns) whose activations are one vector per position, which the
    trainer selects: language-model tokens (lm.*, not attention patterns, which are maps) or
    vision-encoder positions (vision.*, projector.*)."""
    if name.startswith("lm."):
        return not name.endswith("hook_pattern")
    return is_vision_hook(name)


def _is_plain_folder_name(name: str) -> bool:
    """A name that stays inside its parent folder: one component, not . or .., no separator."""
    import os

    seps = {"/", "\\", os.sep} | ({os.altsep} if os.altsep else set())
    return name not in (".", "..") and not any(sep in name for sep in seps) and "\0" not in name


def is_shapes_dataset(name: str) -> bool:
    """DATASET `shapes` or `shapes:N` names the generated shapes world, not a file."""
    return name == "shapes" or name.startswith("shapes:")


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
    #: None: not given (a per-layer transcoder with --sae.transcode); 0: every later layer.
    n_targets: int | None = None
    skip_connection: bool = False
    normalize_decoder: bool | None = None
    aux_k: int = 0
    aux_k_coeff: float = 1.0 / 32.0
    dead_tokens_threshold: int = 10_000_000
    jumprelu_init_threshold: float = 0.001
    jumprelu_bandwidth: float = 0.001
    sparsity_coeff: float = 0.0
    threshold_momentum: float = 0.0
    #: the trainer scales activations by default (the library's SparseCoderConfig does not):
    #: one learning-rate rule then fits models whose activations differ in scale
    normalize_activations: str = "mean_norm"

    def resolved_kind(self) -> str:
        """`kind` if given; else for --transcode a CLT when n_targets asks for a window (0: all
        later layers, or > 1) and a per-layer transcoder otherwise; else an SAE."""
        if self.kind:
            return self.kind
        if self.transcode:
            return "transcoder" if self.n_targets in (None, 1) else "clt"
        return "sae"

    def check_conflicts(self) -> None:
        """Refuse flag combinations where one flag would silently override another."""
        if self.n_targets is not None and self.n_targets < 0:
            raise ValueError(
                f"--sae.n_targets must be >= 0 (0: every later layer, N: layers l .. l+N-1), "
                f"got {self.n_targets}"
            )
        kind = self.resolved_kind()
        if self.kind == "sae" and self.transcode:
            raise ValueError(
                "--sae.kind sae reconstructs a hook point but --sae.transcode asks for a "
                "transcoder: drop one of them (--sae.kind transcoder or clt implies --transcode)"
            )
        if self.n_targets is not None and kind == "sae":
            raise ValueError(
                f"--sae.n_targets {self.n_targets} is the window of a cross-layer transcoder, "
                "not an SAE setting: add --sae.transcode (or --sae.kind clt)"
            )
        if self.n_targets not in (None, 1) and kind != "clt":
            raise ValueError(
                f"--sae.kind {kind} is a per-layer transcoder (one target layer) but "
                f"--sae.n_targets {self.n_targets} asks for a CLT window: use --sae.kind clt "
                "or drop --sae.n_targets"
            )
        if self.skip_connection and kind == "sae":
            raise ValueError("--sae.skip-connection is for transcoders: add --sae.transcode")

    def coder_config(self) -> SparseCoderConfig:
        """A SparseCoderConfig without model dimensions (validated now, filled in later)."""
        kind = self.resolved_kind()
        values = {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if f.name not in ("kind", "transcode")
        }
        if kind != "clt":
            values["n_targets"] = 0  # None or 1 here (check_conflicts): one target, the same
        elif self.n_targets is None:
            values["n_targets"] = 0  # a CLT asked for by --sae.kind clt: every later layer
        return SparseCoderConfig(kind=kind, **values)


@dataclass
class TrainConfig:
    """Everything `vlmscope train` needs. MODEL and DATASET are positional; what each field
    means is its --help text in `_HELP` below."""

    model: str = ""
    dataset: str = ""
    sae: SaeArgs = field(default_factory=SaeArgs)
    layers: list[int] = field(default_factory=list)
    tower: str = "lm"
    hookpoints: list[str] = field(default_factory=list)
    tokens: str = "all"
    include_special_tokens: bool = False
    loss_fn: str = "fvu"
    batch_size: int = 8
    grad_acc_steps: int = 1
    optimizer: str = "auto"
    lr: float = 0.0
    lr_warmup_fraction: float = 0.05
    #: None: 0.2 under Adam, 0 under signum (its averaging does the decay's work)
    lr_decay_fraction: float | None = None
    lr_probe: int = 0
    k_anneal_tokens: int = 0
    #: None: DEFAULT_MAX_TOKENS, or 0 (no token limit) when --epochs is given, so that the
    #: passes set the budget (and, from a store, the learning-rate schedule)
    max_tokens: int | None = None
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
    schema: str = "auto"
    split: str = "train"
    image_root: str = ""
    columns: list[str] = field(default_factory=list)
    strict: bool = False
    workers: int = 0
    dist_timeout: float = 600.0
    distribute_modules: bool = False
    shard_model: str = "none"
    autocast: str = "auto"
    tf32: bool = True
    allow_outside_image_root: bool = False
    pack: bool | None = None
    activations: str = ""
    epochs: int = 0
    shuffle_buffer_mb: float = 1024.0

    def __post_init__(self) -> None:
        if self.max_tokens is None:
            self.max_tokens = 0 if self.epochs else DEFAULT_MAX_TOKENS
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
        for name in ("max_tokens", "max_steps", "k_anneal_tokens", "workers", "epochs", "lr_probe"):
            if getattr(self, name) < 0:
                raise bad(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        if self.run_name and not _is_plain_folder_name(self.run_name):
            raise bad(
                f"--run-name must be one folder name inside --output-dir (no path separators, "
                f"not '.' or '..'), got {self.run_name!r}"
            )
        if not self.dist_timeout > 0 or not math.isfinite(self.dist_timeout):
            raise bad(
                f"--dist-timeout must be a positive number of seconds, got {self.dist_timeout}"
            )
        if self.shard_model not in ("none", "fsdp"):
            raise bad(f"--shard-model must be none or fsdp, got {self.shard_model!r}")
        if self.autocast not in ("auto", "bf16", "off"):
            raise bad(f"--autocast must be auto, bf16 or off, got {self.autocast!r}")
        if self.distribute_modules and self.loss_fn != "fvu":
            raise bad(
                "--distribute-modules trains each layer's dictionary on its owner rank; "
                "--loss-fn ce/kl splices all of them into one model: use --loss-fn fvu"
            )
        if not (self.shuffle_buffer_mb >= 0 and math.isfinite(self.shuffle_buffer_mb)):
            raise bad(f"--shuffle-buffer-mb must be >= 0, got {self.shuffle_buffer_mb}")
        if self.max_tokens == 0 and self.max_steps == 0 and self.epochs == 0:
            raise bad("set --max-tokens, --max-steps or --epochs")
        if self.activations and self.loss_fn != "fvu":
            raise bad(
                f"--loss-fn {self.loss_fn} splices the dictionaries into the model's forward "
                "pass, and --activations trains from stored activations without the model: use "
                "--loss-fn fvu (or train on the fly, without --activations)"
            )
        if self.optimizer not in ("auto", *OPTIMIZERS):
            raise bad(f"--optimizer must be auto, adam or signum, got {self.optimizer!r}")
        if self.lr < 0 or not math.isfinite(self.lr):
            raise bad(f"--lr must be a finite number >= 0, got {self.lr}")
        if self.lr_probe and self.loss_fn != "fvu":
            raise bad(
                "--lr-probe scores rates by held-out FVU, not by the spliced model's "
                f"--loss-fn {self.loss_fn}: probe with --loss-fn fvu and pass its rate with --lr"
            )
        if not 0.0 <= self.lr_warmup_fraction <= 1.0:
            raise bad(f"--lr-warmup-fraction must be in [0, 1], got {self.lr_warmup_fraction}")
        if self.lr_decay_fraction is not None and not 0.0 <= self.lr_decay_fraction <= 1.0:
            raise bad(f"--lr-decay-fraction must be in [0, 1], got {self.lr_decay_fraction}")
        if any(layer < 0 for layer in self.layers):
            raise bad(f"--layers must be >= 0, got {self.layers}")
        if len(set(self.layers)) != len(self.layers):
            raise bad(f"--layers has duplicates: {self.layers}")
        if self.dtype and self.dtype not in ("float32", "bfloat16", "float16", "fp32", "bf16"):
            raise bad(f"--dtype must be float32, bfloat16 or float16, got {self.dtype!r}")
        if self.device:
            try:
                _parse_device(self.device)
            except ValueError as e:
                raise bad(str(e)) from None
        try:
            column_map(self.columns)
        except ValueError as e:
            raise bad(str(e)) from None
        if self.is_shapes_dataset() and ":" in self.dataset:
            n = self.dataset.split(":", 1)[1]
            if not n.isdigit() or int(n) < 1:
                raise bad(f"DATASET shapes:N needs a positive integer N, got {self.dataset!r}")
        try:
            self.sae.check_conflicts()
        except ValueError as e:
            raise bad(str(e)) from None
        kind = self.sae.resolved_kind()
        if kind == "clt" and self.layers:
            want = list(range(min(self.layers), max(self.layers) + 1))
            if sorted(self.layers) != want:
                raise bad(
                    f"a CLT needs contiguous --layers (layer l's features write to the MLP "
                    f"outputs of the layers right after it), got {self.layers}; use --layers "
                    f"{' '.join(map(str, want))}, or per-layer transcoders (--sae.kind transcoder)"
                )
        if self.hookpoints and kind != "sae":
            raise bad("--hookpoints selects SAE hook points; transcoders and CLTs read resid_mid "
                      "and write mlp.hook_out of --layers")  # fmt: skip
        for pattern in self.hookpoints:
            if not trainable_hook(pattern):
                raise bad(
                    f"--hookpoints {pattern!r}: the trainer trains on one vector per position, "
                    "so patterns start with 'lm.' (and exclude attn.hook_pattern), 'vision.' or "
                    "'projector.' (e.g. 'lm.blocks.*.hook_resid_post')"
                )
        if self.tower not in TOWERS:
            raise bad(f"--tower must be one of {TOWERS}, got {self.tower!r}")
        vision = self.tower == "vision" or any(is_vision_hook(h) for h in self.hookpoints)
        if self.tower == "vision" and kind == "clt":
            raise bad("--tower vision trains SAEs and per-layer transcoders; a CLT spans the "
                      "language model's layers (use --sae.kind transcoder)")  # fmt: skip
        if vision and self.tokens == "text":
            raise bad(
                "--tokens text selects no vision-encoder positions (every one is part of an "
                "image): use --tokens all or image for vision and projector hooks"
            )
        if vision and self.loss_fn != "fvu":
            raise bad("--loss-fn ce/kl splice language-model MLP outputs; vision and projector "
                      "dictionaries train with --loss-fn fvu (vlmscope eval measures their "
                      "effect on the answer)")  # fmt: skip
        if self.loss_fn != "fvu" and kind == "sae":
            raise bad("--loss-fn ce/kl splice dictionaries in for MLP outputs: use transcoders "
                      "or a CLT (--sae.transcode)")  # fmt: skip
        try:
            self.sae.coder_config()
        except (TypeError, ValueError) as e:
            raise bad(str(e)) from None

    def is_shapes_dataset(self) -> bool:
        """DATASET `shapes` or `shapes:N` names the generated shapes world, not a file."""
        return is_shapes_dataset(self.dataset)

    def check_environment(self) -> None:
        """Checks that depend on this machine (kept out of `validate`, so a config can be
        written on a machine without the GPU it will run on): the --device exists here."""
        if not self.device:
            return
        import torch

        dev = _parse_device(self.device)
        if dev.type == "cuda":
            n = torch.cuda.device_count() if torch.cuda.is_available() else 0
            if n == 0:
                raise ValueError(f"--device {self.device}: CUDA is not available on this machine")
            if dev.index is not None and dev.index >= n:
                raise ValueError(
                    f"--device {self.device}: this machine has {n} CUDA device(s) (0..{n - 1})"
                )
        elif dev.type == "mps" and not torch.backends.mps.is_available():
            raise ValueError(f"--device {self.device}: MPS is not available on this machine")
        elif dev.type == "xpu" and not (hasattr(torch, "xpu") and torch.xpu.is_available()):
            raise ValueError(f"--device {self.device}: XPU is not available on this machine")

    def lr_for(self, num_latents: int) -> float:
        """--lr, or the optimiser's rule for this kind of dictionary (optim.default_lr)."""
        kind, norm = self.sae.resolved_kind(), self.sae.normalize_activations
        return self.lr or default_lr(num_latents, self.resolved_optimizer(), kind, norm)

    def resolved_optimizer(self) -> str:
        """--optimizer, with auto resolved by kind: signum for SAEs, adam for transcoders and
        CLTs (what benchmarks/vs_sparsify.py measured best at equal tokens; README there)."""
        if self.optimizer != "auto":
            return self.optimizer
        return "signum" if self.sae.resolved_kind() == "sae" else "adam"

    def resolved_lr_decay(self) -> float:
        """--lr-decay-fraction, by default 0.2 under Adam and 0 under signum."""
        if self.lr_decay_fraction is not None:
            return self.lr_decay_fraction
        return 0.0 if self.resolved_optimizer() == "signum" else 0.2

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


_DEVICE_TYPES = ("cpu", "cuda", "mps", "xpu")


def _parse_device(text: str) -> Any:
    """torch.device of --device, or a ValueError that names the flag and what is accepted."""
    import torch

    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError):
        dev = None
    if dev is None or dev.type not in _DEVICE_TYPES:
        raise ValueError(f"--device must be cpu, cuda, cuda:N, mps or xpu, got {text!r}")
    return dev


# --- CLI generation ----------------------------------------------------------------------------
#: --help of every flag; a field without an entry fails when the parser is built.
_HELP = {
    "model": "HF model name or local path (a zoo name such as `toy` or `llava` also works)",
    "dataset": "Parquet/JSONL/JSON file or folder, a save_to_disk folder, a hub dataset name, "
    "or `shapes` / `shapes:N` (the generated shapes world, N samples)",
    "sae.kind": "sae: reconstruct hook points; transcoder: predict each layer's MLP output "
    "from its resid_mid; clt: cross-layer transcoder "
    "(default: from --sae.transcode / --sae.n_targets)",
    "sae.transcode": "predict MLP outputs from resid_mid (transcoder; CLT if n_targets > 1)",
    "sae.activation": "topk: k latents per token; batchtopk: k per token on average over the "
    "batch, a learned threshold at inference; jumprelu: learned per-latent thresholds "
    "(needs --sae.sparsity-coeff > 0)",
    "sae.expansion_factor": "latents per input dimension (when --sae.num-latents is 0)",
    "sae.num_latents": "dictionary size per layer (0: expansion_factor * d_model)",
    "sae.k": "active latents per token (topk, batchtopk)",
    "sae.n_targets": "CLT window with --sae.transcode: source layer l writes to the MLP outputs "
    "of layers l .. l+N-1, clamped to the last layer; 0: all later layers (default: not set, "
    "a per-layer transcoder; --sae.kind clt alone means all later layers)",
    "sae.skip_connection": "learn a linear skip W_skip from input to output (transcoders)",
    "sae.normalize_decoder": "keep every latent's decoder row at unit norm after each step "
    "(default: yes for SAEs, no for transcoders and CLTs)",
    "sae.aux_k": "AuxK: dead latents used to model the residual (0: d_model / 2)",
    "sae.aux_k_coeff": "weight of the AuxK loss that revives dead latents (0: off)",
    "sae.dead_tokens_threshold": "a latent is dead after this many tokens without firing",
    "sae.jumprelu_init_threshold": "initial JumpReLU threshold of every latent",
    "sae.jumprelu_bandwidth": "width of the rectangle kernel of JumpReLU's threshold "
    "pseudo-gradient",
    "sae.sparsity_coeff": "JumpReLU L0 penalty weight (must be > 0 for jumprelu)",
    "sae.threshold_momentum": "BatchTopK eval threshold EMA (0: plain mean)",
    "sae.normalize_activations": "mean_norm: inputs and targets each scaled by one constant, "
    "estimated on the first batch, to a mean norm of sqrt(d), so the default learning rates "
    "hold whatever the model's activation scale (the scales are saved with the dictionaries "
    "and undone on their outputs); none: train on the raw activations",
    "layers": "layers of --tower to train on; for a transcoder/CLT its source and target "
    "layers (a CLT's must be contiguous); with --hookpoints, the matches in these layers "
    "(default: all layers)",
    "tower": "lm: --layers are language-model layers, transcoders read resid_mid and write "
    "mlp.hook_out; vision: --layers are vision blocks, SAEs read vision.blocks.{i}."
    "hook_resid_post and transcoders map the block's mlp.hook_in to mlp.hook_out",
    "hookpoints": "SAE hook-point patterns with * wildcards, of one width: lm.* per-token "
    "hooks, vision.blocks.* or projector.hook_out (vision-encoder positions), e.g. "
    "'lm.blocks.*.hook_resid_post' (default: hook_resid_post of --layers)",
    "tokens": "which token positions train the dictionaries; padding is always excluded "
    "(vision and projector hooks: image patches, all or image)",
    "include_special_tokens": "also train on BOS and chat-template control tokens, and on "
    "the CLS / register tokens of vision hooks",
    "loss_fn": "fvu: reconstruction error; ce / kl: next-token loss / KL to the clean model "
    "with the dictionaries spliced in for the MLP outputs (transcoders and CLTs)",
    "batch_size": "samples (image + conversation) per forward pass",
    "grad_acc_steps": "forward passes whose gradients add up to one optimizer step",
    "optimizer": "adam: Adam; signum: sign-SGD with schedule-free averaging, the final "
    "dictionaries being the averaged weights (training/optim.py); auto: signum for SAEs, "
    "adam for transcoders and CLTs, which reach the lower held-out FVU at equal tokens",
    "lr": "learning rate; 0: 5e-3 (signum), 2e-4 (adam, SAEs) or 2e-3 (adam, transcoders and "
    "CLTs on normalised activations) scaled by 1/sqrt(num_latents / 2**14) (--lr-probe may "
    "then multiply it by 1/3 or 3; under signum by 3 or 10)",
    "lr_warmup_fraction": "fraction of the budget (--max-tokens or --max-steps, whichever ends "
    "the run) over which the learning rate rises linearly from 0",
    "lr_decay_fraction": "fraction of the budget at its end over which the learning rate "
    "decays linearly to 0 (default: 0.2 with adam, 0 with signum)",
    "lr_probe": "N > 0: before training, train the initialised dictionaries for the run's "
    "first N steps at x1/3, x1 and x3 the learning rate (signum: x1, x3, x10; each time from "
    "the same start), then "
    "train at the one with the lowest FVU on batches it had not trained on yet (printed, and "
    "kept in lr_probe.json); for short runs on data unlike the benchmarks' (on theirs the "
    "default rates did as well: benchmarks/README.md); "
    "costs 3N steps; not with --distribute-modules (0: off)",
    "k_anneal_tokens": "tokens over which k anneals from the input width down to --sae.k "
    "(0: no annealing; not for jumprelu)",
    "max_tokens": "stop after this many training tokens (selected positions; 0: no token "
    "limit) (default: 1000000, or 0 with --epochs)",
    "max_steps": "stop after this many optimizer steps (0: no step limit)",
    "ctx_len": "truncate each sample to this many tokens",
    "save_every": "write a checkpoint every this many optimizer steps (and at the end)",
    "log_every": "append metrics to metrics.jsonl every this many optimizer steps",
    "run_name": "name of the run folder under --output-dir (default: MODEL-KIND)",
    "output_dir": "folder that holds one subfolder per run",
    "resume": "continue the run in the run folder from its last checkpoint",
    "device": "cpu, cuda, cuda:N, mps or xpu (default: cuda if available, else cpu)",
    "dtype": "model weights dtype; dictionaries train in float32 (default: the checkpoint's own)",
    "seed": "random seed of the initialisation and the generated shapes dataset",
    "log_to_wandb": "also log metrics to Weights & Biases (WANDB_MODE=offline works offline)",
    "log_to_tensorboard": "also log metrics to TensorBoard (in the run folder)",
    "schema": "dataset record schema; auto picks it from the column names (processed: the "
    "model processor's outputs, input_ids + pixel_values + extras, e.g. from "
    "`vlmscope data process`)",
    "split": "dataset split (files or folders named by split, or a hub split)",
    "image_root": "folder that relative image paths resolve against; image paths must stay "
    "inside it ('../x.png', absolute paths elsewhere and links out of it are skipped as "
    "image_outside_root) unless --allow-outside-image-root (default: the dataset's folder)",
    "allow_outside_image_root": "read image paths that lead outside --image-root (absolute "
    "paths, '..', symbolic links); only for datasets you trust, since a dataset could then "
    "make vlmscope read any file on the machine",
    "pack": "join plain-text documents with the tokenizer's EOS and cut the stream into "
    "--ctx-len chunks: no padding and no text lost to truncation; resumes mid-document "
    "(default: on for a text-only model reading a plain `text` dataset, off otherwise)",
    "columns": "source column names that differ from the schema's, as KEY=NAME with KEY one "
    f"of {', '.join(COLUMN_KEYS)} (e.g. --columns messages=conversation images=pictures)",
    "strict": "stop at the first bad record instead of skipping and counting it",
    "distribute_modules": "with several processes: each rank holds the dictionaries of its "
    "own share of the layers; activations go to their owner by all-to-all (see "
    "training/modules.py; for a CLT no rank holds every layer's decoder)",
    "shard_model": "none: every rank holds the whole frozen model; fsdp: shard its weights "
    "over the ranks with FSDP2 fully_shard, each decoder layer gathered for its forward only "
    "(for models larger than one GPU)",
    "autocast": "auto: a float32 model runs under bfloat16 autocast on CUDA; a bf16 or fp16 "
    "model, or any on CPU, runs in its own dtype (what eval and attribute run); bf16 / off "
    "force it (bf16 on a float16 model is refused: the two would mix into float32); "
    "dictionaries and their optimiser stay float32 either way",
    "tf32": "on CUDA, the dictionaries' float32 matmuls (forward, backward, optimiser step; not "
    "the model's forward that makes their activations) run on TF32 tensor cores: a 10-bit "
    "mantissa, about 8x the IEEE float32 rate on A100/H100, as sparsify trains; --no-tf32 "
    "keeps IEEE float32. No effect on CPU",
    "dist_timeout": "with several processes (torchrun): seconds a collective waits for the "
    "other ranks before every rank stops with an error (a rank died or hangs)",
    "workers": "processes that preprocess records under the read-ahead thread that prepares "
    "batches while the previous one trains (0: that thread alone)",
    "activations": "train from an activation store written by `vlmscope capture` instead of "
    "running the model (MODEL and DATASET may then be omitted; given, they must be the "
    "store's); --loss-fn must be fvu",
    "epochs": "stop after this many passes over the data (0: no limit; the run ends at "
    "--max-tokens / --max-steps; with --activations alone it sets the budget)",
    "shuffle_buffer_mb": "with --activations: MB of activations shuffled together, drawn from "
    "shards in a new random order every epoch (0: capture order, batches of --batch-size "
    "captured samples, the batches on-the-fly training reads)",
}


_CHOICES: dict[str, Sequence[str]] = {
    "sae.kind": ("sae", "transcoder", "clt"),
    "sae.activation": ("topk", "batchtopk", "jumprelu"),
    "sae.normalize_activations": ("none", "mean_norm"),
    "loss_fn": LOSSES,
    "optimizer": ("auto", *OPTIMIZERS),
    "tokens": TOKEN_KINDS,
    "tower": TOWERS,
    "schema": ("auto", "llava", "chat", "processed", "text"),
    "dtype": ("float32", "bfloat16", "float16"),
    "shard_model": ("none", "fsdp"),
    "autocast": ("auto", "bf16", "off"),
}


def _flag_names(path: str) -> list[str]:
    kebab = path.replace("_", "-")
    return [f"--{kebab}"] if kebab == path else [f"--{kebab}", f"--{path}"]


def _add_fields(
    parser: argparse.ArgumentParser,
    cls: type,
    prefix: str = "",
    only: Collection[str] | None = None,
    help_texts: Mapping[str, str] | None = None,
) -> None:
    """Flags for the fields of `cls` (all, or those in `only`), with `_HELP` texts unless
    `help_texts` words a field otherwise (another command reusing the flags)."""
    hints = typing.get_type_hints(cls)
    doc_default = cls()  # type: ignore[call-arg]
    for f in dataclasses.fields(cls):
        path = prefix + f.name
        typ = hints[f.name]
        if only is not None and path not in only:
            continue
        if dataclasses.is_dataclass(typ):
            _add_fields(parser, typ, prefix=f"{path}.")  # type: ignore[arg-type]
            continue
        if path in ("model", "dataset"):
            continue
        default = getattr(doc_default, f.name)
        if path not in _HELP:
            raise KeyError(f"TrainConfig field {path!r} has no --help text in _HELP")
        help_text = (help_texts or {}).get(path, _HELP[path])
        kw: dict[str, Any] = {"dest": path, "default": argparse.SUPPRESS}
        args = typing.get_args(typ)
        origin = typing.get_origin(typ)
        if typ is bool or (origin in (typing.Union, types.UnionType) and bool in args):
            kw["action"] = argparse.BooleanOptionalAction
            shown = default
        elif origin is list:
            kw["nargs"] = "+"
            kw["type"] = args[0]
            shown = default
        else:
            if origin in (typing.Union, types.UnionType):  # X | None: a value of type X
                typ = next(a for a in args if a is not type(None))
            kw["type"] = typ
            if path in _CHOICES:
                kw["choices"] = _CHOICES[path]
            else:
                kw["metavar"] = {"str": "TEXT"}.get(typ.__name__, typ.__name__.upper())
            shown = repr(default)
        # A help text that explains its own default (e.g. "default: all layers") keeps it.
        kw["help"] = help_text if "(default:" in help_text else f"{help_text} (default: {shown})"
        parser.add_argument(*_flag_names(path), **kw)


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """The TrainConfig flags without MODEL and DATASET (for commands that plan a training)."""
    _add_fields(parser, TrainConfig)


def build_train_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """The `vlmscope train` parser, generated from TrainConfig and SaeArgs."""
    p = parser or SuggestingParser(prog="vlmscope train")
    p.add_argument("model", nargs="?", default="", help=_HELP["model"])
    p.add_argument("dataset", nargs="?", default="", help=_HELP["dataset"])
    _add_fields(p, TrainConfig)
    return p


def config_from_args(ns: argparse.Namespace) -> TrainConfig:
    """TrainConfig from parsed flags, checked against this machine too (errors name the
    flag)."""
    values: dict[str, Any] = {}
    sae: dict[str, Any] = {}
    for key, v in vars(ns).items():
        if key.startswith("sae."):
            sae[key[4:]] = v
        elif key in {f.name for f in dataclasses.fields(TrainConfig)}:
            values[key] = v
    if not values.get("activations") and not (values.get("model") and values.get("dataset")):
        raise ValueError(
            "MODEL and DATASET are required (or --activations DIR, to train from a store "
            "written by `vlmscope capture`)"
        )
    cfg = TrainConfig(sae=SaeArgs(**sae), **values)
    try:
        cfg.check_environment()  # a command is about to run here: --device must exist here
    except ValueError as e:
        raise ValueError(f"invalid training config: {e}") from None
    return cfg


def parse_train_args(argv: Sequence[str]) -> TrainConfig:
    p = build_train_parser()
    ns = p.parse_args(argv)
    try:
        return config_from_args(ns)
    except ValueError as e:
        p.error(str(e))
