"""Where training activations come from: the trainer asks a *source*, never a model.

A source knows which hook points the run reads and writes, their widths and the model they came
from, and yields `ActivationBatch`es: per-unit inputs `xs` and targets `ys` at the selected
tokens, plus the data cursor to commit once the batch has been trained on (so a checkpoint
taken after it resumes at the next batch) and the records skipped before that cursor, counted
as it is committed (so the checkpoint's skip counts are those of the rows before it). The
trainer owns the dictionaries, the optimiser, the schedule and the checkpoints; it does not
know whether activations come from

- `LiveSource`: a model forward with hooks per batch of the dataset (on-the-fly training), or
- a store of captured activations, or a per-rank slice of either (later sources).

Only a live source can splice dictionaries back into the model (`loss_fn` ce/kl); others leave
`ActivationBatch.spliced_loss` as None and the config refuses those losses for them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from vlmscope import VlmscopeWarning
from vlmscope.data.packing import Document, Packer, packed_batches
from vlmscope.data.processed import ProcessedDataError, ProcessedSpec
from vlmscope.data.processing import (
    Batch,
    CollateError,
    EncoderPool,
    SampleEncoder,
    SkipCounter,
    SkipJournal,
    SkipRecord,
    WorkerDiedError,
    batches,
    collate,
    encode_stream,
    prefetch,
)
from vlmscope.data.sources import BadRecordError
from vlmscope.dictionaries import NonFiniteError, check_finite
from vlmscope.models.hooked import HookContext, HookedVLM
from vlmscope.models.masks import TokenMasks
from vlmscope.models.vision import is_vision_hook, join_firings, vision_row_mask
from vlmscope.training.bundle import DictionaryBundle, mlp_out, resid_mid
from vlmscope.training.config import TrainConfig, column_map, trainable_hook
from vlmscope.training.distributed import Layout, release_frozen_model, shard_frozen_model
from vlmscope.training.errors import TrainingError

__all__ = [
    "ActivationBatch",
    "ActivationSource",
    "LiveSource",
    "TrainState",
    "bindings",
    "hookpoint_names",
    "load_model",
    "open_training_data",
    "resolve_model_path",
]


@dataclass
class TrainState:
    """Everything besides tensors that a resumed run needs to continue exactly."""

    step: int = 0
    tokens: int = 0
    epoch: int = 0
    #: rows of the dataset consumed in the current epoch (the next row to read).
    rows: int = 0
    #: --pack: tokens of row `rows` (its EOS included) already in trained chunks.
    offset: int = 0
    #: tokens of the current epoch's stream consumed, for a store source (the next to read).
    store_tokens: int = 0
    skips: dict[str, int] = field(default_factory=dict)
    skip_examples: dict[str, list[str]] = field(default_factory=dict)
    initialized: bool = False
    #: the multiple of the rate --lr-probe chose (1: not probed)
    lr_scale: float = 1.0


#: (bundle, loss_fn) -> the model's ce/kl loss with the bundle spliced in at the batch's tokens.
SplicedLoss = Callable[[DictionaryBundle, str], torch.Tensor]


@dataclass
class ActivationBatch:
    """One training batch: `xs[i]` [N, d_in] read and `ys[i]` [N, d_out] written by unit i."""

    xs: list[torch.Tensor]
    ys: list[torch.Tensor]
    #: TrainState fields to set once this batch has been trained on (the data cursor).
    cursor: dict[str, Any]
    #: rows (or record ids) the batch came from, for error messages.
    row_ids: list[str] = field(default_factory=list)
    spliced_loss: SplicedLoss | None = None
    #: (reason, row id) of the records skipped between the previous batch's cursor and this
    #: one's: counted when the cursor is committed, so a checkpoint counts the rows it passed.
    skipped: list[tuple[str, str]] = field(default_factory=list)

    @property
    def n_tokens(self) -> int:
        return int(self.xs[0].shape[0]) if self.xs else 0


class ActivationSource(Protocol):
    """What the trainer needs from wherever activations come from."""

    reads: list[str]
    writes: list[str]
    layers: list[int]
    d_in: int
    d_out: int
    device: torch.device
    #: skipped records of the batches committed (their `skipped`, counted by the trainer).
    skips: SkipCounter
    #: whether `batches` refuses NaN/Inf activations itself (then the trainer's dictionaries
    #: skip their own check); a source without the attribute is taken as not checking.
    checks_finite: bool

    def model_info(self) -> dict[str, Any]:
        """Provenance recorded in the dictionaries (model name, family, dims, layers, data)."""
        ...

    def batches(self, state: TrainState) -> Iterator[ActivationBatch]:
        """Batches from the cursor in `state` on, epoch after epoch, until `--epochs` passes
        are done (or for ever: the trainer stops at its budget). A source that knows how many
        tokens an epoch holds says so in a `tokens_per_epoch` attribute."""
        ...


# --- models and data -----------------------------------------------------------------------
def resolve_model_path(model: str) -> str:
    """`toy` is the shipped toy VLM, a zoo name builds that tiny model; else a HF name/path
    (FileNotFoundError for a path that can only be local, e.g. `./m` or `/m`, and is not)."""
    from vlmscope.models import zoo

    if os.path.exists(model):
        return model
    if model == "toy":
        from vlmscope.models.toy import toy_path

        return str(toy_path())
    if model in zoo.names():
        return str(zoo.cached_path(model))
    if _looks_like_local_path(model):  # not a hub name: say so, not "Repo id must be ..."
        raise FileNotFoundError(f"model path {model!r} does not exist")
    return model


def _looks_like_local_path(name: str) -> bool:
    """A name that can only be a local path (hub names look like `org/name`)."""
    return name.startswith(("/", "./", "../", "~")) or name in (".", "..")


def load_model(cfg: TrainConfig) -> HookedVLM:
    """The model of cfg.model; a missing path or hub name is a TrainingError, not a traceback."""
    if _looks_like_local_path(cfg.model) and not os.path.exists(cfg.model):
        raise TrainingError(f"model path {cfg.model!r} does not exist")
    try:
        path = resolve_model_path(cfg.model)
        return HookedVLM.from_pretrained(path, device=cfg.device or None, dtype=cfg.dtype or None)
    except (OSError, ValueError) as e:
        raise TrainingError(f"cannot load model {cfg.model!r}: {e}") from e


def open_training_data(cfg: TrainConfig) -> Any:
    """The dataset named by cfg.dataset; `shapes` / `shapes:N` is a generated shapes world."""
    from vlmscope.data import open_dataset

    name = cfg.dataset
    if cfg.is_shapes_dataset():
        from vlmscope.data import shapes
        from vlmscope.models.zoo import default_cache_dir

        n = int(name.split(":", 1)[1]) if ":" in name else 4000
        folder = default_cache_dir().parent / "data" / f"shapes-n{n}-seed{cfg.seed}"
        path = folder / f"{cfg.split}.parquet"  # splits draw disjoint seed streams
        if not path.exists():
            shapes.write_dataset(folder, n=n, seed=cfg.seed, split=cfg.split)
        return open_dataset(path, schema="chat", strict=cfg.strict)
    return open_dataset(
        name,
        schema=cfg.schema,
        image_root=cfg.image_root or None,
        columns=column_map(cfg.columns),
        strict=cfg.strict,
        split=cfg.split,
        allow_outside_image_root=cfg.allow_outside_image_root,
    )


def bindings(cfg: TrainConfig, vlm: HookedVLM) -> tuple[list[str], list[str], list[int]]:
    """(read hooks, written hooks, layers) of the run, checked against the model. --layers
    count the language model's layers, or the vision blocks with --tower vision."""
    vision = cfg.tower == "vision" or any(is_vision_hook(h) for h in cfg.hookpoints)
    if vision:
        _check_vision_tower(cfg, vlm)
    n = vlm.adapter.n_vision_layers if cfg.tower == "vision" else vlm.adapter.n_layers
    what = "vision blocks" if cfg.tower == "vision" else "layers"
    bad = [layer for layer in cfg.layers if layer >= n]
    if bad:
        raise TrainingError(f"--layers {bad} do not exist: the model has {n} {what} (0..{n - 1})")
    layers = sorted(cfg.layers) if cfg.layers else list(range(n))
    kind = cfg.sae.resolved_kind()
    if kind == "sae":
        if cfg.hookpoints:
            names = hookpoint_names(cfg.hookpoints, vlm, cfg.layers)
        elif cfg.tower == "vision":
            names = [f"vision.blocks.{layer}.hook_resid_post" for layer in layers]
        else:
            names = [f"lm.blocks.{layer}.hook_resid_post" for layer in layers]
        return names, names, layers
    if cfg.tower == "vision":
        if not vlm.adapter.has_vision_mlp():
            raise TrainingError(
                f"--tower vision transcoders read and write the vision blocks' MLP, and "
                f"{vlm.adapter.family} vision blocks have none at {vlm.adapter.vision_mlp!r}"
            )
        return (
            [f"vision.blocks.{layer}.mlp.hook_in" for layer in layers],
            [f"vision.blocks.{layer}.mlp.hook_out" for layer in layers],
            layers,
        )
    return [resid_mid(layer) for layer in layers], [mlp_out(layer) for layer in layers], layers


