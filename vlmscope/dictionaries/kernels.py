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

On CPU both sparse weight gradients, the encoder's dL/dW above and the decoder's
dL/dW_dec[f] = sum over (n, j) at f of values[n, j] g_out[n], are one [F, N] sparse matrix
times a dense [N, d]: the batch's entries grouped by latent (`SparsePattern`, one radix sort
per batch, shared by the encoder and every decoder that reads the same codes), then one
embedding_bag forward over the [N, d] rows with a bag per latent. embedding_bag's own backward
sorts the indices again for each decoder and then adds rows one by one: 2.0 ms against 0.76
for the whole decode backward this way on the toy's 512 x 1,024 codes, and 101 against 87 ms
at 2,048 x 32,768 x 1,024. The decoder's value gradient g_out[n] . W_dec[idx[n, j]] is a
sampled dense-dense product (`torch.sparse.sampled_addmm`). See benchmarks/README.md, "Sparse
weight gradients on CPU" and "The weight gradients as embedding_bag's forward".

Optional Triton kernels (`vlmscope.dictionaries.triton_kernels`, the `triton` extra) fuse the
encoder matmul with the TopK selection and decode without embedding_bag's bookkeeping; these
torch functions are their reference. `sparse_decode` uses the Triton decoder on CUDA tensors
when VLMSCOPE_TRITON=1 (opt-in until the kernels are timed on a GPU).
"""

from __future__ import annotations

import os
import warnings
import weakref
from typing import Any

import numpy as np
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
        # Zeros still connected to W_dec and to the values (through them to the encoder), so
        # every parameter gets a (zero) gradient: a data-parallel rank with no rows must
        # reduce the same gradients (DDP waits for each one).
        return values[:, :0].to(W_dec.dtype) @ W_dec[:0]
    if W_dec.is_cuda and os.environ.get("VLMSCOPE_TRITON", "0") == "1":
        from vlmscope.dictionaries import triton_kernels

        if triton_kernels.AVAILABLE:
            return triton_kernels.SparseDecode.apply(values, indices, W_dec)
    needs_grad = torch.is_grad_enabled() and (W_dec.requires_grad or values.requires_grad)
    # (more entries per row than latents, which only a caller's own codes have, would break
    # the sampled product's one-entry-per-column layout: embedding_bag takes those)
    if needs_grad and width <= W_dec.shape[0] and _pattern_backward(W_dec):
        return _SparseDecode.apply(values, W_dec, pattern_for(indices, W_dec.shape[0]))
    return F.embedding_bag(indices, W_dec, per_sample_weights=values.to(W_dec.dtype), mode="sum")


def dense_decode(values: Tensor, indices: Tensor, W_dec: Tensor) -> Tensor:
    """Reference for `sparse_decode`: scatter the codes into [N, F], then multiply by W_dec."""
    _check(values, indices, W_dec)
    dense = values.new_zeros(values.shape[0], W_dec.shape[0], dtype=W_dec.dtype)
    dense = dense.scatter_add(1, indices.long(), values.to(W_dec.dtype))
    return dense @ W_dec


def _pattern_backward(weight: Tensor) -> bool:
    """Whether the sparse weight gradients go through `SparsePattern` (CPU float32/64: torch's
    sampled CSR product has no CPU kernel for half types; on CUDA embedding_bag's backward
    stays)."""
    return weight.device.type == "cpu" and weight.dtype in (torch.float32, torch.float64)


class SparsePattern:
    """Where a batch's [N, K] codes sit in the [N, F] activation matrix, for the sparse
    gradients of the weights that read or write them.

    The entries grouped by latent (a stable radix sort of the indices, done once, on first
    use) make the [F, N] matrix of any per-entry weights one embedding_bag (a bag per latent),
    so a weight gradient is one embedding_bag forward; the [N, F] layout in row order needs no
    sort and gives sampled products."""

    def __init__(self, indices: Tensor, num_latents: int) -> None:
        self.indices = indices.long()
        self.num_latents = num_latents
        self._source = (weakref.ref(indices), indices._version)
        self._by_latent: tuple[Tensor, Tensor, Tensor] | None = None

    def made_from(self, indices: Tensor, num_latents: int) -> bool:
        """Whether this pattern is that of `indices` as they are now."""
        ref, version = self._source
        return ref() is indices and indices._version == version and num_latents == self.num_latents

    def _grouped(self) -> tuple[Tensor, Tensor, Tensor]:
        """(crow [F + 1]: where each latent's entries start, the row n of each entry in
        latent order, that order), computed once."""
        if self._by_latent is None:
            # numpy throughout: torch's bincount scans for the min and max first, and its
            # integer division is 4x numpy's on the toy's 16k entries (benchmarks/README.md)
            flat = self.indices.reshape(-1).numpy()
            order = _order_by_key(flat, self.num_latents)
            crow = np.zeros(self.num_latents + 1, dtype=np.int64)
            np.cumsum(np.bincount(flat, minlength=self.num_latents), out=crow[1:])
            row_of = order // self.indices.shape[1]
            as_tensor = torch.from_numpy
            self._by_latent = (as_tensor(crow), as_tensor(row_of), as_tensor(order))
        return self._by_latent

    def rows_grad(self, weights: Tensor, rows: Tensor) -> Tensor:
        """[F, d]: row f = sum over entries (n, j) at latent f of weights[n, j] * rows[n]."""
        n, k = self.indices.shape
        if n == 0 or k == 0:
            return rows.new_zeros(self.num_latents, rows.shape[1])
        crow, row_of, order = self._grouped()
        # index_select, not [order]: advanced indexing costs 2-3x more on 16k entries
        values = weights.reshape(-1).index_select(0, order).to(rows.dtype)
        # The [F, N] matrix times rows is embedding_bag's forward over `rows`: bag f sums the
        # weighted rows of latent f's entries (an empty bag is a zero row). A third of the time
        # of torch's CSR matmul, whose output plumbing (a zero fill and a column-major copy)
        # cost more than the product (benchmarks/README.md, "The weight gradients as
        # embedding_bag's forward").
        return F.embedding_bag(row_of, rows, crow[:-1], mode="sum", per_sample_weights=values)

    def dots(self, rows: Tensor, weight: Tensor) -> Tensor:
        """[N, K]: entry (n, j) = rows[n] . weight[indices[n, j]] (rows [N, d], weight [F, d])."""
        n, k = self.indices.shape  # both > 0: sparse_decode answers empty codes itself
        crow = torch.arange(0, n * k + 1, k, device=rows.device)
        ones = rows.new_ones(n * k)
        mask = _csr(crow, self.indices.reshape(-1), ones, (n, self.num_latents))
        sampled = torch.sparse.sampled_addmm(mask, rows, weight.t(), beta=0.0)
        return sampled.values().view(n, k)


def _csr(crow: Tensor, col: Tensor, values: Tensor, size: tuple[int, int]) -> Tensor:
    with warnings.catch_warnings():  # torch warns once that sparse CSR is in beta: noise here
        warnings.simplefilter("ignore")
        return torch.sparse_csr_tensor(crow, col, values, size)


def _order_by_key(keys: np.ndarray, bound: int) -> np.ndarray:
    """A stable order of `keys` in [0, bound): numpy's radix sort on 16-bit keys (one pass,
    or two for bound > 2^16), 10x faster than torch.sort on the toy's 16k entries."""
    if bound <= 1 << 16:
        return np.argsort(keys.astype(np.uint16), kind="stable")
    if bound > 1 << 32:
        return np.argsort(keys, kind="stable")
    low = np.argsort((keys & 0xFFFF).astype(np.uint16), kind="stable")
    return low[np.argsort((keys[low] >> 16).astype(np.uint16), kind="stable")]


