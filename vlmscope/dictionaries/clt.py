"""CrossLayerTranscoder: per-layer encoders, decoders that write to later layers.

Source layer l encodes x_l (the resid_mid of layer l) into codes a_l with its own encoder and
activation. Its decoder W_dec_l [F, n_out(l), d_out] writes to target layers
l .. l + n_out(l) - 1, n_out(l) = min(n_targets or L, L - l). The output of target t is

    y_t = b_dec_t [+ W_skip_t x_t] + sum over sources s <= t with t < s + n_out(s) of
          W_dec_s[:, t - s]^T a_s

Everything tied to one layer index (its encoder, its decoder, the bias/skip/scales of its
target, its dead-latent counter) lives in `layers[l]`, which is also what one file holds.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlmscope.dictionaries import batchstats
from vlmscope.dictionaries.activations import Gather, SparseCodes, build_activation
from vlmscope.dictionaries.coder import (
    check_finite,
    fvu,
    init_transcoder_,
    init_unit_from_data_,
    remove_parallel_grad_,
    scale_is_set,
    unit_norm_rows_,
    update_dead_counter_,
)
from vlmscope.dictionaries.config import SparseCoderConfig
from vlmscope.dictionaries.kernels import gathered_pre, sparse_decode, training_pre
from vlmscope.dictionaries.topk import topk_among

if TYPE_CHECKING:
    import os


@dataclass
class CLTForwardOutput:
    """What `CrossLayerTranscoder.forward` returns.

    reconstruction: per target layer [N, d_out], caller's units. codes, pre_acts: per source
    layer. fvu: sum over target layers of each layer's FVU (fvu_per_layer [L]); auxk: AuxK
    summed the same way; sparsity: JumpReLU L0 summed over layers; l0: active latents per row
    summed over layers (l0_per_layer [L], detached). loss: fvu + aux_k_coeff * auxk +
    sparsity_coeff * sparsity.
    """

    reconstruction: list[Tensor]
    codes: list[SparseCodes]
    pre_acts: list[Tensor]
    fvu: Tensor
    fvu_per_layer: Tensor
    auxk: Tensor
    sparsity: Tensor
    l0: Tensor
    l0_per_layer: Tensor
    loss: Tensor


class CLTLayer(nn.Module):
    """The parameters and state of layer l of a CLT (source l and target l)."""

    input_scale: Tensor
    output_scale: Tensor
    num_tokens_since_fired: Tensor
    W_skip: nn.Parameter | None

    def __init__(
        self,
        cfg: SparseCoderConfig,
        layer: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.layer = layer
        f, d_in, d_out, n_out = cfg.num_latents, cfg.d_in, cfg.d_out, cfg.n_out(layer)
        kw = {"device": device, "dtype": dtype}
        self.W_enc = nn.Parameter(torch.empty(f, d_in, **kw))
        self.b_enc = nn.Parameter(torch.zeros(f, **kw))
        self.W_dec = nn.Parameter(torch.empty(f, n_out, d_out, **kw))
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

    @property
    def n_out(self) -> int:
        """Number of target layers this layer's decoder writes to."""
        return self.W_dec.shape[1]


