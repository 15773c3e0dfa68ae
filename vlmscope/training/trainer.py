"""The training loop: dictionaries learn from the activations a source yields.

The source decides where activations come from (`training/sources.py`: a model forward per
batch today, a store of captured activations or a per-rank slice of either); the trainer owns
the dictionaries, the optimiser, the learning-rate and k schedules, metrics and checkpoints.
With loss ce/kl the source splices the dictionaries back into the model for the same batch.
Bad settings, data, hooks or sizes stop with a TrainingError that names the flag, preferably
before the model loads.
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vlmscope.data.processing import SkipCounter
from vlmscope.files import FolderLock, FolderLockedError, lock_folder
from vlmscope.models.hooked import HookedVLM
from vlmscope.progress import progress_bar
from vlmscope.training.bundle import DictionaryBundle
from vlmscope.training.checkpoint import (
    find_checkpoint,
    load_checkpoint,
    remove_stale_temporaries,
    save_checkpoint,
    save_final_dictionaries,
)
from vlmscope.training.config import TrainConfig
from vlmscope.training.errors import CheckpointError, TrainingError
from vlmscope.training.logging import MetricsLogger
from vlmscope.training.sources import (
    ActivationSource,
    LiveSource,
    TrainState,
    bindings,
    load_model,
    open_training_data,
    resolve_model_path,
)

__all__ = [
    "CheckpointError",
    "TrainResult",
    "TrainState",
    "Trainer",
    "TrainingError",
    "bindings",
    "load_model",
    "open_source",
    "open_training_data",
    "resolve_model_path",
    "train",
]


@dataclass
class TrainResult:
    run_dir: Path
    dictionaries: Path
    step: int
    tokens: int
    fvu_per_unit: dict[str, float]
    l0_per_unit: dict[str, float]
    dead_per_unit: dict[str, float]


def open_source(cfg: TrainConfig, vlm: HookedVLM | None = None) -> ActivationSource:
    """The source of cfg's activations, opened in order: the data first (a missing file fails
    in seconds, not after minutes of model loading), then the seed, then the model. With
    --activations: the store, checked against the run, then the seed."""
    if cfg.activations:
        from vlmscope.training.store_source import StoreSource

        store = StoreSource(cfg)
        store.open()
        torch.manual_seed(cfg.seed)
        return store
    source = LiveSource(cfg)
    source.open_data()
    torch.manual_seed(cfg.seed)
    source.bind_model(vlm)
    return source


def check_writable(folder: Path) -> None:
    """Fail before any model is loaded when the output folder cannot be written."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise TrainingError(f"cannot write to output folder {folder}: {e}") from e


