"""Decoding sparse codes: `values @ W_dec[indices]` at a cost that grows with K, not F.

`sparse_decode` uses `torch.nn.functional.embedding_bag` (mode "sum", per-sample weights), which
gathers only the K rows of W_dec each code uses, on CPU and GPU, with gradients for both W_dec
and the values. `dense_decode` is the reference: scatter into [N, F], then a matmul. No Triton
kernel ships: embedding_bag already avoids the [N, F] intermediate; a fused kernel can be added
here behind an import guard without changing callers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _check(values: Tensor, indices: Tensor, W_dec: Tensor) -> None:
    if values.ndim != 2 or values.shape != indices.shape:
        raise ValueError(
            "sparse decode: values and indices must both be [N, K]; got "
            f"{tuple(values.shape)} and {tuple(indices.shape)}"
        )
    if W_dec.ndim != 2:
        raise ValueError(f"sparse decode: W_dec must be [F, D], got {tuple(W_dec.shape)}")
    if indices.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"sparse decode: indices must be int64 or int32, got {indices.dtype}")


def sparse_decode(values: Tensor, indices: Tensor, W_dec: Tensor) -> Tensor:
    """[N, D] = sum_j values[:, j, None] * W_dec[indices[:, j]]; zero values add nothing."""
    _check(values, indices, W_dec)
    n_rows, width = values.shape
    if width == 0 or n_rows == 0:
        # Zeros still connected to W_dec, so it gets a (zero) gradient like every other
        # parameter: a data-parallel rank with no rows must reduce the same gradients.
        return values.new_zeros(n_rows, 0, dtype=W_dec.dtype) @ W_dec[:0]
    return F.embedding_bag(indices, W_dec, per_sample_weights=values.to(W_dec.dtype), mode="sum")


def dense_decode(values: Tensor, indices: Tensor, W_dec: Tensor) -> Tensor:
    """Reference for `sparse_decode`: scatter the codes into [N, F], then multiply by W_dec."""
    _check(values, indices, W_dec)
    dense = values.new_zeros(values.shape[0], W_dec.shape[0], dtype=W_dec.dtype)
    dense = dense.scatter_add(1, indices.long(), values.to(W_dec.dtype))
    return dense @ W_dec
