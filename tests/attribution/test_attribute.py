"""Every edge of an attribution graph equals a measured effect in the frozen model.

The measurement is a forward pass, not a gradient: attention patterns and norm scales are
replayed from the clean run, every MLP output is held at its clean value, one source is
perturbed, and the change of every feature pre-activation and demeaned logit is read off.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from tests.conftest import random_image
from tests.replacement.test_model import random_clt, vlm_for
from vlmscope.attribution.attribute import attribute
from vlmscope.attribution.freeze import FreezeState, frozen
from vlmscope.attribution.graph import Graph
from vlmscope.models import zoo
from vlmscope.models.hooked import HookedVLM
from vlmscope.training.bundle import DictionaryBundle


def prompt(vlm: HookedVLM, name: str) -> Any:
    if zoo.spec(name).multimodal:
        return vlm.prepare("what colour is the circle", images=[random_image(32, 40, 7)])
    return vlm.prepare("what colour is the circle and the square")


class FrozenProbe:
    """Forward passes of the frozen model with one source perturbed."""

    def __init__(self, vlm: HookedVLM, bundle: DictionaryBundle, inputs: Any, graph: Graph):
        self.vlm, self.bundle, self.inputs, self.graph = vlm, bundle, inputs, graph
        self.state = FreezeState(mode="record")
        self.embed: torch.Tensor | None = None
        self.mlp: dict[str, torch.Tensor] = {}

        def grab_embed(t: torch.Tensor, ctx: Any) -> None:
            self.embed = t.detach().clone()

        def grab_mlp(t: torch.Tensor, ctx: Any) -> None:
            self.mlp[ctx.name] = t.detach().clone()

        hooks = [("lm.blocks.0.hook_resid_pre", grab_embed)] + [
            (w, grab_mlp) for w in bundle.writes
        ]
        with torch.no_grad(), frozen(vlm, self.state), vlm.hooks(hooks):
            self.clean_logits = vlm.forward(inputs).logits
        self.state.mode = "replay"
        self.base = self.measure({}, None)

    def measure(
        self, d_mlp: dict[int, tuple[int, torch.Tensor]], d_embed: tuple[int, torch.Tensor] | None
    ) -> torch.Tensor:
        b, g = self.bundle, self.graph
        mids: dict[int, torch.Tensor] = {}
        store: dict[str, torch.Tensor] = {}

        def embed(t: torch.Tensor, ctx: Any) -> torch.Tensor:
            e = self.embed.clone()  # type: ignore[union-attr]
            if d_embed is not None:
                e[0, d_embed[0]] += d_embed[1]
            return e

        def write(i: int) -> Any:
            def fn(t: torch.Tensor, ctx: Any) -> torch.Tensor:
                y = self.mlp[ctx.name].clone()
                if i in d_mlp:
                    y[0, d_mlp[i][0]] += d_mlp[i][1]
                return y

            return fn

        def read(i: int) -> Any:
            def fn(t: torch.Tensor, ctx: Any) -> None:
                mids[i] = t[0].detach().clone()

            return fn

        def final(_m: Any, _a: Any, out: torch.Tensor) -> None:
            store["final"] = out[0, -1].detach().clone()

        hooks = [("lm.blocks.0.hook_resid_pre", embed)]
        hooks += [(r, read(i)) for i, r in enumerate(b.reads)] + [
            (w, write(i)) for i, w in enumerate(b.writes)
        ]
        with torch.no_grad(), frozen(self.vlm, self.state), self.vlm.hooks(hooks):
            h = self.vlm.adapter.norm().register_forward_hook(final)  # after the freeze hooks
            try:
                self.vlm.forward(self.inputs)
            finally:
                h.remove()
        clt = b.clt
        assert clt is not None
        pre = []
        for layer, pos, f in g.features.tolist():
            w = clt.layers[layer].W_enc[f] * clt.layers[layer].input_scale
            pre.append(mids[layer][pos] @ w.detach())
        w_u = self.vlm.adapter.unembed().weight.detach()
        logits = w_u @ store["final"]
        demeaned = logits - logits.mean()
        tg = torch.tensor([t.token_id for t in g.logit_targets])
        return torch.cat([torch.stack(pre), demeaned[tg]])


def check_column(probe: FrozenProbe, graph: Graph, col: int, effect: torch.Tensor) -> None:
    rows = torch.cat(
        [
            torch.arange(graph.n_features),
            torch.arange(graph.logit_slice.start, graph.logit_slice.stop),
        ]
    )
    expected = graph.adjacency[rows, col]
    nf = graph.n_features
    probe.largest = max(getattr(probe, "largest", 0.0), float(expected.abs().max()))
    torch.testing.assert_close(effect[:nf], expected[:nf], atol=1e-3, rtol=0)
    torch.testing.assert_close(effect[nf:], expected[nf:], atol=1e-5, rtol=0)


FAMILIES = ["llama", "llava", "qwen2_vl", "gemma3", "smolvlm"]


@pytest.mark.parametrize("name", FAMILIES)
def test_every_edge_equals_a_measured_effect(name: str, zoo_path: Any) -> None:
    vlm = vlm_for(name, zoo_path)
    bundle = random_clt(vlm, n_targets=2, seed=1)
    inputs = prompt(vlm, name)
    # A feature budget below the active count also exercises the influence-ordered search.
    graph = attribute(vlm, bundle, inputs, batch_size=32, max_feature_nodes=96)
    assert graph.n_features == min(96, graph.metadata["n_active_features"])
    # Weights left the autograd graph only while attributing.
    assert all(p.requires_grad for p in [*vlm.model.parameters(), *bundle.parameters()])
    probe = FrozenProbe(vlm, bundle, inputs, graph)
    # The frozen replay reproduces the model.
    torch.testing.assert_close(probe.clean_logits, vlm.forward(inputs).logits, atol=1e-4, rtol=0)
    n_pos = graph.n_pos
    gen = torch.Generator().manual_seed(0)
    positions = [*torch.randint(0, n_pos, (3,), generator=gen).tolist(), n_pos - 1]
    # Input nodes (tokens and, for VLMs, image patches): add the embedding again.
    image_pos = [p for p in range(n_pos) if graph.input_kinds[p] == "image"][:2]
    for p in positions + image_pos:
        eff = probe.measure({}, (p, probe.embed[0, p])) - probe.base  # type: ignore[index]
        check_column(probe, graph, graph.input_index(p), eff)
    # Error nodes: add the error vector again.
    from vlmscope.attribution.context import AttributionContext

    ctx = AttributionContext(vlm, bundle, inputs, torch.ones(n_pos, dtype=torch.bool))
    ctx.record()
    for layer in range(graph.n_layers):
        for p in positions[:2]:
            eff = probe.measure({layer: (p, ctx.errors[layer][p])}, None) - probe.base
            check_column(probe, graph, graph.error_index(layer, p), eff)
    # Feature nodes: double the activation (add its decoder contributions once more).
    clt = bundle.clt
    assert clt is not None
    for j in torch.randperm(graph.n_features, generator=gen)[:6].tolist():
        layer, pos, f = graph.features[j].tolist()
        a = float(graph.activations[j])
        deltas = {}
        for t in range(layer, graph.n_layers):
            if t - layer < clt.layers[layer].n_out:
                deltas[t] = (
                    pos,
                    a * clt.layers[layer].W_dec[f, t - layer].detach() / clt.layers[t].output_scale,
                )
        # One position per layer in this probe: apply each layer's delta.
        eff = probe.measure(deltas, None) - probe.base
        check_column(probe, graph, j, eff)
    assert probe.largest > 0.05, "every checked edge is ~0: the test would not catch errors"


def test_partial_influence_equals_the_square_matrix_series() -> None:
    """The rectangular propagation used to rank features gives the influence of the square
    adjacency whose uncomputed rows are zero (computed independently with `influence`)."""
    from vlmscope.attribution.attribute import _partial_influence
    from vlmscope.attribution.graph import influence, normalize_rows

    gen = torch.Generator().manual_seed(0)
    n_feat, n_other, n_logits = 12, 5, 2
    n_cols = n_feat + n_other
    # Feature f only reads from later-indexed features and the other columns: a DAG.
    computed = [3, 7, 0, 10]
    rows = torch.randn(n_logits + len(computed), n_cols, generator=gen)
    for r, f in enumerate(computed, start=n_logits):
        rows[r, : f + 1] = 0
    row_node = torch.tensor([n_cols, n_cols + 1, *computed])
    probs = torch.tensor([0.7, 0.2])
    square = torch.zeros(n_cols + n_logits, n_cols + n_logits)
    square[row_node, :n_cols] = rows
    weights = torch.zeros(n_cols + n_logits)
    weights[n_cols:] = probs
    want = influence(normalize_rows(square), weights)[:n_cols]
    got = _partial_influence(rows, row_node, probs, n_cols, n_logits)
    torch.testing.assert_close(got, want)
    assert got[computed].gt(0).any()  # paths through computed features do count
