"""On-the-fly training: one VLM forward per batch feeds every layer's dictionary.

The model runs once per batch under hooks that cache the read and written hook points at the
selected tokens (padding never, BOS and chat-template markers only if asked); the dictionaries
train on those activations. With loss ce/kl a second, spliced forward replaces the MLP outputs
at the selected tokens by the dictionaries' reconstructions and compares with the clean logits
of the same batch. Bad settings, data, hooks or sizes stop with a TrainingError that names the
flag, preferably before the model loads.
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from vlmscope.data.processing import Batch, SampleEncoder, SkipCounter, batches, encode_stream
from vlmscope.data.sources import BadRecord
from vlmscope.dictionaries import NonFiniteError, check_finite
from vlmscope.models.hooked import HookContext, HookedVLM
from vlmscope.models.masks import TokenMasks
from vlmscope.training.bundle import DictionaryBundle, mlp_out, resid_mid
from vlmscope.training.checkpoint import (
    find_checkpoint,
    load_checkpoint,
    remove_stale_temporaries,
    save_checkpoint,
    save_final_dictionaries,
)
from vlmscope.training.config import TrainConfig, column_map, trainable_hook
from vlmscope.training.errors import CheckpointError, TrainingError
from vlmscope.training.logging import MetricsLogger

__all__ = [
    "CheckpointError",
    "TrainResult",
    "Trainer",
    "TrainingError",
    "open_training_data",
    "resolve_model_path",
    "train",
]


@dataclass
class TrainState:
    """Everything besides tensors that a resumed run needs to continue exactly."""

    step: int = 0
    tokens: int = 0
    epoch: int = 0
    #: rows of the dataset consumed in the current epoch (the next row to read).
    rows: int = 0
    skips: dict[str, int] = field(default_factory=dict)
    skip_examples: dict[str, list[str]] = field(default_factory=dict)
    initialized: bool = False


@dataclass
class TrainResult:
    run_dir: Path
    dictionaries: Path
    step: int
    tokens: int
    fvu_per_unit: dict[str, float]
    l0_per_unit: dict[str, float]
    dead_per_unit: dict[str, float]


def resolve_model_path(model: str) -> str:
    """`toy` is the shipped toy VLM, a zoo name builds that tiny model; else a HF name/path."""
    from vlmscope.models import zoo

    if os.path.exists(model):
        return model
    if model == "toy":
        from vlmscope.models.toy import toy_path

        return str(toy_path())
    if model in zoo.names():
        return str(zoo.cached_path(model))
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
    )


def check_writable(folder: Path) -> None:
    """Fail before any model is loaded when the output folder cannot be written."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise TrainingError(f"cannot write to output folder {folder}: {e}") from e


def bindings(cfg: TrainConfig, vlm: HookedVLM) -> tuple[list[str], list[str], list[int]]:
    """(read hooks, written hooks, layers) of the run, checked against the model."""
    n = vlm.adapter.n_layers
    bad = [layer for layer in cfg.layers if layer >= n]
    if bad:
        raise TrainingError(f"--layers {bad} do not exist: the model has {n} layers (0..{n - 1})")
    layers = sorted(cfg.layers) if cfg.layers else list(range(n))
    kind = cfg.sae.resolved_kind()
    if kind == "sae":
        if cfg.hookpoints:
            try:
                names = vlm.hook_names(cfg.hookpoints)
            except KeyError as e:  # unknown hook point: the message lists close matches
                raise TrainingError(str(e.args[0])) from None
            untrainable = [h for h in names if not trainable_hook(h)]
            if untrainable:
                raise TrainingError(
                    f"--hookpoints {cfg.hookpoints} match {untrainable[:4]}, which the trainer "
                    "cannot train on: it trains on per-token language-model vectors (lm.* hook "
                    "points other than attn.hook_pattern); narrow the patterns"
                )
        else:
            names = [f"lm.blocks.{layer}.hook_resid_post" for layer in layers]
        return names, names, layers
    return [resid_mid(layer) for layer in layers], [mlp_out(layer) for layer in layers], layers


