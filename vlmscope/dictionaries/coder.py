"""SparseCoder: an SAE or a (per-layer) transcoder mapping [N, d_in] to [N, d_out].

    x_n  = x * input_scale                                  (1 unless normalize_activations)
    pre  = W_enc @ (x_n - b_dec) + b_enc                    (SAE: b_dec is also the input centre)
    pre  = W_enc @ x_n + b_enc                              (transcoder)
    code = activation(pre)                                  (SparseCodes, see activations.py)
    y_n  = W_dec^T code + b_dec [+ W_skip @ x_n]
    y    = y_n / output_scale

`encode` takes and `decode` returns tensors in the caller's units; losses are computed in the
normalised space (FVU and AuxK are ratios, so the scale cancels). Inputs are checked for
NaN/Inf on every `forward` (one host sync); set `coder.check_inputs = False` to skip it, and
call `check_finite` yourself where you want it.
"""

from __future__ import annotations

import math
import warnings
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlmscope.dictionaries import batchstats
from vlmscope.dictionaries.activations import Gather, SparseCodes, build_activation
from vlmscope.dictionaries.config import SparseCoderConfig
from vlmscope.dictionaries.kernels import (
    centred_linear,
    gathered_pre,
    sparse_decode,
    training_pre,
)
from vlmscope.dictionaries.topk import row_topk_indices, topk_among

if TYPE_CHECKING:
    import os


class NonFiniteError(ValueError):
    """An input tensor holds NaN or Inf values."""


def check_finite(name: str, tensor: Tensor) -> None:
    """Raise NonFiniteError naming `name` and counting NaN/Inf entries (one host sync)."""
    # A finite sum proves every entry finite (NaN and Inf propagate; Inf - Inf is NaN) at a
    # sixteenth of isfinite().all()'s cost; a non-finite sum may be overflow, so look closer.
    if bool(torch.isfinite(tensor.sum())):
        return
    finite = torch.isfinite(tensor)
    if bool(finite.all()):
        return
    n_nan = int(torch.isnan(tensor).sum())
    n_inf = int((~finite).sum()) - n_nan
    raise NonFiniteError(
        f"{name} has {n_nan} NaN and {n_inf} Inf values (of {tensor.numel()}, shape "
        f"{tuple(tensor.shape)}); dictionaries need finite activations"
    )


#: mean_norm scales found positive: id -> (weak reference, the tensor's version then)
_POSITIVE: dict[int, tuple[weakref.ref[Tensor], int]] = {}


def scale_is_set(scale: Tensor) -> bool:
    """Whether a mean_norm scale has been estimated (> 0), read from the device once per value
    of the tensor rather than per call: a training step asks twice per unit, and each read is a
    host sync on a GPU. An in-place change (init_from_data, load_state_dict) moves the tensor's
    version, and the next call reads it again."""
    try:
        version = scale._version
    except RuntimeError:  # an inference tensor keeps no version: read it every time
        return bool(scale > 0)
    seen = _POSITIVE.get(id(scale))
    if seen is not None and seen[0]() is scale and seen[1] == version:
        return True
    if not bool(scale > 0):
        return False
    if len(_POSITIVE) > 1024:
        for key in [k for k, (ref, _) in _POSITIVE.items() if ref() is None]:
            del _POSITIVE[key]
    _POSITIVE[id(scale)] = (weakref.ref(scale), version)
    return True


def fvu(target: Tensor, reconstruction: Tensor) -> Tensor:
    """Fraction of variance unexplained: SSE / sum of squared deviations from the batch mean.

    0 for an exact reconstruction, 1 for predicting the batch mean of `target` [N, D].
    """
    target = target.float()
    sse = (target - reconstruction.float()).pow(2).sum()
    sst = batchstats.total_variance(target)  # over the global batch when data-parallel
    return sse / sst.clamp_min(torch.finfo(sst.dtype).tiny)