# The live SparsePattern of each indices tensor, so the encoder gradient and every decoder that
# reads the same codes (a CLT's targets, its sharded decoders) share one sort. Weak: a pattern
# lives as long as the autograd graph that saved it, and an in-place edit of the indices
# (a new version) gets a new one.
_PATTERNS: dict[int, weakref.ref[SparsePattern]] = {}


def pattern_for(indices: Tensor, num_latents: int) -> SparsePattern:
    """The `SparsePattern` of `indices` [N, K] over `num_latents`, made once per tensor."""
    ref = _PATTERNS.get(id(indices))
    pattern = ref() if ref is not None else None
    if pattern is not None and pattern.made_from(indices, num_latents):
        return pattern
    for key in [key for key, r in _PATTERNS.items() if r() is None]:
        del _PATTERNS[key]
    pattern = SparsePattern(indices, num_latents)
    _PATTERNS[id(indices)] = weakref.ref(pattern)
    return pattern


class _SparseDecode(torch.autograd.Function):
    """embedding_bag's forward with both gradients from a shared `SparsePattern`."""

    @staticmethod
    def forward(ctx: Any, values: Tensor, weight: Tensor, pattern: SparsePattern) -> Tensor:
        # the indices too, so an in-place edit before backward is refused, as embedding_bag does
        ctx.save_for_backward(values, weight, pattern.indices)
        ctx.pattern = pattern
        v = values.to(weight.dtype)
        return F.embedding_bag(pattern.indices, weight, per_sample_weights=v, mode="sum")

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        values, weight, indices = ctx.saved_tensors
        pattern = _take_pattern(ctx, indices, weight.shape[0])
        grad = grad.to(weight.dtype).contiguous()
        grad_v = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_v = pattern.dots(grad, weight).to(values.dtype)
        if ctx.needs_input_grad[1]:
            grad_w = pattern.rows_grad(values, grad)
        return grad_v, grad_w, None


