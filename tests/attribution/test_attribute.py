"""Every edge of an attribution graph equals a measured effect in the frozen model.

The measurement is a forward pass, not a gradient: attention patterns and norm scales are
replayed from the clean run, every MLP output is held at its clean value, one source is
perturbed, and the change of every feature pre-activation and demeaned logit is read off.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from tests.conftest import random_image
from tests.replacement.test_model import random_clt, vlm_for
from vlmscope.attribution.attribute import attribute
from vlmscope.attribution.export import load_raw, save_raw, to_json
from vlmscope.attribution.freeze import FreezeState, frozen
from vlmscope.attribution.graph import Graph
from vlmscope.models import zoo
from vlmscope.models.hooked import HookedVLM
from vlmscope.replacement.model import ReplacementModel
from vlmscope.training.bundle import DictionaryBundle


def prompt(vlm: HookedVLM, name: str) -> Any:
    if zoo.spec(name).multimodal:
        return vlm.prepare("what colour is the circle", images=[random_image(32, 40, 7)])
    return vlm.prepare("what colour is the circle and the square")


def layer_of(hook: str) -> int:
    """`lm.blocks.3.hook_resid_mid` -> 3."""
    return int(hook.split(".")[2])


class FrozenProbe:
    """Forward passes of the frozen model with one source perturbed.

    Every LM layer's MLP output is held at its clean value (not only the layers the
    dictionaries cover); perturbations are keyed by model layer.
    """

    def __init__(self, vlm: HookedVLM, bundle: DictionaryBundle, inputs: Any, graph: Graph):
        self.vlm, self.bundle, self.inputs, self.graph = vlm, bundle, inputs, graph
        self.n_layers = vlm.adapter.n_layers
        self.mlp_hooks = [f"lm.blocks.{i}.mlp.hook_out" for i in range(self.n_layers)]
        self.units = [layer_of(r) for r in bundle.reads]  # unit -> model layer
        self.state = FreezeState(mode="record")
        self.embed: torch.Tensor | None = None
        self.mlp: dict[int, torch.Tensor] = {}

        def grab_embed(t: torch.Tensor, ctx: Any) -> None:
            self.embed = t.detach().clone()

        def grab_mlp(t: torch.Tensor, ctx: Any) -> None:
            self.mlp[layer_of(ctx.name)] = t.detach().clone()

        hooks = [("lm.blocks.0.hook_resid_pre", grab_embed)] + [
            (w, grab_mlp) for w in self.mlp_hooks
        ]
        with torch.no_grad(), frozen(vlm, self.state), vlm.hooks(hooks):
            self.clean_logits = vlm.forward(inputs).logits
        assert sorted(self.mlp) == list(range(self.n_layers))  # every MLP is frozen
        self.state.mode = "replay"
        self.base = self.measure({}, None)

    def measure(
        self,
        d_mlp: dict[int, tuple[int, torch.Tensor]],
        d_embed: tuple[int, torch.Tensor] | None,
        deepstack_pos: int | None = None,
    ) -> torch.Tensor:
        """Feature pre-activations and demeaned target logits; `deepstack_pos` also adds the
        model's own DeepStack visual features (Qwen3-VL) once more at that position."""
        b, g = self.bundle, self.graph
        mids: dict[int, torch.Tensor] = {}
        store: dict[str, torch.Tensor] = {}

        def embed(t: torch.Tensor, ctx: Any) -> torch.Tensor:
            e = self.embed.clone()  # type: ignore[union-attr]
            if d_embed is not None:
                e[0, d_embed[0]] += d_embed[1]
            return e

        def write(t: torch.Tensor, ctx: Any) -> torch.Tensor:
            layer = layer_of(ctx.name)
            y = self.mlp[layer].clone()
            if layer in d_mlp:
                y[0, d_mlp[layer][0]] += d_mlp[layer][1]
            return y

        def read(t: torch.Tensor, ctx: Any) -> None:
            mids[layer_of(ctx.name)] = t[0].detach().clone()

        def final(_m: Any, _a: Any, out: torch.Tensor) -> None:
            store["final"] = out[0, -1].detach().clone()

        hooks = [("lm.blocks.0.hook_resid_pre", embed)]
        hooks += [(r, read) for r in b.reads] + [(w, write) for w in self.mlp_hooks]
        lm = self.vlm.adapter.lm()
        if deepstack_pos is not None and hasattr(lm, "_deepstack_process"):
            own = lm._deepstack_process

            def again(h: torch.Tensor, mask: torch.Tensor, embeds: torch.Tensor) -> torch.Tensor:
                out = own(h, mask, embeds)
                extra = torch.zeros_like(h)
                extra[mask.to(h.device)] = embeds.to(h.dtype)
                out[:, deepstack_pos] += extra[:, deepstack_pos]
                return out

            lm._deepstack_process = again  # this instance only, removed below
        try:
            with torch.no_grad(), frozen(self.vlm, self.state), self.vlm.hooks(hooks):
                h = self.vlm.adapter.norm().register_forward_hook(final)  # after freeze hooks
                try:
                    self.vlm.forward(self.inputs)
                finally:
                    h.remove()
        finally:
            lm.__dict__.pop("_deepstack_process", None)
        clt = b.clt
        assert clt is not None
        pre = []
        for layer, pos, f in g.features.tolist():
            unit = clt.layers[self.units.index(layer)]
            w = unit.W_enc[f] * unit.input_scale
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