def unit_norm_rows_(weight: Tensor) -> None:
    """Scale each row of `weight` viewed as [F, -1] to unit L2 norm, in place."""
    rows = weight.data.view(weight.shape[0], -1)
    rows.div_(rows.norm(dim=1, keepdim=True).clamp_min(torch.finfo(rows.dtype).eps))


def remove_parallel_grad_(weight: Tensor) -> None:
    """Project out of weight.grad (viewed as [F, -1]) its component along each row of weight."""
    if weight.grad is None:
        return
    rows = weight.data.view(weight.shape[0], -1)
    grad = weight.grad.view(weight.shape[0], -1)
    # grad -= (grad . w / w . w) w: three passes and no [F, d] temporary, where the unit rows'
    # form took six and three (16 vs 9 ms at 8,192 x 512 on 2 threads, benchmarks/README.md).
    # w . w as a squared norm and grad . w as a batched product: linalg.vecdot took 4.5 ms for
    # each at 8,192 x 512, the norm 0.35 and the product 3 (benchmarks/README.md, "The
    # decoder's parallel gradient, again")
    sq = torch.linalg.vector_norm(rows, dim=1).square().clamp_min(torch.finfo(rows.dtype).eps ** 2)
    dots = torch.bmm(grad.unsqueeze(1), rows.unsqueeze(2)).view(-1)
    grad.addcmul_(rows, (dots / sq).unsqueeze(1), value=-1)


def auxk_loss(
    pre: Tensor,
    dead: Tensor,
    target: Tensor,
    reconstruction: Tensor,
    decode: Callable[[SparseCodes], Tensor],
    aux_k: int,
    gather: Gather | None = None,
) -> Tensor:
    """AuxK (Gao et al. 2024): dead latents' top-aux_k activations reconstruct the residual
    target - reconstruction (detached).

    Returns scale * ||decode(aux codes) - residual||^2 / sst with scale = min(n_dead / aux_k, 1)
    (as in EleutherAI's sparsify) and sst the target's total variance; 0 when nothing is dead,
    before the residual and sst are computed (five [N, d] passes a step saved while no latent
    is dead). `gather(indices)` gives the differentiable pre-activations at the chosen entries
    (default: read them from `pre`, which then carries the gradient).
    """
    n_dead = int(dead.sum())
    if n_dead == 0:  # on every data-parallel rank alike (the dead mask is global), so no rank
        return pre.new_zeros((), dtype=torch.float32)  # waits in total_variance's all-reduce
    residual = (target - reconstruction).detach()
    sst = batchstats.total_variance(target)  # over the global batch when data-parallel
    k = min(aux_k, n_dead)
    scale = min(n_dead / aux_k, 1.0)
    indices = topk_among(pre.detach(), dead, k)
    values = pre.gather(1, indices) if gather is None else gather(indices)
    codes = SparseCodes(values.relu(), indices, pre.shape[1])
    err = (decode(codes).float() - residual.float()).pow(2).sum()
    return scale * err / sst.clamp_min(torch.finfo(sst.dtype).tiny)


@dataclass
class ForwardOutput:
    """What `SparseCoder.forward` returns.

    reconstruction: [N, d_out] in the caller's units. codes: SparseCodes. pre_acts: [N, F]
    encoder pre-activations (normalised space). fvu, auxk, sparsity: scalar losses (auxk is 0
    outside training or with no dead latents; sparsity is the JumpReLU L0 with its
    pseudo-gradient, else 0). l0: mean active latents per row (detached). loss: fvu +
    aux_k_coeff * auxk + sparsity_coeff * sparsity, what a trainer minimises.
    """

    reconstruction: Tensor
    codes: SparseCodes
    pre_acts: Tensor
    fvu: Tensor
    auxk: Tensor
    sparsity: Tensor
    l0: Tensor
    loss: Tensor