class Trainer:
    """Trains a DictionaryBundle on a HookedVLM as configured by a TrainConfig."""

    def __init__(
        self, cfg: TrainConfig, vlm: HookedVLM | None = None, progress: bool = True
    ) -> None:
        self.cfg = cfg
        self.progress = progress
        self.run_name = cfg.run_name or _default_run_name(cfg)
        self.run_dir = Path(cfg.output_dir) / self.run_name
        try:
            cfg.check_environment()
        except ValueError as e:
            raise TrainingError(str(e)) from None
        check_writable(self.run_dir)
        existing = find_checkpoint(self.run_dir)
        if existing is not None and not cfg.resume:
            raise TrainingError(
                f"{self.run_dir} already holds a run (checkpoint at {existing}); pass --resume "
                "to continue it or choose another --run-name"
            )
        if existing is not None:
            _check_resumable(self.run_dir / "train_config.json", cfg)
        remove_stale_temporaries(self.run_dir)  # left by a run killed while writing
        _check_loggers(cfg)
        # The data opens before the model loads: a missing file fails in seconds, not minutes.
        try:
            self.dataset = open_training_data(cfg)
        except (OSError, ValueError, ImportError, RuntimeError) as e:
            raise TrainingError(f"cannot open dataset {cfg.dataset!r}: {e}") from e
        # Records the reader rejects (missing or corrupt images, bad columns) join the run's
        # skip counts, so they are reported at the end and kept in checkpoints even when the
        # run stops before a pass over the data ends.
        self.dataset.on_bad_record = self._count_bad_record
        torch.manual_seed(cfg.seed)
        if vlm is None:
            vlm = load_model(cfg)
        self.vlm = vlm
        self.vlm.model.requires_grad_(False)
        self.device = vlm.device
        self.reads, self.writes, self.layers = bindings(cfg, vlm)
        width = vlm.adapter.d_model
        if cfg.sae.resolved_kind() == "sae":
            width = self._hook_width(self.reads)
        info = {
            "name": cfg.model,
            "family": vlm.adapter.family,
            "dims": vlm.adapter.dims(),
            "layers": self.layers,
            "tokens": cfg.tokens,
            "include_special_tokens": cfg.include_special_tokens,
            # Provenance travels with the dictionaries (eval warns on the same data).
            "data": {"dataset": cfg.dataset, "split": cfg.split, "seed": cfg.seed},
        }
        coder_cfg = cfg.sae.coder_config()
        try:
            self.bundle = DictionaryBundle.create(
                coder_cfg, self.reads, self.writes, width, width, info, device=self.device
            )
        except ValueError as e:
            raise TrainingError(_explain_size_error(cfg, width, e)) from None
        self.lr = cfg.lr_for(self.bundle.cfg.num_latents)
        self.optimizer = torch.optim.Adam(self.bundle.parameters(), lr=self.lr)
        self.state = TrainState()
        if existing is not None:
            raw = load_checkpoint(existing, self.bundle, self.optimizer)
            self.state = TrainState(**raw["train_state"])
        elif cfg.resume:
            warnings.warn(
                f"--resume: no checkpoint in {self.run_dir}; starting fresh", stacklevel=2
            )
        ids = vlm.adapter.image_token_ids()
        self.encoder = SampleEncoder(vlm.processor, cfg.ctx_len, ids)
        self.skips = SkipCounter(dict(self.state.skips), dict(self.state.skip_examples))

    def _count_bad_record(self, bad: BadRecord) -> None:
        self.skips.add(bad.reason, bad.row_id)

    def _hook_width(self, names: list[str]) -> int:
        """The one width of the SAE hook points (a head hook counts heads x head width), read
        off one tiny forward pass the way training reads them; mixed widths are refused."""
        probe = self.vlm.prepare(["a"])
        _, cache = self.vlm.run_with_cache(probe, names=names, mask="all")
        widths = {name: int(cache[name].flatten(1).shape[1]) for name in names}
        if len(set(widths.values())) > 1:
            listed = ", ".join(f"{n}: {w}" for n, w in widths.items())
            raise TrainingError(
                f"--hookpoints select hook points of different widths ({listed}); one run "
                "trains dictionaries of one width: run once per width"
            )
        return widths[names[0]]

    # --- data --------------------------------------------------------------------------------
    def _batches(self) -> Iterator[tuple[Batch, int]]:
        """(batch, rows consumed after it) from the saved position, epoch after epoch."""
        cfg = self.cfg
        pad = self.vlm.tokenizer.pad_token_id
        pad_id = pad if pad is not None else 0
        while True:
            data = self.dataset.skip(self.state.rows) if self.state.rows else self.dataset
            samples = encode_stream(
                data, self.encoder, self.skips, strict=cfg.strict, workers=cfg.workers
            )
            full_pass = self.state.rows == 0
            got_any = False
            tokens_before = self.state.tokens  # fit() counts the tokens each batch selects
            for batch in batches(samples, cfg.batch_size, pad_id, masks=self.vlm.masks):
                got_any = True
                yield batch, batch.positions[-1] + 1
            if not got_any and full_pass:
                raise TrainingError(
                    f"dataset {cfg.dataset!r} produced no usable samples ({self.skips.summary()})"
                )
            if full_pass and self.state.tokens == tokens_before:
                raise TrainingError(
                    f"--tokens {cfg.tokens} selected no tokens in a full pass over "
                    f"{cfg.dataset!r}{_NO_TOKENS_HINT[cfg.tokens]}"
                )
            self.state.epoch += 1
            self.state.rows = 0

    # --- one step ----------------------------------------------------------------------------
    def _activations(self, batch: Batch) -> tuple[list[torch.Tensor], list[torch.Tensor], Any]:
        masks = batch.masks if batch.masks is not None else self.vlm.masks(batch.inputs)
        positions = masks.select(self.cfg.tokens, include_special=self.cfg.include_special_tokens)
        out, cache = self.vlm.run_with_cache(
            batch.inputs, names=self.bundle.hook_names(), mask=positions, masks=masks
        )
        xs = [cache[r].flatten(1).float() for r in self.reads]
        ys = [cache[w].flatten(1).float() for w in self.writes]
        # In forward order, so the error names the first hook where the values broke.
        pairs = [
            p for i in range(len(xs)) for p in ((self.reads[i], xs[i]), (self.writes[i], ys[i]))
        ]
        for name, t in pairs:
            try:
                check_finite(name, t)
            except NonFiniteError as e:
                raise TrainingError(
                    f"step {self.state.step}: {e} (batch rows {batch.row_ids[:4]}"
                    f"{'...' if batch.size > 4 else ''}); the last checkpoint is intact"
                ) from None
        return xs, ys, (out, masks, positions)

    def _spliced_loss(
        self, batch: Batch, clean_logits: torch.Tensor, masks: TokenMasks, positions: torch.Tensor
    ) -> torch.Tensor:
        """CE or KL of the model with every written hook replaced by its reconstruction at the
        selected positions (the others keep the model's own values, as in training). Running
        statistics (BatchTopK's threshold, dead-latent counters) are left alone: the training
        forward already counted this batch, once and on the selected tokens only."""
        b = self.bundle
        codes: dict[int, Any] = {}
        inputs: dict[int, torch.Tensor] = {}
        index = {name: i for i, name in enumerate(b.reads)}
        out_index = {name: i for i, name in enumerate(b.writes)}
        spliced = positions.to(self.device)

        def read(t: torch.Tensor, ctx: HookContext) -> None:
            i = index[ctx.name]
            x = t[spliced].float()
            inputs[i] = x
            codes[i] = b.encode_unit(i, x)

        def write(t: torch.Tensor, ctx: HookContext) -> torch.Tensor:
            i = out_index[ctx.name]
            y = b.decode_unit(i, codes, inputs[i])
            return t.index_put((spliced,), y.to(t.dtype))

        hooks = [(r, read) for r in b.reads] + [(w, write) for w in b.writes]
        with b.frozen_statistics():
            logits = self.vlm.run_with_hooks(batch.inputs, hooks, masks=masks).logits.float()
        pos = positions.to(logits.device)
        if self.cfg.loss_fn == "kl":
            logp = F.log_softmax(clean_logits.float(), -1)[pos]
            logq = F.log_softmax(logits, -1)[pos]
            return (logp.exp() * (logp - logq)).sum(-1).mean()
        targets = batch.inputs["input_ids"][:, 1:].to(logits.device)
        sel = pos[:, :-1] & batch.inputs["attention_mask"][:, 1:].to(logits.device).bool()
        return F.cross_entropy(logits[:, :-1][sel], targets[sel])

    def _lr_at(self, tokens: int, step: int) -> float:
        """Linear warm-up, constant, linear decay to 0, as fractions of the budget: of
        whichever of --max-tokens and --max-steps ends the run first (the larger fraction)."""
        cfg = self.cfg
        fracs = [tokens / cfg.max_tokens] if cfg.max_tokens else []
        fracs += [(step + 1) / cfg.max_steps] if cfg.max_steps else []
        frac = min(1.0, max(fracs))
        warm = min(1.0, frac / cfg.lr_warmup_fraction) if cfg.lr_warmup_fraction else 1.0
        start = 1.0 - cfg.lr_decay_fraction
        decay = 1.0 if frac <= start else max(0.0, (1.0 - frac) / max(1e-12, 1.0 - start))
        return self.lr * warm * decay

    def _k_at(self, tokens: int) -> int | None:
        cfg = self.cfg
        if not cfg.k_anneal_tokens or cfg.sae.activation == "jumprelu":
            return None
        k0 = min(self.bundle.cfg.d_in, self.bundle.cfg.num_latents)
        frac = min(1.0, tokens / cfg.k_anneal_tokens)
        return max(cfg.sae.k, round(k0 + (cfg.sae.k - k0) * frac))

    def _done(self) -> bool:
        cfg, st = self.cfg, self.state
        return (cfg.max_tokens > 0 and st.tokens >= cfg.max_tokens) or (
            cfg.max_steps > 0 and st.step >= cfg.max_steps
        )

    # --- the loop ------------------------------------------------------------------------------
    def fit(self) -> TrainResult:
        cfg, st, b = self.cfg, self.state, self.bundle
        logger = MetricsLogger(
            self.run_dir,
            self.run_name,
            cfg.to_dict(),
            wandb=cfg.log_to_wandb,
            tensorboard=cfg.log_to_tensorboard,
            resume_step=st.step,
        )
        (self.run_dir / "train_config.json").write_text(json.dumps(cfg.to_dict(), indent=1))
        total = cfg.max_tokens or None
        bar = tqdm(total=total, initial=st.tokens, unit="tok", unit_scale=True,
                   disable=not self.progress, desc=self.run_name, dynamic_ncols=True)  # fmt: skip
        b.train()
        micro = 0
        last: dict[str, Any] = {}
        t0, tok0 = time.perf_counter(), st.tokens
        try:
            for batch, rows_after in self._batches():
                if self._done():
                    break
                xs, ys, (out, masks, positions) = self._activations(batch)
                n_tok = xs[0].shape[0]
                if n_tok == 0:
                    st.rows = rows_after
                    continue
                if not st.initialized:
                    b.init_from_data(xs, ys)
                    st.initialized = True
                k = self._k_at(st.tokens)
                if k is not None:
                    for act in b.activations():
                        act.k = k  # type: ignore[assignment]
                res = b(xs, ys)
                loss = res.loss
                if cfg.loss_fn != "fvu":
                    extra = res.loss - res.fvu  # AuxK and sparsity terms
                    loss = self._spliced_loss(batch, out.logits, masks, positions) + extra
                if not torch.isfinite(loss):
                    raise TrainingError(
                        f"step {st.step}: loss became {loss.item()} (batch rows "
                        f"{batch.row_ids[:4]}); the last checkpoint is intact; try a lower --lr"
                    )
                (loss / cfg.grad_acc_steps).backward()
                st.tokens += n_tok
                st.rows = rows_after
                bar.update(n_tok)
                micro += 1
                if micro % cfg.grad_acc_steps:
                    continue
                lr = self._lr_at(st.tokens, st.step)
                for group in self.optimizer.param_groups:
                    group["lr"] = lr
                if b.cfg.normalize_decoder:
                    b.remove_gradient_parallel_to_decoder_directions()
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                if b.cfg.normalize_decoder:
                    b.set_decoder_norm_to_unit_norm()
                st.step += 1
                last = self._metrics(
                    loss, res, lr, k, (st.tokens - tok0) / (time.perf_counter() - t0)
                )
                bar.set_postfix(loss=f"{last['loss']:.4f}", fvu=f"{last['fvu']:.3f}")
                if st.step % cfg.log_every == 0 or self._done():
                    logger.log(last)
                if st.step % cfg.save_every == 0:
                    self._checkpoint()
                if self._done():
                    break
        finally:
            bar.close()
            logger.close()
        if micro % cfg.grad_acc_steps:
            warnings.warn("the data ended inside a gradient-accumulation cycle; its gradient "
                          "was dropped", stacklevel=2)  # fmt: skip
        self._checkpoint()
        out_dir = save_final_dictionaries(self.run_dir, b)
        if self.skips.total:
            print(self.skips.summary())
        units = b.units
        return TrainResult(
            self.run_dir,
            out_dir,
            st.step,
            st.tokens,
            dict(zip(units, last.get("fvu_per_unit", [math.nan] * len(units)), strict=True)),
            dict(zip(units, last.get("l0_per_unit", [math.nan] * len(units)), strict=True)),
            dict(zip(units, b.dead_fraction().tolist(), strict=True)),
        )

    def _metrics(
        self, loss: torch.Tensor, res: Any, lr: float, k: int | None, tps: float
    ) -> dict[str, Any]:
        st = self.state
        return {
            "step": st.step,
            "tokens": st.tokens,
            "lr": lr,
            "loss": float(loss.detach()),
            "fvu": float(res.fvu_per_unit.mean()),
            "fvu_per_unit": [round(float(v), 6) for v in res.fvu_per_unit],
            "l0_per_unit": [round(float(v), 3) for v in res.l0_per_unit],
            "dead_pct": [round(100 * float(v), 3) for v in self.bundle.dead_fraction()],
            "k": k,
            "tokens_per_s": round(tps, 1),
        }

    def _checkpoint(self) -> None:
        self.state.skips = dict(self.skips.counts)
        self.state.skip_examples = {k: list(v) for k, v in self.skips.examples.items()}
        save_checkpoint(
            self.run_dir, self.bundle, self.optimizer, {"train_state": self.state.__dict__}
        )