def check_every_edge(
    vlm: HookedVLM,
    bundle: DictionaryBundle,
    inputs: Any,
    n_features_checked: int = 6,
    offload: Any = None,
) -> FrozenProbe:
    """Attribute, then check sampled columns of every node kind against measured effects."""
    # A feature budget below the active count also exercises the influence-ordered search.
    graph = attribute(vlm, bundle, inputs, batch_size=32, max_feature_nodes=96, offload=offload)
    assert graph.n_features == min(96, graph.metadata["n_active_features"])
    # Layers are the model's, whatever the dictionaries cover.
    assert graph.n_layers == vlm.adapter.n_layers
    covered = [layer_of(r) for r in bundle.reads]
    assert set(graph.features[:, 0].tolist()) <= set(covered)
    # Weights left the autograd graph only while attributing.
    assert all(p.requires_grad for p in [*vlm.model.parameters(), *bundle.parameters()])
    probe = FrozenProbe(vlm, bundle, inputs, graph)
    # The frozen replay reproduces the model.
    torch.testing.assert_close(probe.clean_logits, vlm.forward(inputs).logits, atol=1e-4, rtol=0)
    n_pos = graph.n_pos
    gen = torch.Generator().manual_seed(0)
    positions = [*torch.randint(0, n_pos, (3,), generator=gen).tolist(), n_pos - 1]
    # Input nodes (tokens and, for VLMs, image patches): add what the position injects again,
    # its embedding and (Qwen3-VL) its DeepStack visual features.
    image_pos = [p for p in range(n_pos) if graph.input_kinds[p] == "image"][:2]
    for p in positions + image_pos:
        eff = probe.measure({}, (p, probe.embed[0, p]), deepstack_pos=p) - probe.base  # type: ignore[index]
        check_column(probe, graph, graph.input_index(p), eff)
        if p in image_pos and hasattr(vlm.adapter.lm(), "_deepstack_process"):
            # Not a vacuous check: the DeepStack part alone moves the logits.
            no_ds = probe.measure({}, (p, probe.embed[0, p])) - probe.base  # type: ignore[index]
            assert (eff - no_ds)[graph.n_features :].abs().max() > 1e-4
    # Error nodes: add the error vector again. At a layer without a dictionary the error is
    # the whole (frozen, clean) MLP output.
    from vlmscope.attribution.context import AttributionContext

    # The positions attribute() replaces (special tokens stay original, all error there).
    rm = ReplacementModel(vlm, bundle)
    replace = rm._replace_mask(inputs["input_ids"], inputs.get("attention_mask"))[0]
    ctx = AttributionContext(vlm, bundle, inputs, replace)
    ctx.record()
    for layer in range(graph.n_layers):
        for p in positions[:2]:
            err = ctx.errors[layer][p]
            if layer not in covered:
                torch.testing.assert_close(err, probe.mlp[layer][0, p], atol=0, rtol=0)
            eff = probe.measure({layer: (p, err)}, None) - probe.base
            check_column(probe, graph, graph.error_index(layer, p), eff)
    # Feature nodes: double the activation (add its decoder contributions once more).
    clt = bundle.clt
    assert clt is not None
    for j in torch.randperm(graph.n_features, generator=gen)[:n_features_checked].tolist():
        layer, pos, f = graph.features[j].tolist()
        s = covered.index(layer)
        a = float(graph.activations[j])
        deltas = {}
        for t in range(s, len(covered)):
            if t - s < clt.layers[s].n_out:
                vec = clt.layers[s].W_dec[f, t - s].detach() / clt.layers[t].output_scale
                deltas[covered[t]] = (pos, a * vec)
        # One position per layer in this probe: apply each layer's delta.
        eff = probe.measure(deltas, None) - probe.base
        check_column(probe, graph, j, eff)
    assert probe.largest > 0.05, "every checked edge is ~0: the test would not catch errors"
    return probe