@torch.no_grad()
def init_transcoder_(m: nn.Module, normalize_decoder: bool) -> None:
    """Fresh transcoder weights (a SparseCoder or one CLT layer, which name them alike):
    encoder rows random unit vectors; decoder zero, or random unit rows (over all its targets
    together) with normalize_decoder; biases and skip zero."""
    m.W_enc.copy_(random_unit_rows(m.W_enc))
    if normalize_decoder:
        m.W_dec.copy_(random_unit_rows(m.W_dec))
    else:
        m.W_dec.zero_()
    m.b_enc.zero_()
    m.b_dec.zero_()
    if m.W_skip is not None:
        m.W_skip.zero_()


class SparseCoder(nn.Module):
    """An SAE (kind "sae") or transcoder (kind "transcoder"); see the module docstring."""

    input_scale: Tensor
    output_scale: Tensor
    num_tokens_since_fired: Tensor
    W_skip: nn.Parameter | None
    check_inputs: bool = True

    def __init__(
        self,
        cfg: SparseCoderConfig,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if cfg.kind not in ("sae", "transcoder"):
            raise ValueError(
                f"SparseCoder is for kind 'sae' or 'transcoder'; use CrossLayerTranscoder for "
                f"{cfg.kind!r}"
            )
        cfg.check_buildable()
        self.cfg = cfg
        f, d_in, d_out = cfg.num_latents, cfg.d_in, cfg.d_out
        kw = {"device": device, "dtype": dtype}
        self.W_enc = nn.Parameter(torch.empty(f, d_in, **kw))
        self.b_enc = nn.Parameter(torch.zeros(f, **kw))
        self.W_dec = nn.Parameter(torch.empty(f, d_out, **kw))
        self.b_dec = nn.Parameter(torch.zeros(d_out, **kw))
        self.W_skip = nn.Parameter(torch.zeros(d_out, d_in, **kw)) if cfg.skip_connection else None
        self.activation = build_activation(cfg)
        if device is not None or dtype is not None:
            self.activation.to(device=device, dtype=dtype)
        unset = 0.0 if cfg.normalize_activations == "mean_norm" else 1.0
        self.register_buffer("input_scale", torch.full((), unset, device=device))
        self.register_buffer("output_scale", torch.full((), unset, device=device))
        self.register_buffer(
            "num_tokens_since_fired", torch.zeros(f, dtype=torch.int64, device=device)
        )
        self.reset_parameters()

    # ---------------------------------------------------------------- init

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Random init as in the TopK-SAE literature.

        SAE: decoder rows random unit vectors, W_enc = W_dec^T (Gao et al. 2024).
        Transcoder: encoder rows random unit vectors; decoder zero (as in EleutherAI's
        sparsify), so the initial output is b_dec, or random unit rows when normalize_decoder
        is set (a zero row has no direction to keep). `init_from_data` then solves for the
        zero decoder on the sample (`fit_decoder_to_data_`).
        """
        cfg = self.cfg
        if cfg.kind == "sae":
            self.W_dec.copy_(random_unit_rows(self.W_dec))
            # Both are stored [F, d]: "W_enc = W_dec^T" means equal rows here.
            self.W_enc.copy_(self.W_dec)
            self.b_enc.zero_()
            self.b_dec.zero_()
        else:
            init_transcoder_(self, bool(cfg.normalize_decoder))

    @torch.no_grad()
    def init_from_data(self, x: Tensor, y: Tensor | None = None) -> None:
        """Fit the data-dependent part of the init on a sample (see `fit_init_to_data_`):
        normalisation scales (if any), b_dec = the target's mean, centred pre-activations, the
        encoder's scale (SAEs) and the least-squares decoder (transcoders without unit-norm
        decoder rows). x: [N, d_in] inputs; y: [N, d_out] targets (transcoders only)."""
        target = self._target(x, y)
        check_finite("init_from_data x", x)
        check_finite("init_from_data y", target)
        cfg = self.cfg
        fit_decoder = cfg.kind == "transcoder" and not cfg.normalize_decoder
        mean_norm = cfg.normalize_activations == "mean_norm"
        decoder = self.W_dec if fit_decoder else None
        init_unit_from_data_(self, x, target, mean_norm, sae=cfg.kind == "sae", decoder=decoder)

    # ---------------------------------------------------------------- properties

    @property
    def num_latents(self) -> int:
        return self.cfg.num_latents

    def dead_mask(self) -> Tensor:
        """[F] bool: latents that have not fired for `dead_tokens_threshold` training rows."""
        return self.num_tokens_since_fired >= self.cfg.dead_tokens_threshold

    # ---------------------------------------------------------------- maps

    def pre_activations(self, x: Tensor) -> Tensor:
        """[N, F] encoder pre-activations of inputs x [N, d_in] (normalised space)."""
        self._check_shape("x", x, self.cfg.d_in)
        return self._pre(self._scale_in(x))

    def encode(self, x: Tensor) -> SparseCodes:
        """Sparse codes of inputs x [N, d_in]."""
        self._check_shape("x", x, self.cfg.d_in)
        return self._encode_n(self._scale_in(x))[1]

    def decode(self, codes: SparseCodes, x: Tensor | None = None) -> Tensor:
        """[N, d_out] output of `codes`, in the caller's units; x is needed for W_skip."""
        x_n = None
        if self.W_skip is not None:
            if x is None:
                raise ValueError("decode: this transcoder has a skip connection; pass x")
            self._check_shape("x", x, self.cfg.d_in)
            x_n = self._scale_in(x)
        return self._decode_n(codes, x_n) / self._scale(self.output_scale)

    def forward(self, x: Tensor, y: Tensor | None = None) -> ForwardOutput:
        """Encode x [N, d_in], decode, and compute the losses against y (SAE: against x)."""
        target = self._target(x, y)
        self._check_shape("x", x, self.cfg.d_in)
        self._check_shape("y", target, self.cfg.d_out)
        if x.shape[0] != target.shape[0]:
            raise ValueError(f"x has {x.shape[0]} rows but y has {target.shape[0]}")
        if self.check_inputs:
            check_finite("x", x)
            if y is not None:
                check_finite("y", y)
        x_n = self._scale_in(x)
        out_scale = self._scale(self.output_scale)
        target_n = target.to(self.W_dec.dtype) * out_scale
        pre, codes, gather = self._encode_n(x_n)
        recon_n = self._decode_n(codes, x_n)
        loss_fvu = fvu(target_n, recon_n)

        auxk = pre.new_zeros((), dtype=torch.float32)
        if self.training:
            dead = self.dead_mask()
            self._update_dead(codes, x.shape[0])
            if self.cfg.aux_k_coeff > 0:
                auxk = auxk_loss(
                    pre,
                    dead,
                    target_n,
                    recon_n,
                    lambda c: sparse_decode(c.values, c.indices, self.W_dec),
                    self.cfg.aux_k or max(self.cfg.d_out // 2, 1),
                    gather,
                )
        sparsity = self.activation.sparsity_loss(pre).float()
        loss = loss_fvu + self.cfg.aux_k_coeff * auxk + self.cfg.sparsity_coeff * sparsity
        return ForwardOutput(
            reconstruction=recon_n / out_scale,
            codes=codes,
            pre_acts=pre,
            fvu=loss_fvu,
            auxk=auxk,
            sparsity=sparsity,
            l0=codes.l0().float().mean().detach(),
            loss=loss,
        )

    # ---------------------------------------------------------------- decoder norm

    @torch.no_grad()
    def set_decoder_norm_to_unit_norm(self) -> None:
        """Rescale decoder rows to unit norm (trainer: after each optimiser step)."""
        unit_norm_rows_(self.W_dec)

    @torch.no_grad()
    def remove_gradient_parallel_to_decoder_directions(self) -> None:
        """Drop the gradient component that would change decoder row norms (before the step)."""
        remove_parallel_grad_(self.W_dec)

    # ---------------------------------------------------------------- files

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write `path/cfg.json` and `path/sae.safetensors` (see io.py); returns the folder."""
        from vlmscope.dictionaries.io import save_sparse_coder

        return save_sparse_coder(self, path)

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str],
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> SparseCoder:
        """Read a folder written by `save`, checking tensors against its config."""
        from vlmscope.dictionaries.io import load_sparse_coder

        return load_sparse_coder(path, device=device, dtype=dtype)

    # ---------------------------------------------------------------- internals

    def _target(self, x: Tensor, y: Tensor | None) -> Tensor:
        if self.cfg.kind == "sae":
            if y is not None:
                raise ValueError("an SAE reconstructs its input; do not pass y")
            return x
        if y is None:
            raise ValueError("a transcoder needs the target y (e.g. the MLP output) as well as x")
        return y

    def _check_shape(self, name: str, t: Tensor, width: int) -> None:
        if t.ndim != 2 or t.shape[1] != width:
            raise ValueError(
                f"{type(self).__name__}: {name} must be [N, {width}], got {tuple(t.shape)}"
            )

    def _scale(self, scale: Tensor) -> Tensor:
        if self.cfg.normalize_activations == "mean_norm" and not scale_is_set(scale):
            raise RuntimeError(
                "normalize_activations='mean_norm' but the scale is not estimated yet; call "
                "init_from_data(x, y) with a sample of activations first"
            )
        return scale.to(self.W_enc.dtype)

    def _scale_in(self, x: Tensor) -> Tensor:
        return x.to(self.W_enc.dtype) * self._scale(self.input_scale)

    def _centre(self) -> Tensor | None:
        return self.b_dec if self.cfg.kind == "sae" else None

    def _pre(self, x_n: Tensor) -> Tensor:
        return centred_linear(x_n, self.W_enc, self.b_enc, self._centre())

    def _encode_n(self, x_n: Tensor) -> tuple[Tensor, SparseCodes, Gather | None]:
        """(pre, codes, gather) of normalised inputs. Under autograd with an activation that
        has a sparse forward, `pre` is computed without autograd and the codes' backward costs
        the kept entries only (kernels.gathered_pre); `gather` reads more entries (AuxK)."""
        if not (torch.is_grad_enabled() and self.activation.sparse_backward):
            pre = self._pre(x_n)
            return pre, self.activation(pre), None
        centre = self._centre()
        with torch.no_grad():
            pre = training_pre(x_n, self.W_enc, self.b_enc, centre)

        def gather(indices: Tensor) -> Tensor:
            return gathered_pre(x_n, self.W_enc, self.b_enc, centre, indices, pre)

        return pre, self.activation.forward_sparse(pre, gather), gather

    def _decode_n(self, codes: SparseCodes, x_n: Tensor | None) -> Tensor:
        if codes.num_latents != self.num_latents:
            raise ValueError(
                f"codes have {codes.num_latents} latents, this coder {self.num_latents}"
            )
        out = sparse_decode(codes.values, codes.indices, self.W_dec) + self.b_dec
        if self.W_skip is not None:
            assert x_n is not None
            out = out + F.linear(x_n, self.W_skip)
        return out

    @torch.no_grad()
    def _update_dead(self, codes: SparseCodes, n_rows: int) -> None:
        update_dead_counter_(self.num_tokens_since_fired, codes, n_rows)


def update_dead_counter_(counter: Tensor, codes: SparseCodes, n_rows: int) -> None:
    """Add n_rows to every latent's counter and reset those active in `codes` to 0 (over the
    global batch when data-parallel: its rows, and latents active on any rank)."""
    # Inactive entries point past the end: one index_fill_ marks the fired latents, without
    # boolean indexing's nonzero and index_put (133 against 395 us for the toy's 512 x 32 codes).
    hit = torch.where(codes.active(), codes.indices.long(), counter.shape[0]).reshape(-1)
    fired = torch.zeros(counter.shape[0] + 1, dtype=torch.int32, device=counter.device)
    fired = fired.index_fill_(0, hit, 1)[:-1]
    if batchstats.active():
        counter += batchstats.rows(n_rows, counter.device)
        fired = batchstats.all_max(fired)
    else:
        counter += n_rows
    counter.masked_fill_(fired.bool(), 0)


CENTRING_GRID: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
"""Shares of the sample mean the init may remove from the encoder's input (see below)."""