_NO_TOKENS_HINT = {
    "image": " (its records have no images, or the model has no image tokens): use "
    "--tokens all or --tokens text",
    "text": ": use --tokens all or --tokens image",
    "all": ": every token is padding, BOS or a chat-template marker; pass --include-special-tokens",
}


def _explain_size_error(cfg: TrainConfig, width: int, err: ValueError) -> str:
    """A dictionary-size error in terms of the flags that set the sizes."""
    sae = cfg.sae
    latents = sae.num_latents or sae.expansion_factor * width
    if sae.activation != "jumprelu" and sae.k > latents:
        size = (
            f"--sae.num-latents {sae.num_latents}"
            if sae.num_latents
            else f"--sae.expansion-factor {sae.expansion_factor} x width {width}"
        )
        return (
            f"--sae.k {sae.k} is more than the {latents} latents per dictionary ({size}); "
            "lower --sae.k or raise --sae.expansion-factor / --sae.num-latents"
        )
    return f"cannot build the dictionaries with these --sae.* flags: {err}"


#: settings a resumed run must share with the run it continues (the budget may grow).
_RESUME_FIXED = ("model", "dataset", "sae", "layers", "hookpoints", "tokens", "loss_fn",
                 "include_special_tokens", "batch_size", "grad_acc_steps", "ctx_len", "seed",
                 "schema", "split", "columns", "lr")  # fmt: skip


