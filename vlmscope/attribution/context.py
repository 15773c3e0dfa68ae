"""The local replacement model of one prompt, and batched backward passes through it.

`record()` runs the original model once and stores what the linearised model needs: the input
embeddings (token and image-patch nodes), the active dictionary features, each layer's MLP
output and the error of its reconstruction, the attention patterns and norm scales.
`replay()` runs the language model on copies of the prompt with patterns and scales frozen and
every LM layer's MLP output (covered by a dictionary or not) held at its recorded value, so the
model is linear from its sources (embeddings, MLP outputs, and what enters between layers, such
as Qwen3-VL's DeepStack visual features) to every feature pre-activation and logit. One
backward pass then gives, for a batch of targets (one per copy), the direct effect of every
source on each target.

What the replay keeps per copy of the prompt: nothing. Sources are constants tapped by a
custom autograd function (`_Tap`) whose backward hands each layer's gradient [copies, seq, d]
to a callback that turns it into edge columns at once (errors: g . e; features: g . decoder
row, in feature chunks; inputs: g . embedding), so no layer's gradient outlives its layer;
targets are injected by `_Seed` at resid_mid as the backward passes it, so no resid_mid tensor
is kept either; norms multiply by their recorded scale (freeze.py's linear replay); attention
mixes values with the recorded pattern; the MLPs, whose outputs are constants, run on an empty
slice of positions; q and k projections run without autograd (the pattern is frozen). Autograd
then saves only weights and recorded constants, shared by every copy, so the batch is bounded
by the transient activations of one layer, not by a graph.

Edges, for a target with gradient g_t at model layer t's MLP output (rows of one backward):

    error (t, p):        g_t[p] . e_t[p]
    feature (s, p, f):   a * sum over targets t of unit s of  g_t[p] . W_dec_s[f, t - s] / o_t
    input p:             g_0[p] . embed[p]  (+ g . injected[p] for DeepStack)
    reference, input p:  g_0[p] . embed'[p] (+ g . injected'[p]), with a reference prompt's
                         sources (`record_reference`, e.g. a blank image): the replay is linear
                         in its sources, so the edge minus this is the target's change when
                         position p's sources are swapped for the reference's
    vision feature j:    g_V[j] . V[j]  (cross-attention VLMs: cross_inputs.py)

with a the activation, o_t the target unit's output scale; sums run in float32.
Decoder rows of the active features are gathered once (`decoder_cache`): on the device, in host
memory ("cpu", pinned on CUDA, moved per target), or read again from the memory-mapped
dictionary each batch ("disk").
"""

from __future__ import annotations

import contextlib
import inspect
import math
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from vlmscope.attribution.cross_inputs import cross_attention_inputs
from vlmscope.attribution.freeze import FreezeState, frozen
from vlmscope.attribution.weights import DictionaryWeights
from vlmscope.models.hooked import HookContext, HookedVLM, register_vlmscope_hook
from vlmscope.training.bundle import DictionaryBundle, mlp_out

DecoderCache = Literal["device", "cpu", "disk"]


@dataclass
class ActiveFeatureTable:
    """Active features sorted by (unit, position, feature): parallel 1-D tensors."""

    #: the model's LM layer of each feature (not the dictionary's unit index).
    layer: Tensor
    position: Tensor
    feature: Tensor
    activation: Tensor
    #: the bundle unit (CLT source layer) of each feature, to look its decoders up.
    unit: Tensor

    def __len__(self) -> int:
        return len(self.layer)


_WRITE_RE = re.compile(r"^lm\.blocks\.(\d+)\.mlp\.hook_out$")
_READ_RE = re.compile(r"^lm\.blocks\.(\d+)\.")


def unit_layers(bundle: DictionaryBundle, n_layers: int) -> list[int]:
    """The model layer each unit of `bundle` replaces; raises naming any binding that is not a
    transcoder of one LM layer's MLP (read before, write the MLP output of the same layer)."""
    layers = []
    for read, write in zip(bundle.reads, bundle.writes, strict=True):
        w, r = _WRITE_RE.match(write), _READ_RE.match(read)
        if w is None:
            raise ValueError(
                f"attribution needs dictionaries that write MLP outputs "
                f"(lm.blocks.<i>.mlp.hook_out); this bundle writes {write!r}"
            )
        if r is None or r.group(1) != w.group(1):
            raise ValueError(f"the unit writing {write!r} reads {read!r}, not a hook of its layer")
        layer = int(w.group(1))
        if not 0 <= layer < n_layers:
            raise ValueError(f"{write!r}: the model has {n_layers} layers (0..{n_layers - 1})")
        if layers and layer <= layers[-1]:
            raise ValueError(f"bundle units must cover increasing layers; got {bundle.writes}")
        layers.append(layer)
    return layers


class _Tap(torch.autograd.Function):
    """Identity on a constant source; its backward hands the gradient to `fn` (edge columns)
    and passes nothing on. `anchor` (a scalar leaf) puts every tap on the backward's path."""

    @staticmethod
    def forward(ctx: Any, value: Tensor, anchor: Tensor, fn: Callable[[Tensor], None]) -> Tensor:
        ctx.fn = fn
        ctx.anchor = (anchor.dtype, anchor.device)
        return value.view_as(value)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[None, Tensor, None]:
        ctx.fn(grad)
        dtype, device = ctx.anchor
        return None, torch.zeros((), dtype=dtype, device=device), None