CENTRING_CHUNK_BYTES = 1 << 28
"""Bound on `choose_centring`'s [rows, latents] temporaries (it scores rows in chunks)."""


@torch.no_grad()
def init_unit_from_data_(
    unit: Any, x: Tensor, target: Tensor, mean_norm: bool, *, sae: bool, decoder: Tensor | None
) -> None:
    """`init_from_data` of one encoder/decoder pair (an SAE, a transcoder, a CLT layer: its
    W_enc, b_enc, b_dec, activation and scales) on a sample x [N, d_in] with its target
    [N, d_out]: the scales (`mean_norm`), b_dec = the target's mean, `fit_init_to_data_`
    (an SAE centres on b_dec), then, given the `decoder` [F, d_out] to fit (wherever its
    owner keeps it), `fit_decoder_to_data_`."""
    if mean_norm:
        unit.input_scale.fill_(mean_norm_scale(x))
        unit.output_scale.fill_(mean_norm_scale(target))
    target_n = target.float() * unit.output_scale
    unit.b_dec.copy_(batchstats.mean_rows(target_n))
    dtype = unit.W_enc.dtype
    x_n = x.to(dtype) * unit.input_scale.to(dtype)
    fit_init_to_data_(unit, x_n, unit.b_dec if sae else None)
    if decoder is not None:  # a transcoder's or CLT layer's: no centre in its pre-activations
        codes = codes_at_init(unit.activation, F.linear(x_n, unit.W_enc, unit.b_enc))
        fit_decoder_to_data_(decoder, codes, target_n - unit.b_dec)


