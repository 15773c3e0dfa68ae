"""Sparse kernels of a dictionary's training step: encoder gradients and decoding.

Decoding, `values @ W_dec[indices]` at a cost that grows with K, not F: `sparse_decode` uses
`torch.nn.functional.embedding_bag` (mode "sum", per-sample weights), which gathers only the K
rows of W_dec each code uses, on CPU and GPU, with gradients for both W_dec and the values.
`dense_decode` is the reference: scatter into [N, F], then a matmul.

Encoding. The pre-activations of N rows over F latents are

    pre = (x - c) W^T + b          c = b_dec for an SAE (the input centre), absent otherwise

and a sparse activation keeps K of the F entries per row. Autograd through a dense `pre` pays
two [N, F] x [F or N, d] matmuls in the backward, although the gradient reaching `pre` is zero
outside the kept entries:

- the input gradient g W [N, d], which for an SAE exists only to carry b_dec's gradient through
  `x - b_dec` (the input itself comes from a frozen model and needs none);
- the weight gradient g^T (x - c) [F, d].

With g [N, K] the upstream gradient of the kept values pre[n, idx[n, j]]:

    dL/db[f] = sum over (n, j) with idx[n, j] = f of g[n, j]            (index_add)
    dL/dW[f] = sum over (n, j) with idx[n, j] = f of g[n, j] (x_n - c)  (sparse [F,N] @ [N,d])
    dL/dx_n  = sum_j g[n, j] W[idx[n, j]]                               (embedding_bag)
    dL/dc    = -sum_n dL/dx_n = -(dL/db) W                              (one [F] x [F, d])

so b_dec's gradient needs no [N, d] input gradient at all, the input gradient is computed only
when the input requires it (a spliced CE/KL loss, where a layer's input depends on an earlier
layer's reconstruction), and the weight gradient costs N K d instead of N F d. `gathered_pre`
attaches exactly this backward to the kept entries of a `pre` computed without autograd;
`centred_linear` is the dense form (for activations that need the whole `pre`, like JumpReLU's
threshold) with the same analytic b_dec gradient.

Optional Triton kernels (`vlmscope.dictionaries.triton_kernels`, the `triton` extra) fuse the
encoder matmul with the TopK selection and decode without embedding_bag's bookkeeping; these
torch functions are their reference. `sparse_decode` uses the Triton decoder on CUDA tensors
when VLMSCOPE_TRITON=1 (opt-in until the kernels are timed on a GPU).
"""

from __future__ import annotations

import os
import warnings
from typing import Any

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
    if W_dec.is_cuda and os.environ.get("VLMSCOPE_TRITON", "0") == "1":
        from vlmscope.dictionaries import triton_kernels

        if triton_kernels.AVAILABLE:
            return triton_kernels.SparseDecode.apply(values, indices, W_dec)
    return F.embedding_bag(indices, W_dec, per_sample_weights=values.to(W_dec.dtype), mode="sum")


def dense_decode(values: Tensor, indices: Tensor, W_dec: Tensor) -> Tensor:
    """Reference for `sparse_decode`: scatter the codes into [N, F], then multiply by W_dec."""
    _check(values, indices, W_dec)
    dense = values.new_zeros(values.shape[0], W_dec.shape[0], dtype=W_dec.dtype)
    dense = dense.scatter_add(1, indices.long(), values.to(W_dec.dtype))
    return dense @ W_dec


def _sparse_rows_grad(indices: Tensor, grad: Tensor, rows: Tensor, num_latents: int) -> Tensor:
    """[F, d]: row f = sum over (n, j) with indices[n, j] = f of grad[n, j] * rows[n]."""
    n, k = indices.shape
    if n == 0 or k == 0:
        return rows.new_zeros(num_latents, rows.shape[1])
    row_of = torch.arange(n, device=indices.device).repeat_interleave(k)
    coords = torch.stack([indices.reshape(-1).long(), row_of])
    with warnings.catch_warnings():  # sparse COO mm works; its beta warnings are noise here
        warnings.simplefilter("ignore")
        sparse = torch.sparse_coo_tensor(
            coords, grad.reshape(-1).to(rows.dtype), (num_latents, n), check_invariants=False
        )
        return torch.sparse.mm(sparse, rows)


class _GatheredPre(torch.autograd.Function):
    """pre[n, idx[n, j]] for a `pre` computed without autograd, with the sparse backward of the
    module docstring for x, W, b and the centre c."""

    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        centre: Tensor | None,
        indices: Tensor,
        pre: Tensor,
    ) -> Tensor:
        xc = x if centre is None else x - centre
        ctx.save_for_backward(xc, weight, indices)
        ctx.has_bias = bias is not None
        ctx.has_centre = centre is not None
        ctx.mark_non_differentiable(indices)
        return pre.gather(1, indices)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        xc, weight, indices = ctx.saved_tensors
        need_x, need_w, need_b, need_c = ctx.needs_input_grad[:4]
        g = grad.to(weight.dtype)
        grad_x = grad_w = grad_b = grad_c = None
        if need_x:
            grad_x = sparse_decode(g, indices, weight).to(xc.dtype)
        if need_w:
            grad_w = _sparse_rows_grad(indices, g, xc.to(weight.dtype), weight.shape[0])
        if need_b or need_c:
            col = weight.new_zeros(weight.shape[0])
            col.index_add_(0, indices.reshape(-1), g.reshape(-1))
            grad_b = col if need_b and ctx.has_bias else None
            if need_c and ctx.has_centre:
                grad_c = -(col @ weight)
        return grad_x, grad_w, grad_b, grad_c, None, None


def gathered_pre(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    centre: Tensor | None,
    indices: Tensor,
    pre: Tensor,
) -> Tensor:
    """[N, K] entries `pre[n, indices[n, j]]` of pre = (x - centre) W^T + bias, differentiable in
    x, W, bias and centre at the cost of the K kept entries (see the module docstring).

    `pre` [N, F] must have been computed from the same tensors (without autograd); only its
    values are read. indices [N, K] int64."""
    return _GatheredPre.apply(x, weight, bias, centre, indices, pre.detach())


class _CentredLinear(torch.autograd.Function):
    """(x - c) W^T + b with dL/dc = -(dL/db) W and the input gradient only when x needs one."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None, centre: Tensor) -> Tensor:
        xc = x - centre
        ctx.save_for_backward(xc, weight)
        ctx.has_bias = bias is not None
        return F.linear(xc, weight, bias)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        xc, weight = ctx.saved_tensors
        need_x, need_w, need_b, need_c = ctx.needs_input_grad
        grad_x = grad_w = grad_b = grad_c = None
        if need_x:
            grad_x = grad @ weight
        if need_w:
            grad_w = grad.t() @ xc
        if need_b or need_c:
            col = grad.sum(0)
            grad_b = col if need_b and ctx.has_bias else None
            if need_c:
                grad_c = -(col @ weight)
        return grad_x, grad_w, grad_b, grad_c


def centred_linear(x: Tensor, weight: Tensor, bias: Tensor | None, centre: Tensor | None) -> Tensor:
    """[N, F] = (x - centre) W^T + bias; b_dec-style centres get their gradient analytically."""
    if centre is None:
        return F.linear(x, weight, bias)
    return _CentredLinear.apply(x, weight, bias, centre)
