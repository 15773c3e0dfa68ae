"""Cross-attention VLMs (Mllama): the vision features each cross-attention layer reads are input
nodes, and their edges equal measured effects in the frozen model, like every other edge."""

from __future__ import annotations

from typing import Any

import torch

from tests.attribution.test_attribute import FrozenProbe, check_column, check_every_edge
from tests.conftest import random_image
from tests.replacement.test_model import random_clt, vlm_for
from vlmscope.attribution.attribute import attribute
from vlmscope.attribution.export import image_grids, patch_influence, to_json


def test_vision_feature_edges_equal_measured_effects(zoo_path: Any) -> None:
    vlm = vlm_for("mllama", zoo_path)
    bundle = random_clt(vlm, n_targets=2, seed=1)
    inputs = vlm.prepare("what colour is the circle", images=[random_image(32, 40, 7)])
    # Tokens, errors and features, as for every family (the marker token is the image's).
    check_every_edge(vlm, bundle, inputs)
    graph = attribute(vlm, bundle, inputs, batch_size=32, max_feature_nodes=96)
    n_pos, grid = graph.n_pos, vlm.adapter.vision_token_grid(inputs, 0)
    assert graph.n_inputs == n_pos + len(grid)
    assert graph.input_kinds[n_pos:] == ["image"] * len(grid)
    assert torch.equal(graph.patch_map[n_pos:], grid)
    probe = FrozenProbe(vlm, bundle, inputs, graph)
    values: dict[str, torch.Tensor] = {}

    def keep(t: torch.Tensor, ctx: Any) -> None:
        values["v"] = t[0].detach().reshape(-1, t.shape[-1]).clone()

    vlm.run_with_hooks(inputs, [("projector.hook_out", keep)])
    feats = values["v"]
    # A patch of the first tile, its CLS token, and a patch of the last real tile.
    on_grid = (grid[:, 2] >= 0).nonzero().squeeze(1)
    picks = [int(on_grid[0]), 0, int(on_grid[-1])]
    moved = 0.0
    for j in picks:

        def again(t: torch.Tensor, ctx: Any, j: int = j) -> torch.Tensor:
            flat = t.reshape(t.shape[0], -1, t.shape[-1]).clone()
            flat[0, j] += feats[j]  # the feature once more: its whole direct effect
            return flat.reshape(t.shape)

        with vlm.hooks([("projector.hook_out", again)]):
            eff = probe.measure({}, None) - probe.base
        check_column(probe, graph, graph.input_slice.start + n_pos + j, eff)
        moved = max(moved, float(eff[graph.n_features :].abs().max()))
    assert moved > 1e-3, "the vision features barely move the logits: the check is vacuous"


def test_cross_attention_heatmap_has_one_grid_per_tile(zoo_path: Any) -> None:
    vlm = vlm_for("mllama", zoo_path)
    inputs = vlm.prepare("what colour is the circle", images=[random_image(32, 40, 7)])
    graph = attribute(vlm, random_clt(vlm, seed=2), inputs, max_feature_nodes=16)
    tiles = int(inputs["aspect_ratio_mask"][0, 0].sum())
    g = vlm.adapter.tile_grid()
    assert image_grids(graph) == {0: {t: (g, g) for t in range(tiles)}}
    heat = patch_influence(graph)[0]
    assert sorted(heat) == list(range(tiles))
    assert sum(float(h.abs().sum()) for h in heat.values()) > 0
    data = to_json(graph, node_threshold=1.0, edge_threshold=1.0)
    patches = [n for n in data["nodes"] if n.get("image")]
    assert len(patches) == 1 + len(vlm.adapter.vision_token_grid(inputs, 0))  # marker + features