@torch.no_grad()
def fit_init_to_data_(unit: Any, x_n: Tensor, centre: Tensor | None) -> None:
    """The data-dependent init of one encoder/decoder pair (an SAE, a transcoder, a CLT layer)
    on a sample x_n [N, d_in] of normalised inputs; `centre` is an SAE's b_dec, else None.

    1. Centred pre-activations. TopK ranks latents within each row, so what matters is which
       direction decides the ranking.
       - SAEs: b_enc = -W_enc mean(x_n - centre), so pre = W_enc (x_n - mean(x_n)): the rows'
         deviations from the mean are what an SAE reconstructs.
       - Transcoders and CLT layers: pre = W_enc (x_n - a mean(x_n)), i.e.
         b_enc = -a W_enc mean(x_n), with the share a chosen on the sample by
         `choose_centring`. Uncentred (a = 0), a mean far from 0 (the residual stream's)
         picks the latents most aligned with the mean for every row alike. Fully centred
         (a = 1), rows much shorter than the mean (a stream with image tokens mixes clusters
         of norms ~4x apart) all become about -mean and share one top-k, though the target
         (an MLP's output, a function of the normed row) differs between them. The share that
         spreads the sample's choices over the most latents is taken: a = 1 on the toy's text
         rows, 0.25 on its rows with images (benchmarks/README.md, "Initialisation"). For
         SAEs the same rule picked 0.25 on rows with images and trained worse (held-out FVU
         0.025 against 0.023), so they stay fully centred.
    2. Encoder scale, for decoders that already point somewhere (SAEs): with unit decoder rows
       and W_enc = W_dec, the codes are the projections of x onto the k chosen rows, and their
       sum overshoots: the chosen rows all lean towards x, so they add up to more than x. On
       isotropic data with d = 128, F = 1024, k = 32 the squared cosines of the chosen rows sum
       to S ~ 1.2, and the reconstruction error is 1 - 2sS + s^2 (S + S^2) of ||x||^2 for an
       encoder scale s: 1.25 at s = 1 (worse than predicting the mean), 0.45 at the best
       s = 1/(1 + S). sparsify's nn.Linear init (rows of norm ~0.58) lands near that by the
       width-independent constant of its uniform init; here the least-squares scale
       s = <x, r> / ||r||^2 of the sample's reconstructions r at s = 1 is computed exactly,
       so it holds for any width, k and data. TopK and BatchTopK choose the same latents at
       any positive scale, so the chosen set and its fit stay consistent.
    Transcoders and CLTs start with a zero decoder (as in sparsify): their output starts at
    b_dec, the target's mean; step 2 is for SAEs. Their `init_from_data` then solves for the
    decoder into the source's own layer (`fit_decoder_to_data_`); a CLT's decoders into later
    layers grow from the codes' gradient. JumpReLU is left fully centred and at its scale: its
    codes depend on the scale through its threshold.
    """
    act = unit.activation
    # Means and sums over the global batch when data-parallel, so every rank inits the same.
    mean = batchstats.mean_rows(x_n).to(unit.W_enc.dtype)
    if centre is None:
        shift = choose_centring(unit.W_enc, x_n, mean, getattr(act, "k", None)) * mean
    else:
        shift = mean - centre.to(mean.dtype)
    unit.b_enc.copy_(-(shift @ unit.W_enc.T))
    if centre is None or act.name == "jumprelu":
        return
    xc = x_n - centre
    codes = codes_at_init(act, F.linear(xc, unit.W_enc, unit.b_enc))
    recon = sparse_decode(codes.values, codes.indices, unit.W_dec).float()
    dot = batchstats.all_sum((xc.float() * recon).sum())
    scale = float(dot / batchstats.all_sum(recon.pow(2).sum()).clamp_min(1e-30))
    if math.isfinite(scale) and scale > 0:
        unit.W_enc.mul_(scale)
        unit.b_enc.mul_(scale)