def autocast_on(mode: str, device: torch.device, model_dtype: torch.dtype) -> bool:
    """Whether the model's forward runs under bf16 autocast (`--autocast`). auto: only a
    float32 model on CUDA; a checkpoint in bf16 or fp16 runs in its own dtype, as eval and
    attribute run it (under bf16 autocast an fp16 model's residual stream turns float32,
    fp16 + bf16 promoting, while its matmuls run in bf16: activations no other command
    sees). An explicit bf16 on an fp16 model is refused for that reason."""
    if mode == "bf16" and model_dtype == torch.float16:
        raise TrainingError(
            "--autocast bf16 on a float16 model mixes the two: the residual stream turns "
            "float32 while the matmuls run in bfloat16; load it as bfloat16 (--dtype bfloat16) "
            "or use --autocast off"
        )
    if mode == "bf16":
        return True
    return mode == "auto" and device.type == "cuda" and model_dtype == torch.float32


def pass_ended(state: TrainState, epoch: int, last: dict[str, int]) -> bool:
    """At the end of pass `epoch`, whose last batch's cursor was `last`: if the trainer has
    trained that batch (the usual case: it asks for the next batch once the last is
    committed), move its cursor to the start of the next pass, so a checkpoint from now on
    resumes there; True then. Not when batches were read ahead of training (--lr-probe): the
    next pass's first batch carries the new epoch in its own cursor."""
    if state.epoch != epoch or any(getattr(state, k) != v for k, v in last.items()):
        return False
    state.epoch = epoch + 1
    for key in last:
        setattr(state, key, 0)
    return True


