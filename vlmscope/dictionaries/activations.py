"""Sparse activations (TopK, BatchTopK, JumpReLU) and the package's one sparse-code format.

Every activation maps encoder pre-activations [N, F] to `SparseCodes`: `values` [N, K] and
`indices` [N, K] (int64), K the same for all rows of a batch. Row n's code is the sum of
values[n, j] * e_{indices[n, j]}. An entry whose value is 0 contributes nothing: it is padding
(rows with fewer active latents than K) or, for JumpReLU in training, a latent just below its
threshold kept so that the threshold's pseudo-gradient sees it. Indices in a row are distinct.
TopK gives K = k; BatchTopK and JumpReLU give K = the largest number of entries in any row
(at least 1). One format for all three lets `kernels.sparse_decode` decode any of them at a cost
that grows with K, not F.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from vlmscope.dictionaries import batchstats
from vlmscope.dictionaries.config import ACTIVATION_NAMES, SparseCoderConfig
from vlmscope.dictionaries.topk import row_topk_indices


@dataclass(frozen=True)
class SparseCodes:
    """Sparse codes of N rows over `num_latents` latents (see the module docstring)."""

    values: Tensor
    indices: Tensor
    num_latents: int

    def __post_init__(self) -> None:
        if self.values.ndim != 2 or self.values.shape != self.indices.shape:
            raise ValueError(
                "SparseCodes: values and indices must both be [N, K]; got "
                f"{tuple(self.values.shape)} and {tuple(self.indices.shape)}"
            )

    @property
    def width(self) -> int:
        """K, the number of stored entries per row."""
        return self.values.shape[1]

    def active(self) -> Tensor:
        """[N, K] bool: which stored entries are non-zero (padding and candidates are not)."""
        return self.values != 0

    def l0(self) -> Tensor:
        """[N] number of active latents per row."""
        return self.active().sum(dim=1)

    def to_dense(self) -> Tensor:
        """[N, F] dense codes (differentiable in `values`); for tests and small F."""
        dense = self.values.new_zeros(self.values.shape[0], self.num_latents)
        return dense.scatter_add(1, self.indices, self.values)

    @staticmethod
    def from_dense(dense: Tensor, mask: Tensor | None = None) -> SparseCodes:
        """Pack dense [N, F] codes, keeping entries where `mask` (default: dense != 0)."""
        return pack_codes(dense, dense != 0 if mask is None else mask, dense)

    def detach(self) -> SparseCodes:
        """The same codes cut from the autograd graph (for logging or caching)."""
        return SparseCodes(self.values.detach(), self.indices, self.num_latents)


def pack_codes(values: Tensor, mask: Tensor, order: Tensor, min_width: int = 1) -> SparseCodes:
    """Gather the entries of `values` [N, F] where `mask`, per row, into SparseCodes.

    Rows are padded with zero values up to the largest count (at least `min_width`); the order
    of entries within a row is unspecified (the `order` [N, F] key ranks which entries are kept
    when a row has more than the width). Gradients flow into `values` at the kept entries.
    """
    indices, keep = pack_indices(mask, order, min_width)
    gathered = values.gather(1, indices)
    gathered = torch.where(keep, gathered, torch.zeros_like(gathered))
    return SparseCodes(gathered, indices, values.shape[1])


def pack_indices(mask: Tensor, order: Tensor, min_width: int = 1) -> tuple[Tensor, Tensor]:
    """(indices [N, K], keep [N, K]): per row, the positions where `mask` holds, padded (keep
    False) up to K = the largest count (at least `min_width`, at most F)."""
    n_rows, n_latents = mask.shape
    width = int(mask.sum(dim=1).max().item()) if n_rows else 0
    width = min(max(width, min_width), n_latents)
    key = torch.where(mask, order.detach(), torch.full_like(order, -torch.inf, dtype=order.dtype))
    # Order inside a row does not matter to any consumer of SparseCodes: no sort.
    indices = key.topk(width, dim=1, sorted=False).indices
    return indices, mask.gather(1, indices)


#: `gather(indices [N, K]) -> [N, K]`: differentiable pre-activations at those entries.
Gather = Callable[[Tensor], Tensor]


class SparseActivation(nn.Module):
    """Base class: `forward(pre [N, F]) -> SparseCodes`; behaviour may differ in eval mode.

    `track_statistics`: whether a training-mode forward updates running estimates (BatchTopK's
    threshold). A trainer turns it off for extra forwards over rows already counted.
    """

    name: str = ""
    track_statistics: bool = True

    def __init__(self, num_latents: int) -> None:
        super().__init__()
        self.num_latents = num_latents

    @classmethod
    def from_config(cls, cfg: SparseCoderConfig) -> SparseActivation:
        raise NotImplementedError

    def forward(self, pre: Tensor) -> SparseCodes:  # pragma: no cover - abstract
        raise NotImplementedError

    def sparsity_loss(self, pre: Tensor) -> Tensor:
        """Differentiable sparsity penalty (mean per row); 0 unless the activation learns it."""
        return pre.new_zeros(())

    #: whether `forward_sparse` is implemented (then a coder never backpropagates a dense pre).
    sparse_backward: bool = False

    def forward_sparse(self, pre: Tensor, gather: Gather) -> SparseCodes:
        """The same codes as `forward(pre)`, for a `pre` without autograd: selection reads the
        detached `pre`, and the kept values come from `gather(indices)`, whose backward costs
        the kept entries only (kernels.gathered_pre)."""
        raise NotImplementedError(f"{type(self).__name__} has no sparse-gradient forward")

    def export_threshold(self) -> Tensor | None:
        """Per-latent threshold [F] that reproduces eval behaviour as `pre * (pre > t)`, if any.

        Exporters use it to write JumpReLU-style thresholds; None for TopK, which has none.
        """
        return None

    def _check(self, pre: Tensor) -> None:
        if pre.ndim != 2 or pre.shape[1] != self.num_latents:
            raise ValueError(
                f"{type(self).__name__}: pre-activations must be [N, {self.num_latents}], "
                f"got {tuple(pre.shape)}"
            )


class TopK(SparseActivation):
    """Keep the k largest pre-activations of each row, then ReLU (Gao et al. 2024)."""

    name = "topk"

    def __init__(self, num_latents: int, k: int) -> None:
        super().__init__(num_latents)
        if not 1 <= k <= num_latents:
            raise ValueError(f"TopK: need 1 <= k <= num_latents={num_latents}, got k={k}")
        self.k = k

    @classmethod
    def from_config(cls, cfg: SparseCoderConfig) -> TopK:
        return cls(cfg.num_latents, cfg.k)

    sparse_backward = True

    def forward(self, pre: Tensor) -> SparseCodes:
        self._check(pre)
        # Unsorted: no consumer depends on the order of a row's entries, and sorting costs.
        indices = row_topk_indices(pre.detach(), self.k)
        return SparseCodes(pre.gather(1, indices).relu(), indices, self.num_latents)

    def forward_sparse(self, pre: Tensor, gather: Gather) -> SparseCodes:
        self._check(pre)
        indices = row_topk_indices(pre.detach(), self.k)
        return SparseCodes(gather(indices).relu(), indices, self.num_latents)

    def extra_repr(self) -> str:
        return f"num_latents={self.num_latents}, k={self.k}"


class BatchTopK(SparseActivation):
    """Keep the k * N largest ReLU'd pre-activations of the whole batch (Bussmann et al. 2024).

    Training also estimates a threshold: the smallest kept positive activation, averaged over
    steps (`momentum` 0) or as an exponential moving average (`momentum` m > 0). In eval mode a
    latent is active iff its pre-activation exceeds that threshold, so rows are independent.
    """

    name = "batchtopk"
    threshold: Tensor
    num_updates: Tensor

    def __init__(self, num_latents: int, k: int, momentum: float = 0.0) -> None:
        super().__init__(num_latents)
        if not 1 <= k <= num_latents:
            raise ValueError(f"BatchTopK: need 1 <= k <= num_latents={num_latents}, got k={k}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"BatchTopK: momentum must be in [0, 1), got {momentum}")
        self.k = k
        self.momentum = momentum
        self.register_buffer("threshold", torch.zeros(()))
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.int64))

    @classmethod
    def from_config(cls, cfg: SparseCoderConfig) -> BatchTopK:
        return cls(cfg.num_latents, cfg.k, cfg.threshold_momentum)

    sparse_backward = True

    def forward(self, pre: Tensor) -> SparseCodes:
        self._check(pre)
        acts = pre.relu()
        return pack_codes(acts, self._mask(acts.detach(), pre.detach()), pre)

    def forward_sparse(self, pre: Tensor, gather: Gather) -> SparseCodes:
        self._check(pre)
        pre = pre.detach()
        indices, keep = pack_indices(self._mask(pre.relu(), pre), pre)
        values = torch.where(keep, gather(indices).relu(), 0.0)
        return SparseCodes(values, indices, self.num_latents)

    def _mask(self, acts: Tensor, pre: Tensor) -> Tensor:
        """[N, F] bool: the kept entries (batch top k*N in training, over all data-parallel
        ranks' rows when distributed; above threshold in eval)."""
        if self.training and batchstats.active():
            mask, kept_min = self._global_mask(acts)
            if self.track_statistics:
                self._record_threshold(kept_min)
            return mask
        if self.training:
            # Every entry tied with the (k*N)-th largest is kept, the rule the data-parallel
            # selection above uses: which of several equal values topk returns depends on the
            # batch's layout, so one process and N ranks would keep different latents.
            n_keep = min(self.k * pre.shape[0], acts.numel())
            cut = acts.flatten().topk(n_keep, sorted=False).values.min()
            mask = (acts >= cut) & (acts > 0)
            if self.track_statistics:
                self._update_threshold(acts[mask])
            return mask
        if int(self.num_updates) == 0:
            raise RuntimeError(
                "BatchTopK: the eval threshold has not been estimated yet; run training "
                "steps first (or load a trained dictionary)"
            )
        return pre > self.threshold

    @torch.no_grad()
    def _global_mask(self, acts: Tensor) -> tuple[Tensor, Tensor]:
        """Data-parallel training: the k * N largest activations of the global batch (N its
        rows over all ranks), found by an exact distributed selection; and the smallest kept
        positive activation over all ranks (inf if none)."""
        n_rows = batchstats.rows(acts.shape[0], acts.device)
        n_keep = min(self.k * n_rows, n_rows * self.num_latents)
        cut = batchstats.kth_largest(acts, n_keep) if n_keep else acts.new_tensor(torch.inf)
        mask = (acts >= cut) & (acts > 0)
        kept = acts[mask]
        local_min = kept.min() if kept.numel() else acts.new_tensor(torch.inf)
        return mask, batchstats.all_min(local_min.float())

    @torch.no_grad()
    def _update_threshold(self, kept: Tensor) -> None:
        positive = kept[kept > 0]
        if positive.numel() == 0:
            return
        self._record_threshold(positive.min())

    @torch.no_grad()
    def _record_threshold(self, smallest_kept: Tensor) -> None:
        if not bool(torch.isfinite(smallest_kept)):
            return  # nothing positive was kept
        value = smallest_kept.to(self.threshold.dtype)
        self.num_updates += 1
        if self.momentum == 0.0:
            # Running mean over steps: t_n = t_{n-1} + (v - t_{n-1}) / n.
            self.threshold += (value - self.threshold) / self.num_updates.to(value.dtype)
        elif int(self.num_updates) == 1:
            self.threshold.copy_(value)
        else:
            self.threshold.lerp_(value, self.momentum)

    def export_threshold(self) -> Tensor | None:
        return self.threshold.detach().expand(self.num_latents).clone()

    def extra_repr(self) -> str:
        return f"num_latents={self.num_latents}, k={self.k}, momentum={self.momentum}"


def _rectangle(x: Tensor) -> Tensor:
    return ((x > -0.5) & (x < 0.5)).to(x.dtype)


class _JumpReLUFn(torch.autograd.Function):
    """z * H(z - t): exact gradient in z, rectangle-kernel pseudo-gradient in t."""

    @staticmethod
    def forward(ctx: Any, pre: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return pre * (pre > threshold).to(pre.dtype)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor, None]:
        pre, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_pre = (pre > threshold).to(grad.dtype) * grad
        # d/dt [z H(z - t)] := -(t / eps) K((z - t) / eps)   (Rajamanoharan et al. 2024, eq. 11)
        grad_t = (-(threshold / eps) * _rectangle((pre - threshold) / eps) * grad).sum(dim=0)
        return grad_pre, grad_t, None


class _StepFn(torch.autograd.Function):
    """H(z - t): no gradient in z, rectangle-kernel pseudo-gradient -K((z - t)/eps)/eps in t."""

    @staticmethod
    def forward(ctx: Any, pre: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return (pre > threshold).to(pre.dtype)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor, None]:
        pre, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_t = (-(1.0 / eps) * _rectangle((pre - threshold) / eps) * grad).sum(dim=0)
        return torch.zeros_like(pre), grad_t, None


class JumpReLU(SparseActivation):
    """z * H(z - t) with a learned per-latent threshold t = exp(log_threshold).

    The threshold gets a straight-through pseudo-gradient through a rectangle kernel of width
    `bandwidth`, for both the reconstruction and the L0 penalty (`sparsity_loss`), as in
    Rajamanoharan et al. 2024 ("Jumping Ahead"). In training, latents within bandwidth/2 below
    their threshold are kept in the codes with value 0 so the pseudo-gradient reaches them.
    """

    name = "jumprelu"

    def __init__(self, num_latents: int, init_threshold: float, bandwidth: float) -> None:
        super().__init__(num_latents)
        if init_threshold <= 0 or bandwidth <= 0:
            raise ValueError("JumpReLU: init_threshold and bandwidth must be > 0")
        self.bandwidth = bandwidth
        self.log_threshold = nn.Parameter(torch.full((num_latents,), math.log(init_threshold)))

    @classmethod
    def from_config(cls, cfg: SparseCoderConfig) -> JumpReLU:
        return cls(cfg.num_latents, cfg.jumprelu_init_threshold, cfg.jumprelu_bandwidth)

    @property
    def threshold(self) -> Tensor:
        return self.log_threshold.exp()

    def forward(self, pre: Tensor) -> SparseCodes:
        self._check(pre)
        threshold = self.threshold.to(pre.dtype)
        out = _JumpReLUFn.apply(pre, threshold, self.bandwidth)
        if self.training:
            mask = pre > threshold - self.bandwidth / 2
        else:
            mask = pre > threshold
        return pack_codes(out, mask, pre)

    def sparsity_loss(self, pre: Tensor) -> Tensor:
        """Mean per row of L0 = sum_i H(z_i - t_i), differentiable in the threshold only."""
        self._check(pre)
        step = _StepFn.apply(pre, self.threshold.to(pre.dtype), self.bandwidth)
        if batchstats.active():  # this rank's share of the global batch's mean
            return step.sum() / batchstats.rows(pre.shape[0], pre.device)
        return step.sum(dim=1).mean()

    def export_threshold(self) -> Tensor | None:
        return self.threshold.detach().clone()

    def extra_repr(self) -> str:
        return f"num_latents={self.num_latents}, bandwidth={self.bandwidth}"


ACTIVATIONS: dict[str, type[SparseActivation]] = {
    "topk": TopK,
    "batchtopk": BatchTopK,
    "jumprelu": JumpReLU,
}
assert tuple(ACTIVATIONS) == ACTIVATION_NAMES, "config.ACTIVATION_NAMES out of sync"


def build_activation(cfg: SparseCoderConfig) -> SparseActivation:
    """The activation module named by `cfg.activation`, sized by `cfg.num_latents`."""
    return ACTIVATIONS[cfg.activation].from_config(cfg)