def codes_at_init(act: Any, pre: Tensor) -> SparseCodes:
    """The activation's training-mode codes of `pre`, leaving its running statistics (a
    BatchTopK threshold) as they were: the init's sample is not a training step."""
    was_training, was_tracking = act.training, act.track_statistics
    act.train()
    act.track_statistics = False
    try:
        return act(pre)
    finally:
        act.train(was_training)
        act.track_statistics = was_tracking


LSTSQ_ROWS = 2048
"""Rows of the first batch a transcoder's least-squares decoder init reads at most: its dual
form solves a [rows, rows] system (16 MB and well under a second at 2,048)."""


@torch.no_grad()
def fit_decoder_to_data_(W_dec: Tensor, codes: SparseCodes, target: Tensor) -> None:
    """W_dec [F, d] := the ridge least-squares decoder of `target` [N, d] (centred: b_dec is
    the mean) from the init's `codes`, on the global batch's first LSTSQ_ROWS rows.

    Why: a zero decoder (sparsify's transcoder init) grows about one learning rate per step,
    so the first steps reconstruct little. Solving for the decoder the encoder's first codes
    call for starts it where those steps would head: on the toy's layer 2 at the trainer's
    defaults the held-out FVU after 40,960 tokens fell from 0.050 to 0.044 (text rows) and
    0.084 to 0.081 (rows with images), and on the zoo's LLaVA from 0.211 to 0.201 and 0.174 to
    0.162 (benchmarks/README.md, "A least-squares decoder at init").

    Dual form, W = C^T (C C^T + r I)^-1 target with C the [N, F] codes, so the system is
    [N, N] however wide the dictionary, and C stays sparse. The ridge r is the mean squared
    code norm (diag of C C^T): measured flat between 0.3x and 3x that. Latents that never fire
    in the sample keep zero rows. Every data-parallel rank gathers the same rows, so each
    solves the system one process would."""
    # A rank's share of the global batch's first LSTSQ_ROWS rows is among its own first
    # LSTSQ_ROWS: cut before gathering, so no rank receives every rank's whole batch.
    values = codes.values[:LSTSQ_ROWS].float()
    indices = codes.indices[:LSTSQ_ROWS].long()
    target = target[:LSTSQ_ROWS].float()
    # codes packed per batch (BatchTopK, JumpReLU) are as wide as the batch's busiest row:
    # zero entries pad every rank's to the widest, so the rows can be gathered
    width = int(batchstats.all_max(torch.tensor(values.shape[1], device=values.device)))
    values = batchstats.gather_rows(F.pad(values, (0, width - values.shape[1])))[:LSTSQ_ROWS]
    indices = batchstats.gather_rows(F.pad(indices, (0, width - indices.shape[1])))[:LSTSQ_ROWS]
    target = batchstats.gather_rows(target)[:LSTSQ_ROWS]
    n, k = values.shape
    if n == 0 or k == 0:
        return
    rows = torch.arange(n, device=values.device).repeat_interleave(k)
    with warnings.catch_warnings():  # torch's notes that sparse tensors are in beta: noise here
        warnings.simplefilter("ignore")
        c = torch.sparse_coo_tensor(
            torch.stack([rows, indices.reshape(-1)]),
            values.reshape(-1),
            (n, W_dec.shape[0]),
            check_invariants=False,
        ).coalesce()
        gram = torch.sparse.mm(c, c.t()).to_dense()
        ridge = float(gram.diagonal().mean())
        if not (math.isfinite(ridge) and ridge > 0):  # no code fired: keep the zero decoder
            return
        gram.diagonal().add_(ridge)
        W_dec.copy_(torch.sparse.mm(c.t(), torch.linalg.solve(gram, target)).to(W_dec.dtype))


