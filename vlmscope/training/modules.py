"""`--distribute-modules`: each rank trains the dictionaries of its own share of the layers.

Per-layer dictionaries (SAEs, transcoders). Units are split into contiguous blocks, unit i on
rank `i * world // n_units`. Every rank runs the model on its own rows of the batch window (as
in data parallel), then one `all_to_all_single` sends each unit's inputs and targets to the
unit's owner: rank r sends its N_r rows of unit i to owner(i) and receives, for each unit it
owns, every rank's rows, concatenated in rank order, which is the global batch in the order one
process would read it. The owner trains its units on the global batch alone: batch statistics
are already global, no gradient is all-reduced, and its optimiser holds only its units.
Dictionaries and Adam state per rank fall from `16 B x all parameters` (DDP) to
`16 B x parameters / world`; the price is the all-to-all of `N x units x (d_in + d_out)`
activations per micro-step. Non-owned units exist only on the meta device (no memory); each
unit is initialised from its own seed (run seed, unit index), so any layout, and one process,
start from the same weights. Checkpoints: each rank writes its own units (and their optimiser
state, keyed by parameter name) to its own file, nothing is gathered (training/sharded.py);
resuming reads each unit by name from whichever file holds it, for any world size. The final
dictionaries are one ordinary folder, loadable by eval and attribution, each owner writing
its units' subfolders.

Cross-layer transcoders (implemented in `clt_shards.py`). A CLT target t sums the decoders of
every source s <= t in its window, so sharding by source would make each owner send dense
[N, d] partial reconstructions for every (s, t) pair. Instead:
- the *decoder is sharded by target*: the owner of layer t holds the encoder of source t and
  the decoder slices W_dec_s[:, t - s] of every source s that writes to t (its `b_dec_t`,
  W_skip_t); summed over ranks this is every decoder parameter exactly once, so no rank
  materialises every layer's decoder. Blocks are balanced by parameter count (encoder plus
  the slices into each target), not by layer count: with a window of every later layer, late
  targets have many sources;
- forward: inputs x_t and targets y_t go to owner(t) by the all-to-all above; owner(t) encodes
  source t into sparse codes (K values + indices per token, plus AuxK codes of dead latents);
  one small all-reduce tells every rank each source's code width and dead count, then two
  `all_to_all_single` send each source's codes (indices, then values) to the ranks whose
  targets its window reaches (K * 12 bytes per token, source and receiving rank, instead of
  the d * 4 bytes of a dense partial output per (source, target) pair); owner(t) decodes
  target t with its slices and computes its FVU and AuxK error;
- backward: the values' all-to-all is an autograd function whose backward is the transposed
  all-to-all: each receiver's gradient of a code value returns to the code's source owner,
  where autograd sums the copies and flows on into the encoder; decoder gradients stay local.
  Every rank runs the forward and backward (also one owning no layer), so the collectives stay
  paired;
- decoder-norm constraints (--sae.normalize_decoder) over a latent's whole decoder row, which
  spans owners, take one all-reduce of per-latent squared norms (and one of gradient-row dot
  products before the step).
All activations (TopK, BatchTopK, JumpReLU) and AuxK work unchanged: a source's codes are
computed by its owner on the global batch. Checkpoints keep the ordinary CLT's names, each
slice W_dec_s[:, t - s] (and its Adam moments) written by its owner as a column of W_dec_s; a
resume cuts or reassembles them by name (memory-mapped), for any world size. No rank holds a
whole W_dec_s while writing: the final dictionaries stream each layer file's W_dec_s in row
blocks to the layer's owner (clt_shards.py, sharded.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from vlmscope.dictionaries import SparseCoder
from vlmscope.training.bundle import DictionaryBundle
from vlmscope.training.distributed import Layout, collective_errors

__all__ = ["ModuleShards", "layer_seed", "seed_units", "shards_for"]


def layer_seed(seed: int, unit: int) -> int:
    """The seed unit `unit` is initialised from, whichever rank (or process) builds it."""
    return seed * 1_000_003 + unit


def seed_units(bundle: DictionaryBundle, seed: int, units: Sequence[int] | None = None) -> None:
    """Re-initialise each unit (a per-layer coder, or one layer of a CLT: its encoder and
    whole decoder) from its own seed, so that a unit starts the same whichever rank (or
    process) builds it."""
    from vlmscope.dictionaries.clt import init_layer_

    clt = bundle.clt
    n = clt.n_layers if clt is not None else len(bundle.coders)
    for i in units if units is not None else range(n):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(layer_seed(seed, i))
            if clt is not None:
                init_layer_(clt.layers[i], bool(clt.cfg.normalize_decoder))  # type: ignore[arg-type]
            else:
                bundle.coders[i].reset_parameters()  # type: ignore[operator]


def shards_for(bundle: DictionaryBundle, layout: Layout) -> ModuleShards:
    """The sharding of --distribute-modules for a bundle (built on the meta device):
    per-layer units, or a CLT's decoder sharded by target (clt_shards.py)."""
    if bundle.clt is not None:
        from vlmscope.training.clt_shards import CLTShards

        return CLTShards(bundle.clt.cfg, layout)
    return ModuleShards(len(bundle.coders), layout)