def within_layers(names: list[str], layers: list[int] | None, patterns: list[str]) -> list[str]:
    """The `--hookpoints` matches `names` that lie in `layers` (--layers; all when none): block
    hooks of other layers are dropped, hooks outside blocks kept; none left is an error."""
    if not layers:
        return names
    blocks = [re.match(r"(?:lm|vision)\.blocks\.(\d+)\.", h) for h in names]
    kept = [h for h, m in zip(names, blocks, strict=True) if m is None or int(m[1]) in layers]
    if not kept:
        raise TrainingError(f"--hookpoints {patterns} match nothing in --layers {layers}")
    return kept


def hookpoint_names(
    patterns: list[str], vlm: HookedVLM, layers: list[int] | None = None
) -> list[str]:
    """The hooks `--hookpoints` patterns match, in forward order, within `layers` (--layers,
    when given: block hooks of other layers are dropped, hooks outside blocks kept); unknown or
    untrainable ones, or none left, are a TrainingError naming them."""
    try:
        names = vlm.hook_names(patterns)
    except KeyError as e:  # unknown hook point: the message lists close matches
        raise TrainingError(str(e.args[0])) from None
    names = within_layers(names, layers, patterns)
    untrainable = [h for h in names if not trainable_hook(h)]
    if untrainable:
        raise TrainingError(
            f"--hookpoints {patterns} match {untrainable[:4]}, which the trainer cannot train "
            "on: it trains on one vector per position (lm.* hook points other than "
            "attn.hook_pattern, vision.* and projector.*); narrow the patterns"
        )
    return names


def _check_vision_tower(cfg: TrainConfig, vlm: HookedVLM) -> None:
    """A vision hook on a model without a vision tower is a one-line error, not a KeyError."""
    if vlm.adapter.n_vision_layers > 0:
        return
    asked = "--tower vision" if cfg.tower == "vision" else f"--hookpoints {cfg.hookpoints}"
    raise TrainingError(
        f"{asked}: {cfg.model!r} is a text-only model (family {vlm.adapter.family}) with no "
        "vision tower or projector, so vision.* and projector.* hook points do not exist; "
        "train on lm.* hook points"
    )


_NO_TOKENS_HINT = {
    "image": " (its records have no images, or the model has no image tokens): use "
    "--tokens all or --tokens text",
    "text": ": use --tokens all or --tokens image",
    "all": ": every token is padding, BOS or a chat-template marker; pass --include-special-tokens",
}


# --- the live source -------------------------------------------------------------------------
#: (batch or None, the cursor after it, the records skipped before that cursor since the last)
_Part = tuple[Batch | None, dict[str, int], list[tuple[str, str]]]


