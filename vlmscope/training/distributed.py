"""Training on many processes: torch.distributed process groups, DDP, and collectives that are
no-ops in one process.

`torchrun --nproc_per_node N [--nnodes M --rdzv-endpoint HOST:PORT] -m vlmscope train ...`
starts one process per GPU (or per CPU slot with gloo); `Layout.from_environment` reads the
variables torchrun sets (RANK, WORLD_SIZE, LOCAL_RANK) and joins the process group. Without them
it is a one-process layout and every helper below does nothing.

Data parallel (the default with several processes):
- Each optimiser step reads a *window* of `world * batch_size * grad_acc_steps` dataset rows
  from the one global data cursor; within a micro-step window rank r takes rows
  [r * B, (r + 1) * B) (sources.py). Rows that fail to load leave that rank's batch smaller; a
  rank whose rows all failed runs the step with zero rows, so collectives stay in step.
- Dictionary statistics are those of the *global* batch (`dictionaries/batchstats.py`): FVU's
  denominator, BatchTopK's k * N selection, dead-latent counters, data-driven initialisation.
  Each rank's loss is its share of the global loss, so DDP's gradient average times the world
  size is the single-process gradient of the same global batch, to float rounding.
- Gradients are all-reduced by `DistributedDataParallel`; `no_sync` skips the all-reduce on
  the first grad_acc_steps - 1 micro-steps. DDP broadcasts rank 0's initial weights, so every
  rank starts, and (same gradients, same Adam) stays, identical.
- Rank 0 alone writes checkpoints (atomically), metrics and the progress bar; metrics are
  global (summed shares). Checkpoints hold every rank's RNG state.

Faults: every micro-step the ranks exchange one small status tensor. A rank whose source or
loss fails (NaN activations, a NaN loss, a bad record under --strict) reports it there, and all
ranks stop with the same TrainingError naming the rank and its message; nothing is written. A
rank that dies breaks the next collective: gloo/NCCL raise after at most `--dist-timeout`
seconds, which `collective_errors` turns into a one-line TrainingError (torchrun also tears the
group down when one of its workers exits). The last checkpoint is whole either way.

`--distribute-modules` is described in `modules.py`; `--shard-model fsdp` shards the frozen
model with FSDP2 (`shard_frozen_model` below).
"""

from __future__ import annotations

import contextlib
import datetime
import os
import socket
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from vlmscope.dictionaries import batchstats
from vlmscope.training.errors import TrainingError

__all__ = [
    "Layout",
    "collective_errors",
    "leaving",
    "rank_seed",
    "release_frozen_model",
]


