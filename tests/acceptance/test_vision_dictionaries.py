"""Vision-tower and projector dictionaries on every zoo family, gated by capability flags.

Truth comes from the language model itself: each image token's input embedding is what the
projector produced for that token's patch, so the projector row that the vision layout puts
at (image, view, row, col) must be parallel to the embedding of the token the patch map puts
there. Families without a vision tower get a clear error instead of a KeyError.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.conftest import random_image
from vlmscope.models import zoo
from vlmscope.models.hooked import HookedVLM
from vlmscope.models.vision import vision_row_mask
from vlmscope.replacement.evaluate import evaluate
from vlmscope.training.config import parse_train_args
from vlmscope.training.trainer import TrainingError, train

pytestmark = pytest.mark.usefixtures("one_thread")

_LOADED: dict[str, HookedVLM] = {}


@pytest.fixture(params=zoo.names())
def family(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def load(zoo_path: Callable[[str], Path]) -> Callable[[str], HookedVLM]:
    def get(name: str) -> HookedVLM:
        if name not in _LOADED:
            path = zoo_path(name)
            _LOADED[name] = HookedVLM.from_pretrained(path, device="cpu", dtype=torch.float32)
        return _LOADED[name]

    return get


def two_samples(vlm: HookedVLM) -> Any:
    """One and two images of different sizes (the first large enough to be tiled, and for
    Qwen2.5-VL to be split into attention windows)."""
    return vlm.prepare(
        ["what colour is the circle", "how many squares"],
        images=[[random_image(64, 96, 1)], [random_image(48, 32, 2), random_image(32, 32, 3)]],
    )


def test_vision_positions_agree_with_the_language_models_image_tokens(
    family: str, load: Callable[[str], HookedVLM], request: pytest.FixtureRequest
) -> None:
    vlm = load(family)
    caps = vlm.adapter.capabilities
    if not caps.has_vision:
        assert not [n for n in vlm.hook_names() if n.startswith(("vision.", "projector."))]
        return
    if not caps.patch_grid:
        pytest.skip("no patch grid for this family's image tokens")
    inputs = two_samples(vlm)
    masks = vlm.masks(inputs)
    names = ["vision.blocks.0.hook_resid_post", "vision.blocks.0.mlp.hook_out"]
    names += ["projector.hook_out", "lm.blocks.0.hook_resid_pre"]
    _, cache = vlm.run_with_cache(inputs, names=names)
    for name in names[:3]:
        layout = vlm.vision_positions(inputs, name, cache[name].shape[:-1])
        assert len(layout) == cache[name].shape[:-1].numel()
        patches = layout[vision_row_mask(layout)]
        keys = [tuple(r) for r in patches.tolist()]
        assert len(set(keys)) == len(keys), f"{name}: a patch position appears twice"
        assert set(patches[:, 0].tolist()) == set(range(len(masks.image_sample)))
    order = getattr(vlm.adapter, "_window_order", lambda _: None)(inputs.get("image_grid_thw"))
    if order is not None:  # the batch must exercise a real reordering
        assert not torch.equal(order, torch.arange(len(order)))

    proj = cache["projector.hook_out"]
    rows = proj.reshape(-1, proj.shape[-1])
    layout = vlm.vision_positions(inputs, "projector.hook_out", proj.shape[:-1])
    at = {tuple(r): j for j, r in enumerate(layout.tolist())}
    first_image = {}
    for image, sample in enumerate(masks.image_sample):
        first_image.setdefault(sample, image)
    emb = cache["lm.blocks.0.hook_resid_pre"]
    pm = masks.patch_map
    compared = 0
    for b, s in (pm[:, :, 2] >= 0).nonzero().tolist():
        image, view, r, c = pm[b, s].tolist()
        j = at.get((first_image[b] + image, view, r, c))
        if view == 0:
            assert j is not None, f"no projector row for token {s} of sample {b} ({view, r, c})"
        if j is None:
            continue  # a tile position the language model interpolates (OneVision)
        cos = torch.nn.functional.cosine_similarity(rows[j], emb[b, s], dim=0)
        assert cos > 0.999, (b, s, image, view, r, c)
        compared += 1
    # ... and every projector patch reaches the language model as exactly one image token.
    assert compared == int((layout[:, 2] >= 0).sum())


def test_vision_transcoders_train_and_evaluate(
    family: str, load: Callable[[str], HookedVLM], tmp_path: Path
) -> None:
    """A transcoder on vision block 0's MLP trains on image patches only, and eval reports
    its reconstruction and what replacing that MLP does to the next-token loss."""
    vlm = load(family)
    flags = "--tower vision --layers 0 --sae.transcode --sae.expansion-factor 2 --sae.k 4 "
    flags += f"--batch-size 2 --max-steps 1 --output-dir {tmp_path} --run-name v --ctx-len 512"
    cfg = parse_train_args([family, "shapes:4", *flags.split()])
    if not vlm.adapter.capabilities.has_vision:
        with pytest.raises(TrainingError, match="text-only model"):
            train(cfg, vlm, progress=False)
        return
    result = train(cfg, vlm, progress=False)
    assert result.tokens > 0
    batch = two_samples(vlm)
    report = evaluate(vlm, result.dictionaries, batch, per_layer=False, progress=False)
    unit = "vision.blocks.0.mlp.hook_in"
    recon = report.reconstruction["all"]["per_unit"][unit]
    assert 0 <= recon["fvu"] < 10 and recon["l0"] <= 4
    block = report.next_token["all"]["all_layers"]  # the one vision MLP replaced
    assert block["kl"] >= 0 and torch.isfinite(torch.tensor(block["ce_replaced"]))
