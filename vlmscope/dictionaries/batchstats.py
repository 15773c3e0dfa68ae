"""Batch statistics over a data-parallel group: plain local computations in one process.

A dictionary's loss and running estimates are statistics of *the batch*: FVU divides by the
batch's total variance, BatchTopK keeps the k * N largest activations of the batch, the
dead-latent counters advance by the batch's rows, `init_from_data` takes the batch mean. When
the batch is split over several processes (data parallel training), each process sees a slice;
computing these statistics on the slice would make N processes train a different model than one
process on the same global batch. So the dictionaries compute them through the functions below,
which reduce over the group installed by `data_parallel(group)` and are the local computation
when no group is installed (one process, evaluation, attribution). `training/distributed.py`
installs the group; nothing here knows about models or training.

With a group, a loss term is written as (sum over this rank's rows) / (global normaliser): the
ranks' terms then *add up* to the global batch's term, and data-parallel gradient averaging
times the world size gives exactly the single-process gradient.

Exact global BatchTopK threshold (`kth_largest`): a radix select over the IEEE bits of the
non-negative activations, 8 bits per round, 4 rounds of a 256-bin histogram all-reduce; the
k-th largest value of the union of all ranks' rows, whatever their sizes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

_GROUP: list[Any] = []  # the installed process group (a stack; empty: one process)


@contextlib.contextmanager
def data_parallel(group: Any) -> Iterator[None]:
    """Compute batch statistics over `group` (a torch.distributed process group, or the
    default group as `torch.distributed.group.WORLD`) inside the block."""
    _GROUP.append(group)
    try:
        yield
    finally:
        _GROUP.pop()


def active() -> bool:
    """Whether statistics are reduced over more than one process right now."""
    if not _GROUP:
        return False
    import torch.distributed as dist

    return dist.is_initialized() and dist.get_world_size(_GROUP[-1]) > 1


def _reduce(t: Tensor, op: str) -> Tensor:
    import torch.distributed as dist

    out = t.detach().clone()
    dist.all_reduce(out, op=getattr(dist.ReduceOp, op), group=_GROUP[-1])
    return out


def all_sum(t: Tensor) -> Tensor:
    """Sum of `t` over the group (a detached copy; `t` itself when alone)."""
    return _reduce(t, "SUM") if active() else t


def all_max(t: Tensor) -> Tensor:
    return _reduce(t, "MAX") if active() else t


def all_min(t: Tensor) -> Tensor:
    return _reduce(t, "MIN") if active() else t


def rows(n: int, device: torch.device | None = None) -> int:
    """Rows of the global batch, given this rank's `n`."""
    if not active():
        return n
    return int(all_sum(torch.tensor(n, dtype=torch.int64, device=device)))


def mean_rows(t: Tensor) -> Tensor:
    """Mean over dim 0 of the global batch, [N, ...] -> [...] (float32)."""
    if not active():
        return t.float().mean(dim=0)
    total = all_sum(t.float().sum(dim=0))
    return total / rows(t.shape[0], t.device)


def total_variance(target: Tensor) -> Tensor:
    """Sum of squared deviations of `target` [N, D] from the global batch mean (FVU's
    denominator), over the global batch."""
    target = target.float()
    if not active():
        return (target - target.mean(dim=0)).pow(2).sum()
    return all_sum((target - mean_rows(target)).pow(2).sum())


def kth_largest(values: Tensor, k: int) -> Tensor:
    """The k-th largest entry of the union of every rank's non-negative float `values`
    (k >= 1, at most the global number of entries), identical on every rank."""
    bits = values.detach().float().flatten().view(torch.int32).long()  # monotonic, x >= 0
    prefix, remaining = 0, k
    high_mask = 0
    for shift in (24, 16, 8, 0):
        sel = bits if high_mask == 0 else bits[(bits & high_mask) == prefix]
        digits = (sel >> shift) & 0xFF
        hist = all_sum(torch.bincount(digits, minlength=256))
        above = torch.flip(torch.cumsum(torch.flip(hist, [0]), 0), [0])  # count >= digit d
        d = int((above >= remaining).nonzero().max())
        remaining -= int(above[d + 1]) if d < 255 else 0
        prefix |= d << shift
        high_mask |= 0xFF << shift
    return torch.tensor(prefix, dtype=torch.int32).view(torch.float32).to(values.device)


def gather_rows(t: Tensor) -> Tensor:
    """The global batch's rows of `t` [n, ...], ranks in order (`t` itself when alone): for an
    estimate that does not split into per-row sums, so every rank computes the one a single
    process would on the global batch. Ranks may hold different numbers of rows (even none)."""
    if not active():
        return t
    import torch.distributed as dist

    group = _GROUP[-1]
    count = torch.tensor([t.shape[0]], dtype=torch.int64, device=t.device)
    counts = [torch.zeros_like(count) for _ in range(dist.get_world_size(group))]
    dist.all_gather(counts, count, group=group)
    sizes = [int(c) for c in counts]
    padded = t.new_zeros((max(sizes), *t.shape[1:]))
    padded[: t.shape[0]] = t
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded, group=group)
    return torch.cat([part[:size] for part, size in zip(parts, sizes, strict=True)])