class ModuleShards:
    """Which rank owns which unit, and the all-to-all that feeds the owners."""

    #: whether every rank must run the forward and backward, also one that owns no unit
    collective_forward = False

    def __init__(self, n_units: int, layout: Layout) -> None:
        self.layout = layout
        self.n_units = n_units
        self.owner = [i * layout.world // n_units for i in range(n_units)]
        self.mine = [i for i in range(n_units) if self.owner[i] == layout.rank]

    def materialise(self, bundle: DictionaryBundle, device: Any, seed: int) -> nn.Module:
        """Real, seeded tensors for this rank's units of a bundle built on the meta device;
        returns what this rank trains."""
        for i in self.mine:
            bundle.coders[i] = SparseCoder(bundle.coders[i].cfg, device=device)  # type: ignore[union-attr]
        seed_units(bundle, seed, self.mine)
        return self.sub_bundle(bundle)

    def checkpoint_view(self) -> Any:
        """What load_checkpoint restores into other than the bundle's own units (a CLT shard)."""
        return None

    def sub_bundle(self, bundle: DictionaryBundle) -> DictionaryBundle:
        """A bundle of this rank's units (sharing their modules) for the forward pass."""
        reads = [bundle.reads[i] for i in self.mine]
        writes = [bundle.writes[i] for i in self.mine]
        coders = {bundle.reads[i]: bundle.coders[i] for i in self.mine}
        return DictionaryBundle(bundle.kind, coders, reads, writes, bundle.model_info)  # type: ignore[arg-type]

    def exchange(
        self, xs: Sequence[Tensor], ys: Sequence[Tensor]
    ) -> tuple[list[Tensor], list[Tensor]]:
        """This rank's rows of every unit -> the global batch of each unit this rank owns."""
        import torch.distributed as dist

        lay = self.layout
        n_local = int(xs[0].shape[0]) if xs else 0
        d_in, d_out = int(xs[0].shape[1]), int(ys[0].shape[1])
        width = d_in + d_out
        rows = [int(n) for n in lay.gather(n_local)]
        dev = xs[0].device
        send_parts, send_sizes = [], []
        for dest in range(lay.world):
            units = [i for i in range(self.n_units) if self.owner[i] == dest]
            if units and n_local:
                block = torch.cat([torch.cat([xs[i], ys[i]], dim=1) for i in units], dim=1)
                send_parts.append(block.reshape(-1))
            send_sizes.append(n_local * width * len(units))
        send = torch.cat(send_parts) if send_parts else torch.zeros(0, device=dev)
        recv_sizes = [n * width * len(self.mine) for n in rows]
        recv = torch.empty(sum(recv_sizes), device=dev, dtype=send.dtype)
        with collective_errors(lay, "sending activations to their owners (all-to-all)"):
            dist.all_to_all_single(recv, send.contiguous(), recv_sizes, send_sizes)
        blocks = [
            b.view(n, width * len(self.mine))
            for b, n in zip(recv.split(recv_sizes), rows, strict=True)
        ]
        full = torch.cat(blocks) if blocks else torch.zeros(0, width * len(self.mine))
        out_x, out_y = [], []
        for j in range(len(self.mine)):
            unit = full[:, j * width : (j + 1) * width]
            out_x.append(unit[:, :d_in].contiguous())
            out_y.append(unit[:, d_in:].contiguous())
        return out_x, out_y

    def spread(self, values: Tensor) -> Tensor:
        """[len(mine)] per-unit values of this rank -> [n_units] of all ranks (float64)."""
        full = torch.zeros(self.n_units, dtype=torch.float64)
        for j, i in enumerate(self.mine):
            full[i] = float(values[j])
        return self.layout.sum(full)


def _unit_of(key: str) -> int:
    """`coders.3.W_enc` -> 3."""
    parts = key.split(".")
    return int(parts[1]) if len(parts) > 1 and parts[0] == "coders" else -1


def state_of_units(state: dict[str, Any], units: Sequence[int]) -> dict[str, Any]:
    return {k: v for k, v in state.items() if _unit_of(k) in units}