class LiveSource:
    """Activations from a model forward per batch of a dataset (one forward feeds every unit).

    Opening it is two phases with a gap between them: `open_data` (cheap: a missing file fails
    in seconds) and `bind_model` (loads the model unless one is given, checks the hooks, reads
    their widths). With --shard-model fsdp over several ranks the widths wait for a third,
    `open_together`, which every rank runs at once (see there). The cursor is the dataset row
    after the batch, within the current epoch. Every pass reads through a SkipJournal, so the
    records skipped before a batch's cursor travel with the batch, however far ahead the rows
    were read.
    """

    checks_finite = True  # every batch's activations, naming the hook and rows

    def __init__(self, cfg: TrainConfig, layout: Layout | None = None) -> None:
        self.cfg = cfg
        self.layout = layout or Layout()
        self.skips = SkipCounter()
        #: batches whose forward skipped a layer the run reads (see `left_out`)
        self.batches_left_out = 0
        self.dataset: Any = None
        self.vlm: HookedVLM | None = None
        #: requires_grad of a caller's model's parameters before training froze them.
        self._grad_flags: list[tuple[torch.nn.Parameter, bool]] = []
        self._pool: EncoderPool | None = None  # --workers processes, kept for the whole run
        self._total_rows: int | None = None
        self._opened = False  # open_together has run

    # --- phases --------------------------------------------------------------------------
    def open_data(self) -> None:
        """Open the dataset. Each pass reads a view of it whose rejected records (missing or
        corrupt images, bad columns) go to the pass's SkipJournal (`_journaled`)."""
        try:
            self.dataset = open_training_data(self.cfg)
        except (OSError, ValueError, ImportError, RuntimeError) as e:
            raise TrainingError(f"cannot open dataset {self.cfg.dataset!r}: {e}") from e

    def bind_model(self, vlm: HookedVLM | None = None) -> None:
        """Load (or take) the model, freeze it and bind the run's hook points to it. A model
        the caller passed in gets its requires_grad flags back from `release_model`. Unless
        the model is to be sharded over several ranks, `open_together` follows at once."""
        cfg = self.cfg
        if vlm is not None:
            self._grad_flags = [(p, p.requires_grad) for p in vlm.model.parameters()]
        if vlm is None:  # a model to shard loads into host memory: it may not fit one GPU
            vlm = load_model(dataclasses.replace(cfg, device="cpu") if self._sharded() else cfg)
        vlm.model.requires_grad_(False)
        self.vlm = vlm
        autocast_on(cfg.autocast, vlm.device, vlm.dtype)  # a refused mix stops here
        self.reads, self.writes, self.layers = bindings(cfg, vlm)
        self.vision = any(is_vision_hook(h) for h in self.reads + self.writes)
        processed = None
        if self.dataset.schema == "processed":
            processed = ProcessedSpec(vlm, cfg.model)
            try:  # before the first batch: a dataset made for another model stops here
                processed.check_dataset(self.dataset, repr(cfg.dataset))
            except (ProcessedDataError, CollateError) as e:
                raise TrainingError(str(e)) from None
        self.encoder = SampleEncoder(
            vlm.processor,
            cfg.ctx_len,
            vlm.adapter.image_token_ids(),
            processed=processed,
            videos=vlm.adapter.capabilities.video,
        )
        self.packer = self._packer(vlm)
        if not self._sharded():
            self.open_together()

    def open_together(self) -> None:
        """Shard the model (--shard-model fsdp) and read the hook widths, the part of opening
        that runs a forward. A sharded model's forward gathers each unit's weights from every
        rank, so the trainer runs this on all ranks at once, after each opened the rest in
        turn: rank 0's probe forward alone would wait for ever on ranks waiting to agree.
        Once only (a source the caller opened may be opened again by the trainer)."""
        if self._opened:
            return
        vlm = self._model()
        if self._sharded():
            shard_frozen_model(vlm, self.layout)  # moves a model loaded on the CPU to the GPU
        self.device = vlm.device
        width = vlm.adapter.d_model
        if self.cfg.sae.resolved_kind() == "sae" or self.vision:
            width = self._hook_width(list(dict.fromkeys(self.reads + self.writes)))
            release_frozen_model(vlm)  # the probe's gathered weights
        self.d_in = self.d_out = width
        self._opened = True

    def _sharded(self) -> bool:
        """Whether the model is sharded over several ranks (FSDP2)."""
        return self.cfg.shard_model == "fsdp" and self.layout.distributed

    def _packer(self, vlm: HookedVLM) -> Packer | None:
        """The packer of a --pack run: on by default for a text-only model reading plain text."""
        cfg, schema = self.cfg, self.dataset.schema
        pack = cfg.pack
        if pack is None:
            pack = schema == "text" and not hasattr(vlm.processor, "image_processor")
        if not pack:
            return None
        if schema != "text":
            raise TrainingError(
                f"--pack joins plain-text documents, but {cfg.dataset!r} has schema {schema!r}; "
                "drop --pack (or read a `text` column with --schema text)"
            )
        try:
            return Packer(vlm.tokenizer, cfg.ctx_len)
        except ValueError as e:
            raise TrainingError(str(e)) from None

    def release_model(self) -> None:
        """Give a caller's model back as it came: training froze its parameters."""
        for p, flag in self._grad_flags:
            p.requires_grad_(flag)
        self._grad_flags = []

    def close(self) -> None:
        """Give the model back (`release_model`) and stop the --workers processes."""
        self.release_model()
        if self._pool is not None:
            self._pool.close()
            self._pool = None

    def _workers(self) -> EncoderPool | None:
        """The --workers processes, started at the first pass and kept for every later one."""
        if self.cfg.workers > 0 and self._pool is None:
            self._pool = EncoderPool(self.encoder, self.cfg.workers)
        return self._pool

    def model_info(self) -> dict[str, Any]:
        cfg, vlm = self.cfg, self._model()
        return {
            "name": cfg.model,
            "family": vlm.adapter.family,
            "dims": vlm.adapter.dims(),
            "layers": self.layers,
            "tokens": cfg.tokens,
            "include_special_tokens": cfg.include_special_tokens,
            # Provenance travels with the dictionaries (eval warns on the same data).
            "data": {
                "dataset": cfg.dataset,
                "split": cfg.split,
                "seed": cfg.seed,
                "ctx_len": cfg.ctx_len,
            },
        }

    def _model(self) -> HookedVLM:
        if self.vlm is None:
            raise RuntimeError("LiveSource.bind_model() has not run")
        return self.vlm

    def _journaled(self, rows: int, journal: SkipJournal) -> Any:
        """The dataset from row `rows` on, its reader noting the records it rejects in
        `journal` (the view's own callback: a pass read in another thread touches no shared
        state)."""
        view = self.dataset.skip(rows)
        view.on_bad_record = journal.note_bad
        return view

    def _hook_width(self, names: list[str]) -> int:
        """The one width of the SAE hook points (a head hook counts heads x head width), read
        off one tiny forward pass the way training reads them; mixed widths are refused."""
        vlm = self._model()
        probe = probe_inputs(vlm, image=any(is_vision_hook(n) for n in names))
        _, cache = vlm.run_with_cache(probe, names=names, mask="all")
        widths = {
            name: int(cache[name].shape[-1] if is_vision_hook(name) else cache[name][0].numel())
            for name in names
        }
        if len(set(widths.values())) > 1:
            listed = ", ".join(f"{n}: {w}" for n, w in widths.items())
            raise TrainingError(
                f"--hookpoints select hook points of different widths ({listed}); one run "
                "trains dictionaries of one width: run once per width"
            )
        return widths[names[0]]

    # --- batches -----------------------------------------------------------------------------
    def batches(self, state: TrainState) -> Iterator[ActivationBatch]:
        if self.packer is not None:  # with several ranks too: each reads its share of windows
            parts = self._packed_batches(state)
        elif self.layout.distributed:
            parts = self._rank_batches(state)
        else:
            parts = self._model_batches(state)
        for batch, cursor, skipped in self._paired_errors(parts):
            if batch is not None and self.left_out(batch):
                batch = None
            if batch is None:  # this rank's rows of the window all failed: a zero-row step
                spliced = None
                # A sharded model gathers its layers in every forward, and a spliced ce/kl loss
                # selects BatchTopK codes over all ranks: run what the others run.
                if self._sharded() or (self.layout.distributed and self.cfg.loss_fn != "fvu"):
                    spliced = self._stand_in_forward()
                xs = [torch.zeros(0, self.d_in, device=self.device) for _ in self.reads]
                ys = [torch.zeros(0, self.d_out, device=self.device) for _ in self.writes]
                yield ActivationBatch(xs, ys, cursor, spliced_loss=spliced, skipped=skipped)
                continue
            xs, ys, out, masks, positions = self._activations(batch, state.step)
            spliced = self._splicer(batch.inputs, out, masks, positions)
            yield ActivationBatch(xs, ys, cursor, list(batch.row_ids), spliced, skipped)

    def no_tokens_message(self) -> str:
        """Why a full pass gave no tokens: the --tokens choice, or every batch left out."""
        cfg = self.cfg
        if self.batches_left_out:
            vlm = self._model()
            return (
                f"no tokens in a full pass over {cfg.dataset!r}: {self.batches_left_out} "
                f"batch(es) left out ({vlm.skipped_layers()}, which this run reads): give "
                "rows with images"
            )
        return (
            f"--tokens {cfg.tokens} selected no tokens in a full pass over {cfg.dataset!r}"
            f"{_NO_TOKENS_HINT[cfg.tokens]}"
        )

    def no_samples_message(self) -> str:
        """A full pass gave no sample (on any rank, with several: this rank's skips named)."""
        lay, skips = self.layout, self.skips.summary()
        if not lay.distributed:
            return f"dataset {self.cfg.dataset!r} produced no usable samples ({skips})"
        return (
            f"dataset {self.cfg.dataset!r} produced no usable samples on any of the "
            f"{lay.world} ranks (rank {lay.rank}: {skips})"
        )

    def left_out(self, batch: Batch, names: list[str] | None = None) -> bool:
        """Whether the batch's forward skips a layer the run reads (`names`, or the units'
        hooks: Mllama's cross-attention layers, for a batch without images): its rows give no
        activations there, so it trains as a step without rows; counted, and said once."""
        vlm = self._model()
        missed = vlm.skipped_hooks(batch.inputs, names or [*self.reads, *self.writes])
        if not missed:
            return False
        self.batches_left_out += 1
        if self.batches_left_out == 1:  # any rank's first: another rank may leave out none
            where = f"rank {self.layout.rank}: " if self.layout.distributed else ""
            warnings.warn(
                f"{where}{vlm.skipped_layers()}, which this run reads ({missed[0]}): such "
                f"batches are left out (rows {batch.row_ids[:3]} first); "
                "rows without images train only in batches with an image",
                category=VlmscopeWarning,
                stacklevel=2,
            )
        return True

    def _paired_errors(self, parts: Iterator[_Part]) -> Iterator[_Part]:
        """`parts`, and on a sharded model an error raised while reading them (a bad record
        under --strict, rows that cannot fit the tower) first runs the forward the other ranks
        are in, whose all-gathers would otherwise wait for this rank until the timeout; then
        every rank learns the error at the step's agreement, as without sharding."""
        it = iter(parts)
        while True:
            try:
                part = next(it)
            except StopIteration:
                return
            except (TrainingError, BadRecordError, SkipRecord, WorkerDiedError) as e:
                if self._sharded():
                    with contextlib.suppress(Exception):  # the error to report is `e`
                        self._stand_in_forward()
                if isinstance(e, WorkerDiedError):  # as _model_batches says it, on every path
                    raise TrainingError(f"{e}; the last checkpoint is intact") from None
                raise
            yield part

    def _rank_batches(self, state: TrainState) -> Iterator[_Part]:
        """(this rank's batch or None, the cursor after the window, this rank's records skipped
        in the window) with several ranks.

        Each micro-step reads a window of world * batch_size rows from the global cursor;
        rank r takes rows [r * B, (r + 1) * B) of it (counted from the cursor, so a run resumed
        with another world size re-cuts from where it stopped). Every rank yields one item per
        window, so all ranks step together even when one rank's rows all fail to load."""
        cfg, vlm, lay = self.cfg, self._model(), self.layout
        pad = vlm.tokenizer.pad_token_id
        pad_id = pad if pad is not None else 0
        size, rank = cfg.batch_size, lay.rank
        window = lay.world * size
        if self._total_rows is None:
            self._total_rows = int(self.dataset.count_rows())
        total = self._total_rows
        # The pass and row read from are local: a batch's cursor says where it ends, and the
        # trainer commits it once trained (--lr-probe reads batches ahead across a pass's end).
        epoch, start = state.epoch, state.rows
        while not cfg.epochs or epoch < cfg.epochs:
            end = start
            n_windows = -(-(total - start) // window) if total > start else 0

            def mine(pos: int, start: int = start) -> bool:
                return ((pos - start) // size) % lay.world == rank

            journal = SkipJournal()
            data = self._journaled(start, journal).select(mine)
            samples = encode_stream(
                data, self.encoder, journal, strict=cfg.strict, pool=self._workers()
            )
            pending = next(samples, None)
            got, tokens_before = 0, state.tokens
            for w in range(n_windows):
                buf = []
                while pending is not None and (pending.position - start) // window == w:
                    buf.append(pending)
                    pending = next(samples, None)
                got += len(buf)
                end = min(start + (w + 1) * window, total)
                try:
                    part = collate(buf, pad_id, masks=vlm.masks) if buf else None
                except (ProcessedDataError, CollateError) as e:  # rows no tower or batch takes
                    raise TrainingError(str(e)) from None
                yield part, {"epoch": epoch, "rows": end}, journal.take((0, end))
            if start == 0:  # a full pass: the same checks as one process, over all ranks
                if lay.sum([float(got)]).item() == 0:
                    raise TrainingError(self.no_samples_message())
                if state.tokens == tokens_before:
                    raise TrainingError(self.no_tokens_message())
            pass_ended(state, epoch, {"rows": end})
            epoch, start = epoch + 1, 0

    def _model_batches(
        self, state: TrainState, pass_checks: bool = True
    ) -> Iterator[tuple[Batch, dict[str, int], list[tuple[str, str]]]]:
        """(batch, cursor after it, records skipped before that cursor since the previous
        batch's) from the saved position, epoch after epoch. The consumer counts the skipped
        records as it commits the cursor; those after a pass's last batch are counted here,
        as the pass ends (and with it the cursor's epoch), or, when the consumer reads ahead
        (--lr-probe), by a last item whose batch is None and whose cursor is the data's end.
        A full pass without samples or tokens is an error unless `pass_checks` is off (a
        capture rank reads its block of the data only, and the ranks check together)."""
        cfg, vlm = self.cfg, self._model()
        pad = vlm.tokenizer.pad_token_id
        pad_id = pad if pad is not None else 0
        # The pass and row read from are local (see _rank_batches); the records skipped after a
        # pass's last batch travel with the next batch, or are counted when the data ends.
        epoch, rows = state.epoch, state.rows
        trailing: list[tuple[str, str]] = []
        while not cfg.epochs or epoch < cfg.epochs:
            full_pass = rows == 0
            got_any = False
            tokens_before = state.tokens  # the trainer counts the tokens each batch selects
            # Data preparation runs in a thread ahead of training (and in --workers processes
            # under it), reading rows ahead of the batches it hands over; the records it skips
            # travel with the batch whose cursor passes them.
            try:
                last = rows
                for batch, skipped in prefetch(self._prepared(rows, pad_id)):
                    if batch is None:
                        trailing += skipped
                        break
                    got_any = True
                    last = batch.positions[-1] + 1
                    yield batch, {"epoch": epoch, "rows": last}, trailing + skipped
                    trailing = []
            except (ProcessedDataError, CollateError) as e:  # rows no tower or batch takes
                raise TrainingError(str(e)) from None
            except WorkerDiedError as e:
                raise TrainingError(f"{e}; the last checkpoint is intact") from None
            full_pass = full_pass and pass_checks
            if not got_any and full_pass:
                self.skips.add_all(trailing)  # the pass's rows, all of them skipped
                raise TrainingError(self.no_samples_message())
            if full_pass and state.tokens == tokens_before:
                if self.vision:
                    raise TrainingError(
                        f"no image reached the vision tower in a full pass over "
                        f"{cfg.dataset!r}: vision and projector dictionaries need records "
                        "with images"
                    )
                raise TrainingError(self.no_tokens_message())
            if pass_ended(state, epoch, {"rows": last}):
                self.skips.add_all(trailing)
                trailing = []
            epoch, rows = epoch + 1, 0
        if trailing:  # the data ended, and batches were read ahead of training (--lr-probe):
            # a closing item without rows carries the rest, counted when the trainer reaches it
            yield None, {"epoch": epoch, "rows": 0}, trailing

    def _packed_batches(self, state: TrainState) -> Iterator[_Part]:
        """--pack: batches of full ctx_len chunks of the document stream, which runs on across
        epochs; the cursor (epoch, rows, offset) resumes mid-document. With several ranks each
        packs the whole stream (tokenising text is cheap beside the forward) and trains on its
        share of every window of world x batch chunks. The packer reads documents in groups
        far ahead of the chunks (on a small dataset, passes ahead): a rejected row travels
        with the batch whose cursor passes it."""
        cfg, vlm = self.cfg, self._model()
        assert self.packer is not None
        pad = vlm.tokenizer.pad_token_id
        journal = SkipJournal(state.epoch)

        def documents() -> Iterator[Document]:
            epoch, rows = state.epoch, state.rows
            while True:
                full_pass, got_any = rows == 0, False
                journal.epoch = epoch
                for record in self._journaled(rows, journal):
                    got_any = True
                    yield Document(epoch, record.position, record.row_id, record.text)
                if full_pass and not got_any:
                    self.skips.add_all(journal.take())  # the pass is over: name its rows
                    raise TrainingError(
                        f"dataset {cfg.dataset!r} produced no usable documents "
                        f"({self.skips.summary()})"
                    )
                epoch, rows = epoch + 1, 0

        chunks = self.packer.chunks(documents(), offset=state.offset)
        tokens_before, epoch0 = state.tokens, state.epoch
        part = (self.layout.rank, self.layout.world)
        for batch, cursor in packed_batches(chunks, cfg.batch_size, pad or 0, vlm.masks, part):
            if cursor.epoch > epoch0 + 1 and state.tokens == tokens_before:
                raise TrainingError(self.no_tokens_message())
            skipped = journal.take((cursor.epoch, cursor.rows))
            # Every rank reads the whole stream: rank 0 alone counts its rejected rows.
            yield batch, cursor.as_state(), skipped if self.layout.is_main else []

    def _prepared(
        self, rows: int, pad_id: int
    ) -> Iterator[tuple[Batch | None, list[tuple[str, str]]]]:
        """The pass from row `rows` on: (batch, records skipped before its cursor since the
        previous batch's), then (None, the rest of the pass's)."""
        cfg, vlm = self.cfg, self._model()
        journal = SkipJournal()
        data = self._journaled(rows, journal)
        pool = self._workers()
        samples = encode_stream(data, self.encoder, journal, strict=cfg.strict, pool=pool)
        for batch in batches(samples, cfg.batch_size, pad_id, masks=vlm.masks):
            yield batch, journal.take((0, batch.positions[-1] + 1))
        yield None, journal.take()

    def _activations(
        self, batch: Batch, step: int
    ) -> tuple[list[torch.Tensor], list[torch.Tensor], Any, TokenMasks, torch.Tensor]:
        vlm = self._model()
        masks = batch.masks if batch.masks is not None else vlm.masks(batch.inputs)
        positions = masks.select(self.cfg.tokens, include_special=self.cfg.include_special_tokens)
        out, cache = self._forward(batch.inputs, masks, positions)
        rows = self._rows
        xs = [rows(batch.inputs, r, cache.get(r), self.d_in) for r in self.reads]
        ys = [rows(batch.inputs, w, cache.get(w), self.d_out) for w in self.writes]
        # In forward order, so the error names the first hook where the values broke.
        pairs = [
            p for i in range(len(xs)) for p in ((self.reads[i], xs[i]), (self.writes[i], ys[i]))
        ]
        # One host sync for all of them (one per tensor stalls a GPU as many times a step);
        # a non-finite sum is looked at tensor by tensor, in order.
        sums = [t.sum() for _, t in pairs if t.numel()]
        if sums and bool(torch.isfinite(torch.stack(sums)).all()):
            return xs, ys, out, masks, positions
        for name, t in pairs:
            try:
                check_finite(name, t)
            except NonFiniteError as e:
                raise TrainingError(
                    f"step {step}: {e} (batch rows {batch.row_ids[:4]}"
                    f"{'...' if batch.size > 4 else ''}); the last checkpoint is intact"
                ) from None
        return xs, ys, out, masks, positions

    def _forward(
        self, inputs: Any, masks: TokenMasks, positions: torch.Tensor
    ) -> tuple[Any, dict[str, torch.Tensor]]:
        """(model output or None, activations of the run's hooks) of one training forward."""
        vlm = self._model()
        names = list(dict.fromkeys(self.reads + self.writes))
        try:
            with self._autocast():
                if all(is_vision_hook(n) for n in names):
                    return None, self._vision_cache(inputs, names, masks)
                # The plain FVU loss needs no logits: the forward ends at the last hook read.
                out, cache = vlm.run_with_cache(
                    inputs, names=names, mask=positions, masks=masks,
                    stop_early=self.cfg.loss_fn == "fvu",
                )  # fmt: skip
            return out, cache
        finally:  # a sharded model's gathered weights are freed between forwards
            release_frozen_model(vlm)

    def _stand_in_forward(self) -> SplicedLoss | None:
        """The forward a rank without rows runs on a sharded model, so that its all-gathers
        pair with the other ranks': the training forward (same hooks, same early stop) on a
        one-word prompt, its activations dropped; with --loss-fn ce/kl also the spliced loss
        the trainer then runs, forward and backward, at no token (its share is zero). Images
        change no gather (the vision tower is in the root unit, see shard_frozen_model)."""
        vlm = self._model()
        inputs = probe_inputs(vlm)
        masks = vlm.masks(inputs)
        none = torch.zeros_like(masks.select("all"))
        out, _ = self._forward(inputs, masks, none)
        return self._splicer(inputs, out, masks, none)

    def _splicer(
        self, inputs: Any, out: Any, masks: TokenMasks, positions: torch.Tensor
    ) -> SplicedLoss | None:
        """The batch's spliced ce/kl loss, to be run by the trainer (None for --loss-fn fvu)."""
        if self.cfg.loss_fn == "fvu":
            return None

        def spliced(bundle: DictionaryBundle, loss_fn: str) -> torch.Tensor:
            return self._spliced_loss(bundle, loss_fn, inputs, out.logits, masks, positions)

        return spliced

    def _autocast(self) -> Any:
        """bf16 autocast for the model forward where `autocast_on` says; the activations handed
        to the dictionaries are float32 either way."""
        if not autocast_on(self.cfg.autocast, self.device, self._model().dtype):
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)

    def _vision_cache(
        self, inputs: Any, names: list[str], masks: TokenMasks
    ) -> dict[str, torch.Tensor]:
        """Vision-side activations from a forward that stops where the language model starts:
        a run on vision and projector hooks alone never needs the language model's layers."""
        vlm = self._model()
        cache: dict[str, torch.Tensor] = {}

        def store(t: torch.Tensor, ctx: HookContext) -> None:
            prev = cache.get(ctx.name)  # a part that runs once per image fires once for each
            cache[ctx.name] = t.detach() if prev is None else join_firings(prev, t.detach())

        def stop(t: torch.Tensor, ctx: HookContext) -> None:
            raise _VisionDone

        hooks = [(n, store) for n in names] + [("lm.blocks.0.hook_resid_pre", stop)]
        with torch.no_grad(), vlm.hooks(hooks, masks=masks), contextlib.suppress(_VisionDone):
            vlm.forward(inputs, masks=masks)
        return cache

    def _rows(self, inputs: Any, name: str, t: torch.Tensor | None, width: int) -> torch.Tensor:
        """[N, d] float rows of a cached activation: LM hooks are cached at the selected
        tokens already; vision hooks keep their image patches (and CLS / register tokens
        with --include-special-tokens); none where the hook did not run (no images)."""
        if t is None:
            return torch.zeros(0, width, device=self.device)
        if not is_vision_hook(name):
            return t.flatten(1).float()
        layout = self._model().vision_positions(inputs, name, t.shape[:-1])
        keep = vision_row_mask(layout, self.cfg.include_special_tokens).to(t.device)
        return t.reshape(-1, t.shape[-1])[keep].float()

    def _spliced_loss(
        self,
        b: DictionaryBundle,
        loss_fn: str,
        model_inputs: Any,
        clean_logits: torch.Tensor,
        masks: TokenMasks,
        positions: torch.Tensor,
    ) -> torch.Tensor:
        """CE or KL of the model with every written hook replaced by its reconstruction at the
        selected positions (the others keep the model's own values, as in training). Running
        statistics (BatchTopK's threshold, dead-latent counters) are left alone: the training
        forward already counted this batch, once and on the selected tokens only. No token
        selected (a rank without rows): zero, still through the spliced model and the
        dictionaries, so its backward gathers and reduces what the other ranks' do."""
        vlm = self._model()
        codes: dict[int, Any] = {}
        inputs: dict[int, torch.Tensor] = {}
        index = {name: i for i, name in enumerate(b.reads)}
        out_index = {name: i for i, name in enumerate(b.writes)}
        spliced = positions.to(self.device)

        fp32 = torch.autocast(device_type=self.device.type, enabled=False)  # dictionaries

        def read(t: torch.Tensor, ctx: HookContext) -> None:
            i = index[ctx.name]
            x = t[spliced].float()
            inputs[i] = x
            with fp32:
                codes[i] = b.encode_unit(i, x)

        def write(t: torch.Tensor, ctx: HookContext) -> torch.Tensor:
            i = out_index[ctx.name]
            with fp32:
                y = b.decode_unit(i, codes, inputs[i])
            return t.index_put((spliced,), y.to(t.dtype))

        hooks = [(r, read) for r in b.reads] + [(w, write) for w in b.writes]
        with b.frozen_statistics(), self._autocast():
            logits = vlm.run_with_hooks(model_inputs, hooks, masks=masks).logits.float()
        pos = positions.to(logits.device)
        # Means as sums over at least one position: no token selected gives 0, still through
        # the spliced model (no branch, no host read of the count)
        if loss_fn == "kl":
            logp = F.log_softmax(clean_logits.float(), -1)[pos]
            logq = F.log_softmax(logits, -1)[pos]
            return (logp.exp() * (logp - logq)).sum() / pos.sum().clamp_min(1)
        targets = model_inputs["input_ids"][:, 1:].to(logits.device)
        sel = pos[:, :-1] & model_inputs["attention_mask"][:, 1:].to(logits.device).bool()
        ce = F.cross_entropy(logits[:, :-1][sel], targets[sel], reduction="sum")
        return ce / sel.sum().clamp_min(1)


def _probe_image() -> Any:
    """A small blank image for the one forward that reads the hook widths."""
    from PIL import Image

    return Image.new("RGB", (64, 64), (255, 255, 255))


def probe_inputs(vlm: HookedVLM, image: bool = False) -> Any:
    """A one-word prompt for a forward whose activations are not trained on (hook widths, a
    rank's stand-in): with a small image when asked, when the model skips layers for a batch
    without one (Mllama's cross-attention layers, whose hooks would not fire), or when the
    processor wants one with every prompt (PaliGemma's refuses text alone)."""
    if not image and not vlm.adapter.skippable_blocks():
        try:
            return vlm.prepare(["a"])
        except ValueError:  # "images are expected": the image is not optional
            pass
    return vlm.prepare(["a"], images=[[_probe_image()]])


class _VisionDone(Exception):
    """Raised by a hook to end a forward once the vision-side activations are in."""
