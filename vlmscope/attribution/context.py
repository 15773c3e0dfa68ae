"""The local replacement model of one prompt, and batched backward passes through it.

`record()` runs the original model once and stores what the linearised model needs: the input
embeddings (token and image-patch nodes), the active dictionary features, each layer's MLP
output and the error of its reconstruction, the attention patterns and norm scales. `replay()`
reruns the model on copies of the prompt with patterns and scales frozen and every LM layer's
MLP output (covered by a dictionary or not) replaced by a constant leaf tensor, so that the
model is linear from its leaves (embeddings, MLP outputs, and what enters between layers, such
as Qwen3-VL's DeepStack visual features) to every feature pre-activation and logit. One
backward pass then gives, for a batch of targets (one per copy), the direct effect of every
source on each target.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from vlmscope.attribution.cross_inputs import cross_attention_inputs
from vlmscope.attribution.freeze import FreezeState, frozen
from vlmscope.dictionaries import SparseCodes
from vlmscope.models.hooked import HookContext, HookedVLM
from vlmscope.training.bundle import DictionaryBundle, mlp_out


@dataclass
class ActiveFeatureTable:
    """Active features sorted by (layer, position, feature): parallel 1-D tensors."""

    #: the model's LM layer of each feature (not the dictionary's unit index).
    layer: Tensor
    position: Tensor
    feature: Tensor
    activation: Tensor
    #: [n, d] the gradient of each feature's pre-activation w.r.t. its layer's resid_mid.
    encoder: Tensor
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


class AttributionContext:
    """Everything attribution needs about one prompt (batch of 1).

    Layers are the model's: every LM layer's MLP output is a source, whether or not a dictionary
    covers it (a layer without one is all error), so gradients never pass through a real MLP.
    """

    def __init__(
        self,
        vlm: HookedVLM,
        bundle: DictionaryBundle,
        inputs: Mapping[str, Any],
        replace_mask: Tensor,
    ) -> None:
        if bundle.kind == "sae":
            raise ValueError("attribution needs transcoders or a CLT that replace MLP outputs")
        if inputs["input_ids"].shape[0] != 1:
            raise ValueError("attribution runs on one prompt at a time (batch size 1)")
        self.vlm = vlm
        self.bundle = bundle
        self.inputs = inputs
        self.replace_mask = replace_mask.to(vlm.device)  # [seq] positions the dictionaries replace
        self.n_layers = int(vlm.adapter.n_layers)
        #: model layer of each bundle unit; unit_of maps back.
        self.unit_layers = unit_layers(bundle, self.n_layers)
        self.unit_of = {layer: u for u, layer in enumerate(self.unit_layers)}
        self.n_units = len(self.unit_layers)
        self.mlp_hooks = [mlp_out(layer) for layer in range(self.n_layers)]
        self.freeze = FreezeState()
        #: input nodes past the sequence: the vision features cross-attention reads (Mllama).
        self.cross = cross_attention_inputs(vlm, inputs)
        self.n_pos = int(inputs["input_ids"].shape[1])

    @property
    def n_inputs(self) -> int:
        """Input-node columns: one per position, then any cross-attention vision features."""
        return self.n_pos + (self.cross.n if self.cross is not None else 0)

    # --- pass 1: the original model ------------------------------------------------------------
    @torch.no_grad()
    def record(self) -> None:
        b, vlm = self.bundle, self.vlm
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
            codes[i] = b.encode_unit(i, mids[i])

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
        hooks += [(r, read) for r in b.reads] + [(w, write) for w in self.mlp_hooks]
        hooks += [(f"lm.blocks.{i}.hook_resid_post", resid_post) for i in range(self.n_layers)]
        hooks += [(f"lm.blocks.{i}.hook_resid_pre", resid_pre) for i in range(1, self.n_layers)]
        if self.cross is not None:
            hooks.append(self.cross.record_hook())
        # The final-norm hook goes in after the freeze hooks so it sees the frozen output.
        with frozen(vlm, self.freeze), vlm.hooks(hooks), _hook(vlm.adapter.norm(), final):
            out = vlm.forward(self.inputs)
        self.logits = out.logits[0, -1].float()
        self.embeddings = store["embed"]  # [seq, d]
        #: per model layer, the true MLP output.
        self.mlp_outputs = [outs[layer] for layer in range(self.n_layers)]
        #: model layer -> what is added to the residual stream after it outside the layers.
        self.injected = injected
        # Reconstruction where the dictionaries replace; elsewhere (other positions, layers
        # without a dictionary) the whole MLP output is error.
        keep = self.replace_mask
        self.errors = []
        for layer, o in enumerate(self.mlp_outputs):
            t = self.unit_of.get(layer)
            if t is None:
                self.errors.append(o)  # no dictionary: the whole output (read only, shared)
                continue
            masked = {s: _mask_codes(c, keep) for s, c in codes.items() if s <= t}
            recon = b.decode_unit(t, masked, mids[t]).float() * keep[:, None]
            self.errors.append(o - recon)
        self.features = self._feature_table({s: _mask_codes(c, keep) for s, c in codes.items()})
        #: per unit, the indices of its rows in `features` (fixed for every backward pass).
        unit = self.features.unit
        self._unit_rows = [(unit == s).nonzero().squeeze(1) for s in range(self.n_units)]

    def _feature_table(self, codes: Mapping[int, Any]) -> ActiveFeatureTable:
        units, layers, pos, feat, act, enc = [], [], [], [], [], []
        for s in range(self.n_units):
            c = codes[s]
            rows, slot = (c.values > 0).nonzero(as_tuple=True)
            f = c.indices[rows, slot]
            order = torch.argsort(rows * c.num_latents + f)
            rows, f, vals = rows[order], f[order], c.values[rows, slot][order]
            units.append(torch.full_like(rows, s))
            layers.append(torch.full_like(rows, self.unit_layers[s]))
            pos.append(rows)
            feat.append(f)
            act.append(vals.float())
            enc.append(self._encoder_rows(s, f))
        return ActiveFeatureTable(
            torch.cat(layers),
            torch.cat(pos),
            torch.cat(feat),
            torch.cat(act),
            torch.cat(enc),
            torch.cat(units),
        )

    def _module(self, s: int) -> Any:
        """Unit s's dictionary: the CLT's layer s, or transcoder s."""
        b = self.bundle
        return b.clt.layers[s] if b.clt is not None else b.coders[s]

    def _encoder_rows(self, s: int, f: Tensor) -> Tensor:
        """d(pre-activation of feature f of unit s) / d(resid_mid): scaled encoder rows."""
        mod = self._module(s)
        return (mod.W_enc[f] * mod.input_scale).detach().float()

    def decoder_targets(self, s: int) -> range:
        """The units whose MLP output unit s's decoders write: t in s .. s + n_out - 1 for a
        CLT, s alone for a transcoder."""
        n_out = self.bundle.clt.layers[s].n_out if self.bundle.clt is not None else 1
        return range(s, min(s + n_out, self.n_units))

    def decoder_rows(self, s: int, t: int, f: Tensor) -> Tensor:
        """The vector a unit activation of features f (unit s) adds to unit t's MLP output;
        zeros for a t outside `decoder_targets(s)`."""
        if t not in self.decoder_targets(s):
            return torch.zeros(len(f), self.bundle.cfg.d_out, device=f.device)
        w_dec = self._module(s).W_dec
        rows = w_dec[f, t - s] if self.bundle.clt is not None else w_dec[f]
        return (rows / self._module(t).output_scale).detach().float()

    def skip(self, t: int, x: Tensor) -> Tensor | None:
        """The linear skip path's output of unit t (None without skip connections)."""
        mod = self._module(t)
        w = getattr(mod, "W_skip", None)
        if w is None:
            return None
        scaled = x.float() * mod.input_scale
        return torch.nn.functional.linear(scaled, w.float()) / mod.output_scale

    # --- pass 2: the frozen linear model on copies of the prompt -------------------------------
    def replay(self, copies: int) -> None:
        """Forward `copies` copies with frozen patterns/scales and leaf sources; keeps the graph.

        Leaves: the input embeddings, every layer's MLP output, and whatever enters the
        residual stream between layers (DeepStack), each held at its recorded value.
        """
        vlm, b = self.vlm, self.bundle
        self.freeze.mode = "replay"

        def leaf(x: Tensor) -> Tensor:
            return x.expand(copies, -1, -1).clone().requires_grad_(True)

        self.embed_leaf = leaf(self.embeddings)
        self.mlp_leaves = [leaf(o) for o in self.mlp_outputs]
        self.inject_leaves = {layer: leaf(d) for layer, d in self.injected.items()}
        mids: dict[int, Tensor] = {}
        read_index = {n: i for i, n in enumerate(b.reads)}
        mlp_index = {n: i for i, n in enumerate(self.mlp_hooks)}
        holder: dict[str, Tensor] = {}

        def embed(t: Tensor, ctx: HookContext) -> Tensor:
            return self.embed_leaf.to(t.dtype)

        def read(t: Tensor, ctx: HookContext) -> None:
            mids[read_index[ctx.name]] = t

        def write(t: Tensor, ctx: HookContext) -> Tensor:
            layer = mlp_index[ctx.name]
            out = self.mlp_leaves[layer]
            i = self.unit_of.get(layer)
            skip = self.skip(i, mids[i]) if i is not None and i in mids else None
            if skip is not None:  # the skip connection's linear path stays live where replaced
                skip = skip * self.replace_mask[:, None]
                out = out + skip - skip.detach()
            return out.to(t.dtype)

        def resid_pre(t: Tensor, ctx: HookContext) -> Tensor:
            """The injection after the previous layer swapped for its leaf (same value)."""
            layer = int(ctx.layer) - 1  # type: ignore[arg-type]
            x = t.float() - self.injected[layer] + self.inject_leaves[layer]
            return x.to(t.dtype)

        def final(_m: Any, _a: Any, out: Tensor) -> None:
            holder["final"] = out

        hooks = [("lm.blocks.0.hook_resid_pre", embed)]
        hooks += [(r, read) for r in b.reads] + [(w, write) for w in self.mlp_hooks]
        hooks += [(f"lm.blocks.{i + 1}.hook_resid_pre", resid_pre) for i in self.injected]
        if self.cross is not None:
            hooks.append(self.cross.replay_hook(copies))
        with (
            torch.enable_grad(),
            _no_parameter_grads(vlm.model, b),
            frozen(vlm, self.freeze),
            vlm.hooks(hooks),
            _hook(vlm.adapter.norm(), final),
        ):
            vlm.forward(_repeat_inputs(self.inputs, copies))
        self.copies = copies
        self.mids = {self.unit_layers[i]: mids[i] for i in range(self.n_units)}
        self.final = holder["final"]

    def backward(self, targets: list[tuple[int, int, Tensor]], retain: bool = True) -> Tensor:
        """Rows of direct effects for up to `copies` targets.

        A target is (layer, position, vector): the gradient `vector` is injected at resid_mid of
        model layer `layer` (a feature's encoder row) or, with layer == n_layers, at the final
        norm's output (a demeaned unembedding row). Returns [n_targets, n_cols] with columns
        ordered [active features, errors (layer-major, every model layer), input embeddings,
        cross-attention vision features (Mllama)].
        """
        n = len(targets)
        if n > self.copies:
            raise ValueError(f"{n} targets for {self.copies} copies")
        outputs: list[Tensor] = []
        grads: list[Tensor] = []
        by_layer: dict[int, list[tuple[int, int, Tensor]]] = {}
        for row, (layer, pos, vec) in enumerate(targets):
            by_layer.setdefault(layer, []).append((row, pos, vec))
        for layer, items in by_layer.items():
            out = self.final if layer == self.n_layers else self.mids[layer]
            g = torch.zeros_like(out)
            for row, pos, vec in items:
                g[row, pos] = vec.to(g.dtype)
            outputs.append(out)
            grads.append(g)
        inject = list(self.inject_leaves.values())
        cross = [self.cross.leaf] if self.cross is not None and self.cross.leaf is not None else []
        leaves = [self.embed_leaf, *self.mlp_leaves, *inject, *cross]
        got = torch.autograd.grad(outputs, leaves, grads, retain_graph=retain, allow_unused=True)
        g = [_zeros_if_none(x, leaf)[:n].float() for x, leaf in zip(got, leaves, strict=True)]
        n_mlp = len(self.mlp_leaves)
        g_inject = dict(
            zip(self.inject_leaves, g[1 + n_mlp : 1 + n_mlp + len(inject)], strict=True)
        )
        rows = self._rows(g[0], g[1 : 1 + n_mlp], g_inject)
        if cross:
            rows = torch.cat([rows, self.cross.columns(g[-1])], dim=1)  # type: ignore[union-attr]
        return rows

    def _rows(self, g_embed: Tensor, g_mlp: list[Tensor], g_inject: dict[int, Tensor]) -> Tensor:
        feats = self.features
        cols = []
        feat_cols = torch.zeros(g_embed.shape[0], len(feats), device=g_embed.device)
        for s, sel in enumerate(self._unit_rows):
            if len(sel) == 0:
                continue
            pos, f, a = feats.position[sel], feats.feature[sel], feats.activation[sel]
            total = torch.zeros(g_embed.shape[0], len(sel), device=g_embed.device)
            for t in self.decoder_targets(s):
                dec = self.decoder_rows(s, t, f)
                total += torch.einsum("bnd,nd->bn", g_mlp[self.unit_layers[t]][:, pos], dec)
            feat_cols[:, sel] = total * a
        cols.append(feat_cols)
        cols += [(g * e).sum(-1) for g, e in zip(g_mlp, self.errors, strict=True)]
        # An input node is everything its position injects: the embedding, plus (DeepStack)
        # the visual features added to image positions between layers.
        inputs = (g_embed * self.embeddings).sum(-1)
        for layer, g in g_inject.items():
            inputs = inputs + (g * self.injected[layer]).sum(-1)
        cols.append(inputs)
        return torch.cat(cols, dim=1)