class Trainer:
    """Trains a DictionaryBundle on the activations of a source, as a TrainConfig says.

    Construction runs in phases, each named below, so that cheap checks fail before expensive
    work: (1) the run folder (writable, not another run's, resumable), (2) the source (the data
    opens before the model loads), (3) the dictionaries and optimiser, (4) the checkpoint's
    state when resuming. `fit` then trains until the token or step budget ends.
    """

    def __init__(
        self,
        cfg: TrainConfig,
        vlm: HookedVLM | None = None,
        progress: bool = True,
        source: ActivationSource | None = None,
    ) -> None:
        self.cfg = cfg
        self.progress = progress
        self.run_name = cfg.run_name or _default_run_name(cfg)
        self.run_dir = Path(cfg.output_dir) / self.run_name
        self._lock: FolderLock | None = None
        self._created_run_dir = not self.run_dir.exists()
        try:
            existing = self._prepare_run_dir()
            self.source = source if source is not None else open_source(cfg, vlm)
            self.device = self.source.device
            self.reads, self.writes, self.layers = (
                self.source.reads,
                self.source.writes,
                self.source.layers,
            )
            self._build_dictionaries()
            self.state = TrainState()
            if existing is not None:
                self._restore(existing)
            elif cfg.resume:
                warnings.warn(
                    f"--resume: no checkpoint in {self.run_dir}; starting fresh", stacklevel=2
                )
        except BaseException:
            self.close()  # a run that never started leaves no lock and no empty folder
            raise

    def close(self) -> None:
        """Release the run folder (and remove it if this run created it and wrote nothing)."""
        if self._lock is not None:
            self._lock.release()
            self._lock = None
        if self._created_run_dir and self.run_dir.is_dir() and not any(self.run_dir.iterdir()):
            self.run_dir.rmdir()

    def __del__(self) -> None:
        if getattr(self, "_lock", None) is not None:
            self._lock.release()  # type: ignore[union-attr]

    @property
    def vlm(self) -> HookedVLM | None:
        """The model behind a live source (None for sources without one)."""
        return getattr(self.source, "vlm", None)

    @property
    def skips(self) -> SkipCounter:
        return self.source.skips

    # --- phases of construction ----------------------------------------------------------
    def _prepare_run_dir(self) -> Path | None:
        """Check the machine, the output folder and the loggers; return the checkpoint to
        resume from, if any."""
        cfg = self.cfg
        try:
            cfg.check_environment()
        except ValueError as e:
            raise TrainingError(str(e)) from None
        check_writable(self.run_dir)
        if cfg.epochs and not (cfg.max_tokens or cfg.max_steps or cfg.activations):
            raise TrainingError(
                "--epochs alone gives on-the-fly training no budget for its learning-rate "
                "schedule (the tokens of a pass are unknown): add --max-tokens or --max-steps"
            )
        try:
            self._lock = lock_folder(self.run_dir, "run folder")
        except FolderLockedError as e:
            raise TrainingError(f"{e} (another `vlmscope train` with this --run-name?)") from None
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
        return existing

    def _build_dictionaries(self) -> None:
        """Fresh dictionaries for the source's hooks and widths, and their optimiser."""
        cfg, src = self.cfg, self.source
        try:
            self.bundle = DictionaryBundle.create(
                cfg.sae.coder_config(),
                src.reads,
                src.writes,
                src.d_in,
                src.d_out,
                src.model_info(),
                device=self.device,
            )
        except ValueError as e:
            raise TrainingError(_explain_size_error(cfg, src.d_in, e)) from None
        self.lr = cfg.lr_for(self.bundle.cfg.num_latents)
        self.optimizer = torch.optim.Adam(self.bundle.parameters(), lr=self.lr)

    def _restore(self, checkpoint: Path) -> None:
        """Dictionaries, optimiser, RNG, counters and data cursor from a checkpoint."""
        raw = load_checkpoint(checkpoint, self.bundle, self.optimizer)
        self.state = TrainState(**raw["train_state"])
        self.source.skips = SkipCounter(dict(self.state.skips), dict(self.state.skip_examples))

    # --- one step ----------------------------------------------------------------------------
    def _epoch_budget(self) -> int:
        """Tokens of --epochs passes, for a source that knows an epoch's size (else 0)."""
        return self.cfg.epochs * getattr(self.source, "tokens_per_epoch", 0)

    def _lr_at(self, tokens: int, step: int) -> float:
        """Linear warm-up, constant, linear decay to 0, as fractions of the budget: of
        whichever of --max-tokens and --max-steps ends the run first (the larger fraction)."""
        cfg = self.cfg
        fracs = [tokens / cfg.max_tokens] if cfg.max_tokens else []
        fracs += [(step + 1) / cfg.max_steps] if cfg.max_steps else []
        if not fracs and self._epoch_budget():  # --epochs alone: a store knows its size
            fracs = [tokens / self._epoch_budget()]
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
        """Train until the budget ends; checkpoints, final dictionaries, per-unit results.
        The run folder stays locked until the last file is written."""
        try:
            return self._fit()
        finally:
            self.close()

    def _fit(self) -> TrainResult:
        cfg, st, b = self.cfg, self.state, self.bundle
        logger = MetricsLogger(
            self.run_dir,
            self.run_name,
            cfg.to_dict(),
            wandb=cfg.log_to_wandb,
            tensorboard=cfg.log_to_tensorboard,
            resume_step=st.step,
            units=list(b.units),
        )
        (self.run_dir / "train_config.json").write_text(json.dumps(cfg.to_dict(), indent=1))
        # The bar counts what ends the run: steps under --max-steps, else tokens.
        by_steps = cfg.max_steps > 0
        bar = progress_bar(
            cfg.max_steps if by_steps else (cfg.max_tokens or self._epoch_budget() or None),
            initial=st.step if by_steps else st.tokens,
            unit="step" if by_steps else "tok",
            unit_scale=not by_steps,
            disable=not self.progress,
            desc=self.run_name,
            dynamic_ncols=True,
        )
        b.train()
        micro = 0
        last: dict[str, Any] = {}
        t0, tok0 = time.perf_counter(), st.tokens
        try:
            for batch in self.source.batches(st):
                if self._done():
                    break
                xs, ys, n_tok = batch.xs, batch.ys, batch.n_tokens
                if n_tok == 0:
                    self._commit(batch.cursor)
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
                    if batch.spliced_loss is None:
                        raise TrainingError(
                            f"--loss-fn {cfg.loss_fn} splices the dictionaries into the model; "
                            "this source has no model: use --loss-fn fvu"
                        )
                    extra = res.loss - res.fvu  # AuxK and sparsity terms
                    loss = batch.spliced_loss(b, cfg.loss_fn) + extra
                if not torch.isfinite(loss):
                    raise TrainingError(
                        f"step {st.step}: loss became {loss.item()} (batch rows "
                        f"{batch.row_ids[:4]}); the last checkpoint is intact; try a lower --lr"
                    )
                (loss / cfg.grad_acc_steps).backward()
                st.tokens += n_tok
                self._commit(batch.cursor)
                if not by_steps:
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
                if by_steps:
                    bar.update(1)
                last = self._metrics(
                    loss, res, lr, k, (st.tokens - tok0) / (time.perf_counter() - t0)
                )
                bar.set_postfix(
                    loss=f"{last['loss']:.4f}", fvu=f"{last['fvu']:.3f}", tokens=st.tokens
                )
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

    def _commit(self, cursor: dict[str, Any]) -> None:
        """Move the data cursor past a batch that has been trained on (or had no tokens)."""
        for key, value in cursor.items():
            setattr(self.state, key, value)

    def _checkpoint(self) -> None:
        self.state.skips = dict(self.skips.counts)
        self.state.skip_examples = {k: list(v) for k, v in self.skips.examples.items()}
        save_checkpoint(
            self.run_dir, self.bundle, self.optimizer, {"train_state": self.state.__dict__}
        )


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
_RESUME_FIXED = ("model", "dataset", "sae", "layers", "tower", "hookpoints", "tokens", "loss_fn",
                 "include_special_tokens", "batch_size", "grad_acc_steps", "ctx_len", "seed",
                 "schema", "split", "columns", "lr", "pack", "activations",
                 "shuffle_buffer_mb")  # fmt: skip


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
    model = Path((cfg.model or cfg.activations).rstrip("/")).name or "model"
    return f"{model}-{cfg.sae.resolved_kind()}"


def train(cfg: TrainConfig, vlm: HookedVLM | None = None, progress: bool = True) -> TrainResult:
    """Train dictionaries as configured; see `vlmscope train --help`."""
    return Trainer(cfg, vlm, progress=progress).fit()
