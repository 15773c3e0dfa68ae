"""Per-row top-k selection for TopK dictionaries, faster than `torch.topk` on CPU.

A TopK dictionary's training step selects the k largest of F pre-activations in every row; on
CPU, torch's topk was 45% of a transcoder step (N 512, F 1,024, k 32, one thread). Two exact
changes make it 1.1-2.8x cheaper (benchmarks/README.md, "Top-k selection on CPU"):

- Stripes. Cut each row into m >= k stripes of b entries (stripe s: columns s, s + m, s + 2m,
  ...) and search only the k stripes with the largest maxima. An entry among the row's k
  largest is at least the k-th largest stripe maximum, so its stripe's maximum is too: the
  stripes kept hold every entry of the answer. Cost: one pass of stripe maxima (an elementwise
  maximum of b contiguous [N, m] slices: 0.55 ms at [512, 8,192] on 2 threads, where maxima
  of b adjacent entries took 4.4-5.0 ms), a selection over m maxima and one over k * b
  candidates (b about 1.5 sqrt(F / k)); used where F / k is large enough for that to pay
  (`_BLOCKED_RATIO`).
- numpy's introselect (`argpartition`), which does per row what torch's topk does with less
  overhead per row, and releases the GIL, so row chunks run on torch's thread count. Inside a
  training step that pays only while torch's OpenMP workers sleep rather than spin between
  kernels: the CLI shortens their spin before torch loads (`vlmscope.torch_env`).

The answer is the same set of values as `x.topk(k, dim=1).values`; among entries tied with the
k-th value either may be chosen, as with torch, and NaN counts as the largest, as with torch.
Tensors off the CPU (CUDA's topk is a radix select; MPS and meta tensors have no numpy view),
other dtypes and small inputs keep torch's topk.

Not for rows with many equal entries: introselect slows down on heavy ties (rows 90% masked to
-inf: 3-10x slower than torch.topk), so AuxK, which masks live latents out, keeps torch's
topk. Pre-activations of a TopK encoder are continuous and rarely tie.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from torch import Tensor

_MIN_NUMPY = 1 << 12
"""Fewer entries than this: torch.topk (the numpy round trip costs more than it saves)."""

_MIN_CHUNK_ROWS = 64
"""Rows per thread below which splitting a selection over threads does not pay."""

_CHUNK_ENTRIES = 1 << 18
"""Entries per numpy call at most (its [rows, F] int64 answer is 2 MB at this size)."""

_BLOCKED_RATIO = 64
"""F / k from which the block pass pays for itself (measured on 2 cores: at 32 it costs more
than it saves, at 64 it breaks even, at 512 it takes 55-60% off)."""

_pool: ThreadPoolExecutor | None = None
_pool_workers = 0


def row_topk_indices(x: Tensor, k: int) -> Tensor:
    """[N, k] int64: positions of the k largest entries of each row of x [N, F], unordered
    (the same selection as `x.topk(k, dim=1, sorted=False).indices`; see the module doc)."""
    if x.ndim != 2 or not 1 <= k <= x.shape[1]:
        raise ValueError(
            f"row_topk_indices: need x [N, F] and 1 <= k <= F, got {tuple(x.shape)}, k={k}"
        )
    x = x.detach()
    n_rows, width = x.shape
    block = _block_width(width, k)
    if x.device.type != "cpu" or block < 2 or width < _BLOCKED_RATIO * k:
        return _select(x, k)
    m = width // block
    stripes = x.reshape(n_rows, block, m)  # [n, i, s] = x[n, i * m + s]: stripe s is column s
    best = _select(stripes.amax(1), k)  # [N, k]: the stripes with the largest maxima
    picked = stripes.gather(2, best.unsqueeze(1).expand(n_rows, block, k))  # [N, b, k]
    inner = _select(picked.reshape(n_rows, block * k), k)  # q = i * k + j: stripe best[j]
    return best.gather(1, inner % k) + (inner // k) * m


def _block_width(width: int, k: int) -> int:
    """Largest divisor of `width` at most 1.5 sqrt(width / k), leaving at least k stripes."""
    target = min(int(1.5 * (width / k) ** 0.5), width // k)
    for b in range(target, 1, -1):
        if width % b == 0:
            return b
    return 1


def _select(x: Tensor, k: int) -> Tensor:
    """Indices of each row's k largest entries: numpy's argpartition on CPU floats, in row
    chunks over torch's threads; torch.topk elsewhere."""
    on_cpu = x.device.type == "cpu"
    if not on_cpu or x.dtype not in (torch.float32, torch.float64) or x.numel() < _MIN_NUMPY:
        return x.topk(k, dim=1, sorted=False).indices
    n_rows, width = x.shape
    arr = x.contiguous().numpy()
    out = np.empty((n_rows, k), dtype=np.int64)

    def chunk(rows: slice) -> None:
        out[rows] = np.argpartition(arr[rows], width - k, axis=1)[:, width - k :]

    # argpartition returns all F positions of a row: chunks bound that temporary
    n_threads = min(torch.get_num_threads(), max(1, n_rows // _MIN_CHUNK_ROWS))
    per = min(-(-n_rows // n_threads), max(1, _CHUNK_ENTRIES // width))
    chunks = [slice(i, i + per) for i in range(0, n_rows, per)]
    if n_threads < 2 or len(chunks) < 2:
        for rows in chunks:
            chunk(rows)
    else:
        list(_threads(torch.get_num_threads()).map(chunk, chunks))
    return torch.from_numpy(out)


def _threads(n: int) -> ThreadPoolExecutor:
    """A pool of n threads (torch's count), kept between calls and made again when that count
    changes or after a fork (threads do not survive one)."""
    global _pool, _pool_workers
    if _pool is None or _pool_workers != n:
        if _pool is not None:
            _pool.shutdown(wait=False)
        _pool, _pool_workers = ThreadPoolExecutor(n, thread_name_prefix="vlmscope-topk"), n
    return _pool


def _forget_pool() -> None:
    global _pool, _pool_workers
    _pool, _pool_workers = None, 0


os.register_at_fork(after_in_child=_forget_pool)