FAMILIES = ["llama", "llava", "qwen2_vl", "qwen3_vl", "gemma3", "smolvlm"]


@pytest.mark.parametrize("name", FAMILIES)
def test_every_edge_equals_a_measured_effect(name: str, zoo_path: Any) -> None:
    vlm = vlm_for(name, zoo_path)
    check_every_edge(vlm, random_clt(vlm, n_targets=2, seed=1), prompt(vlm, name))


def test_every_edge_with_dictionaries_on_some_layers(zoo_path: Any, tmp_path: Path) -> None:
    """A CLT on layers 0 and 2 of 3 (`train --layers 0 2`): layer 1's real MLP must not pass
    gradients; its output is an error node, and nodes carry model layer numbers."""
    vlm = vlm_for("llava", zoo_path)
    bundle = random_clt(vlm, n_targets=2, seed=1, layers=[0, 2])
    probe = check_every_edge(vlm, bundle, prompt(vlm, "llava"))
    graph = probe.graph
    assert set(graph.features[:, 0].tolist()) == {0, 2}
    assert graph.metadata["layers"] == [0, 2]
    # Layer 1's error nodes carry its MLP output, and it does reach the logits.
    p = graph.n_pos - 1
    assert graph.adjacency[graph.logit_slice, graph.error_index(1, p)].abs().max() > 1e-3
    # The viewer JSON and the raw file number layers as the model does; logits sit above.
    data = to_json(graph, node_threshold=1.0, edge_threshold=1.0)
    layers = {n["feature_type"]: set() for n in data["nodes"]}
    for n in data["nodes"]:
        layers[n["feature_type"]].add(n["layer"])
    assert layers["cross layer transcoder"] == {"0", "2"}
    assert layers["mlp reconstruction error"] == {"0", "1", "2"}
    assert layers["logit"] == {"4"}
    assert load_raw(save_raw(graph, tmp_path / "g.safetensors")).n_layers == 3


def _uneven_clt(vlm: HookedVLM, seed: int) -> DictionaryBundle:
    """A JumpReLU CLT whose thresholds spread over two orders of magnitude, so positions fire
    very different numbers of features (trained CLTs do: BOS fires hundreds)."""
    b = random_clt(vlm, n_targets=2, seed=seed, expansion_factor=4, activation="jumprelu",
                   sparsity_coeff=0.01)  # fmt: skip
    with torch.no_grad():
        for layer in b.clt.layers:  # type: ignore[union-attr]
            f = layer.W_enc.shape[0]
            layer.activation.log_threshold.copy_(torch.empty(f).uniform_(-0.5, 1.5))
    return b