class CrossLayerTranscoder(nn.Module):
    """A CLT over `cfg.n_layers` layers (see the module docstring)."""

    check_inputs: bool = True

    def __init__(
        self,
        cfg: SparseCoderConfig,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if cfg.kind != "clt":
            raise ValueError(f"CrossLayerTranscoder needs kind='clt', got {cfg.kind!r}")
        cfg.check_buildable()
        self.cfg = cfg
        self.layers = nn.ModuleList(
            CLTLayer(cfg, layer, device, dtype) for layer in range(cfg.n_layers)
        )
        self.reset_parameters()

    # ---------------------------------------------------------------- init

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Encoder rows random unit vectors; decoders zero (random unit rows with
        normalize_decoder); biases and skips zero."""
        for layer in self._layers():
            init_layer_(layer, bool(self.cfg.normalize_decoder))

    @torch.no_grad()
    def init_from_data(self, xs: Sequence[Tensor], ys: Sequence[Tensor]) -> None:
        """Per layer: estimate normalisation scales (if any), set b_dec_t to mean(y_t),
        centre the encoder's pre-activations (the share of the sample's mean that
        coder.choose_centring picks, in coder.fit_init_to_data_) and, without unit-norm
        decoder rows, fit the decoder to its own layer's target as a per-layer transcoder's
        is (coder.fit_decoder_to_data_); decoders to later layers start at zero."""
        xs, ys = self._as_lists(xs, ys)
        for layer, x, y in zip(self._layers(), xs, ys, strict=True):
            self._init_layer_from_data(layer, x, y, layer.W_dec[:, 0])

    @torch.no_grad()
    def _init_layer_from_data(
        self, layer: CLTLayer, x: Tensor, y: Tensor, own_decoder: Tensor
    ) -> None:
        """init_from_data of one layer: its source encoder, its target's bias/scales and
        `own_decoder` [F, d_out], the source's decoder into its own layer (wherever a
        sharded CLT keeps it)."""
        check_finite(f"init_from_data xs[{layer.layer}]", x)
        check_finite(f"init_from_data ys[{layer.layer}]", y)
        mean_norm = self.cfg.normalize_activations == "mean_norm"
        decoder = None if self.cfg.normalize_decoder else own_decoder
        init_unit_from_data_(layer, x, y, mean_norm, sae=False, decoder=decoder)

    # ---------------------------------------------------------------- properties

    @property
    def n_layers(self) -> int:
        return self.cfg.n_layers

    @property
    def num_latents(self) -> int:
        return self.cfg.num_latents

    @property
    def b_dec(self) -> Tensor:
        """[L, d_out] decoder biases of the target layers (a stacked copy, for reading)."""
        return torch.stack([layer.b_dec for layer in self._layers()])

    def dead_mask(self) -> Tensor:
        """[L, F] bool: latents of each source layer that have not fired for a while."""
        counters = torch.stack([layer.num_tokens_since_fired for layer in self._layers()])
        return counters >= self.cfg.dead_tokens_threshold

    # ---------------------------------------------------------------- maps

    def pre_activations(self, xs: Sequence[Tensor]) -> list[Tensor]:
        """Per source layer, [N, F] encoder pre-activations (normalised space)."""
        xs = self._as_list("xs", xs, self.cfg.d_in)
        return [
            self._pre(layer, self._scale_in(layer, x))
            for layer, x in zip(self._layers(), xs, strict=True)
        ]

    def encode(self, xs: Sequence[Tensor]) -> list[SparseCodes]:
        """Per source layer, the sparse codes of xs[l] [N, d_in]."""
        xs = self._as_list("xs", xs, self.cfg.d_in)
        return [
            self._encode_n(layer, self._scale_in(layer, x))[1]
            for layer, x in zip(self._layers(), xs, strict=True)
        ]

    def decode(
        self, codes: Sequence[SparseCodes], xs: Sequence[Tensor] | None = None
    ) -> list[Tensor]:
        """Per target layer, [N, d_out] outputs in the caller's units (xs needed for W_skip)."""
        if len(codes) != self.n_layers:
            raise ValueError(f"decode: expected codes for {self.n_layers} layers, got {len(codes)}")
        xs_n: list[Tensor] | None = None
        if self.cfg.skip_connection:
            if xs is None:
                raise ValueError("decode: this CLT has skip connections; pass xs")
            xs_list = self._as_list("xs", xs, self.cfg.d_in)
            xs_n = [
                self._scale_in(layer, x) for layer, x in zip(self._layers(), xs_list, strict=True)
            ]
        outs = self._decode_n(codes, xs_n)
        return [
            out / self._scale(layer.output_scale)
            for layer, out in zip(self._layers(), outs, strict=True)
        ]

    def encode_layer(self, layer: int, x: Tensor) -> SparseCodes:
        """Codes of source `layer` alone, for models run layer by layer (a replacement model
        whose later inputs depend on earlier reconstructions)."""
        lay = self._layers()[layer]
        return self._encode_n(lay, self._scale_in(lay, x))[1]

    def decode_layer(
        self, target: int, codes: Mapping[int, SparseCodes], x: Tensor | None = None
    ) -> Tensor:
        """Output of target layer `target` [N, d_out] in the caller's units, from the codes of
        every source s <= target whose window reaches it (all must be in `codes`). `x` is the
        target layer's own input, needed only with skip connections."""
        layers = self._layers()
        lay = layers[target]
        out: Tensor | None = None
        for s in range(target + 1):
            src = layers[s]
            if target - s >= src.n_out:
                continue
            if s not in codes:
                raise KeyError(f"decode_layer({target}): codes of source layer {s} are missing")
            c = codes[s]
            part = sparse_decode(c.values, c.indices, src.W_dec[:, target - s])
            out = part if out is None else out + part
        assert out is not None  # source `target` always reaches its own layer
        out = out + lay.b_dec
        if lay.W_skip is not None:
            if x is None:
                raise ValueError("decode_layer: this CLT has skip connections; pass x")
            out = out + F.linear(self._scale_in(lay, x), lay.W_skip)
        return out / self._scale(lay.output_scale)

    def forward(self, xs: Sequence[Tensor], ys: Sequence[Tensor]) -> CLTForwardOutput:
        """Encode every layer, decode into every target, and compute the losses."""
        xs, ys = self._as_lists(xs, ys)
        layers = self._layers()
        xs_n, ys_n, encoded = self._encode_training(layers, xs, ys, self.check_inputs)
        pres = [pre for pre, _, _ in encoded]
        codes = [c for _, c, _ in encoded]
        recons_n = self._decode_n(codes, xs_n)
        fvus = torch.stack([fvu(y_n, r_n) for y_n, r_n in zip(ys_n, recons_n, strict=True)])

        auxk = pres[0].new_zeros((), dtype=torch.float32)
        if self.training:
            dead = self.dead_mask()
            for layer, c in zip(layers, codes, strict=True):
                update_dead_counter_(layer.num_tokens_since_fired, c, xs[0].shape[0])
            if self.cfg.aux_k_coeff > 0:
                auxk = self._auxk(pres, dead, ys_n, recons_n, [g for _, _, g in encoded])
        sparsity = torch.stack(
            [
                layer.activation.sparsity_loss(pre).float()
                for layer, pre in zip(layers, pres, strict=True)
            ]
        ).sum()
        l0s = torch.stack([c.l0().float().mean() for c in codes]).detach()
        loss = fvus.sum() + self.cfg.aux_k_coeff * auxk + self.cfg.sparsity_coeff * sparsity
        return CLTForwardOutput(
            reconstruction=[
                r / self._scale(layer.output_scale)
                for layer, r in zip(layers, recons_n, strict=True)
            ],
            codes=codes,
            pre_acts=pres,
            fvu=fvus.sum(),
            fvu_per_layer=fvus.detach(),
            auxk=auxk,
            sparsity=sparsity,
            l0=l0s.sum(),
            l0_per_layer=l0s,
            loss=loss,
        )

    def _encode_training(
        self, layers: Sequence[CLTLayer], xs: Sequence[Tensor], ys: Sequence[Tensor], check: bool
    ) -> tuple[list[Tensor], list[Tensor], list[tuple[Tensor, SparseCodes, Gather | None]]]:
        """Normalised inputs and targets of `layers` (a CLT's, or a shard's) and the
        (pre, codes, gather) of each as a source; `check`: refuse non-finite inputs first."""
        if check:
            for layer, x, y in zip(layers, xs, ys, strict=True):
                check_finite(f"xs[{layer.layer}]", x)
                check_finite(f"ys[{layer.layer}]", y)
        xs_n = [self._scale_in(layer, x) for layer, x in zip(layers, xs, strict=True)]
        ys_n = [
            y.to(layer.b_dec.dtype) * self._scale(layer.output_scale)
            for layer, y in zip(layers, ys, strict=True)
        ]
        encoded = [self._encode_n(layer, x_n) for layer, x_n in zip(layers, xs_n, strict=True)]
        return xs_n, ys_n, encoded

    # ---------------------------------------------------------------- decoder norm

    @torch.no_grad()
    def set_decoder_norm_to_unit_norm(self) -> None:
        """Rescale each latent's whole decoder (all its target layers together) to unit norm."""
        for layer in self._layers():
            unit_norm_rows_(layer.W_dec)

    @torch.no_grad()
    def remove_gradient_parallel_to_decoder_directions(self) -> None:
        """Drop the gradient component along each latent's (flattened) decoder."""
        for layer in self._layers():
            remove_parallel_grad_(layer.W_dec)

    # ---------------------------------------------------------------- files

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write `path/config.json` and `path/layer_{l}.safetensors` (see io.py)."""
        from vlmscope.dictionaries.io import save_clt

        return save_clt(self, path)

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str],
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> CrossLayerTranscoder:
        """Read a folder written by `save`, checking tensors against its config."""
        from vlmscope.dictionaries.io import load_clt

        return load_clt(path, device=device, dtype=dtype)

    # ---------------------------------------------------------------- internals

    def _layers(self) -> list[CLTLayer]:
        return list(self.layers)  # type: ignore[arg-type]

    def _as_list(self, name: str, ts: Sequence[Tensor], width: int) -> list[Tensor]:
        ts = list(ts)
        if len(ts) != self.n_layers:
            raise ValueError(f"{name}: expected {self.n_layers} layers, got {len(ts)}")
        for i, t in enumerate(ts):
            if t.ndim != 2 or t.shape[1] != width:
                raise ValueError(f"{name}[{i}] must be [N, {width}], got {tuple(t.shape)}")
            if t.shape[0] != ts[0].shape[0]:
                raise ValueError(f"{name}[{i}] has {t.shape[0]} rows, {name}[0] {ts[0].shape[0]}")
        return ts

    def _as_lists(
        self, xs: Sequence[Tensor], ys: Sequence[Tensor]
    ) -> tuple[list[Tensor], list[Tensor]]:
        xs = self._as_list("xs", xs, self.cfg.d_in)
        ys = self._as_list("ys", ys, self.cfg.d_out)
        if xs[0].shape[0] != ys[0].shape[0]:
            raise ValueError(f"xs have {xs[0].shape[0]} rows but ys have {ys[0].shape[0]}")
        return xs, ys

    def _scale(self, scale: Tensor) -> Tensor:
        if self.cfg.normalize_activations == "mean_norm" and not scale_is_set(scale):
            raise RuntimeError(
                "normalize_activations='mean_norm' but the scales are not estimated yet; call "
                "init_from_data(xs, ys) with a sample of activations first"
            )
        return scale.to(self.layers[0].W_enc.dtype)

    def _scale_in(self, layer: CLTLayer, x: Tensor) -> Tensor:
        return x.to(layer.W_enc.dtype) * self._scale(layer.input_scale)

    @staticmethod
    def _pre(layer: CLTLayer, x_n: Tensor) -> Tensor:
        return F.linear(x_n, layer.W_enc, layer.b_enc)

    @classmethod
    def _encode_n(cls, layer: CLTLayer, x_n: Tensor) -> tuple[Tensor, SparseCodes, Gather | None]:
        """(pre, codes, gather) of one source layer, as SparseCoder._encode_n: with a sparse
        activation under autograd, the encoder backward costs the kept entries only."""
        if not (torch.is_grad_enabled() and layer.activation.sparse_backward):
            pre = cls._pre(layer, x_n)
            return pre, layer.activation(pre), None
        with torch.no_grad():
            pre = training_pre(x_n, layer.W_enc, layer.b_enc, None)

        def gather(indices: Tensor) -> Tensor:
            return gathered_pre(x_n, layer.W_enc, layer.b_enc, None, indices, pre)

        return pre, layer.activation.forward_sparse(pre, gather), gather

    def _decode_sources(self, codes: Sequence[SparseCodes], n_rows: int) -> list[Tensor]:
        """Per target, the sum of decoder contributions (no bias, no skip)."""
        layers = self._layers()
        outs: list[Tensor | None] = [None] * self.n_layers
        for s, (layer, c) in enumerate(zip(layers, codes, strict=True)):
            if c.num_latents != self.num_latents or c.values.shape[0] != n_rows:
                raise ValueError(
                    f"codes[{s}]: expected {n_rows} rows over {self.num_latents} latents, got "
                    f"{c.values.shape[0]} rows over {c.num_latents}"
                )
            f, n_out, d = layer.W_dec.shape
            contrib = sparse_decode(c.values, c.indices, layer.W_dec.reshape(f, n_out * d))
            # unbind, not contrib[:, j]: its backward stacks the targets' gradients once, where
            # each select's fills a zero [rows, n_out, d] and adds it (n_out^2 rows x d traffic)
            for j, part in enumerate(contrib.view(n_rows, n_out, d).unbind(1)):
                prev = outs[s + j]
                outs[s + j] = part if prev is None else prev + part
        return [
            o if o is not None else layers[0].b_dec.new_zeros(n_rows, self.cfg.d_out) for o in outs
        ]

    def _decode_n(self, codes: Sequence[SparseCodes], xs_n: list[Tensor] | None) -> list[Tensor]:
        n_rows = codes[0].values.shape[0]
        outs = self._decode_sources(codes, n_rows)
        result = []
        for t, layer in enumerate(self._layers()):
            out = outs[t] + layer.b_dec
            if layer.W_skip is not None:
                assert xs_n is not None
                out = out + F.linear(xs_n[t], layer.W_skip)
            result.append(out)
        return result

    def _auxk(
        self,
        pres: list[Tensor],
        dead: Tensor,
        ys_n: list[Tensor],
        recons_n: list[Tensor],
        gathers: Sequence[Gather | None],
    ) -> Tensor:
        """AuxK summed over targets: each layer's dead latents (top aux_k of their
        pre-activations) decode through their windows to reconstruct the residuals."""
        n_dead = int(dead.sum())
        if n_dead == 0:
            return pres[0].new_zeros((), dtype=torch.float32)
        aux_k = self.aux_k_width()
        scale = min(n_dead / (aux_k * self.n_layers), 1.0)
        aux_codes = [
            self.aux_codes(pre, dead_l, gather, aux_k)
            for pre, dead_l, gather in zip(pres, dead, gathers, strict=True)
        ]
        e_hats = self._decode_sources(aux_codes, pres[0].shape[0])
        total = pres[0].new_zeros((), dtype=torch.float32)
        for e_hat, y_n, r_n in zip(e_hats, ys_n, recons_n, strict=True):
            total = total + self.aux_error(e_hat, y_n, r_n)
        return scale * total

    def aux_k_width(self) -> int:
        """AuxK's number of dead latents per row (aux_k, or d_out / 2 when 0)."""
        return self.cfg.aux_k or max(self.cfg.d_out // 2, 1)

    def aux_codes(
        self, pre: Tensor, dead_l: Tensor, gather: Gather | None, aux_k: int
    ) -> SparseCodes:
        """AuxK codes of one source layer: its top aux_k dead latents' pre-activations
        (relu'd); a layer with no dead latent gives zeros."""
        n_dead = int(dead_l.sum())
        if n_dead:  # every chosen latent is dead: nothing to mask
            indices = topk_among(pre.detach(), dead_l, min(aux_k, n_dead))
        else:  # one arbitrary latent per row, zeroed below (the graph stays connected)
            indices = pre.new_zeros((pre.shape[0], 1), dtype=torch.long)
        values = pre.gather(1, indices) if gather is None else gather(indices)
        if not n_dead:
            values = values.masked_fill(torch.ones_like(values, dtype=torch.bool), 0.0)
        return SparseCodes(values.relu(), indices, self.num_latents)

    @staticmethod
    def aux_error(e_hat: Tensor, y_n: Tensor, r_n: Tensor) -> Tensor:
        """AuxK error of one target: how far the dead latents' output e_hat is from the
        residual y_n - r_n, relative to the target's total variance."""
        residual = (y_n - r_n).detach().float()
        sst = batchstats.total_variance(y_n)
        err = (e_hat.float() - residual).pow(2).sum()
        return err / sst.clamp_min(torch.finfo(sst.dtype).tiny)


@torch.no_grad()
def init_layer_(layer: CLTLayer, normalize_decoder: bool) -> None:
    """Fresh weights of one layer, as a transcoder's (`coder.init_transcoder_`)."""
    init_transcoder_(layer, normalize_decoder)
