"""The local replacement model of one prompt, and batched backward passes through it.

`record()` runs the original model once and stores what the linearised model needs: the input
embeddings (token and image-patch nodes), the active dictionary features, each layer's MLP
output and the error of its reconstruction, the attention patterns and norm scales. `replay()`
reruns the model on copies of the prompt with patterns and scales frozen and every MLP output
replaced by a constant leaf tensor, so that the model is linear from its leaves (embeddings,
MLP outputs) to every feature pre-activation and logit. One backward pass then gives, for a
batch of targets (one per copy), the direct effect of every source on each target.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from vlmscope.attribution.freeze import FreezeState, frozen
from vlmscope.models.hooked import HookContext, HookedVLM
from vlmscope.training.bundle import DictionaryBundle


@dataclass
class ActiveFeatureTable:
    """Active features sorted by (layer, position, feature): parallel 1-D tensors."""

    layer: Tensor
    position: Tensor
    feature: Tensor
    activation: Tensor
    #: [n, d] the gradient of each feature's pre-activation w.r.t. its layer's resid_mid.
    encoder: Tensor

    def __len__(self) -> int:
        return len(self.layer)


class AttributionContext:
    """Everything attribution needs about one prompt (batch of 1)."""

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
        self.n_layers = len(bundle.writes)
        self.freeze = FreezeState()

    # --- pass 1: the original model ------------------------------------------------------------
    @torch.no_grad()
    def record(self) -> None:
        b, vlm = self.bundle, self.vlm
        self.freeze = FreezeState(mode="record")
        mids: dict[int, Tensor] = {}
        outs: dict[int, Tensor] = {}
        codes: dict[int, Any] = {}
        read_index = {n: i for i, n in enumerate(b.reads)}
        write_index = {n: i for i, n in enumerate(b.writes)}
        store: dict[str, Tensor] = {}

        def embed(t: Tensor, ctx: HookContext) -> None:
            store["embed"] = t[0].detach().float()

        def read(t: Tensor, ctx: HookContext) -> None:
            i = read_index[ctx.name]
            mids[i] = t[0].detach().float()
            codes[i] = b.encode_unit(i, mids[i])

        def write(t: Tensor, ctx: HookContext) -> None:
            outs[write_index[ctx.name]] = t[0].detach().float()

        def final(_m: Any, _a: Any, out: Tensor) -> None:
            store["final"] = out[0].detach().float()

        hooks = [("lm.blocks.0.hook_resid_pre", embed)]
        hooks += [(r, read) for r in b.reads] + [(w, write) for w in b.writes]
        # The final-norm hook goes in after the freeze hooks so it sees the frozen output.
        with frozen(vlm, self.freeze), vlm.hooks(hooks), _hook(vlm.adapter.norm(), final):
            out = vlm.forward(self.inputs)
        self.logits = out.logits[0, -1].float()
        self.embeddings = store["embed"]  # [seq, d]
        self.final_resid = store["final"]
        self.mlp_outputs = [outs[t] for t in range(self.n_layers)]
        self.resid_mid = [mids[i] for i in range(self.n_layers)]
        # Reconstruction where the dictionaries replace; elsewhere the whole output is error.
        keep = self.replace_mask
        recon = []
        for t in range(self.n_layers):
            masked = {s: _mask_codes(c, keep) for s, c in codes.items() if s <= t}
            recon.append(b.decode_unit(t, masked, mids[t]).float() * keep[:, None])
        self.errors = [o - r for o, r in zip(self.mlp_outputs, recon, strict=True)]
        self.features = self._feature_table({s: _mask_codes(c, keep) for s, c in codes.items()})

    def _feature_table(self, codes: Mapping[int, Any]) -> ActiveFeatureTable:
        layers, pos, feat, act, enc = [], [], [], [], []
        for s in range(self.n_layers):
            c = codes[s]
            rows, slot = (c.values > 0).nonzero(as_tuple=True)
            f = c.indices[rows, slot]
            order = torch.argsort(rows * c.num_latents + f)
            rows, f, vals = rows[order], f[order], c.values[rows, slot][order]
            layers.append(torch.full_like(rows, s))
            pos.append(rows)
            feat.append(f)
            act.append(vals.float())
            enc.append(self._encoder_rows(s, f))
        return ActiveFeatureTable(
            torch.cat(layers), torch.cat(pos), torch.cat(feat), torch.cat(act), torch.cat(enc)
        )

    def _encoder_rows(self, s: int, f: Tensor) -> Tensor:
        """d(pre-activation of feature f at layer s) / d(resid_mid): scaled encoder rows."""
        b = self.bundle
        if b.clt is not None:
            layer = b.clt.layers[s]
            return (layer.W_enc[f] * layer.input_scale).detach().float()
        coder = b.coders[s]
        return (coder.W_enc[f] * coder.input_scale).detach().float()  # type: ignore[index]

    def decoder_rows(self, s: int, t: int, f: Tensor) -> Tensor:
        """The vector a unit activation of features f (source layer s) adds to MLP output t."""
        b = self.bundle
        if b.clt is not None:
            layer, target = b.clt.layers[s], b.clt.layers[t]
            if t - s >= layer.n_out:
                return torch.zeros(len(f), b.cfg.d_out, device=f.device)
            return (layer.W_dec[f, t - s] / target.output_scale).detach().float()
        if s != t:
            return torch.zeros(len(f), b.cfg.d_out, device=f.device)
        coder = b.coders[s]
        return (coder.W_dec[f] / coder.output_scale).detach().float()  # type: ignore[index]

    def skip(self, t: int, x: Tensor) -> Tensor | None:
        """The linear skip path's output at layer t (None without skip connections)."""
        b = self.bundle
        mod = b.clt.layers[t] if b.clt is not None else b.coders[t]
        w = getattr(mod, "W_skip", None)
        if w is None:
            return None
        scaled = x.float() * mod.input_scale
        return torch.nn.functional.linear(scaled, w.float()) / mod.output_scale

    # --- pass 2: the frozen linear model on copies of the prompt -------------------------------
    def replay(self, copies: int) -> None:
        """Forward `copies` copies with frozen patterns/scales and leaf sources; keeps the graph."""
        vlm, b = self.vlm, self.bundle
        self.freeze.mode = "replay"
        self.embed_leaf = self.embeddings.expand(copies, -1, -1).clone().requires_grad_(True)
        self.mlp_leaves = [
            o.expand(copies, -1, -1).clone().requires_grad_(True) for o in self.mlp_outputs
        ]
        mids: dict[int, Tensor] = {}
        read_index = {n: i for i, n in enumerate(b.reads)}
        write_index = {n: i for i, n in enumerate(b.writes)}
        holder: dict[str, Tensor] = {}

        def embed(t: Tensor, ctx: HookContext) -> Tensor:
            return self.embed_leaf.to(t.dtype)

        def read(t: Tensor, ctx: HookContext) -> None:
            mids[read_index[ctx.name]] = t

        def write(t: Tensor, ctx: HookContext) -> Tensor:
            i = write_index[ctx.name]
            out = self.mlp_leaves[i]
            skip = self.skip(i, mids[i]) if i in mids else None
            if skip is not None:  # the skip connection's linear path stays live where replaced
                skip = skip * self.replace_mask[:, None]
                out = out + skip - skip.detach()
            return out.to(t.dtype)

        def final(_m: Any, _a: Any, out: Tensor) -> None:
            holder["final"] = out

        hooks = [("lm.blocks.0.hook_resid_pre", embed)]
        hooks += [(r, read) for r in b.reads] + [(w, write) for w in b.writes]
        with (
            torch.enable_grad(),
            _no_parameter_grads(vlm.model, b),
            frozen(vlm, self.freeze),
            vlm.hooks(hooks),
            _hook(vlm.adapter.norm(), final),
        ):
            vlm.forward(_repeat_inputs(self.inputs, copies))
        self.copies = copies
        self.mids = [mids[i] for i in range(self.n_layers)]
        self.final = holder["final"]

    def backward(self, targets: list[tuple[int, int, Tensor]], retain: bool = True) -> Tensor:
        """Rows of direct effects for up to `copies` targets.

        A target is (layer, position, vector): the gradient `vector` is injected at resid_mid of
        `layer` (a feature's encoder row) or, with layer == n_layers, at the final norm's
        output (a demeaned unembedding row). Returns [n_targets, n_cols] with columns ordered
        [active features, errors (layer-major), input embeddings].
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
        leaves = [self.embed_leaf, *self.mlp_leaves]
        got = torch.autograd.grad(outputs, leaves, grads, retain_graph=retain, allow_unused=True)
        g_embed = _zeros_if_none(got[0], self.embed_leaf)[:n].float()
        g_mlp = [
            _zeros_if_none(x, leaf)[:n].float()
            for x, leaf in zip(got[1:], self.mlp_leaves, strict=True)
        ]
        return self._rows(g_embed, g_mlp)

    def _rows(self, g_embed: Tensor, g_mlp: list[Tensor]) -> Tensor:
        feats = self.features
        cols = []
        feat_cols = torch.zeros(g_embed.shape[0], len(feats), device=g_embed.device)
        for s in range(self.n_layers):
            sel = (feats.layer == s).nonzero().squeeze(1)
            if len(sel) == 0:
                continue
            pos, f, a = feats.position[sel], feats.feature[sel], feats.activation[sel]
            total = torch.zeros(g_embed.shape[0], len(sel), device=g_embed.device)
            for t in range(s, self.n_layers):
                dec = self.decoder_rows(s, t, f)
                if not bool(dec.any()):
                    continue
                total += torch.einsum("bnd,nd->bn", g_mlp[t][:, pos], dec)
            feat_cols[:, sel] = total * a
        cols.append(feat_cols)
        cols += [(g * e).sum(-1) for g, e in zip(g_mlp, self.errors, strict=True)]
        cols.append((g_embed * self.embeddings).sum(-1))
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


def _mask_codes(codes: Any, keep: Tensor) -> Any:
    """Codes with every entry at a non-replaced position set to zero."""
    from vlmscope.dictionaries import SparseCodes

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
