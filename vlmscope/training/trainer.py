"""The training loop: dictionaries learn from the activations a source yields.

The source decides where activations come from (`training/sources.py`: a model forward per
batch today, a store of captured activations or a per-rank slice of either); the trainer owns
the dictionaries, the optimiser, the learning-rate and k schedules, metrics and checkpoints.
With loss ce/kl the source splices the dictionaries back into the model for the same batch.
Bad settings, data, hooks or sizes stop with a TrainingError that names the flag, preferably
before the model loads.
"""

from __future__ import annotations

import dataclasses
import gc
import itertools
import json
import math
import os
import shlex
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from tqdm.auto import tqdm

from vlmscope import VlmscopeWarning
from vlmscope.data.processing import SkipCounter, SkipRecord
from vlmscope.data.sources import BadRecordError
from vlmscope.files import FolderLock, FolderLockedError, lock_folder
from vlmscope.models.hooked import HookedVLM
from vlmscope.progress import progress_bar
from vlmscope.training.bundle import DictionaryBundle
from vlmscope.training.checkpoint import find_checkpoint, load_checkpoint, remove_stale_temporaries
from vlmscope.training.config import TrainConfig
from vlmscope.training.distributed import Layout, collective_errors, leaving, rank_seed
from vlmscope.training.errors import CheckpointError, TrainingError
from vlmscope.training.logging import MetricsLogger
from vlmscope.training.lr_probe import moved, probe_lr
from vlmscope.training.modules import ModuleShards, seed_units, shards_for
from vlmscope.training.optim import (
    averaged,
    build_optimizer,
    is_schedule_free,
    lr_multiplier,
    take_step,
)
from vlmscope.training.sharded import save_checkpoint, save_final_dictionaries
from vlmscope.training.sources import (
    ActivationBatch,
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


class _Cycle:
    """One optimizer step's micro-batches (--grad-acc-steps): its loss and per-unit FVU and L0
    are their means weighted by tokens, not the last micro-batch's. Each value is what
    `Trainer._metrics` takes (a rank's share with several ranks; sums stay sums). Only the
    detached metrics are kept, not the micro-batches' results (reconstructions)."""

    def __init__(self) -> None:
        #: (loss, fvu_per_unit, l0_per_unit, local tokens, tokens), FVU/L0 None where no unit ran
        self.parts: list[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, int, int]]
        self.parts = []
        self.n_local = self.n_tok = 0

    def add(self, loss: torch.Tensor, res: Any, n_local: int, n_tok: int) -> None:
        fvu, l0 = (None, None) if res is None else (res.fvu_per_unit, res.l0_per_unit)
        self.parts.append((loss.detach(), _detached(fvu), _detached(l0), n_local, n_tok))
        self.n_local += n_local
        self.n_tok += n_tok

    def mean(self) -> tuple[torch.Tensor, Any]:
        """(loss, an object with fvu_per_unit and l0_per_unit, or None where no unit ran)."""
        ran = [p for p in self.parts if p[1] is not None]
        if len(self.parts) == 1:  # no grad accumulation: the values as they are
            loss, fvu, l0 = self.parts[0][:3]
        else:
            tok = max(self.n_tok, 1)
            loss = sum(p[0] * p[4] for p in self.parts) / tok  # type: ignore[assignment]
            fvu = sum(p[1] * p[4] for p in ran) / tok if ran else None  # type: ignore[operator]
            l0 = sum(p[2] * p[3] for p in ran) / max(self.n_local, 1) if ran else None  # type: ignore[operator]
        res = SimpleNamespace(fvu_per_unit=fvu, l0_per_unit=l0) if ran else None
        return loss, res


