"""`--distribute-modules` for a cross-layer transcoder: the decoder sharded by target layer.

The design is in `modules.py`'s docstring; this is its implementation. Rank r owns a contiguous
block of layers `mine` (balanced by parameter count, see `CLTShards`), and for each owned layer
t holds:
- `layers[t]`: the CLTLayer of t without its decoder: encoder of source t (W_enc, b_enc, its
  activation and dead-latent counter, input scale) and target t's b_dec, W_skip, output scale;
- `decoders[f"{s}_{t}"]`: the slice W_dec_s[:, t - s] [F, d_out] of every source s whose
  window reaches t.
Every parameter of the CLT lives on exactly one rank; the rank that owns the most holds its
layers' encoders plus the decoder slices writing into them, never every layer's decoder.

One micro-step (after `ModuleShards.exchange` brought x_t, y_t of the global batch to t's
owner):
1. each owner encodes its sources (codes, and AuxK codes of dead latents when AuxK is on);
2. one all-reduce of a [2L + 1] vector gives every rank each source's code width, dead-latent
   count and the row count, so every receive buffer is sized without another round trip;
3. codes go to the ranks whose targets their source reaches, by two `all_to_all_single`: the
   indices (int64, no gradient) and the values (`_SendValues`, an autograd function whose
   backward is the transposed all-to-all: every receiver's gradient of a code value returns
   to its source's owner, where autograd sums the copies and flows into the encoder);
4. each owner decodes its targets from the received codes with its decoder slices (the same
   sums, in the same source order, as `CrossLayerTranscoder`), and computes their FVU and AuxK
   error; the loss of the CLT is the sum of the owners' losses.
Decoder-norm constraints (normalize_decoder) need each latent's norm over its whole decoder
row, which spans owners: one all-reduce of per-latent squared norms (and, before the step, of
gradient-row dot products) per step. Every rank runs the forward and the backward, also one
that owns no layer, so the collectives stay paired.

Checkpoints use the names of the ordinary CLT and are written without gathering
(training/sharded.py): each rank writes its own tensors, a decoder slice W_dec_s[:, t - s] as
column `clt.layers.{s}.W_dec#{t - s}` (and its Adam moments likewise); a resume reads each
slice it holds now by name, memory-mapped, from whichever rank's file has it (or cuts it from
a whole W_dec_s), for any world size. The final dictionaries are the ordinary CLT folder: the
owner of layer s writes layer_{s}.safetensors, receiving W_dec_s's other columns from their
owners in blocks of rows, so no rank holds a whole W_dec_s.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from vlmscope.dictionaries import CrossLayerTranscoder, SparseCodes
from vlmscope.dictionaries.clt import CLTLayer, init_layer_
from vlmscope.dictionaries.coder import fvu, update_dead_counter_
from vlmscope.dictionaries.config import SparseCoderConfig
from vlmscope.dictionaries.kernels import sparse_decode
from vlmscope.training.bundle import BundleOutput, DictionaryBundle
from vlmscope.training.distributed import Layout, collective_errors
from vlmscope.training.modules import ModuleShards, layer_seed

__all__ = ["CLTShard", "CLTShards", "balanced_blocks", "balanced_owners"]


def balanced_owners(cfg: SparseCoderConfig, world: int) -> list[int]:
    """Owner of each layer: contiguous blocks holding about equal parameter counts (a layer's
    encoder plus the decoder slices writing into it: late layers have more sources)."""
    n = cfg.n_layers
    return balanced_blocks(
        [cfg.d_in + cfg.d_out * len(sources_of(cfg, t)) for t in range(n)], world
    )


def balanced_blocks(cost: Sequence[float], world: int) -> list[int]:
    """Owner of each item: contiguous blocks of about equal total cost, item i going to the
    rank whose share holds its midpoint (the planner sizes ranks with the same rule)."""
    total, before, owners = sum(cost), 0.0, []
    for c in cost:
        owners.append(min(world - 1, int(world * (before + c / 2) / total)))
        before += c
    return owners


def sources_of(cfg: SparseCoderConfig, t: int) -> list[int]:
    """The sources s <= t whose decoder window reaches target t, ascending."""
    return [s for s in range(t + 1) if t - s < cfg.n_out(s)]


class CLTShards(ModuleShards):
    """Which rank owns which CLT layer; builds, gathers and re-splits this rank's shard."""

    collective_forward = True

    def __init__(self, cfg: SparseCoderConfig, layout: Layout) -> None:
        super().__init__(cfg.n_layers, layout)
        self.owner = balanced_owners(cfg, layout.world)
        self.mine = [i for i in range(self.n_units) if self.owner[i] == layout.rank]
        self.module: CLTShard | None = None

    def materialise(self, bundle: DictionaryBundle, device: Any, seed: int) -> nn.Module:
        assert bundle.clt is not None
        self.module = CLTShard(bundle.clt, self, device, seed)
        return self.module

    def checkpoint_view(self) -> CLTShard | None:
        return self.module


