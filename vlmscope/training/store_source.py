"""StoreSource: training activations read from an activation store instead of a model.

`vlmscope train --activations DIR` opens the store written by `vlmscope capture` and feeds the
same trainer (loop, checkpoints, bit-exact resume, metrics, outputs) as on-the-fly training.
Before anything is built it checks the store against the run: complete, captured from MODEL
(when given: the config hash must match), holding every hook the dictionaries read and write,
and holding the tokens `--tokens` / `--include-special-tokens` select.

Order: with `--shuffle-buffer-mb 0` the batches are those on-the-fly training reads (every
selected token of `--batch-size` consecutive captured samples), so a run from a store equals
the run on the fly with the same seed; otherwise tokens are shuffled across shards within a
bounded buffer, anew every epoch, in batches of `--batch-size` samples' worth of tokens on
average. The cursor saved in checkpoints is the epoch and the position in its stream.

Several processes (torchrun): every rank walks the same stream with global batches of
world x --batch-size samples (or that many samples' worth of tokens) and reads only its share
of each (`ActivationStore.batches(part=...)`): in capture order rank r gets samples
[r B, (r + 1) B) of every group of world x B, as the live source gives rank r rows
[r B, (r + 1) B) of every window. So the ranks step in lockstep by construction, N ranks train
on the global batches one process reads with --batch-size N x B (the same dictionaries, to
float rounding), and the cursor is global: identical on every rank, and resumable with another
world size (the stream's order is kept, its batches are cut anew from the cursor on).
"""

from __future__ import annotations

import fnmatch
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from vlmscope import VlmscopeWarning
from vlmscope.capture import ActivationStore, StoreError, config_sha256
from vlmscope.capture.layout import MODALITIES, selected_modalities
from vlmscope.data.processing import SkipCounter
from vlmscope.dictionaries import NonFiniteError, check_finite
from vlmscope.training.bundle import mlp_out, resid_mid
from vlmscope.training.config import TrainConfig
from vlmscope.training.errors import TrainingError
from vlmscope.training.sources import (
    ActivationBatch,
    TrainState,
    pass_ended,
    resolve_model_path,
    within_layers,
)

__all__ = ["StoreSource", "store_bindings"]


def store_bindings(
    cfg: TrainConfig, hooks: list[str], n_layers: int, where: str
) -> tuple[list[str], list[str], list[int]]:
    """(read hooks, written hooks, layers) of the run, like `sources.bindings` but against a
    store's hooks: default layers are those the store holds; a missing hook is named."""
    bad = [layer for layer in cfg.layers if layer >= n_layers]
    if bad:
        raise TrainingError(
            f"--layers {bad} do not exist: the store's model has {n_layers} layers "
            f"(0..{n_layers - 1})"
        )
    kind = cfg.sae.resolved_kind()
    held = set(hooks)
    if kind == "sae" and cfg.hookpoints:
        names = [h for h in hooks if any(fnmatch.fnmatchcase(h, p) for p in cfg.hookpoints)]
        if not names:
            raise TrainingError(
                f"--hookpoints {cfg.hookpoints} match no hook of the store {where}, which holds "
                f"{_short(hooks)}; capture them with `vlmscope capture ... --hookpoints ...`"
            )
        names = within_layers(names, cfg.layers, cfg.hookpoints)  # as on the fly
        layers = sorted({int(h.split(".")[2]) for h in names if h.startswith("lm.blocks.")})
        return names, names, layers
    if kind == "sae":
        need = ["hook_resid_post"]
    else:
        need = ["hook_resid_mid", "mlp.hook_out"]
    if cfg.layers:
        layers = sorted(cfg.layers)
    else:
        layers = [
            layer
            for layer in range(n_layers)
            if all(f"lm.blocks.{layer}.{n}" in held for n in need)
        ]
        if kind == "clt" and layers and layers != list(range(layers[0], layers[-1] + 1)):
            raise TrainingError(
                f"the store {where} holds resid_mid and mlp.hook_out of layers {layers}, which "
                "are not contiguous; pass the --layers of one contiguous run for a CLT"
            )
    if kind == "sae":
        reads = writes = [f"lm.blocks.{layer}.hook_resid_post" for layer in layers]
    else:
        reads, writes = [resid_mid(i) for i in layers], [mlp_out(i) for i in layers]
    missing = [h for h in dict.fromkeys(reads + writes) if h not in held]
    if missing or not layers:
        what = f"lacks {_short(missing)}" if missing else f"holds no {' or '.join(need)} hook"
        capture = (
            "--hookpoints 'lm.blocks.*.hook_resid_post'"
            if kind == "sae"
            else "(its default hooks: resid_mid and mlp.hook_out of --layers)"
        )
        raise TrainingError(
            f"the store {where} {what} that this {kind} needs; it holds {_short(hooks)}; "
            f"capture them with `vlmscope capture MODEL DATASET --out DIR {capture}`"
        )
    return reads, writes, layers