@torch.no_grad()
def choose_centring(W_enc: Tensor, x_n: Tensor, mean: Tensor, k: int | None) -> float:
    """The share a in CENTRING_GRID of `mean` to remove from the encoder's input at init: the
    one whose per-row top-k latents of W_enc (x_n - a mean) are spread most evenly over the
    latents (highest perplexity of their counts over the sample; ties to the larger share).
    1.0 without a k (JumpReLU). Counts are summed over the data-parallel group, so every rank
    picks the same share."""
    if k is None:
        return 1.0
    x = x_n.to(W_enc.dtype)
    k = min(k, W_enc.shape[0])
    chunk = max(1, CENTRING_CHUNK_BYTES // (W_enc.shape[0] * W_enc.element_size()))
    best, best_ppl = 1.0, -math.inf
    for share in sorted(CENTRING_GRID, reverse=True):
        counts = torch.zeros(W_enc.shape[0], device=W_enc.device)
        for rows in x.split(chunk):
            chosen = row_topk_indices(F.linear(rows - share * mean, W_enc), k)
            counts += torch.bincount(chosen.flatten(), minlength=W_enc.shape[0])
        p = batchstats.all_sum(counts)
        p = p[p > 0] / p.sum()
        ppl = float(torch.exp(-(p * p.log()).sum()))
        if ppl > best_ppl * (1 + 1e-6):
            best, best_ppl = share, ppl
    return best


def random_unit_rows(like: Tensor) -> Tensor:
    """Gaussian tensor shaped like `like` with each row (viewed as [F, -1]) of unit norm."""
    out = torch.randn(like.shape, device=like.device, dtype=like.dtype)
    unit_norm_rows_(out)
    return out


def mean_norm_scale(x: Tensor) -> float:
    """sqrt(width) / mean row L2 norm: scales x so that its mean row norm is sqrt(width)."""
    norms = x.float().norm(dim=1)
    mean_norm = (
        float(batchstats.mean_rows(norms[:, None])[0])
        if batchstats.active()
        else float(norms.mean())
    )
    if not mean_norm > 0:
        raise ValueError("cannot estimate a normalisation scale from all-zero activations")
    return math.sqrt(x.shape[1]) / mean_norm