def _check_resumable(saved_path: Path, cfg: TrainConfig) -> None:
    """Refuse to resume with settings that would make the continued run a different run."""
    try:
        saved = json.loads(saved_path.read_text())
    except (OSError, ValueError):
        return  # written at the start of fit(); a run killed before it has nothing to compare
    now = cfg.to_dict()
    diff = [f"--{k.replace('_', '-')}: {saved.get(k)!r} -> {now[k]!r}"
            for k in _RESUME_FIXED if k in saved and saved[k] != now[k]]  # fmt: skip
    if diff:
        raise TrainingError(
            "--resume with settings that differ from the run's: "
            + "; ".join(diff)
            + " (use the original flags, or start a new --run-name)"
        )


def _check_loggers(cfg: TrainConfig) -> None:
    """Optional loggers must be importable before hours of model loading, not after."""
    import importlib.util

    wanted = {"wandb": cfg.log_to_wandb, "tensorboard": cfg.log_to_tensorboard}
    for package, on in wanted.items():
        if on and importlib.util.find_spec(package) is None:
            raise TrainingError(
                f"--log-to-{package} needs the {package} package: pip install {package}"
                + (" (WANDB_MODE=offline logs without a network)" if package == "wandb" else "")
            )


def _default_run_name(cfg: TrainConfig) -> str:
    model = Path(cfg.model.rstrip("/")).name or "model"
    return f"{model}-{cfg.sae.resolved_kind()}"


def train(cfg: TrainConfig, vlm: HookedVLM | None = None, progress: bool = True) -> TrainResult:
    """Train dictionaries as configured; see `vlmscope train --help`."""
    return Trainer(cfg, vlm, progress=progress).fit()