@pytest.mark.parametrize("small", [False, True], ids=["whole-blocks", "one-position-chunks"])
def test_every_edge_with_uneven_feature_counts(
    zoo_path: Any, small: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Positions with very different feature counts are laid out in blocks of similar counts
    (context._blocks), whose features are not one run of columns: every edge still equals
    its measured effect. `small`: chunks of one position within each block, and decoder rows
    from the host cache (offload "cpu") instead of the dictionary in place."""
    from vlmscope.attribution.context import BLOCK_FILL, AttributionContext

    if small:
        monkeypatch.setitem(AttributionContext.__init__.__kwdefaults__, "chunk_bytes", 1)
    vlm = vlm_for("llama", zoo_path)
    bundle = _uneven_clt(vlm, seed=3)
    inputs = vlm.prepare("what colour is the circle and the square, and how many are there")
    replace = ReplacementModel(vlm, bundle)._replace_mask(inputs["input_ids"], None)[0]
    ctx = AttributionContext(vlm, bundle, inputs, replace)
    ctx.record()
    blocks = [b for u in ctx.units for b in u.blocks]
    assert max(len(u.blocks) for u in ctx.units) > 1
    assert any(b.start is None for b in blocks) and any(b.filled is not None for b in blocks)
    # each block's slots are mostly features: padding is bounded per block
    for b in blocks:
        held = b.slots.numel() if b.filled is None else len(b.filled)
        assert held >= BLOCK_FILL * b.slots.numel()
    check_every_edge(vlm, bundle, inputs, n_features_checked=16, offload="cpu" if small else None)


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


def _common(g1: Graph, g2: Graph) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Indices of the nodes two graphs of one prompt share (features by (layer, position,
    feature), then every error, input and logit node), and how many are features."""
    key = {tuple(f): i for i, f in enumerate(g2.features.tolist())}
    pairs = [(i, key[tuple(f)]) for i, f in enumerate(g1.features.tolist()) if tuple(f) in key]
    rest1 = torch.arange(g1.n_features, g1.adjacency.shape[0])
    rest2 = torch.arange(g2.n_features, g2.adjacency.shape[0])
    i1 = torch.cat([torch.tensor([p for p, _ in pairs], dtype=torch.long), rest1])
    i2 = torch.cat([torch.tensor([q for _, q in pairs], dtype=torch.long), rest2])
    return i1, i2, len(pairs)


def test_bf16_edges_match_fp32_within_three_percent(zoo_path: Any) -> None:
    """bf16 model and dictionaries (float32 where edges are summed) against float32 on the
    same bf16-rounded weights: every feature and input edge, and every error edge whose
    reconstruction uses the same active features, within 3% of the largest edge (0.5-1.4%
    measured). Where bf16 flips a TopK tie, that position's error absorbs the difference."""
    import copy

    v16 = HookedVLM.from_pretrained(zoo_path("llama"), device="cpu", dtype=torch.bfloat16)
    v32 = HookedVLM.from_pretrained(zoo_path("llama"), device="cpu", dtype=torch.bfloat16)
    v32.model.float()
    b16 = random_clt(v32, n_targets=2, seed=1).to(torch.bfloat16)
    b32 = copy.deepcopy(b16).float()
    inputs = v32.prepare("what colour is the circle and the square")
    g32 = attribute(v32, b32, inputs, batch_size=64)
    targets = [t.token_id for t in g32.logit_targets]
    g16 = attribute(v16, b16, inputs, batch_size=64, logit_targets=targets)
    i32, i16, nf = _common(g32, g16)
    assert nf >= 0.95 * max(g32.n_features, g16.n_features)
    a, b = g32.adjacency[i32][:, i32], g16.adjacency[i16][:, i16]
    diff, scale = (a - b).abs(), a.abs().max()
    n_pos, errors = g32.n_pos, g32.n_layers * g32.n_pos
    assert diff[:, :nf].max() <= 0.03 * scale  # features
    assert diff[:, nf + errors : nf + errors + n_pos].max() <= 0.03 * scale  # inputs

    def active(g: Graph) -> dict[tuple[int, int], set[int]]:
        out: dict[tuple[int, int], set[int]] = {}
        for layer, pos, f in g.features.tolist():
            out.setdefault((layer, pos), set()).add(f)
        return out

    s32, s16 = active(g32), active(g16)
    same = [
        nf + layer * n_pos + p
        for layer in range(g32.n_layers)
        for p in range(n_pos)
        if all(s32.get((k, p), set()) == s16.get((k, p), set()) for k in range(layer + 1))
    ]
    assert len(same) >= 0.9 * errors
    assert diff[:, same].max() <= 0.03 * scale
    assert a.abs().max() > 0.1  # not a comparison of zeros


def _clt_with_skip(vlm: HookedVLM, seed: int) -> DictionaryBundle:
    b = random_clt(vlm, seed=seed, skip_connection=True)
    with torch.no_grad():
        for layer in b.clt.layers:  # type: ignore[union-attr]
            layer.W_skip.normal_(0, 0.05)  # type: ignore[union-attr]
    return b


def test_circuit_tracer_convention_at_bos(zoo_path: Any) -> None:
    """circuit-tracer's convention: every position replaced, position 0's features and error
    dropped, its skip path live. Against the same dictionaries replacing every token: the
    same graph but for position 0's nodes. Against vlmscope's default (BOS unreplaced, its
    skip path off): BOS's input node reaches the logits differently."""
    from vlmscope.replacement.model import ReplacementModel

    vlm = vlm_for("llama", zoo_path)
    bundle = _clt_with_skip(vlm, seed=2)
    inputs = vlm.prepare("what colour is the circle")
    ct = attribute(vlm, bundle, inputs, convention="circuit-tracer", batch_size=128)
    same: dict[str, Any] = {
        "batch_size": 128,
        "logit_targets": [t.token_id for t in ct.logit_targets],
    }
    everything = attribute(
        ReplacementModel(vlm, bundle, replace_tokens="all"), None, inputs, **same
    )
    default = attribute(vlm, bundle, inputs, **same)
    assert ct.metadata["convention"] == "circuit-tracer"
    assert (ct.features[:, 1] == 0).sum() == 0 < int((everything.features[:, 1] == 0).sum())
    assert (ct.features[:, 1] > 0).sum() == (everything.features[:, 1] > 0).sum()
    bos_errors = [ct.error_index(layer, 0) for layer in range(ct.n_layers)]
    assert ct.adjacency[:, bos_errors].abs().max() == 0
    assert everything.adjacency[:, [everything.error_index(0, 0)]].abs().max() > 0
    # Every other edge is the same graph's.
    i_ct, i_all, nf = _common(ct, everything)
    keep = torch.ones(len(i_ct), dtype=torch.bool)
    for layer in range(ct.n_layers):
        keep[nf + layer * ct.n_pos] = False  # position 0's errors
    a = ct.adjacency[i_ct][:, i_ct][keep][:, keep]
    b = everything.adjacency[i_all][:, i_all][keep][:, keep]
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    # The skip path at BOS is live in circuit-tracer's convention, off in vlmscope's.
    col_ct = ct.adjacency[ct.logit_slice, ct.input_index(0)]
    col_default = default.adjacency[default.logit_slice, default.input_index(0)]
    assert (col_ct - col_default).abs().max() > 1e-4


def test_nan_dictionary_weights_are_named_not_a_cycle(zoo_path: Any) -> None:
    """NaN weights built in memory (not loaded, so not caught on load) end in an error that
    names the dictionary unit, not in 'the adjacency matrix has a cycle'."""
    from vlmscope.attribution.graph import NonFiniteGraphError, influence, normalize_rows

    vlm = vlm_for("llama", zoo_path)
    bundle = random_clt(vlm, n_targets=2, seed=1)
    with torch.no_grad():
        bundle.clt.layers[0].W_dec[:] = float("nan")  # type: ignore[union-attr]
    inputs = vlm.prepare("what colour is the circle")
    with pytest.raises(NonFiniteGraphError, match=r"W_dec of unit 0 \(lm\.blocks\.0\."):
        attribute(vlm, bundle, inputs, batch_size=16, max_feature_nodes=8)
    adj = torch.tensor([[0.0, float("nan")], [1.0, 0.0]])
    with pytest.raises(NonFiniteGraphError, match="NaN/Inf entries"):
        influence(normalize_rows(adj), torch.tensor([0.0, 1.0]))


@pytest.mark.parametrize("name", ["qwen2_vl", "qwen3_vl"])
def test_every_edge_with_a_video_prompt(name: str, zoo_path: Any) -> None:
    """A video's tokens are image nodes (Qwen3-VL: with DeepStack injections, runs between
    timestamps); their edges, like every other, equal measured effects."""
    vlm = vlm_for(name, zoo_path)
    frames = [random_image(32, 40, s) for s in range(3)]
    inputs = vlm.prepare("what happens in the video", videos=frames)
    masks = vlm.masks(inputs)
    assert torch.equal(masks.image, inputs["input_ids"] == vlm.model.config.video_token_id)
    assert masks.patch_map[masks.image][:, 1].unique().tolist() == [0, 1]  # temporal patches
    check_every_edge(vlm, random_clt(vlm, n_targets=2, seed=1), inputs)


def test_an_mllama_prompt_without_an_image_is_refused_by_name(zoo_path: Any) -> None:
    """Without an image transformers skips Mllama's cross-attention layers, while the graph's
    replay runs every layer: it stopped with a KeyError deep in the replay. With an image the
    same dictionaries attribute."""
    vlm = vlm_for("mllama", zoo_path)
    clt = random_clt(vlm)
    with pytest.raises(ValueError, match=r"mllama skips its layers \[1, 3\].*give an image"):
        attribute(vlm, clt, vlm.prepare(["Say hello."]), max_feature_nodes=4)
    inputs = vlm.prepare(["Say hello."], images=[[random_image(32, 32)]])
    assert attribute(vlm, clt, inputs, max_feature_nodes=4).adjacency.shape[0] > 0