class _Seed(torch.autograd.Function):
    """Identity whose backward adds `fn`'s seed to the gradient: a target's injection at a
    resid_mid, without keeping that resid_mid tensor for the backward."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, fn: Callable[[Tensor], Tensor]) -> Tensor:
        ctx.fn = fn
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return ctx.fn(grad), None


@dataclass
class _Block:
    """Positions of one unit whose feature counts are close, laid out [P, k] for one batched
    matmul: the padding is bounded by the block, not by the prompt's busiest position."""

    positions: Tensor  # [P] ascending (device)
    slots: Tensor  # [P, k] row of the unit's `unique` per slot; U (a zero row) for padding
    filled: Tensor | None  # [m] the slots that hold a feature, in [P * k]; None: all of them
    columns: Tensor  # [m] those features' indices within the unit, ascending (device)
    start: int | None  # columns[0] when the columns are consecutive (one slice add), else None


@dataclass
class _UnitIndex:
    """Unit s's active features, arranged for the backward's batched dot products."""

    offset: int  # first column of the unit's features
    count: int
    unique: Tensor  # [U] sorted feature ids
    inverse: Tensor  # [count] row of `unique` of each feature, in feature order (host)
    blocks: list[_Block]


BLOCK_FILL = 0.75
"""A block of positions takes the next busiest position while its feature count is at least
this share of the block's first (busiest): the slots that hold a feature are then at least
that share of the block's [P, k], where one [P, kmax] layout over a JumpReLU CLT's prompt was
2-50x padding (a few positions, BOS among them, fire hundreds of features)."""


def _blocks(
    pos: Tensor, inverse: Tensor, n_unique: int, seq: int, dev: torch.device
) -> list[_Block]:
    """The `_Block`s of a unit whose features (sorted by position) sit at `pos` and read row
    `inverse` of its `n_unique` decoder rows (row n_unique: the zero row, for padding)."""
    n = len(pos)
    counts = torch.bincount(pos, minlength=seq)
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.arange(n) - starts[pos]  # slot of each feature within its position
    positions = counts.nonzero().squeeze(1)
    by_count = positions[torch.argsort(counts[positions], descending=True, stable=True)].tolist()
    count_of = counts.tolist()
    groups: list[list[int]] = []
    for p in by_count:
        if not groups or count_of[p] < BLOCK_FILL * count_of[groups[-1][0]]:
            groups.append([])
        groups[-1].append(p)
    blocks = []
    for group in groups:
        members = torch.tensor(sorted(group), dtype=torch.long)
        k = count_of[group[0]]  # the busiest: the group was taken in descending count
        row = torch.full((seq,), -1, dtype=torch.long)
        row[members] = torch.arange(len(members))
        columns = (row[pos] >= 0).nonzero().squeeze(1)  # ascending: features are by position
        flat = row[pos[columns]] * k + slot[columns]  # ascending too
        slots = torch.full((len(members) * k,), n_unique)
        slots[flat] = inverse[columns]
        full = len(columns) == len(members) * k
        consecutive = len(columns) > 0 and int(columns[-1] - columns[0]) == len(columns) - 1
        blocks.append(
            _Block(
                positions=members.to(dev),
                slots=slots.view(len(members), k).to(dev),
                filled=None if full else flat.to(dev),
                columns=columns.to(dev),
                start=int(columns[0]) if consecutive else None,
            )
        )
    return blocks