@dataclass
class Layout:
    """Where this process sits: its rank among `world` processes, and the group they form."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    backend: str = ""
    host: str = field(default_factory=socket.gethostname)
    timeout_s: float = 600.0
    owns_group: bool = field(default=False, compare=False, repr=False)  # it called init

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # --- set-up ------------------------------------------------------------------------------
    @classmethod
    def from_environment(cls, timeout_s: float = 600.0, device: str = "") -> Layout:
        """The layout torchrun describes in the environment; joins its process group (NCCL on
        CUDA, gloo otherwise). One process when WORLD_SIZE is absent or 1."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls(timeout_s=timeout_s)
        import torch.distributed as dist

        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", "0"))
        cuda = torch.cuda.is_available() and not device.startswith("cpu")
        backend = "nccl" if cuda else "gloo"
        if not dist.is_initialized():
            if "MASTER_ADDR" not in os.environ:
                raise TrainingError(
                    f"WORLD_SIZE={world} but MASTER_ADDR is not set: start vlmscope with torchrun "
                    "(torchrun --nproc_per_node N -m vlmscope train ...)"
                )
            if cuda:
                torch.cuda.set_device(local)
            _bind_functional_defaults_before_joining()
            try:
                dist.init_process_group(
                    backend, timeout=datetime.timedelta(seconds=timeout_s), rank=rank,
                    world_size=world,
                )  # fmt: skip
            except (RuntimeError, ValueError) as e:
                raise TrainingError(
                    f"rank {rank}: cannot join the process group ({type(e).__name__}: {e})"
                ) from None
            return cls(rank, world, local, backend, timeout_s=timeout_s, owns_group=True)
        backend = str(dist.get_backend())
        rank, world = dist.get_rank(), dist.get_world_size()
        return cls(rank, world, local, backend, timeout_s=timeout_s)

    def leave(self) -> None:
        """Destroy the process group this layout joined; a no-op for a group the caller made.
        Without it gloo's worker threads can outlive the interpreter and abort the process
        at exit (SIGABRT, "terminate called without an active exception"), after a run that
        had succeeded, so torchrun reports the whole job failed."""
        if not self.owns_group:
            return
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
        self.owns_group = False

    def device(self, requested: str) -> str:
        """The device of this rank: --device if it names one index, else cuda:LOCAL_RANK
        with several processes on a CUDA machine."""
        if not self.distributed or self.backend != "nccl":
            return requested
        if requested in ("", "cuda"):
            return f"cuda:{self.local_rank}"
        return requested

    # --- collectives (no-ops in one process) ------------------------------------------------
    def sum(self, values: list[float] | torch.Tensor) -> torch.Tensor:
        """Element-wise sum over ranks of a small float64 vector."""
        t = torch.as_tensor(values, dtype=torch.float64).clone()
        if self.distributed:
            import torch.distributed as dist

            buf = t.to(self._comm_device())
            with collective_errors(self, "summing step statistics"):
                dist.all_reduce(buf, op=dist.ReduceOp.SUM)
            t = buf.cpu()
        return t

    def _comm_device(self) -> torch.device:
        return (
            torch.device(f"cuda:{self.local_rank}")
            if self.backend == "nccl"
            else torch.device("cpu")
        )

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's `obj` (picklable, small), in rank order; [obj] in one process."""
        if not self.distributed:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world
        with collective_errors(self, "gathering per-rank state"):
            dist.all_gather_object(out, obj)
        return out

    def barrier(self, what: str) -> None:
        if self.distributed:
            import torch.distributed as dist

            with collective_errors(self, what):
                if self.backend == "nccl":
                    dist.barrier(device_ids=[self.local_rank])
                else:
                    dist.barrier()

    def agree(self, error: str | None) -> None:
        """Stop every rank if any rank has an error: all raise the same TrainingError naming
        the failing ranks. A no-op (without communication) in one process without error."""
        if not self.distributed:
            if error is not None:
                raise TrainingError(error)
            return
        failed = self.sum([0.0 if error is None else 1.0])
        if failed.item() == 0:
            return
        messages = self.gather(error)
        culprits = [(r, m) for r, m in enumerate(messages) if m is not None]
        text = "; ".join(f"rank {r} on {self.host if r == self.rank else 'its host'}: {m}"
                         for r, m in culprits[:3])  # fmt: skip
        raise AgreedError(f"{text} (all {self.world} ranks stopped)")

    def phase(self, fn: Any, main_only: bool = False, others_only: bool = False) -> Any:
        """Run `fn()` on rank 0 only, on the other ranks only, or on all, then let every rank
        agree that it succeeded: a TrainingError or bad record on any rank stops all of them
        with one error naming it. One process (rank 0, no others): just `fn()`."""
        from vlmscope.data.sources import BadRecordError

        if not self.distributed:
            return None if others_only else fn()
        skip = (main_only and not self.is_main) or (others_only and self.is_main)
        result, error = None, None
        if not skip:
            try:
                result = fn()
            except (TrainingError, BadRecordError) as e:
                error = str(e)
        self.agree(error)
        return result

    @contextlib.contextmanager
    def statistics(self) -> Iterator[None]:
        """Dictionary batch statistics over all ranks inside the block (see batchstats)."""
        if not self.distributed:
            yield
            return
        import torch.distributed as dist

        with batchstats.data_parallel(dist.group.WORLD):
            yield

    # --- modules -----------------------------------------------------------------------------
    def wrap(self, module: nn.Module) -> nn.Module:
        """DDP around the dictionaries with several ranks (buffers are kept in step by the
        global statistics, so DDP does not broadcast them); the module itself in one."""
        if not self.distributed:
            return module
        from torch.nn.parallel import DistributedDataParallel as DDP

        dev = next(module.parameters()).device
        ids = [dev.index] if dev.type == "cuda" else None
        with collective_errors(self, "wrapping the dictionaries in DDP"), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # broadcast_buffers' new name
            return DDP(module, device_ids=ids, broadcast_buffers=False)

    @staticmethod
    def no_sync(module: nn.Module, skip: bool) -> contextlib.AbstractContextManager[Any]:
        """DDP's no_sync on accumulation micro-steps (`skip`), else nothing."""
        if skip and hasattr(module, "no_sync"):
            return module.no_sync()  # type: ignore[no-any-return]
        return contextlib.nullcontext()


def shard_frozen_model(vlm: Any, layout: Layout) -> None:
    """Shard the frozen model's weights over the ranks with FSDP2 (`fully_shard`, ZeRO-3 for
    parameters): each language-model decoder layer is its own unit, gathered for its forward
    and freed after, the rest (embeddings, norms, head, projector, the whole vision tower and
    the layers a forward may skip) one root unit, gathered at the start of every forward.
    Forward hooks keep working: a hooked submodule runs inside its unit's gathered forward.

    Every rank must issue the same all-gathers in the same order, so every rank must run the
    same forwards: LiveSource opens the model on all ranks at once, runs a stand-in forward
    like the others' on a rank whose rows all failed, and what HF models skip for a batch
    without images (one rank's batch may have images and another's none) is not a unit of
    its own: the vision tower, small next to the language model, and the decoder layers the
    adapter says are skipped (Mllama's cross-attention layers).

    The model may come on the CPU (the trainer loads it there under fsdp, so a model larger
    than one GPU fits): `fully_shard` moves every parameter and buffer of the modules it
    manages, the root's being all the rest, to the mesh's device (this rank's GPU under NCCL).
    Host memory must hold one whole copy per rank on a node while they start."""
    if not layout.distributed:
        return
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    device = "cuda" if layout.backend == "nccl" else "cpu"
    with collective_errors(layout, "sharding the model (FSDP2)"):
        mesh = init_device_mesh(device, (layout.world,))
        skippable = vlm.adapter.skippable_blocks()
        for i, block in enumerate(vlm.adapter.blocks()):
            if i not in skippable:
                fully_shard(block, mesh=mesh)
        fully_shard(vlm.model, mesh=mesh)