def _detached(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach()


@dataclass
class TrainResult:
    run_dir: Path
    dictionaries: Path
    step: int
    tokens: int
    fvu_per_unit: dict[str, float]
    l0_per_unit: dict[str, float]
    dead_per_unit: dict[str, float]


def open_source(
    cfg: TrainConfig, vlm: HookedVLM | None = None, layout: Layout | None = None
) -> ActivationSource:
    """The source of cfg's activations, opened in order: the data first (a missing file fails
    in seconds, not after minutes of model loading), then the seed, then the model. With
    several ranks the source reads this rank's share of each batch window, on its device.
    --activations: the store, checked against the run, then the seed."""
    layout = layout or Layout()
    device = layout.device(cfg.device)
    if device != cfg.device:
        cfg = dataclasses.replace(cfg, device=device)
    if cfg.activations:
        from vlmscope.training.store_source import StoreSource

        store = StoreSource(cfg, layout.rank, layout.world)
        store.open()
        torch.manual_seed(cfg.seed)
        return store
    source = LiveSource(cfg, layout)
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
        layout: Layout | None = None,
    ) -> None:
        self.cfg = cfg
        self.progress = progress
        world = layout.world if layout else int(os.environ.get("WORLD_SIZE", "1"))
        if cfg.lr_probe and cfg.distribute_modules and world > 1:  # before joining a group
            raise TrainingError(
                "--lr-probe trains the whole dictionaries on every rank, which "
                "--distribute-modules splits over the ranks: probe without it (data parallel "
                "or one process) and give the rate it prints to this run with --lr"
            )
        self.layout = lay = layout or Layout.from_environment(cfg.dist_timeout, cfg.device)
        self._joined = layout is None  # the group is this trainer's to leave
        self.run_name = cfg.run_name or _default_run_name(cfg)
        self.run_dir = Path(cfg.output_dir) / self.run_name
        self._lock: FolderLock | None = None
        self._created_run_dir = not self.run_dir.exists()
        try:
            # Rank 0 checks the run folder; every rank learns its verdict (a failure on any rank
            # stops all of them with the same one-line error, never a hang).
            found = self.layout.phase(self._prepare_run_dir, main_only=True)
            existing = lay.gather(str(found) if found is not None else None)[0]
            existing = Path(existing) if existing is not None else None
            if existing is not None:  # every rank: the source binds the run's hooks next
                for note in _continue_as_trained(self.run_dir / "train_config.json", cfg):
                    if lay.is_main:
                        warnings.warn(note, category=VlmscopeWarning, stacklevel=2)

            def open_it() -> ActivationSource:
                return source if source is not None else open_source(cfg, vlm, lay)

            # Rank 0 first: it writes shared caches (the shapes world, zoo models) the others read.
            first = self.layout.phase(open_it, main_only=True)
            rest = self.layout.phase(open_it, others_only=True)
            self.source = first if lay.is_main else rest
            # Then together: a model sharded over the ranks gathers its weights from all of
            # them in every forward, the probe that reads hook widths included.
            together = getattr(self.source, "open_together", None)
            if together is not None:
                self.layout.phase(together)
            self.device = self.source.device
            self.reads, self.writes, self.layers = (
                self.source.reads,
                self.source.writes,
                self.source.layers,
            )
            self.layout.phase(self._build_dictionaries)
            self.state = TrainState()
            if existing is not None:
                self.layout.phase(lambda: self._restore(existing))
            elif cfg.resume and lay.is_main:
                warnings.warn(
                    f"--resume: no checkpoint in {self.run_dir}; starting fresh",
                    category=VlmscopeWarning,
                    stacklevel=2,
                )
            if lay.distributed:
                torch.manual_seed(rank_seed(cfg.seed, lay.rank))
        except BaseException:
            self.close()  # a run that never started leaves no lock and no empty folder
            raise

    def close(self) -> None:
        """Release the run folder (and remove it if this run created it and wrote nothing),
        give a model the caller passed in its requires_grad flags back and stop the source's
        worker processes."""
        source = getattr(self, "source", None)
        release = getattr(source, "close", None) or getattr(source, "release_model", None)
        if release is not None:
            release()
        if self._lock is not None:
            self._lock.release()
            self._lock = None
        if (
            self.layout.is_main
            and self._created_run_dir
            and self.run_dir.is_dir()
            and not any(self.run_dir.iterdir())
        ):
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
        cfg, src, lay = self.cfg, self.source, self.layout
        torch.manual_seed(cfg.seed)  # the same initial dictionaries whatever the source did
        sharded = cfg.distribute_modules and lay.distributed
        try:
            self.bundle = self._create_bundle("meta" if sharded else self.device)
        except ValueError as e:
            raise TrainingError(_explain_size_error(cfg, src.d_in, e)) from None
        self.shards: ModuleShards | None = shards_for(self.bundle, lay) if sharded else None
        #: the dictionaries this rank trains: all (one process, DDP) or its units' only (real
        #: tensors for them; the bundle's others stay on the meta device)
        self.trained: torch.nn.Module = self.bundle
        if self.shards is not None:
            self.trained = self.shards.materialise(self.bundle, self.device, cfg.seed)
        else:
            seed_units(self.bundle, cfg.seed)
        self.lr = cfg.lr_for(self.bundle.cfg.num_latents)
        # The optimiser holds the parameters of the module that trains (DDP with several
        # ranks; DDP has broadcast rank 0's initial weights to every rank).
        self.model = self.trained if self.shards else lay.wrap(self.bundle)
        # A rank that owns no distributed module still steps with the others (on nothing).
        params = list(self.model.parameters()) or [torch.nn.Parameter(torch.zeros(0))]
        self.optimizer = build_optimizer(cfg.resolved_optimizer(), params, self.lr)

    def _create_bundle(self, device: Any) -> DictionaryBundle:
        src = self.source
        return DictionaryBundle.create(
            self.cfg.sae.coder_config(),
            src.reads,
            src.writes,
            src.d_in,
            src.d_out,
            src.model_info(),
            device=device,
        )

    def _restore(self, checkpoint: Path) -> None:
        """Dictionaries, optimiser, this rank's RNG, counters and data cursor."""
        lay = self.layout
        units = self.shards.mine if self.shards else None
        view = self.shards.checkpoint_view() if self.shards else None
        raw = load_checkpoint(checkpoint, self.bundle, self.optimizer, rank=lay.rank,
                              units=units, local=view, layout=lay)  # fmt: skip
        saved_world = int(raw.get("world_size", 1))
        if saved_world != lay.world and lay.is_main:
            warnings.warn(
                f"--resume with {lay.world} processes a run checkpointed with {saved_world}: "
                "dictionaries, optimiser state, step, token count, skip counts and the data "
                "cursor carry over; batches from here on are cut for "
                f"{lay.world} ranks (a global batch of {lay.world} x --batch-size), so the run "
                "is not bit-identical to one continued with the old world size",
                category=VlmscopeWarning,
                stacklevel=2,
            )
        self.state = TrainState(**raw["train_state"])
        if lay.is_main:  # the saved counts are global; other ranks count their own from here
            self.source.skips = SkipCounter(dict(self.state.skips), dict(self.state.skip_examples))

    # --- one step ----------------------------------------------------------------------------
    def _epoch_budget(self) -> int:
        """Tokens of --epochs passes, for a source that knows an epoch's size (else 0)."""
        return self.cfg.epochs * getattr(self.source, "tokens_per_epoch", 0)

    def _lr_at(self, tokens: int, step: int) -> float:
        """--lr (or the default rule) times the multiple --lr-probe chose, under linear
        warm-up, constant, linear decay to 0, as fractions of the budget: of whichever of
        --max-tokens and --max-steps ends the run first (the larger fraction)."""
        cfg = self.cfg
        fracs = [tokens / cfg.max_tokens] if cfg.max_tokens else []
        fracs += [(step + 1) / cfg.max_steps] if cfg.max_steps else []
        if not fracs and self._epoch_budget():  # --epochs alone: a store knows its size
            fracs = [tokens / self._epoch_budget()]
        mult = lr_multiplier(max(fracs), cfg.lr_warmup_fraction, cfg.resolved_lr_decay())
        return self.lr * self.state.lr_scale * mult

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
        with leaving(self.layout if self._joined else None):  # left when the run ends
            try:
                return self._fit()
            finally:
                self.close()
                self._drop_ddp()

    def _drop_ddp(self) -> None:
        """Free the DDP wrapper while the process group is alive. DDP's reducer holds the
        group; were it the last holder, freeing it later (the trainer going out of scope)
        would run gloo's destructor under the GIL, which joins gloo's worker threads while one
        of them waits for the GIL to free a finished collective's tensors: the process hangs
        after a run that succeeded (seen in the test suite). The trained parameters stay in
        the bundle and the optimiser; the wrapper is of no use once the run ended."""
        if self.model is not self.trained:
            self.model = self.trained
            gc.collect()  # DDP's module graph has reference cycles

    def _fit(self) -> TrainResult:
        cfg, st, b, lay = self.cfg, self.state, self.trained, self.layout
        shards = self.shards
        main = lay.is_main
        logger = None
        if main:  # rank 0 alone logs, shows progress and writes files
            logger = MetricsLogger(
                self.run_dir,
                self.run_name,
                cfg.to_dict(),
                wandb=cfg.log_to_wandb,
                tensorboard=cfg.log_to_tensorboard,
                resume_step=st.step,
                units=list(self.bundle.units),
            )
            (self.run_dir / "train_config.json").write_text(json.dumps(cfg.to_dict(), indent=1))
        # The bar counts what ends the run: steps under --max-steps, else tokens.
        by_steps = cfg.max_steps > 0
        bar = progress_bar(
            cfg.max_steps if by_steps else (cfg.max_tokens or self._epoch_budget() or None),
            initial=st.step if by_steps else st.tokens,
            unit="step" if by_steps else "tok",
            unit_scale=not by_steps,
            disable=not (self.progress and main),
            desc=self.run_name,
            dynamic_ncols=True,
        )
        self.model.train()
        micro = 0
        # Unit decoder rows: after each Adam step; before each schedule-free forward instead,
        # so the last step's y, and with it the averaged x, is the optimiser's own.
        norm_before = self.bundle.cfg.normalize_decoder and is_schedule_free(self.optimizer)
        last: dict[str, Any] = {}
        finished: tuple[_Cycle, float, int | None, float] | None = None  # the last step's
        t0, tok0 = time.perf_counter(), st.tokens
        batches = iter(self.source.batches(st))
        steps = collective_errors(lay, "a training step") if lay.distributed else nullcontext()
        # Data parallel: dictionary statistics over all ranks. Distributed modules: an owner
        # already holds the global batch of its units.
        stats = lay.statistics() if shards is None else nullcontext()
        try:
            with steps, stats, self._source_checks_inputs():
                while True:
                    # The budget is checked between optimizer steps only: a step that began
                    # ends with all of its micro-batches (stopping inside a cycle would drop
                    # its gradient while its tokens and rows count as trained on).
                    if micro % cfg.grad_acc_steps == 0 and self._done():
                        break
                    batch, error = self._next_batch(batches)
                    if batch is None and error is None:
                        break
                    n_local = batch.n_tokens if batch is not None else 0
                    n_tok = self._step_status(n_local, error)
                    assert batch is not None
                    if n_tok == 0:
                        self._commit(batch)
                        continue
                    xs, ys = batch.xs, batch.ys
                    if shards is not None:
                        xs, ys = shards.exchange(xs, ys)
                        n_local = int(xs[0].shape[0]) if xs else 0
                    if not st.initialized:
                        b.init_from_data(xs, ys)
                        if cfg.lr_probe:
                            batches = self._probe_lr(batch, n_tok, batches)
                        st.initialized = True
                    k = self._k_at(st.tokens)
                    if k is not None:
                        for act in b.activations():
                            act.k = k  # type: ignore[assignment]
                    syncs = (micro + 1) % cfg.grad_acc_steps == 0
                    if micro % cfg.grad_acc_steps == 0:
                        cycle = _Cycle()
                        if norm_before:
                            b.set_decoder_norm_to_unit_norm()
                    with lay.no_sync(self.model, skip=not syncs):
                        runs = xs or (shards is not None and shards.collective_forward)
                        with tf32_matmuls(self.device, cfg.tf32):
                            res = self.model(xs, ys) if runs else None
                        loss = self._loss(res, batch, n_local, n_tok)
                        bad = None
                        if not torch.isfinite(loss):
                            bad = (
                                f"step {st.step}: loss became {loss.item()} (batch rows "
                                f"{batch.row_ids[:4]}); the last checkpoint is intact; try a "
                                "lower --lr"
                            )
                        lay.agree(bad)
                        # Each rank's loss is its share of the global batch's loss; DDP
                        # averages gradients over ranks, so scale by the world size. An owner
                        # of distributed modules has its units' whole loss.
                        scale = (1 if shards else lay.world) / cfg.grad_acc_steps
                        if res is not None:
                            with tf32_matmuls(self.device, cfg.tf32):
                                (loss * scale).backward()
                    cycle.add(loss, res, n_local, n_tok)
                    st.tokens += n_tok
                    self._commit(batch)
                    if not by_steps:
                        bar.update(n_tok)
                    micro += 1
                    if not syncs:
                        continue
                    lr = self._lr_at(st.tokens, st.step)
                    with tf32_matmuls(self.device, cfg.tf32):
                        take_step(b, self.optimizer, lr, self.bundle.cfg.normalize_decoder)
                    st.step += 1
                    if by_steps:
                        bar.update(1)
                    tps = (st.tokens - tok0) / (time.perf_counter() - t0)
                    finished = (cycle, lr, k, tps)
                    # Read back on log steps only: each value is a device-to-host sync on a
                    # GPU (and a collective with several ranks, which all log the same steps).
                    if st.step % cfg.log_every == 0 or self._done():
                        last = self._metrics_of(*finished)
                        bar.set_postfix(loss=f"{last['loss']:.4f}", fvu=f"{last['fvu']:.3f}",
                                        tokens=st.tokens)  # fmt: skip
                        if logger is not None:
                            logger.log(last)
                    if st.step % cfg.save_every == 0:
                        self._checkpoint()
                    if self._done():
                        break
                if finished is not None and last.get("step") != st.step:  # the data ran out
                    last = self._metrics_of(*finished)  # the summary's: the last step's
        finally:
            bar.close()
            if logger is not None:
                logger.close()
        if micro % cfg.grad_acc_steps and main:
            warnings.warn("the data ended inside a gradient-accumulation cycle; its gradient "
                          "was dropped", category=VlmscopeWarning, stacklevel=2)  # fmt: skip
        self._checkpoint()  # the training weights (signum: y), which --resume continues from
        out_dir = self.run_dir / "dictionaries"
        with averaged(self.optimizer):  # signum: the averaged weights are the result
            save_final_dictionaries(self.run_dir, self.layout, self.bundle, self.shards)
        skips = self._global_skips()
        if skips.total and main:
            print(skips.summary())
        units = self.bundle.units
        dead = last.get("dead_pct", [math.nan] * len(units))
        return TrainResult(
            self.run_dir,
            out_dir,
            st.step,
            st.tokens,
            dict(zip(units, last.get("fvu_per_unit", [math.nan] * len(units)), strict=True)),
            dict(zip(units, last.get("l0_per_unit", [math.nan] * len(units)), strict=True)),
            dict(zip(units, [v / 100 for v in dead], strict=True)),
        )

    def _probe_lr(self, first: ActivationBatch, n_first: int, batches: Any) -> Any:
        """--lr-probe: read the batches the probe needs after `first` (of `n_first` tokens
        over all ranks), set the state's rate multiple from it (see lr_probe), and return the
        batches to train on, those read included, in order. With data parallel ranks every
        rank reads its share, as in the loop, and the candidates train as DDP would."""
        cfg, st, lay = self.cfg, self.state, self.layout
        acc = cfg.grad_acc_steps
        read, tokens = [first], [n_first]
        want = cfg.lr_probe * acc + 1
        # The source checks, as a pass ends, that its batches selected tokens, from the count
        # the loop keeps: count the batches read ahead meanwhile as if trained on (the loop
        # counts them again as it trains on them).
        st.tokens += n_first
        try:
            while len(read) < want:
                try:
                    nxt, error = self._next_batch(batches)
                except TrainingError as e:  # one process: the source names step 0, the step now
                    raise TrainingError(
                        f"{e} [a batch --lr-probe read ahead, for step {len(read) // acc}]"
                    ) from None
                if nxt is None and error is None:  # the data ended (on every rank alike)
                    break
                tokens.append(self._step_status(nxt.n_tokens if nxt is not None else 0, error))
                assert nxt is not None  # a failure on any rank has raised on all by now
                read.append(self._moved(nxt, "cpu"))  # waits in host memory
                st.tokens += tokens[-1]
        finally:
            st.tokens -= sum(tokens)
        # back on the device one at a time, as the loop takes them
        rest = itertools.chain((self._moved(r, self.device) for r in read[1:]), batches)
        usable = [r for r, n in zip(read, tokens, strict=True) if n > 0]
        if len(usable) < acc + 1:
            if lay.is_main:
                warnings.warn(
                    f"--lr-probe: the data has {len(usable)} batch(es) with tokens, too few to "
                    "probe one step and score it on the next; training at the rate given",
                    category=VlmscopeWarning,
                    stacklevel=2,
                )
            return rest
        steps = [[(r.xs, r.ys) for r in usable[i * acc : (i + 1) * acc]]
                 for i in range((len(usable) - 1) // acc)]  # fmt: skip
        result = probe_lr(
            self.bundle,
            cfg.resolved_optimizer(),
            self.lr,
            steps,
            (usable[-1].xs, usable[-1].ys),
            self._k_at,
            bool(self.bundle.cfg.normalize_decoder),
        )
        st.lr_scale = result.scale
        if lay.is_main:
            report = {"base_lr": self.lr, "scale": result.scale, "steps": result.steps,
                      "score": {f"{s:g}": v for s, v in result.score.items()}}  # fmt: skip
            (self.run_dir / "lr_probe.json").write_text(json.dumps(report, indent=1))
            if self.progress:
                tqdm.write(result.summary(self.lr))
        return rest

    @staticmethod
    def _moved(batch: ActivationBatch, device: Any) -> ActivationBatch:
        xs, ys = moved((batch.xs, batch.ys), device)
        return dataclasses.replace(batch, xs=xs, ys=ys)

    def _next_batch(self, batches: Any) -> tuple[ActivationBatch | None, str | None]:
        """The source's next batch, or the error it raised (with several ranks the error is
        shared with the others before anyone stops; in one process it propagates as is)."""
        try:
            return next(batches), None
        except StopIteration:
            return None, None
        except (TrainingError, BadRecordError, SkipRecord) as e:
            if not self.layout.distributed:
                raise
            return None, str(e)

    def _step_status(self, n_local: int, error: str | None) -> int:
        """Tokens of this micro-step over all ranks; stops every rank if any rank failed."""
        lay = self.layout
        if not lay.distributed:
            return n_local
        counts = lay.sum([float(n_local), 0.0 if error is None else 1.0])
        if counts[1].item():
            lay.agree(error)
        return int(counts[0].item())

    def _loss(self, res: Any, batch: ActivationBatch, n_local: int, n_tok: int) -> torch.Tensor:
        """The loss to minimise: the bundle's (already this rank's share of the global batch's)
        or, for ce/kl, the spliced model's loss weighted by this rank's share of the tokens,
        run by a rank without tokens too when its source splices (a sharded model's forward
        and backward must be every rank's)."""
        cfg = self.cfg
        if res is None:  # a rank that owns no distributed module
            return torch.zeros(())
        if cfg.loss_fn == "fvu" or (n_local == 0 and batch.spliced_loss is None):
            return res.loss  # type: ignore[no-any-return]
        if batch.spliced_loss is None:
            raise TrainingError(
                f"--loss-fn {cfg.loss_fn} splices the dictionaries into the model; "
                "this source has no model: use --loss-fn fvu"
            )
        extra = res.loss - res.fvu  # AuxK and sparsity terms
        spliced = batch.spliced_loss(self.bundle, cfg.loss_fn)
        if self.layout.distributed:
            spliced = spliced * (n_local / n_tok)
        return spliced + extra  # type: ignore[no-any-return]

    @contextmanager
    def _source_checks_inputs(self) -> Iterator[None]:
        """While training, dictionaries skip their own NaN/Inf check of x and y where the
        source has refused non-finite batches already (naming hook and rows): the second check
        is one device-to-host sync per tensor per step on a GPU."""
        if not getattr(self.source, "checks_finite", False):
            yield
            return
        coders = [m for m in self.trained.modules() if hasattr(m, "check_inputs")]
        before = [m.check_inputs for m in coders]
        for m in coders:
            m.check_inputs = False
        try:
            yield
        finally:
            for m, was in zip(coders, before, strict=True):
                m.check_inputs = was

    def _metrics_of(self, cycle: _Cycle, lr: float, k: int | None, tps: float) -> dict[str, Any]:
        """`_metrics` of one optimizer step's cycle of micro-batches."""
        return self._metrics(*cycle.mean(), lr, k, tps, cycle.n_local, cycle.n_tok)

    def _metrics(
        self,
        loss: torch.Tensor,
        res: Any,
        lr: float,
        k: int | None,
        tps: float,
        n_local: int = 0,
        n_tok: int = 0,
    ) -> dict[str, Any]:
        """The step's metrics, of the global batch: with several ranks, loss and FVU are sums
        of the ranks' shares and L0 a token-weighted mean."""
        st = self.state
        if self.shards is not None:  # each unit's values come from its owner
            sh, n_mine = self.shards, len(self.shards.mine)
            fvu_u = sh.spread(res.fvu_per_unit if res is not None else torch.zeros(n_mine))
            l0_u = sh.spread(res.l0_per_unit if res is not None else torch.zeros(n_mine))
            dead_u = sh.spread(self.trained.dead_fraction() if n_mine else torch.zeros(0))
            loss_v = float(self.layout.sum([float(loss.detach())])[0])
        else:
            loss_v, fvu_u, l0_u = float(loss.detach()), res.fvu_per_unit, res.l0_per_unit
            dead_u = self.bundle.dead_fraction()
        if self.layout.distributed and self.shards is None:
            n = len(fvu_u)
            l0_sum = l0_u.double().cpu() * n_local if n_local else torch.zeros(len(l0_u))
            packed = torch.cat([loss.detach().reshape(1).double().cpu(), fvu_u.double().cpu(),
                                l0_sum.double()])  # fmt: skip
            summed = self.layout.sum(packed)
            loss_v, fvu_u, l0_u = float(summed[0]), summed[1 : 1 + n], summed[1 + n :] / n_tok
        return {
            "step": st.step,
            "tokens": st.tokens,
            "lr": lr,
            "loss": loss_v,
            "fvu": float(fvu_u.mean()),
            "fvu_per_unit": [round(float(v), 6) for v in fvu_u],
            "l0_per_unit": [round(float(v), 3) for v in l0_u],
            "dead_pct": [round(100 * float(v), 3) for v in dead_u],
            "k": k,
            "tokens_per_s": round(tps, 1),
        }

    def _commit(self, batch: ActivationBatch) -> None:
        """Move the data cursor past a batch that has been trained on (or had no tokens), and
        count the records skipped before it: the source read them ahead (and --lr-probe reads
        batches ahead), so counting them any earlier would save rows past the cursor."""
        for key, value in batch.cursor.items():
            setattr(self.state, key, value)
        self.skips.add_all(batch.skipped)

    def _global_skips(self) -> SkipCounter:
        """Skipped records of all ranks (each counts its own rows)."""
        mine = self.skips
        if not self.layout.distributed:
            return mine
        out = SkipCounter()
        for counts, examples in self.layout.gather((mine.counts, mine.examples)):
            out.merge(counts, examples)
        return out

    def _checkpoint(self) -> None:
        """Every rank writes what it holds (data parallel: rank 0 the dictionaries and
        optimiser, the same on every rank), rank 0 the RNG states of all and the counters;
        all ranks learn whether it worked (training/sharded.py)."""
        skips = self._global_skips()
        self.state.skips = dict(skips.counts)
        self.state.skip_examples = {k: list(v) for k, v in skips.examples.items()}
        state = {"train_state": self.state.__dict__, "world_size": self.layout.world}
        save_checkpoint(self.run_dir, self.layout, self.bundle, self.optimizer, self.shards, state)


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


@contextmanager
def tf32_matmuls(device: torch.device, on: bool) -> Iterator[None]:
    """On CUDA (with --tf32), float32 matmuls inside run on TF32 tensor cores, then the setting
    goes back to what it was. The trainer opens it around the dictionaries' forward, the
    backward and the optimiser step, never around the model's forward that makes the
    activations (they stay what eval and attribute see; a spliced ce/kl loss's backward does
    run through the model in TF32). CUDA's matmul setting only (the new per-backend API):
    the legacy `set_float32_matmul_precision("high")` would also turn oneDNN's CPU matmuls to
    TF32 and cuDNN's convolutions, and mixing the two APIs makes the legacy getter raise."""
    if device.type != "cuda" or not on:
        yield
        return
    matmul = torch.backends.cuda.matmul
    before = matmul.fp32_precision
    matmul.fp32_precision = "tf32"
    try:
        yield
    finally:
        matmul.fp32_precision = before


#: settings a resumed run must share with the run it continues (the budget may grow).
_RESUME_FIXED = ("model", "dataset", "sae", "layers", "tower", "hookpoints", "tokens", "loss_fn",
                 "include_special_tokens", "batch_size", "grad_acc_steps", "ctx_len", "seed",
                 "schema", "split", "columns", "optimizer", "lr", "lr_probe", "pack", "activations",
                 "shuffle_buffer_mb", "k_anneal_tokens", "dtype", "autocast", "tf32")  # fmt: skip


def _continue_as_trained(saved_path: Path, cfg: TrainConfig) -> list[str]:
    """Settings whose meaning changed since a resumed run was written, set in `cfg` to what
    that run trained with (its train_config.json predates --tf32, 2026-12-02); the notes to
    show. A run then continues as it began instead of changing numerics or hooks midway."""
    try:
        saved = json.loads(saved_path.read_text())
    except (OSError, ValueError):
        return []
    if "tf32" in saved:
        return []
    notes = []
    if cfg.tf32:  # its matmuls were IEEE float32 (no effect on CPU)
        cfg.tf32 = False
        notes.append(
            "--resume: this run was started before --tf32 existed and trained in IEEE float32, "
            "as it continues; resume it with --no-tf32 from now on"
        )
    if saved.get("hookpoints") and saved.get("layers") and cfg.hookpoints and cfg.layers:
        cfg.layers = []
        notes.append(
            f"--resume: this run was started before --layers narrowed --hookpoints, so it "
            f"trains every match of {cfg.hookpoints} and continues so; resume it without "
            "--layers from now on"
        )
    return notes


def _check_resumable(saved_path: Path, cfg: TrainConfig) -> None:
    """Refuse to resume with settings that would make the continued run a different run."""
    try:
        saved = json.loads(saved_path.read_text())
    except (OSError, ValueError):
        return  # written at the start of fit(); a run killed before it has nothing to compare
    now = cfg.to_dict()
    if "optimizer" not in saved and cfg.resolved_optimizer() != "adam":
        raise TrainingError(
            "--resume: this run was trained with Adam (before --optimizer existed); add "
            "--optimizer adam to continue it"
        )
    diff, back = [], []  # "flag: old -> new", and the flags that continue the run
    for k in _RESUME_FIXED:
        if k not in saved or saved[k] == now[k]:
            continue
        if isinstance(now[k], dict) and isinstance(saved[k], dict):  # --sae.*: name the field
            changed = [(f"{k}.{f}", saved[k].get(f), v)
                       for f, v in now[k].items() if saved[k].get(f, v) != v]  # fmt: skip
        else:
            changed = [(k, saved[k], now[k])]
        for name, old, new in changed:
            flag = "--" + name.replace("_", "-")
            diff.append(f"{flag}: {old!r} -> {new!r}")
            back.append(_as_flag(flag, old))
    if diff:
        again = " ".join(b for b in back if b) if all(back) else ""
        raise TrainingError(
            "--resume with settings that differ from the run's: "
            + "; ".join(diff)
            + (f" (the run continues with {again}, " if again else " (use the original flags, ")
            + "or start a new --run-name)"
        )


def _as_flag(flag: str, value: Any) -> str | None:
    """`flag value` as typed on the command line (a switch as `--x` / `--no-x`); None for
    values no flag spells plainly (unset values, nested ones)."""
    if isinstance(value, bool):  # a switch: --x / --no-x
        return flag if value else f"--no-{flag.removeprefix('--')}"
    items = value if isinstance(value, list) else [value]
    if not items or any(isinstance(v, bool) or not isinstance(v, (str, int, float)) for v in items):
        return None
    return " ".join([flag, *(shlex.quote(str(v)) for v in items)])


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