class AttributionContext:
    """Everything attribution needs about one prompt (batch of 1).

    Layers are the model's: every LM layer's MLP output is a source, whether or not a dictionary
    covers it (a layer without one is all error), so gradients never pass through a real MLP.
    `replace_mask` [seq]: positions the dictionaries replace (features, reconstruction and the
    skip path live there); `zero_mask` [seq]: replaced positions whose features and error are
    dropped from the graph (circuit-tracer's convention at BOS); see attribute.py.
    """

    def __init__(
        self,
        vlm: HookedVLM,
        bundle: DictionaryBundle,
        inputs: Mapping[str, Any],
        replace_mask: Tensor,
        *,
        zero_mask: Tensor | None = None,
        decoder_cache: DecoderCache = "device",
        chunk_bytes: int = 256 << 20,
    ) -> None:
        if bundle.kind == "sae":
            raise ValueError("attribution needs transcoders or a CLT that replace MLP outputs")
        if inputs["input_ids"].shape[0] != 1:
            raise ValueError("attribution runs on one prompt at a time (batch size 1)")
        if decoder_cache not in ("device", "cpu", "disk"):
            raise ValueError(f"decoder_cache must be device, cpu or disk, not {decoder_cache!r}")
        self.vlm = vlm
        self.bundle = bundle
        self.inputs = inputs
        self.device = vlm.device
        self.replace_mask = replace_mask.to(self.device).bool()  # [seq]
        zero = torch.zeros_like(self.replace_mask) if zero_mask is None else zero_mask
        self.zero_mask = zero.to(self.device).bool() & self.replace_mask
        self.n_layers = int(vlm.adapter.n_layers)
        #: model layer of each bundle unit; unit_of maps back.
        self.unit_layers = unit_layers(bundle, self.n_layers)
        self.unit_of = {layer: u for u, layer in enumerate(self.unit_layers)}
        self.n_units = len(self.unit_layers)
        self.mlp_hooks = [mlp_out(layer) for layer in range(self.n_layers)]
        self.freeze = FreezeState()
        self.weights = DictionaryWeights(bundle, self.device)
        self.decoder_cache: DecoderCache = decoder_cache
        self.chunk_bytes = chunk_bytes
        self._scratch: dict[str, Tensor] = {}  # see _buffer
        self.copies = 0
        self.final: Tensor | None = None
        self._skip_qk = True
        #: input nodes past the sequence: the vision features cross-attention reads (Mllama).
        self.cross = cross_attention_inputs(vlm, inputs)
        #: a reference prompt's input sources (`record_reference`): embeddings [seq, d] and
        #: DeepStack injections; when set, each backward also gives `reference_rows`.
        self.reference: Tensor | None = None
        self.reference_injected: dict[int, Tensor] = {}
        #: [n_targets, n_inputs] of the last backward: each target's edge from the reference
        #: prompt's sources at every input node (None without a reference).
        self.reference_rows: Tensor | None = None
        self._ref_rows: Tensor | None = None

    # --- pass 1: the original model ------------------------------------------------------------
    def record(self) -> None:
        """Run the original model (`record_forward`), then gather the decoder rows and
        compute the errors (`prepare`, with this context's `decoder_cache`)."""
        self.record_forward()
        self.prepare(self.decoder_cache)

    @torch.no_grad()
    def record_forward(self) -> None:
        """The forward pass: logits, embeddings, MLP outputs, patterns, scales, features."""
        b, vlm, w = self.bundle, self.vlm, self.weights
        self.freeze = FreezeState(mode="record")
        mids: dict[int, Tensor] = {}
        outs: dict[int, Tensor] = {}
        codes: dict[int, Any] = {}
        read_index = {n: i for i, n in enumerate(b.reads)}
        mlp_index = {n: i for i, n in enumerate(self.mlp_hooks)}
        store: dict[str, Tensor] = {}
        post: dict[int, Tensor] = {}
        injected: dict[int, Tensor] = {}

        def embed(t: Tensor, ctx: HookContext) -> None:
            store["embed"] = t[0].detach().float()

        def read(t: Tensor, ctx: HookContext) -> None:
            i = read_index[ctx.name]
            mids[i] = t[0].detach().float()
            codes[i] = w.encode(i, mids[i])

        def write(t: Tensor, ctx: HookContext) -> None:
            outs[mlp_index[ctx.name]] = t[0].detach().float()

        def resid_post(t: Tensor, ctx: HookContext) -> None:
            post[int(ctx.layer)] = t[0].detach().float()  # type: ignore[arg-type]

        def between(layer: int, x: Tensor) -> None:
            """What enters after `layer` outside the decoder layers (DeepStack's visual
            features): the next input minus this layer's output; kept only where nonzero."""
            d = x[0].detach().float() - post.pop(layer)
            if bool(d.any()):
                injected[layer] = d

        def resid_pre(t: Tensor, ctx: HookContext) -> None:
            between(int(ctx.layer) - 1, t)  # type: ignore[arg-type]

        def final(_m: Any, args: Any, _out: Tensor) -> None:
            between(self.n_layers - 1, args[0])
            if self.n_layers - 1 in injected:  # no family does this; refuse, never mis-attribute
                where = injected[self.n_layers - 1].abs().sum(-1).nonzero().squeeze(1).tolist()
                raise ValueError(
                    f"{vlm.adapter.family}: the final norm's input differs from the last "
                    f"layer's output at positions {where[:8]}; attribution does not model that"
                )

        hooks = [("lm.blocks.0.hook_resid_pre", embed)]
        hooks += [(r, read) for r in b.reads] + [(w_, write) for w_ in self.mlp_hooks]
        hooks += [(f"lm.blocks.{i}.hook_resid_post", resid_post) for i in range(self.n_layers)]
        hooks += [(f"lm.blocks.{i}.hook_resid_pre", resid_pre) for i in range(1, self.n_layers)]
        lm_hook = [] if self.cross is None else [self.cross.record_hook()]
        # The final-norm hook goes in after the freeze hooks so it sees the frozen output.
        with (
            frozen(vlm, self.freeze),
            vlm.hooks(hooks),
            _hook(vlm.adapter.norm(), final),
            _pre_hooks(lm_hook),
        ):
            out = vlm.forward(self.inputs, **_last_logit_kwargs(vlm.model))
        self.logits = out.logits[0, -1].float()
        del out
        self.embeddings = store["embed"]  # [seq, d]
        #: per model layer, the true MLP output.
        self.mlp_outputs = [outs[layer] for layer in range(self.n_layers)]
        #: model layer -> what is added to the residual stream after it outside the layers.
        self.injected = injected
        feature_mask = self.replace_mask & ~self.zero_mask
        self.features = self._feature_table(codes, feature_mask)
        self._index_units()
        #: resid_mid of each unit's layer, until `prepare` has used it for the skip path.
        self._mids: dict[int, Tensor] = dict(mids)

    @torch.no_grad()
    def record_reference(self, reference: Mapping[str, Any]) -> None:
        """Record the input sources of `reference`, a prompt of the same tokens (e.g. the
        prompt with a blank image, `baselines.blank_inputs`): its input embeddings and
        DeepStack injections. Only the sources are read; features, errors, patterns and scales
        stay those of the recorded prompt."""
        if self.cross is not None:
            raise ValueError(
                f"{self.vlm.adapter.family}: a reference prompt is not supported for "
                "cross-attention models (their image enters through cross-attention, not the "
                "input embeddings)"
            )
        ids = reference["input_ids"]
        if not torch.equal(ids.cpu(), self.inputs["input_ids"].cpu()):
            raise ValueError(
                f"the reference prompt's input_ids {tuple(ids.shape)} differ from the prompt's "
                f"{tuple(self.inputs['input_ids'].shape)}: it must have the same tokens"
            )
        store: dict[str, Tensor] = {}
        post: dict[int, Tensor] = {}
        injected: dict[int, Tensor] = {}

        def embed(t: Tensor, ctx: HookContext) -> None:
            store["embed"] = t[0].detach().float()

        def resid_post(t: Tensor, ctx: HookContext) -> None:
            post[int(ctx.layer)] = t[0].detach().float()  # type: ignore[arg-type]

        def resid_pre(t: Tensor, ctx: HookContext) -> None:
            layer = int(ctx.layer) - 1  # type: ignore[arg-type]
            d = t[0].detach().float() - post.pop(layer)
            if bool(d.any()):
                injected[layer] = d

        hooks = [("lm.blocks.0.hook_resid_pre", embed)]
        hooks += [(f"lm.blocks.{i}.hook_resid_post", resid_post) for i in range(self.n_layers)]
        hooks += [(f"lm.blocks.{i}.hook_resid_pre", resid_pre) for i in range(1, self.n_layers)]
        with self.vlm.hooks(hooks):
            self.vlm.forward(reference, **_last_logit_kwargs(self.vlm.model))
        self.reference = store["embed"]
        self.reference_injected = injected

    @torch.no_grad()
    def prepare(self, decoder_cache: DecoderCache) -> None:
        """Gather the active features' decoder rows where `decoder_cache` says and compute
        every layer's error node (what the backward passes read)."""
        if decoder_cache not in ("device", "cpu", "disk"):
            raise ValueError(f"decoder_cache must be device, cpu or disk, not {decoder_cache!r}")
        self.decoder_cache = decoder_cache
        self._build_decoder_cache()
        self.errors = self._errors(self._mids)
        self._mids = {}

    def _feature_table(self, codes: Mapping[int, Any], keep: Tensor) -> ActiveFeatureTable:
        units, layers, pos, feat, act = [], [], [], [], []
        for s in range(self.n_units):
            c = codes[s]
            active = (c.values > 0) & keep[:, None].to(c.values.device)
            rows, slot = active.nonzero(as_tuple=True)
            f = c.indices[rows, slot]
            order = torch.argsort(rows * c.num_latents + f)
            rows, f, vals = rows[order], f[order], c.values[rows, slot][order]
            units.append(torch.full_like(rows, s).cpu())
            layers.append(torch.full_like(rows, self.unit_layers[s]).cpu())
            pos.append(rows.cpu())
            feat.append(f.cpu())
            act.append(vals.float().cpu())
        return ActiveFeatureTable(
            torch.cat(layers), torch.cat(pos), torch.cat(feat), torch.cat(act), torch.cat(units)
        )

    def _index_units(self) -> None:
        """Per unit: its unique features and the blocks of positions its features are laid
        out in (computed on the host, kept on the device)."""
        feats, seq, dev = self.features, self.replace_mask.shape[0], self.device
        self.units: list[_UnitIndex] = []
        offset = 0
        for s in range(self.n_units):
            sel = (feats.unit == s).nonzero().squeeze(1)
            pos, f = feats.position[sel], feats.feature[sel]
            unique, inverse = torch.unique(f, return_inverse=True)
            blocks = _blocks(pos, inverse, len(unique), seq, dev)
            self.units.append(_UnitIndex(offset, len(sel), unique, inverse, blocks))
            offset += len(sel)

    def _build_decoder_cache(self) -> None:
        """Decoder rows of each unit's unique active features (+ one zero row for padding):
        [n_out, U + 1, d] per unit, on the device, in host memory, or not at all ("disk").
        With "device" on a CPU, where the dictionaries already are, nothing is copied: the
        rows are read from the (memory-mapped) decoders themselves by feature id."""
        self._dec: list[Tensor | None] = []
        # per unit and block: [P, k] rows of decoder_rows(s, j)
        self._slot_rows: list[list[Tensor]] = []
        self._feature_rows: list[Tensor] = []  # per unit: [count] the same, per feature
        for s, u in enumerate(self.units):
            per_feature = u.inverse.to(self.device)
            if self._mapped(s):
                self.weights.bundle.check(self.weights._name(s, "W_dec"), u.unique)
                ids = torch.cat([u.unique, u.unique.new_zeros(1)]).to(self.device)
                # Padding slots read row 0: their products are dropped (`filled`).
                self._slot_rows.append([ids[b.slots] for b in u.blocks])
                self._feature_rows.append(ids[per_feature])
                self._dec.append(None)
                continue
            self._slot_rows.append([b.slots for b in u.blocks])
            self._feature_rows.append(per_feature)
            if self.decoder_cache == "disk":
                self._dec.append(None)
                continue
            rows = self._gather_decoders(s, u.unique)
            if self.decoder_cache == "device":
                rows = rows.to(self.device)
            elif self.device.type == "cuda":
                rows = rows.cpu().pin_memory()
            else:
                rows = rows.cpu()
            self._dec.append(rows)

    def _mapped(self, s: int) -> bool:
        """Rows are read in place: the device is the CPU the decoders live on, in memory. A
        memory-mapped decoder is not read in place: each row read through the map leaves its
        page-cache folio (up to 2 MiB) mapped in the process, most of the decoder in the end;
        its rows are gathered from the file instead (`DictionaryWeights.decoder_rows`)."""
        w = self.weights.module(s).W_dec
        on_file = self.weights._name(s, "W_dec") in self.weights.bundle.tensor_checks.entries
        cpu = self.device.type == w.device.type == "cpu"
        return self.decoder_cache == "device" and cpu and not on_file

    def _gather_decoders(self, s: int, unique: Tensor, j: int | None = None) -> Tensor:
        """[n_out, U + 1, d] (or [U + 1, d] for target j alone) from the dictionary."""
        rows = self.weights.decoder_rows(s, unique.cpu(), j)
        pad = rows.new_zeros(*rows.shape[:-2], 1, rows.shape[-1])
        return torch.cat([rows, pad], -2)

    def decoder_rows(self, s: int, j: int) -> Tensor:
        """The rows unit s's active features write to its j-th target, on the device
        (dictionary dtype, normalised units), indexed by `_slot_rows` / `_feature_rows`:
        [U + 1, d] (last row zero), or the whole decoder [F, d] where it is "mapped"."""
        if self._mapped(s):
            w = self.weights.module(s).W_dec.detach()
            return w[:, j] if self.weights.is_clt else w
        cached = self._dec[s]
        if cached is not None:
            return cached[j].to(self.device, non_blocking=True)
        return self._gather_decoders(s, self.units[s].unique, j).to(self.device)

    def _errors(self, mids: Mapping[int, Tensor]) -> list[Tensor]:
        """Per model layer: MLP output minus its reconstruction where replaced (the whole
        output elsewhere, and on layers without a dictionary); zero where `zero_mask`."""
        w, feats = self.weights, self.features
        keep = self.replace_mask[:, None].float()
        act = feats.activation.to(self.device)
        recon: dict[int, Tensor] = {}
        for s, u in enumerate(self.units):
            pos = feats.position[u.offset : u.offset + u.count].to(self.device)
            a = act[u.offset : u.offset + u.count]
            inv = self._feature_rows[s]
            for j, t in enumerate(w.targets(s)):
                acc = recon.setdefault(t, torch.zeros_like(self.mlp_outputs[0]))
                dec = self.decoder_rows(s, j)
                step = max(1, self.chunk_bytes // max(1, 8 * dec.shape[1]))
                for i in range(0, u.count, step):
                    rows = dec[inv[i : i + step]].float() * a[i : i + step, None]
                    acc.index_add_(0, pos[i : i + step], rows)
        errors = []
        for layer, o in enumerate(self.mlp_outputs):
            t = self.unit_of.get(layer)
            if t is None:
                errors.append(o)  # no dictionary: the whole output (read only, shared)
                continue
            r = (recon.get(t, torch.zeros_like(o)) + w.b_dec(t)) / w.output_scale(t)
            skip = w.skip(t, mids[t])
            if skip is not None:
                r = r + skip
            e = o - r * keep
            errors.append(e.masked_fill(self.zero_mask[:, None], 0.0))
        return errors

    def encoder_rows(self, idx: Tensor) -> Tensor:
        """[len(idx), d] float32: the gradient of feature idx's pre-activation w.r.t. its
        layer's resid_mid (scaled encoder rows), read for the features asked only."""
        feats = self.features
        out = torch.empty(len(idx), self.weights.d_in, device=self.device)
        unit = feats.unit[idx]
        for s in unit.unique().tolist():
            sel = (unit == s).nonzero().squeeze(1)
            out[sel.to(self.device)] = self.weights.encoder_rows(s, feats.feature[idx[sel]])
        return out

    def decoder_targets(self, s: int) -> range:
        """The units whose MLP output unit s's decoders write: t in s .. s + n_out - 1 for a
        CLT, s alone for a transcoder."""
        return self.weights.targets(s)

    # --- pass 2: the frozen linear model on copies of the prompt -------------------------------
    def replay(self, copies: int) -> None:
        """Run the language model on `copies` copies with frozen patterns and scales and
        constant, tapped sources; the graph it leaves holds constants only. A second call
        replaces the first graph (a batch of another size)."""
        self.final = None  # frees the previous graph
        if self._skip_qk:
            try:
                self._replay(copies, skip_qk=True)
                return
            except (RuntimeError, ValueError, IndexError) as e:
                # Running out of memory is not a family's attention refusing empty queries and
                # keys (both are RuntimeErrors): the fallback would take more memory, silently.
                if _out_of_memory(e):
                    raise
                # A family whose attention cannot run on empty queries and keys: compute them
                # (without autograd) from now on.
                self._skip_qk = False
        self._replay(copies, skip_qk=False)

    def _replay(self, copies: int, skip_qk: bool) -> None:
        vlm = self.vlm
        a = vlm.adapter
        self.freeze.mode = "replay"
        self.freeze.linear = True
        dtype = vlm.dtype
        seq = self.embeddings.shape[0]
        self.anchor = torch.zeros((), device=self.device, requires_grad=True)
        self._seeds: dict[int, tuple[Tensor, Tensor, Tensor]] = {}
        self._rows: Tensor | None = None
        holder: dict[str, Tensor] = {}
        anchor = self.anchor

        def const(x: Tensor) -> Tensor:
            return x.to(dtype)[None].expand(copies, -1, -1)

        def embed(t: Tensor, ctx: HookContext) -> Tensor:
            return _Tap.apply(const(self.embeddings), anchor, self._input_columns(None))

        # resid_mid of the layer running, for its skip path only: popped by its MLP output, or
        # the forward would hold every layer's [copies, seq, d] until the replay ends.
        mids: dict[int, Tensor] = {}

        def read(t: Tensor, ctx: HookContext) -> Tensor:
            layer = int(ctx.layer)  # type: ignore[arg-type]
            mids[layer] = _Seed.apply(t, self._seed_fn(layer))
            return mids[layer]

        def write(t: Tensor, ctx: HookContext) -> Tensor:
            layer = int(ctx.layer)  # type: ignore[arg-type]
            out = _Tap.apply(const(self.mlp_outputs[layer]), anchor, self._mlp_columns(layer))
            i = self.unit_of.get(layer)
            skip = self.weights.skip(i, mids.pop(layer)) if i is not None else None
            if skip is not None:  # the skip connection's linear path stays live where replaced
                skip = skip * self.replace_mask[:, None]
                out = out + (skip - skip.detach()).to(out.dtype)
            return out

        def resid_pre(t: Tensor, ctx: HookContext) -> Tensor:
            """The language model runs alone (no DeepStack): add the recorded injection."""
            layer = int(ctx.layer) - 1  # type: ignore[arg-type]
            inj = _Tap.apply(const(self.injected[layer]), anchor, self._input_columns(layer))
            return t + inj

        def final(_m: Any, _a: Any, out: Tensor) -> None:
            holder["final"] = out[:, -1].clone()  # the rest of the output is not kept

        hooks = [("lm.blocks.0.hook_resid_pre", embed)]
        hooks += [(r, read) for r in self.bundle.reads]
        hooks += [(f"lm.blocks.{i + 1}.hook_resid_pre", resid_pre) for i in self.injected]
        # MLP outputs are module hooks, not HookedVLM hooks: the MLP itself runs on no
        # positions (`_empty_inputs`), and its output's shape changes on replacement.
        mlp_outs = [(a.part(i, "mlp_out"), _as_module_hook(write, i)) for i in range(self.n_layers)]
        mlps = [a.part(i, "mlp") for i in range(self.n_layers)]
        # Queries and keys only feed the (frozen) pattern: their projections run on no
        # positions too (the attention's view to [.., -1 heads, d_head] makes that 0 heads),
        # or at least without autograd.
        qk = _qk_modules(a)
        # vlm.hooks before frozen: the resid_mid pre-hook (the seed) must run before the
        # norm's own pre-hook, which turns autograd off for the norm's forward.
        with (
            torch.enable_grad(),
            _no_parameter_grads(vlm.model),
            vlm.hooks(hooks),
            frozen(vlm, self.freeze),
            _empty_inputs(mlps + (qk if skip_qk else [])),
            _module_hooks(mlp_outs),
            _no_grad_modules([] if skip_qk else qk),
            _hook(a.norm(), final),
        ):
            zeros = torch.zeros(1, seq, a.d_model, dtype=dtype, device=self.device)
            extra: dict[str, Any] = {}
            if self.cross is not None:  # the vision features, a tapped constant (Mllama)
                cols = self._cross_columns()
                extra = self.cross.replay_kwargs(
                    copies, dtype, lambda v: _Tap.apply(v, anchor, cols)
                )
            a.lm()(inputs_embeds=zeros.expand(copies, -1, -1), use_cache=False, **extra)
        self.copies = copies
        self.final = holder["final"]

    def _seed_fn(self, layer: int) -> Callable[[Tensor], Tensor]:
        def fn(g: Tensor) -> Tensor:
            seed = self._seeds.get(layer)
            if seed is None:
                return g
            rows, pos, vecs = seed
            return g.index_put((rows, pos), vecs.to(g.dtype), accumulate=True)

        return fn

    def _mlp_columns(self, layer: int) -> Callable[[Tensor], None]:
        """Backward callback of layer `layer`'s MLP output: its error columns and the feature
        columns of every unit whose decoders write there."""

        def fn(g: Tensor) -> None:
            rows = self._rows
            assert rows is not None
            n, seq = rows.shape[0], self.embeddings.shape[0]
            # One float32 copy, position-major: [seq, n, d] feeds batched matmuls directly.
            gt = self._position_major(g[:n])
            start = self._err_start + layer * seq
            rows[:, start : start + seq] += torch.einsum("pnd,pd->np", gt, self.errors[layer])
            t = self.unit_of.get(layer)
            if t is None:
                return
            scale = 1.0 / self.weights.output_scale(t)
            for s in range(t + 1):
                if t in self.weights.targets(s):
                    self._feature_columns(s, t - s, gt, scale)

        return fn

    def _buffer(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
        """A tensor of `shape` from this backward's scratch space, reused by every callback of
        the pass: on a CPU the cost of a large temporary is first touching fresh memory (a
        [300, 64, 512] gather took 7-22 ms into new memory, 3.7 ms into a reused buffer). Freed
        when the backward ends. Its contents are whatever was there."""
        numel = math.prod(shape)
        buf = self._scratch.get(name)
        if buf is None or buf.numel() < numel or buf.dtype != dtype:
            buf = torch.empty(numel, dtype=dtype, device=self.device)
            self._scratch[name] = buf
        return buf[:numel].view(shape)

    def _position_major(self, g: Tensor) -> Tensor:
        """[n, seq, d] -> a contiguous float32 [seq, n, d] (one copy, into scratch space)."""
        n, seq, d = g.shape
        return self._buffer("position-major", (seq, n, d), torch.float32).copy_(g.transpose(0, 1))

    def _feature_columns(self, s: int, j: int, gt: Tensor, scale: float) -> None:
        """rows[:, unit s's features] += gt[p] . (decoder row of the feature at p, target j)
        * scale, as one batched matmul per block and chunk of positions (gt: [seq, n, d]
        float32)."""
        u, rows = self.units[s], self._rows
        assert rows is not None
        if u.count == 0:
            return
        dec = self.decoder_rows(s, j)
        seq, n, d = gt.shape
        for b, slot_rows in zip(u.blocks, self._slot_rows[s], strict=True):
            n_pos, k = slot_rows.shape
            per_pos = 4 * d * (n + 2 * k) + 4 * n * k
            step = max(1, self.chunk_bytes // per_pos)
            every = n_pos == seq  # every position, in order: slices, no gather
            for p0 in range(0, n_pos, step):
                p1 = min(p0 + step, n_pos)
                if every:
                    gp = gt[p0:p1]  # [P, n, d]
                else:
                    gp = self._buffer("positions", (p1 - p0, n, d), gt.dtype)
                    torch.index_select(gt, 0, b.positions[p0:p1], out=gp)
                dp = self._buffer("decoder rows", (p1 - p0, k, d), dec.dtype)
                torch.index_select(dec, 0, slot_rows[p0:p1].reshape(-1), out=dp.view(-1, d))
                dp = dp.float()  # [P, k, d]
                out = torch.bmm(
                    gp, dp.transpose(1, 2), out=self._buffer("products", (p1 - p0, n, k), gt.dtype)
                )  # [P, n, k]
                out = out.transpose(0, 1).reshape(n, -1)  # [n, P * k]
                lo, hi = p0 * k, p1 * k
                if b.filled is not None:  # the slots that hold a feature, in column order
                    lo = int(torch.searchsorted(b.filled, lo))
                    hi = int(torch.searchsorted(b.filled, hi))
                    out = out.index_select(1, b.filled[lo:hi] - p0 * k)
                if b.start is not None:
                    first = u.offset + b.start + lo
                    rows[:, first : first + out.shape[1]].add_(out, alpha=scale)
                else:
                    rows.index_add_(1, b.columns[lo:hi] + u.offset, out, alpha=scale)

    def _input_columns(self, layer: int | None) -> Callable[[Tensor], None]:
        """Backward callback of the input embeddings (layer None) or of what enters after
        `layer` (DeepStack): both belong to the input node of their position."""
        source = self.embeddings if layer is None else self.injected[layer]
        ref = self.reference if layer is None else self.reference_injected.get(layer)

        def fn(g: Tensor) -> None:
            rows = self._rows
            assert rows is not None
            n, seq = rows.shape[0], source.shape[0]
            start = self._err_start + self.n_layers * seq
            gt = self._position_major(g[:n])
            rows[:, start : start + seq] += torch.einsum("pnd,pd->np", gt, source)
            if self._ref_rows is not None and ref is not None:
                self._ref_rows[:, :seq] += torch.einsum("pnd,pd->np", gt, ref)

        return fn

    def _cross_columns(self) -> Callable[[Tensor], None]:
        """Backward callback of the vision features cross-attention reads: their input
        columns, after the token input columns."""
        cross = self.cross
        assert cross is not None

        def fn(g: Tensor) -> None:
            rows = self._rows
            assert rows is not None
            n = rows.shape[0]
            start = self._err_start + (self.n_layers + 1) * self.embeddings.shape[0]
            rows[:, start : start + cross.n] += cross.columns(g[:n])

        return fn

    @property
    def _err_start(self) -> int:
        return len(self.features)

    @property
    def n_inputs(self) -> int:
        """Input-node columns: one per position, then any cross-attention vision features."""
        return self.embeddings.shape[0] + (self.cross.n if self.cross is not None else 0)

    @property
    def n_cols(self) -> int:
        return len(self.features) + self.n_layers * self.embeddings.shape[0] + self.n_inputs

    def backward(self, targets: list[tuple[int, int, Tensor]], retain: bool = True) -> Tensor:
        """Rows of direct effects for up to `copies` targets.

        A target is (layer, position, vector): the gradient `vector` is injected at resid_mid of
        model layer `layer` (a feature's encoder row) or, with layer == n_layers, at the final
        norm's output (a demeaned unembedding row). Returns [n_targets, n_cols] float32 with
        columns ordered [active features, errors (layer-major, every model layer), inputs
        (one per position, then cross-attention vision features)].
        """
        n = len(targets)
        if n > self.copies:
            raise ValueError(f"{n} targets for {self.copies} copies")
        grad_final = torch.zeros_like(self.final)
        by_layer: dict[int, list[tuple[int, int, Tensor]]] = {}
        for row, (layer, pos, vec) in enumerate(targets):
            if layer == self.n_layers:
                grad_final[row] = vec.to(grad_final.dtype)
            else:
                by_layer.setdefault(layer, []).append((row, pos, vec))
        self._seeds = {
            layer: (
                torch.tensor([r for r, _, _ in items], device=self.device),
                torch.tensor([p for _, p, _ in items], device=self.device),
                torch.stack([v.to(self.device) for _, _, v in items]),
            )
            for layer, items in by_layer.items()
        }
        self._rows = torch.zeros(n, self.n_cols, device=self.device)
        if self.reference is not None:
            self._ref_rows = torch.zeros(n, self.n_inputs, device=self.device)
        try:
            torch.autograd.backward(
                [self.final], [grad_final], inputs=[self.anchor], retain_graph=retain
            )
            rows = self._rows
            self.reference_rows = self._ref_rows
        finally:
            self._rows = None
            self._ref_rows = None
            self._seeds = {}
            self._scratch = {}
        # Activations multiply each feature's column once, after every target's sum.
        rows[:, : len(self.features)] *= self.features.activation.to(self.device)
        return rows


def _as_module_hook(fn: Callable[[Tensor, HookContext], Tensor], layer: int) -> Any:
    ctx = HookContext(mlp_out(layer), layer, None)

    def hook(_m: torch.nn.Module, _args: Any, output: Any) -> Any:
        if isinstance(output, tuple):
            return (fn(output[0], ctx), *output[1:])
        return fn(output, ctx)

    return hook


@contextlib.contextmanager
def _module_hooks(pairs: list[tuple[torch.nn.Module, Any]]) -> Iterator[None]:
    """Forward hooks on modules for the duration of the block."""
    handles = [register_vlmscope_hook(m, fn) for m, fn in pairs]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _qk_modules(adapter: Any) -> list[torch.nn.Module]:
    """The query and key projections of every LM layer (none where a family fuses them:
    Phi-4-multimodal's qkv_proj computes the values too, and `part(i, "q")` names it)."""
    out = []
    for i in range(adapter.n_layers):
        if adapter.layer_map_of(i).qkv is not None:
            continue
        for part in ("q", "k"):
            try:
                out.append(adapter.part(i, part))
            except AttributeError:
                return []
    return out


def _last_logit_kwargs(model: torch.nn.Module) -> dict[str, Any]:
    """Ask the HF model for the last position's logits only, where it can."""
    params = inspect.signature(model.forward).parameters
    return {"logits_to_keep": 1} if "logits_to_keep" in params else {}


@contextlib.contextmanager
def _hook(module: torch.nn.Module, fn: Any) -> Iterator[None]:
    """A forward hook on `module` for the duration of the block."""
    with _module_hooks([(module, fn)]):
        yield


@contextlib.contextmanager
def _pre_hooks(pairs: list[tuple[torch.nn.Module, Any]]) -> Iterator[None]:
    """Forward pre-hooks (with keyword arguments) on modules for the duration of the block."""
    handles = [m.register_forward_pre_hook(fn, with_kwargs=True) for m, fn in pairs]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def _empty_inputs(modules: list[torch.nn.Module]) -> Iterator[None]:
    """`modules` run on an empty slice of positions: their outputs are replaced (MLPs, by
    recorded constants) or unused (query and key projections, under a frozen pattern), so
    computing them would only cost time and memory."""

    def empty(_m: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if args:
            return (args[0][:, :0], *args[1:]), kwargs
        key = next(k for k in ("hidden_states", "x", "input") if k in kwargs)
        return args, {**kwargs, key: kwargs[key][:, :0]}

    with _pre_hooks([(m, empty) for m in modules]):
        yield


@contextlib.contextmanager
def _no_grad_modules(modules: list[torch.nn.Module]) -> Iterator[None]:
    """Run `modules` without autograd (their outputs feed nothing the replay differentiates:
    queries and keys, whose pattern is frozen)."""
    modes: list[bool] = []

    def pre(_m: torch.nn.Module, _args: Any) -> None:
        modes.append(torch.is_grad_enabled())
        torch.set_grad_enabled(False)

    def post(_m: torch.nn.Module, _args: Any, _out: Any) -> None:
        torch.set_grad_enabled(modes.pop())

    handles = [h for m in modules for h in (m.register_forward_pre_hook(pre),
                                             register_vlmscope_hook(m, post))]  # fmt: skip
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def _no_parameter_grads(*modules: torch.nn.Module) -> Iterator[None]:
    """Parameters leave the autograd graph for the block: attribution differentiates with
    respect to its sources only, and a graph through the weights would keep every layer's
    input alive for weight gradients nobody asks for."""
    params = [p for m in modules for p in m.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


def _out_of_memory(e: BaseException) -> bool:
    """Whether `e` is an accelerator running out of memory (or failing), not a model error."""
    accelerator = getattr(torch, "AcceleratorError", None)  # torch >= 2.8
    return isinstance(e, torch.OutOfMemoryError) or (
        accelerator is not None and isinstance(e, accelerator)
    )