def release_frozen_model(vlm: Any) -> None:
    """End a sharded model's forward as FSDP2 ends an iteration: every unit resharded (its
    gathered weights freed) and the per-iteration state cleared. A forward that an exception
    ended (the early stop at the last hook read, the vision-only forward) never ran FSDP2's
    post-forward hooks: the stopping layer and the root unit (with the vision tower) stayed
    gathered between steps, and the root still counted as inside its forward, so the next
    forward skipped its root pre-forward. Local to the rank: no collective. Nothing for a
    model that is not sharded."""
    from torch.distributed.fsdp import FSDPModule

    model = vlm.model
    if not isinstance(model, FSDPModule):
        return
    # FSDP2's own recovery after a mid-forward exception (private in torch 2.13); without
    # it, reshard every unit, which frees the weights but leaves the root's state.
    reset = getattr(model._get_fsdp_state(), "_reset_iter_state", None)
    if reset is not None:
        reset()
        return
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def window_rows(cursor: int, total: int, batch_size: int, world: int) -> Iterator[range]:
    """The one global data cursor, cut into micro-step windows of world * batch_size rows
    from `cursor` to `total` (the last may be short): yields each window's row range. Rank r
    reads `share(window, r, batch_size)` of it."""
    size = world * batch_size
    for start in range(cursor, total, size):
        yield range(start, min(start + size, total))


def share(window: range, rank: int, batch_size: int) -> range:
    """Rank `rank`'s rows of a window: [r * B, (r + 1) * B) counted from its start."""
    lo = window.start + rank * batch_size
    return range(min(lo, window.stop), min(lo + batch_size, window.stop))


class AgreedError(TrainingError):
    """Raised on every rank at once, after the ranks agreed that one failed; the CLI prints it
    from rank 0 only."""


@contextlib.contextmanager
def leaving(layout: Layout | None) -> Iterator[None]:
    """`layout.leave()` when the block ends normally or with an error every rank agreed on;
    nothing for None (a layout the caller made and will leave itself). After an error on one
    rank alone the others may still wait in a collective, so the group is left to the
    process's end (torchrun tears it down) rather than destroyed under them."""
    try:
        yield
    except AgreedError:
        if layout is not None:
            layout.leave()
        raise
    if layout is not None:
        layout.leave()


def _bind_functional_defaults_before_joining() -> None:
    """Import `torch.distributed.nn.functional` while no group exists.

    Its functions take ``group=group.WORLD`` as a default argument, evaluated once, at import.
    Imported after `init_process_group` (transformers imports it while loading a model), they
    keep the default group's Python object alive after `destroy_process_group`: gloo's worker
    threads then outlive the interpreter, and one that frees a finished collective's tensors
    during shutdown aborts the process ("terminate called without an active exception") after
    a run that succeeded. Imported first, the defaults are None (the default group at call
    time, so nothing changes for their callers)."""
    import torch.distributed as dist

    if not dist.is_initialized():
        import torch.distributed.nn.functional  # noqa: F401


def rank_seed(seed: int, rank: int) -> int:
    """Seed of rank `rank` for whatever is random after the dictionaries exist (they are built
    from `seed` alone, identically on every rank)."""
    return seed if rank == 0 else seed + 1_000_003 * rank


@contextlib.contextmanager
def collective_errors(layout: Layout, what: str) -> Iterator[None]:
    """Turn a failed or timed-out collective (a rank died, hangs or lost its network) into a
    one-line TrainingError."""
    try:
        yield
    except RuntimeError as e:  # DistBackendError, gloo's "Connection closed by peer", timeouts
        if isinstance(e, TrainingError) or not _is_collective_failure(e):
            raise
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise TrainingError(
            f"rank {layout.rank} on {layout.host}: {what} failed: another rank died, hangs or "
            f"cannot be reached (collectives time out after --dist-timeout "
            f"{layout.timeout_s:g} s; {first}); the last checkpoint is intact"
        ) from None


_COLLECTIVE_MARKERS = ("gloo", "nccl", "connection closed", "timed out", "timeout", "socket",
                       "broken pipe", "connection reset", "monitoredbarrier")  # fmt: skip


def _is_collective_failure(e: BaseException) -> bool:
    """Whether an exception comes from torch.distributed's communication (not a bug)."""
    import torch.distributed as dist

    if isinstance(e, getattr(dist, "DistError", ())):
        return True
    text = str(e).lower()
    return any(m in text for m in _COLLECTIVE_MARKERS)