@contextlib.contextmanager
def _hook(module: torch.nn.Module, fn: Any) -> Iterator[None]:
    """A forward hook on `module` for the duration of the block."""
    h = module.register_forward_hook(fn)
    try:
        yield
    finally:
        h.remove()


@contextlib.contextmanager
def _no_parameter_grads(*modules: torch.nn.Module) -> Iterator[None]:
    """Parameters leave the autograd graph for the block: attribution differentiates with
    respect to its leaves only, and a graph through the weights would keep every layer's input
    (and the vision tower's activations) alive for weight gradients nobody asks for."""
    params = [p for m in modules for p in m.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


def _zeros_if_none(g: Tensor | None, like: Tensor) -> Tensor:
    return torch.zeros_like(like) if g is None else g


def _mask_codes(codes: SparseCodes, keep: Tensor) -> SparseCodes:
    """Codes with every entry at a non-replaced position set to zero."""
    vals = codes.values * keep[:, None].to(codes.values.dtype)
    return SparseCodes(vals, codes.indices, codes.num_latents)


def _repeat_inputs(inputs: Mapping[str, Any], copies: int) -> dict[str, Any]:
    """The prompt repeated `copies` times: per-sample tensors along the batch dimension, image
    tensors (one row per image or patch) repeated as many times."""
    out: dict[str, Any] = {}
    for k, v in inputs.items():
        if not isinstance(v, Tensor):
            out[k] = v
        elif k in (
            "input_ids",
            "attention_mask",
            "token_type_ids",
            "mm_token_type_ids",
            "position_ids",
        ):
            out[k] = v.expand(copies, *v.shape[1:])
        else:
            out[k] = torch.cat([v] * copies)
    return out
