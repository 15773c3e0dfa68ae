"""Per-row top-k selection for TopK dictionaries, faster than `torch.topk` on CPU.

A TopK dictionary's training step selects the k largest of F pre-activations in every row. On
the 2-core VM (N 512, F 1,024, k 32, 2 threads) torch's topk takes 2.4 ms, about 5 ns an entry
(per row an introselect), and numpy's argpartition, which this module used before, 3.1-3.4 ms
of a 7-9 ms transcoder step. This module finds the same set in 0.9-1.0 ms (benchmarks/
README.md, "Top-k from sorted values; weight gradients as embedding_bag's forward"):

- The k-th largest value of a row of at most SORT_WIDTH entries is read off numpy's sort of
  the row's values, which is vectorised for float rows that short: 0.15-0.75 us a row of
  128-512, far less than any selection that carries indices along. The columns are then the
  entries at least that value: one comparison and one `flatnonzero`, exactly k per row unless
  values tie at the k-th.
- Longer rows are cut into m > k stripes of b entries (stripe s: columns s, s + m, s + 2m,
  ...). An entry among the row's k largest has fewer than k entries above it, so fewer than
  k stripes have a maximum above its stripe's: its stripe is among the k with the largest
  maxima, and those k stripes' b * k entries hold the answer. The k best stripes of the
  [N, m] maxima and the k largest of the [N, b * k] candidates are two selections of the same
  kind (each by stripes again where it is wider than SORT_WIDTH); b about sqrt(F / k)
  balances their widths.

Values tied with the k-th largest (more than k entries qualify, and torch would pick some)
and NaN (which torch counts as the largest, and no comparison keeps) leave some row with
other than k; such a batch gets torch's topk instead. Pre-activations of a TopK encoder are
continuous and rarely tie. The answer is the same set of values as `x.topk(k, dim=1).values`.
Tensors off the CPU (CUDA's topk is a radix select; MPS and meta tensors have no numpy
view), other dtypes and small inputs keep torch's topk.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from torch import Tensor

SORT_WIDTH = 512
"""Rows at most this wide are selected from by sorting their values whole. numpy's float sort
is vectorised (x86-simd-sort): 1.1-1.5 ns an entry for rows of 128-512, then a jump ([512,
512] in 0.39 ms, [512, 1,024] in 3.2 ms; one thread of the 2-core VM)."""

_MIN_NUMPY = 1 << 17
"""Fewer entries than this: torch.topk (the numpy round trips cost more than they save)."""

_MIN_PARALLEL = 1 << 18
"""Entries from which a sort is split into row chunks over torch's thread count."""

_pool: ThreadPoolExecutor | None = None
_pool_workers = 0


def row_topk_indices(x: Tensor, k: int) -> Tensor:
    """[N, k] int64: positions of the k largest entries of each row of x [N, F] (the same
    selection as `x.topk(k, dim=1, sorted=False).indices`; see the module doc), in increasing
    order on CPU, unordered elsewhere."""
    if x.ndim != 2 or not 1 <= k <= x.shape[1]:
        raise ValueError(
            f"row_topk_indices: need x [N, F] and 1 <= k <= F, got {tuple(x.shape)}, k={k}"
        )
    x = x.detach()
    if x.device.type != "cpu":
        return x.topk(k, dim=1, sorted=False).indices
    if x.dtype in (torch.float32, torch.float64) and x.numel() >= _MIN_NUMPY:
        columns = _columns(x.contiguous(), k)
        if columns is not None:
            return torch.from_numpy(columns)
    # in increasing order as `_columns` gives them: a row's codes, and so the order its
    # decoder rows are summed in, must not depend on which path the batch took (a data-
    # parallel rank's share of the batch is smaller than one process's whole batch)
    return x.topk(k, dim=1, sorted=False).indices.sort(dim=1).values


def topk_among(x: Tensor, allowed: Tensor, k: int) -> Tensor:
    """[N, k] int64: positions in x [N, F] of each row's k largest entries among the columns
    where `allowed` [F] (bool) is set, 1 <= k <= allowed.sum(). AuxK's choice among the dead
    latents: the rows it replaces, masked to -inf outside them, are mostly ties, which send
    `row_topk_indices` to torch's topk at full width; here only the allowed columns are read."""
    columns = allowed.nonzero().squeeze(1)
    return columns[row_topk_indices(x.index_select(1, columns), k)]


def _columns(x: Tensor, k: int) -> np.ndarray | None:
    """[N, k] int64 columns of each row's k largest entries of x [N, W] (CPU, contiguous), in
    increasing order; None where ties or NaN leave some row without exactly k (see above)."""
    n, width = x.shape
    if width <= SORT_WIDTH:
        values = x.numpy()
        return _exactly_k(values >= _kth_largest(values, k)[:, None], k)
    block = _stripe_width(width, k)
    if block < 2:
        return None
    m = width // block
    stripes = x.view(n, block, m)  # [n, i, s] = x[n, i * m + s]: stripe s is column s
    best = _columns(stripes.amax(1), k)  # [N, k]: the stripes with the largest maxima
    if best is None:
        return None
    index = torch.from_numpy(best).unsqueeze(1).expand(n, block, k)
    picked = stripes.gather(2, index).view(n, block * k)  # q = i * k + j: stripe best[j]
    inner = _columns(picked, k)
    if inner is None:
        return None
    return np.take_along_axis(best, inner % k, axis=1) + (inner // k) * m


def _stripe_width(width: int, k: int) -> int:
    """The stripe length b: a divisor of `width` near sqrt(width / k), leaving more than k
    stripes (so each level narrows the row); 1 where there is none."""
    target = min(int((width / k) ** 0.5), width // (k + 1))
    for b in range(max(target, 2), 1, -1):
        if width % b == 0 and width // b > k:
            return b
    return 1


def _kth_largest(values: np.ndarray, k: int) -> np.ndarray:
    """[N]: the k-th largest of each row of values [N, W] (NaN sorts last, i.e. largest), by
    sorting rows in chunks over torch's thread count (numpy's sort releases the GIL)."""
    n, width = values.shape
    n_threads = min(torch.get_num_threads(), max(1, values.size // _MIN_PARALLEL))
    if n_threads < 2:
        return np.sort(values, axis=1)[:, width - k]
    out = np.empty(n, dtype=values.dtype)
    per = -(-n // n_threads)

    def chunk(rows: slice) -> None:
        out[rows] = np.sort(values[rows], axis=1)[:, width - k]

    list(
        _threads(torch.get_num_threads()).map(chunk, [slice(i, i + per) for i in range(0, n, per)])
    )
    return out


def _exactly_k(mask: np.ndarray, k: int) -> np.ndarray | None:
    """[N, k] columns of the True entries of mask [N, W], if every row has exactly k."""
    n, width = mask.shape
    flat = np.flatnonzero(mask)  # row-major: rows in order, each row's columns increasing
    if flat.size != n * k:
        return None
    # n * k entries in row order: every row has k iff the j-th block of k starts and ends in
    # row j (a row with more pushes some block across a row boundary)
    rows = np.arange(n)
    if not (
        np.array_equal(flat[::k] // width, rows) and np.array_equal(flat[k - 1 :: k] // width, rows)
    ):
        return None
    return (flat % width).reshape(n, k)


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