def _short(names: list[str], n: int = 6) -> str:
    return "[" + ", ".join(names[:n]) + (f", ... {len(names) - n} more]" if len(names) > n else "]")


class StoreSource:
    """Activations from an activation store (see the module docstring).

    `rank` / `world_size`: this process reads its share of every global batch (see the
    module docstring); the default reads them whole.
    """

    checks_finite = True  # every batch, naming the store's samples and shard (_check_finite)

    def __init__(self, cfg: TrainConfig, rank: int = 0, world_size: int = 1) -> None:
        self.cfg = cfg
        self.rank, self.world_size = rank, world_size
        self.skips = SkipCounter()
        self.store: ActivationStore | None = None

    def open(self) -> None:
        """Open the store and check it against the run, before any dictionary is built."""
        cfg = self.cfg
        where = cfg.activations
        try:
            store = ActivationStore(where)
        except StoreError as e:
            raise TrainingError(str(e)) from None
        if not store.complete:
            raise TrainingError(
                f"the capture into {where} did not finish ({store.n_tokens} tokens in "
                f"{len(store.shards)} shards so far): rerun it with --resume, then train"
            )
        m = store.manifest
        self._check_model(m["model"], where)
        data = m["data"]
        if cfg.dataset and cfg.dataset != data["dataset"]:
            raise TrainingError(
                f"the store {where} was captured from dataset {data['dataset']!r}, not "
                f"{cfg.dataset!r}: drop DATASET or capture that dataset"
            )
        self._check_tokens(data, store, where)
        n_layers = int(m["model"]["dims"]["n_layers"])
        self.reads, self.writes, self.layers = store_bindings(
            cfg, list(store.hooks), n_layers, where
        )
        width_in = {store.hooks[h] for h in self.reads}
        width_out = {store.hooks[h] for h in self.writes}
        if len(width_in) > 1 or len(width_out) > 1:
            listed = ", ".join(f"{h}: {store.hooks[h]}" for h in self.reads)
            raise TrainingError(
                f"--hookpoints select hooks of different widths ({listed}); one run trains "
                "dictionaries of one width: run once per width"
            )
        self.d_in, self.d_out = width_in.pop(), width_out.pop()
        from vlmscope.models.hooked import default_device

        self.device = torch.device(cfg.device) if cfg.device else default_device()
        self.shards = store.shards
        #: selected tokens of one pass over the store, over all ranks.
        self.tokens_per_epoch = store.selected_tokens(cfg.tokens, cfg.include_special_tokens)
        if self.tokens_per_epoch == 0:
            raise TrainingError(
                f"--tokens {cfg.tokens} selects no token of the store {where} "
                f"({_counts(m['modality_tokens'])})"
            )
        samples = max(1, int(m["samples"]))
        #: tokens per global batch when shuffling: world x --batch-size captured samples'
        #: worth on average (the same batches one process reads with that --batch-size).
        self.batch_tokens = max(
            1, round(cfg.batch_size * self.world_size * self.tokens_per_epoch / samples)
        )
        self.store = store

    def _check_model(self, model: dict[str, Any], where: str) -> None:
        """MODEL, when given, must be the store's model: same config hash (and name)."""
        cfg = self.cfg
        if not cfg.model:
            return
        try:
            from transformers import AutoConfig

            from vlmscope.models import zoo

            zoo.names()  # registers the zoo's config classes
            config = AutoConfig.from_pretrained(resolve_model_path(cfg.model))
        except (OSError, ValueError) as e:
            raise TrainingError(
                f"cannot read the config of MODEL {cfg.model!r} to check it against the store "
                f"{where} ({e}); drop MODEL to train on the store's own ({model['name']!r})"
            ) from None
        digest = config_sha256(config.to_dict())
        if digest != model["config_sha256"]:
            raise TrainingError(
                f"the store {where} was captured from model {model['name']!r} (config "
                f"{model['config_sha256'][:12]}), not from {cfg.model!r} (config "
                f"{digest[:12]}): train with the store's model, or capture this one"
            )
        if Path(cfg.model.rstrip("/")).name != Path(str(model["name"]).rstrip("/")).name:
            warnings.warn(
                f"MODEL {cfg.model!r} has the config of the store's model {model['name']!r} "
                "under another name; make sure they share their weights too",
                category=VlmscopeWarning,
                stacklevel=3,
            )

    def _check_tokens(self, data: dict[str, Any], store: ActivationStore, where: str) -> None:
        """The run's --tokens must be among the captured ones (a store holds what its capture
        selected)."""
        cfg = self.cfg
        want = selected_modalities(cfg.tokens, cfg.include_special_tokens)
        held = selected_modalities(data["tokens"], data["include_special_tokens"])
        lacking = sorted(MODALITIES[m] for m in want - held)
        if lacking:
            flags = f"--tokens {data['tokens']}" + (
                " --include-special-tokens" if data["include_special_tokens"] else ""
            )
            raise TrainingError(
                f"--tokens {cfg.tokens}"
                + (" --include-special-tokens" if cfg.include_special_tokens else "")
                + f" asks for {', '.join(lacking)} tokens, which the store {where} does not "
                f"hold (captured with {flags}); train on those, or capture again"
            )

    def _store(self) -> ActivationStore:
        if self.store is None:
            raise RuntimeError("StoreSource.open() has not run")
        return self.store

    def model_info(self) -> dict[str, Any]:
        """The store's model and data, recorded with the dictionaries as on-the-fly training
        records them."""
        m = self._store().manifest
        model, data = m["model"], m["data"]
        return {
            "name": model["name"],
            "family": model["family"],
            "dims": model["dims"],
            "layers": self.layers,
            "tokens": self.cfg.tokens,
            "include_special_tokens": self.cfg.include_special_tokens,
            "data": {
                "dataset": data["dataset"],
                "split": data["split"],
                "seed": data["seed"],
                "ctx_len": data.get("ctx_len"),
            },
            "activations": {
                "store": str(self.cfg.activations),
                "config_sha256": model["config_sha256"],
                "tokens": m["tokens"],
            },
        }

    def batches(self, state: TrainState) -> Iterator[ActivationBatch]:
        cfg, store = self.cfg, self._store()
        names = list(dict.fromkeys(self.reads + self.writes))
        ordered = cfg.shuffle_buffer_mb == 0
        # The pass and offset read from are local: a batch's cursor says where it ends, and the
        # trainer commits it once trained (--lr-probe reads batches ahead across a pass's end).
        epoch, start = state.epoch, state.store_tokens
        while not cfg.epochs or epoch < cfg.epochs:
            last = start
            try:
                for b in store.batches(
                    names,
                    tokens=cfg.tokens,
                    include_special=cfg.include_special_tokens,
                    batch_samples=cfg.batch_size * self.world_size if ordered else 0,
                    batch_tokens=self.batch_tokens,
                    shuffle_buffer_mb=cfg.shuffle_buffer_mb,
                    seed=cfg.seed,
                    epoch=epoch,
                    start=start,
                    meta=("meta.sample",),
                    part=(self.rank, self.world_size),
                ):
                    t = b.tensors
                    acts = {h: t[h].to(self.device, non_blocking=True).float() for h in names}
                    for h in names:
                        _check_finite(store, h, acts[h], t["meta.sample"])
                    xs, ys = [acts[h] for h in self.reads], [acts[h] for h in self.writes]
                    samples = torch.unique_consecutive(t["meta.sample"][:64]).tolist()[:4]
                    rows = [f"store sample {s}" for s in samples]
                    last = b.end
                    yield ActivationBatch(xs, ys, {"epoch": epoch, "store_tokens": last}, rows)
            except StoreError as e:
                raise TrainingError(f"{e}; the last checkpoint is intact") from None
            pass_ended(state, epoch, {"store_tokens": last})
            epoch, start = epoch + 1, 0


def _check_finite(store: ActivationStore, hook: str, acts: torch.Tensor, sample: Any) -> None:
    """Raise StoreError naming the store, hook, samples and shard when a batch of hook's
    activations holds NaN or Inf: the store's bytes pass their checksum whatever they hold
    (a model that overflowed in bf16 while capturing writes them)."""
    try:
        check_finite(hook, acts)
    except NonFiniteError as e:
        bad = (~torch.isfinite(acts)).any(1).cpu()
        samples = torch.unique(sample[bad]).tolist()
        shards = ", ".join(s.path.name for s in store.shards_of_sample(samples[0]))
        where = f" (the first held in {shards})" if shards else ""
        raise StoreError(
            f"store {store.path}: {e}; in store samples {samples[:4]}"
            f"{'...' if len(samples) > 4 else ''}{where}"
        ) from None


def _counts(modality_tokens: dict[str, int]) -> str:
    return ", ".join(f"{n} {m}" for m, n in modality_tokens.items())