class _SendValues(torch.autograd.Function):
    """all_to_all_single of code values; backward: the transposed all-to-all of gradients."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, send: Tensor, recv_sizes: list[int], send_sizes: list[int], layout: Layout
    ) -> Tensor:
        import torch.distributed as dist

        ctx.sizes, ctx.layout = (recv_sizes, send_sizes), layout
        recv = send.new_empty(sum(recv_sizes))
        with collective_errors(layout, "sending CLT codes to their targets' owners"):
            dist.all_to_all_single(recv, send.detach().contiguous(), recv_sizes, send_sizes)
        return recv

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None, None]:  # type: ignore[override]
        import torch.distributed as dist

        recv_sizes, send_sizes = ctx.sizes
        out = grad.new_empty(sum(send_sizes))
        with collective_errors(ctx.layout, "returning CLT code gradients to their sources"):
            dist.all_to_all_single(out, grad.contiguous(), send_sizes, recv_sizes)
        return out, None, None, None


class CLTShard(nn.Module):
    """This rank's part of a CLT (see the module docstring); trains like a bundle."""

    check_inputs: bool = True

    def __init__(
        self, meta: CrossLayerTranscoder, shards: CLTShards, device: Any, seed: int
    ) -> None:
        super().__init__()
        self.cfg = cfg = meta.cfg
        self.device = torch.device(device)  # where the exchange's buffers live (also unowned)
        self.layout = shards.layout
        self.owner, self.mine = shards.owner, list(shards.mine)
        # The full CLT on the meta device (no memory): its helpers scale, encode and init.
        self._meta = [meta]
        self.layers = nn.ModuleDict()
        self.decoders = nn.ParameterDict()
        wanted = sorted({s for t in self.mine for s in sources_of(cfg, t)})
        for s in wanted:  # each source's weights from its own seed, as in one process
            layer = CLTLayer(cfg, s, device)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(layer_seed(seed, s))
                init_layer_(layer, bool(cfg.normalize_decoder))
            for t in self.mine:
                if s <= t < s + cfg.n_out(s):
                    self.decoders[f"{s}_{t}"] = nn.Parameter(layer.W_dec.data[:, t - s].clone())
            del layer.W_dec
            if s in self.mine:
                self.layers[str(s)] = layer

    @property
    def meta(self) -> CrossLayerTranscoder:
        return self._meta[0]

    def _mine(self) -> list[CLTLayer]:
        return [self.layers[str(t)] for t in self.mine]  # type: ignore[misc]

    # --- names of the ordinary CLT ---------------------------------------------------------
    def full_name(self, name: str) -> tuple[str, int | None]:
        """`layers.3.W_enc` -> (`clt.layers.3.W_enc`, None); `decoders.1_3` -> the column 2
        of `clt.layers.1.W_dec`."""
        if name.startswith("decoders."):
            s, t = (int(v) for v in name.split(".", 1)[1].split("_"))
            return f"clt.layers.{s}.W_dec", t - s
        return f"clt.{name}", None

    def full_state(self) -> dict[Any, Tensor]:
        """This shard's state under the CLT's names; decoder slices keyed (name, column)."""
        out: dict[Any, Tensor] = {}
        for name, value in self.state_dict().items():
            full, column = self.full_name(name)
            out[full if column is None else (full, column)] = value.detach().cpu()
        return out

    # --- training --------------------------------------------------------------------------
    @torch.no_grad()
    def init_from_data(self, xs: Sequence[Tensor], ys: Sequence[Tensor]) -> None:
        for t, layer, x, y in zip(self.mine, self._mine(), xs, ys, strict=True):
            self.meta._init_layer_from_data(layer, x, y, self.decoders[f"{t}_{t}"])

    def activations(self) -> list[nn.Module]:
        return [layer.activation for layer in self._mine()]

    def dead_fraction(self) -> Tensor:
        thr = self.cfg.dead_tokens_threshold
        return torch.stack(
            [(la.num_tokens_since_fired >= thr).float().mean() for la in self._mine()]
        )

    def forward(self, xs: Sequence[Tensor], ys: Sequence[Tensor]) -> BundleOutput:
        """xs, ys: the global batch of each owned layer. Returns this rank's share: the FVU of
        its targets, the L0 of its sources, and the loss terms they own."""
        cfg, meta, layers = self.cfg, self.meta, self._mine()
        xs_n, ys_n, encoded = meta._encode_training(layers, xs, ys, self.check_inputs)
        pres = [pre for pre, _, _ in encoded]
        codes = [c for _, c, _ in encoded]
        n_rows = int(xs[0].shape[0]) if xs else 0
        dead = [la.num_tokens_since_fired >= cfg.dead_tokens_threshold for la in layers]
        if self.training:
            for la, c in zip(layers, codes, strict=True):
                update_dead_counter_(la.num_tokens_since_fired, c, n_rows)
        # 2. widths, dead counts and rows of every source, on every rank
        n = cfg.n_layers
        info = torch.zeros(2 * n + 1, dtype=torch.float64)
        for t, c, d in zip(self.mine, codes, dead, strict=True):
            info[t], info[n + t] = c.width, float(d.sum())
        info[2 * n] = float(n_rows) if self.owner[0] == self.layout.rank else 0.0
        info = self.layout.sum(info)
        widths = [int(v) for v in info[:n]]
        n_dead = [int(v) for v in info[n : 2 * n]]
        n_rows = int(info[2 * n])  # every owner holds the same global batch
        aux_k = meta.aux_k_width()
        use_aux = self.training and cfg.aux_k_coeff > 0 and sum(n_dead) > 0
        aux: list[SparseCodes] = []
        if use_aux:
            aux = [meta.aux_codes(pre, d, g, aux_k)
                   for (pre, _, g), d in zip(encoded, dead, strict=True)]  # fmt: skip
        aux_widths = [max(min(aux_k, d), 1) for d in n_dead] if use_aux else [0] * n
        # 3. codes to the owners of the targets they reach
        got, received = self._send(codes, aux, widths, aux_widths, n_rows)
        # 4. decode the owned targets
        fvus, auxk, recons = [], xs_n[0].new_zeros(()) if xs else torch.zeros(()), []
        for t, la, x_n, y_n in zip(self.mine, layers, xs_n, ys_n, strict=True):
            out = self._decode(t, {s: got[s][0] for s in sources_of(cfg, t)}) + la.b_dec
            if la.W_skip is not None:
                out = out + torch.nn.functional.linear(x_n, la.W_skip)
            recons.append(out)
            fvus.append(fvu(y_n, out))
            if use_aux:
                e_hat = self._decode(t, {s: got[s][1] for s in sources_of(cfg, t)})
                auxk = auxk + meta.aux_error(e_hat, y_n, out)
        if use_aux:
            auxk = auxk * min(sum(n_dead) / (aux_k * n), 1.0)
        fvu_t = torch.stack(fvus) if fvus else torch.zeros(0)
        sparsity = torch.stack(
            [la.activation.sparsity_loss(p).float() for la, p in zip(layers, pres, strict=True)]
        ).sum() if pres else torch.zeros(())  # fmt: skip
        l0 = torch.stack([c.l0().float().mean() for c in codes]).detach() if codes else fvu_t
        # received[:0].sum() is 0 but ties the exchange into every rank's graph, so that
        # every rank runs its backward (the transposed all-to-all) in step with the others.
        loss = (fvu_t.sum() + cfg.aux_k_coeff * auxk + cfg.sparsity_coeff * sparsity
                + received[:0].sum())  # fmt: skip
        scaled = [r / meta._scale(la.output_scale) for r, la in zip(recons, layers, strict=True)]
        return BundleOutput(loss, fvu_t.sum(), fvu_t.detach(), l0, scaled)

    def _decode(self, t: int, codes: dict[int, SparseCodes]) -> Tensor:
        out: Tensor | None = None
        for s, c in codes.items():
            part = sparse_decode(c.values, c.indices, self.decoders[f"{s}_{t}"])
            out = part if out is None else out + part
        assert out is not None
        return out

    def _needs(self, rank: int) -> list[int]:
        """Sources whose codes rank `rank` needs (its targets' windows), ascending."""
        mine = [t for t in range(self.cfg.n_layers) if self.owner[t] == rank]
        return sorted({s for t in mine for s in sources_of(self.cfg, t)})

    def _send(
        self,
        codes: list[SparseCodes],
        aux: list[SparseCodes],
        widths: list[int],
        aux_widths: list[int],
        n_rows: int,
    ) -> tuple[dict[int, tuple[SparseCodes, SparseCodes | None]], Tensor]:
        """Codes (and AuxK codes) of this rank's sources to every rank whose targets they
        reach; returns the codes of the sources this rank's targets read, and the received
        values tensor (for the graph tie in forward)."""
        import torch.distributed as dist

        lay, num = self.layout, self.cfg.num_latents
        dev = self.device
        per = [n_rows * (widths[s] + aux_widths[s]) for s in range(self.cfg.n_layers)]
        vals, idx, send_sizes = [], [], []
        for dest in range(lay.world):
            needed = set(self._needs(dest))
            size = 0
            for j, s in enumerate(self.mine):
                if s not in needed:
                    continue
                pieces = [codes[j]] + ([aux[j]] if aux else [])
                vals += [p.values.reshape(-1) for p in pieces]
                idx += [p.indices.reshape(-1) for p in pieces]
                size += per[s]
            send_sizes.append(size)
        recv_sources = self._needs(lay.rank)
        recv_sizes = [sum(per[s] for s in recv_sources if self.owner[s] == p)
                      for p in range(lay.world)]  # fmt: skip
        if vals:
            send_v, send_i = torch.cat(vals), torch.cat(idx).long()
        else:  # a leaf that needs a gradient, so that the backward exchange runs here too
            send_v = torch.zeros(0, device=dev, requires_grad=True)
            send_i = torch.zeros(0, dtype=torch.long, device=dev)
        recv_i = torch.empty(sum(recv_sizes), dtype=torch.long, device=dev)
        with collective_errors(lay, "sending CLT code indices to their targets' owners"):
            dist.all_to_all_single(recv_i, send_i.contiguous(), recv_sizes, send_sizes)
        recv_v = _SendValues.apply(send_v, recv_sizes, send_sizes, lay)
        out: dict[int, tuple[SparseCodes, SparseCodes | None]] = {}
        at = 0
        for s in recv_sources:  # owners are contiguous blocks: rank order is source order
            k, a = widths[s], aux_widths[s]
            v = recv_v[at : at + n_rows * k].view(n_rows, k)
            i = recv_i[at : at + n_rows * k].view(n_rows, k)
            at += n_rows * k
            extra = None
            if a:
                extra = SparseCodes(
                    recv_v[at : at + n_rows * a].view(n_rows, a),
                    recv_i[at : at + n_rows * a].view(n_rows, a),
                    num,
                )
                at += n_rows * a
            out[s] = (SparseCodes(v, i, num), extra)
        return out, recv_v

    # --- decoder-norm constraints ----------------------------------------------------------
    def _row_sums(self, grads: bool) -> tuple[Tensor, Tensor | None]:
        """[L, F] squared norms of every source's whole decoder rows, and (grads) the dot
        products of its gradient rows with them, summed over the ranks' slices."""
        n, f = self.cfg.n_layers, self.cfg.num_latents
        sums = torch.zeros(2 if grads else 1, n, f, dtype=torch.float64)
        for name, w in self.decoders.items():
            s = int(name.split("_")[0])
            sums[0, s] += w.detach().double().pow(2).sum(dim=1).cpu()
            if grads and w.grad is not None:
                sums[1, s] += (w.grad.double() * w.detach().double()).sum(dim=1).cpu()
        sums = self.layout.sum(sums.reshape(-1)).view(sums.shape)
        return sums[0], sums[1] if grads else None

    @torch.no_grad()
    def set_decoder_norm_to_unit_norm(self) -> None:
        sq, _ = self._row_sums(grads=False)
        eps = torch.finfo(torch.float32).eps
        for name, w in self.decoders.items():
            norm = sq[int(name.split("_")[0])].sqrt().clamp_min(eps).to(w.device, w.dtype)
            w.div_(norm[:, None])

    @torch.no_grad()
    def remove_gradient_parallel_to_decoder_directions(self) -> None:
        sq, dots = self._row_sums(grads=True)
        assert dots is not None
        eps = torch.finfo(torch.float32).eps
        for name, w in self.decoders.items():
            if w.grad is None:
                continue
            s = int(name.split("_")[0])
            coef = dots[s] / sq[s].sqrt().clamp_min(eps).pow(2)
            w.grad.sub_(coef.to(w.device, w.dtype)[:, None] * w)
