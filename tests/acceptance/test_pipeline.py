"""train -> eval -> attribute on the newer image-text zoo families, with image-patch nodes.

Tiny budgets: the point is that each family goes through the whole pipeline with its own
layout (a CLT trained one step on the shapes world, evaluated on one batch, a graph whose image
nodes follow the patch map and whose heatmap has every view's grid).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.conftest import random_image
from vlmscope.attribution.attribute import attribute
from vlmscope.attribution.export import image_grids, patch_influence
from vlmscope.attribution.graph import Graph
from vlmscope.attribution.heatmap import save_heatmap_png
from vlmscope.models.hooked import HookedVLM
from vlmscope.replacement.evaluate import evaluate
from vlmscope.training.config import parse_train_args
from vlmscope.training.trainer import train

PROMPT = "what colour is the circle"


def run_pipeline(vlm: HookedVLM, model_path: Path, out: Path) -> Graph:
    """Train a CLT for one step, evaluate it on one batch, attribute one prompt; checks the
    evaluation is finite and returns the graph."""
    argv = [
        str(model_path), "shapes:8", "--sae.transcode", "--sae.n_targets", "2",
        "--sae.expansion-factor", "1", "--sae.k", "4", "--max-steps", "1", "--batch-size", "2",
        "--output-dir", str(out), "--run-name", "run", "--device", "cpu",
    ]  # fmt: skip
    train(parse_train_args(argv), vlm, progress=False)
    dicts = out / "run" / "dictionaries"
    batch = vlm.prepare(
        [PROMPT, "how many squares are there"],
        images=[[random_image(32, 40, 1)], [random_image(40, 32, 2)]],
    )
    report = evaluate(vlm, dicts, batch, per_layer=False, progress=False)
    assert report.n_tokens > 0
    recon = report.reconstruction["all"]
    assert all(math.isfinite(v) for v in recon.values() if isinstance(v, float))
    inputs = vlm.prepare(PROMPT, images=[random_image(32, 40, 7)])
    return attribute(vlm, dicts, inputs, max_feature_nodes=8)


def check_image_nodes(vlm: HookedVLM, graph: Graph, inputs: Any, out: Path) -> None:
    """Image input nodes are the image tokens (and Mllama's vision features), laid out by the
    patch map; the heatmap covers every view's grid and is written as a PNG."""
    masks = vlm.masks(inputs)
    kinds = graph.input_kinds
    n_img = int(masks.image[0].sum())
    extra = graph.n_inputs - graph.n_pos
    assert sum(k == "image" for k in kinds) == n_img + extra > 0
    assert torch.equal(graph.patch_map[: graph.n_pos], masks.patch_map[0])
    grids = image_grids(graph)
    heat = patch_influence(graph)
    assert (
        grids
        and {i: {v: tuple(h.shape) for v, h in views.items()} for i, views in heat.items()} == grids
    )
    assert sum(float(h.abs().sum()) for views in heat.values() for h in views.values()) > 0
    png = save_heatmap_png(graph, random_image(32, 40, 7), out / "heat.png")
    assert Path(png).stat().st_size > 0


# The families issue #13 added; the older ones go through the same stages in the trainer,
# evaluation and attribution tests.
NEW_FAMILIES = [
    "internvl", "mistral3", "llama4", "mllama", "aya_vision", "glm4v", "llava_next_video",
    "phi4_multimodal",
]  # fmt: skip


@pytest.mark.parametrize("name", NEW_FAMILIES)
def test_train_eval_attribute(
    name: str, load: Callable[..., HookedVLM], zoo_path: Callable[[str], Path], tmp_path: Path
) -> None:
    vlm = load(name)
    graph = run_pipeline(vlm, zoo_path(name), tmp_path)
    check_image_nodes(vlm, graph, vlm.prepare(PROMPT, images=[random_image(32, 40, 7)]), tmp_path)