def _take_pattern(ctx: Any, indices: Tensor, num_latents: int) -> SparsePattern:
    """The pattern a backward saved, released from `ctx`: a graph kept alive after its backward
    (a loss kept for logging) must not keep the sort with it. A second backward through a
    retained graph groups the saved indices again."""
    pattern, ctx.pattern = ctx.pattern, None
    return pattern if pattern is not None else SparsePattern(indices, num_latents)


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
        # found now, while `indices` is the tensor the decoder reads, so both share one sort
        # (inference tensors have no version to check it by, and no backward to serve)
        ctx.grouped = _pattern_backward(weight) and not indices.is_inference()
        ctx.pattern = pattern_for(indices, weight.shape[0]) if ctx.grouped else None
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
        pattern = _take_pattern(ctx, indices, weight.shape[0]) if ctx.grouped else None
        if need_w and pattern is not None:
            grad_w = pattern.rows_grad(g, xc.to(weight.dtype))
        elif need_w:
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


ONEDNN_PRE = True
"""Whether `training_pre` may use oneDNN's matmul (set False to keep torch's default BLAS)."""


def training_pre(x: Tensor, weight: Tensor, bias: Tensor | None, centre: Tensor | None) -> Tensor:
    """[N, F] = (x - centre) W^T + bias without autograd: the pre-activations a sparse training
    step selects from (its kept entries get their gradient from `gathered_pre`).

    On CPU in float32 through oneDNN's matmul (`torch.ops.mkldnn._linear_pointwise`, what
    torch's compiler calls for linear layers) where torch has it: the encoder's product is the
    step's largest kernel, and on the AMD EPYC VM oneDNN's took 22.7 ms against MKL's 35.0 at
    [512, 512] x [512, 8,192] (0.70 against 0.79 ms at the toy's [512, 128] x [128, 1,024];
    benchmarks/README.md, "The encoder's product through oneDNN"). Elsewhere, or if the call
    fails once (another torch build), `F.linear`. Only the training step's selection reads
    it; `encode` and attribution keep `F.linear`, so their codes do not move."""
    global ONEDNN_PRE
    xc = x if centre is None else x - centre
    plain = (xc, weight) if bias is None else (xc, weight, bias)
    if ONEDNN_PRE and all(t.device.type == "cpu" and t.dtype == torch.float32 for t in plain):
        try:
            return torch.ops.mkldnn._linear_pointwise(xc, weight, bias, "none", [None], "")
        except (AttributeError, RuntimeError, NotImplementedError):
            ONEDNN_PRE = False  # this build has no such kernel: the default from now on
    return F.linear(xc, weight, bias)


def centred_linear(x: Tensor, weight: Tensor, bias: Tensor | None, centre: Tensor | None) -> Tensor:
    """[N, F] = (x - centre) W^T + bias; b_dec-style centres get their gradient analytically."""
    if centre is None:
        return F.linear(x, weight, bias)
    return _CentredLinear.apply(x, weight, bias, centre)
