"""Qwen-VL videos against transformers: the vision tower's video run, its layout and edits.

Truth comes from the model: each video token's input embedding is the projector row the
layout puts at its (video, temporal patch, row, col); `get_video_features` gives the video
features the model scatters into the sequence, in token order; `video_grid_thw` gives the
tower's patches per temporal patch; and a causal decoder cannot move a logit before the
first token an edit touches.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from tests.conftest import random_image
from tests.replacement.test_model import vlm_for
from vlmscope.models.hooked import HookContext, HookedVLM
from vlmscope.models.masks import ImageTokenMismatchError
from vlmscope.models.vision import VisionLayoutError

pytestmark = pytest.mark.usefixtures("one_thread")

FAMILIES = ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"]


def clip(n: int, seed: int, h: int = 64, w: int = 96) -> list[Any]:
    return [random_image(h, w, seed=seed + s) for s in range(n)]


def mixed(vlm: HookedVLM) -> Any:
    """Sample 0: a 3-frame video, then an image; sample 1: an image, then a 2-frame video of
    another size. In token order they are video, image, image, video: the masks number the
    videos 0 and 3 (`VIDEO_NUMBERS`), while the tower runs over both images, then both
    videos."""
    first = [
        {
            "role": "user",
            "content": [{"type": "video"}, {"type": "image"}, {"type": "text", "text": "what"}],
        }
    ]
    return vlm.prepare(
        [first, "and here"],
        images=[[random_image(48, 32, seed=9)], [random_image(32, 40, seed=5)]],
        videos=[[clip(3, 0)], [clip(2, 10, 32, 48)]],
    )


VIDEO_NUMBERS = [0, 3]


@pytest.mark.parametrize("family", FAMILIES)
def test_video_rows_of_the_tower_and_projector_reach_their_tokens(
    family: str, zoo_path: Any
) -> None:
    vlm = vlm_for(family, zoo_path)
    inputs = mixed(vlm)
    masks = vlm.masks(inputs)
    cfg = vlm.model.config
    is_video = inputs["input_ids"] == cfg.video_token_id
    is_image = inputs["input_ids"] == cfg.image_token_id
    assert torch.equal(masks.image, is_video | is_image)
    assert masks.images_per_sample() == [2, 2]
    names = ["vision.blocks.0.hook_resid_post", "projector.hook_out", "lm.blocks.0.hook_resid_pre"]
    _, cache = vlm.run_with_cache(inputs, names=names)
    # The tower ran twice (images, then videos): its rows are the patches of both grids.
    n_patches = inputs["image_grid_thw"].prod(-1).sum() + inputs["video_grid_thw"].prod(-1).sum()
    assert cache[names[0]].shape[0] == int(n_patches)
    tower = vlm.vision_positions(inputs, names[0], cache[names[0]].shape[:-1])
    for number, (t, h, w) in zip(VIDEO_NUMBERS, inputs["video_grid_thw"].tolist(), strict=True):
        mine = tower[tower[:, 0] == number]
        assert mine[:, 1].unique().tolist() == list(range(t))  # its temporal patches
        for view in range(t):
            cells = mine[mine[:, 1] == view][:, 2:]
            # transformers' patches per temporal patch: h x w, every cell once
            want = [(r, c) for r in range(h) for c in range(w)]
            assert sorted(map(tuple, cells.tolist())) == want
    if family == "qwen2_5_vl":  # the video run must be really window-permuted
        order = vlm.adapter._window_order(inputs["video_grid_thw"])
        assert order is not None and not torch.equal(order, torch.arange(len(order)))
    proj = cache["projector.hook_out"]
    layout = vlm.vision_positions(inputs, "projector.hook_out", proj.shape[:-1])
    at = {tuple(r): j for j, r in enumerate(layout.tolist())}
    first = {}
    for k, sample in enumerate(masks.image_sample):
        first.setdefault(sample, k)
    emb = cache["lm.blocks.0.hook_resid_pre"]
    pm = masks.patch_map
    for b, s in masks.image.nonzero().tolist():
        image, view, r, c = pm[b, s].tolist()
        j = at.pop((first[b] + image, view, r, c))
        cos = torch.nn.functional.cosine_similarity(proj[j], emb[b, s], dim=0)
        assert cos > 0.999, (b, s, image, view, r, c)
    assert not at  # every projector row reached exactly one token


def _reference_logits(vlm: HookedVLM, inputs: Any, video: int, view: int) -> torch.Tensor:
    """The model run on its own video features, with the merged features transformers'
    get_video_features returns for temporal patch `view` of video `video` set to zero."""
    model = vlm.model
    grids = inputs["video_grid_thw"]
    m2 = int(model.config.vision_config.spatial_merge_size) ** 2
    with torch.no_grad():
        vid = model.model.get_video_features(inputs["pixel_values_videos"], grids)
        feats = [f.clone() for f in vid.pooler_output]
        per_view = int(grids[video, 1] * grids[video, 2]) // m2
        feats[video][view * per_view : (view + 1) * per_view] = 0.0
        vid.pooler_output = tuple(feats)
        rest = {k: v for k, v in inputs.items() if k != "pixel_values_videos"}
        return model(**rest, mm_encoder_outputs={"video": vid}).logits


@pytest.mark.parametrize("family", FAMILIES)
def test_zeroing_a_temporal_patch_at_the_projector_is_zeroing_its_video_features(
    family: str, zoo_path: Any
) -> None:
    """Two videos of different sizes in two samples; the projector's rows of video 1's first
    temporal patch, found by the layout (window-permuted in Qwen2.5-VL), set to zero."""
    vlm = vlm_for(family, zoo_path)
    inputs = vlm.prepare(
        ["what happens in the video", "and here"],
        videos=[[clip(3, 0)], [clip(4, 10, 32, 48)]],
    )
    video, view = 1, 0

    def zero(t: torch.Tensor, ctx: HookContext) -> torch.Tensor:
        cells = vlm.vision_positions(inputs, ctx.name, t.shape[:-1])
        hit = (cells[:, 0] == video) & (cells[:, 1] == view)
        assert int(hit.sum()) > 0
        return t.masked_fill(hit[:, None], 0.0)

    with torch.no_grad():
        got = vlm.run_with_hooks(inputs, [("projector.hook_out", zero)]).logits
        clean = vlm.forward(inputs).logits
    want = _reference_logits(vlm, inputs, video, view)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert (got - clean).abs().max() > 1e-3, "zeroing the temporal patch moved nothing"


@pytest.mark.parametrize("family", FAMILIES)
def test_an_edit_of_the_video_run_moves_logits_from_the_first_video_token_on(
    family: str, zoo_path: Any
) -> None:
    """A video-only prompt: the tower runs once, and a hook on a vision block, laid out per
    firing, edits the video's patches; the logits move, but only from the first video token
    on (the decoder is causal)."""
    vlm = vlm_for(family, zoo_path)
    inputs = vlm.prepare("what happens in the video", videos=clip(4, 20))
    seen: list[torch.Tensor] = []

    def push(t: torch.Tensor, ctx: HookContext) -> torch.Tensor:
        cells = vlm.vision_positions(inputs, ctx.name, t.shape[:-1])
        seen.append(cells)
        on = (cells[:, 1] == 1).to(t.dtype)[:, None]  # the second temporal patch only
        # Not a constant shift: the LayerNorms of Qwen2-VL's tower and merger remove those.
        g = torch.Generator().manual_seed(0)
        return t + on * torch.randn(t.shape[-1], generator=g).to(t.dtype)

    with torch.no_grad():
        clean = vlm.forward(inputs).logits[0]
        moved = vlm.run_with_hooks(inputs, [("vision.blocks.0.hook_resid_post", push)])
    assert len(seen) == 1 and int((seen[0][:, 1] == 1).sum()) > 0
    first = int((inputs["input_ids"][0] == vlm.model.config.video_token_id).nonzero()[0])
    diff = (moved.logits[0] - clean).abs().amax(-1)
    assert float(diff[:first].max()) == 0.0
    assert float(diff[first:].max()) > 1e-3


def test_a_hook_firing_on_a_batch_of_images_and_videos_is_refused_by_name(zoo_path: Any) -> None:
    """A per-firing layout of a mixed batch would be the images' or the videos' rows alone:
    the error says so, instead of laying out the wrong run."""
    vlm = vlm_for("qwen2_vl", zoo_path)
    inputs = mixed(vlm)

    def place(t: torch.Tensor, ctx: HookContext) -> None:
        vlm.vision_positions(inputs, ctx.name, t.shape[:-1])

    with pytest.raises(VisionLayoutError, match=r"vision.blocks.1.hook_resid_post: .*one run"):
        vlm.run_with_hooks(inputs, [("vision.blocks.1.hook_resid_post", place)])


def test_video_placeholders_and_grids_that_disagree_are_named(zoo_path: Any) -> None:
    vlm = vlm_for("qwen2_vl", zoo_path)
    inputs = dict(mixed(vlm))
    two = dict(inputs, video_grid_thw=inputs["video_grid_thw"][:1])
    with pytest.raises(ImageTokenMismatchError, match="sample 1 has video tokens but no video"):
        vlm.masks(two)
    swapped = dict(inputs, video_grid_thw=inputs["video_grid_thw"].flip(0))
    with pytest.raises(ImageTokenMismatchError, match="sample 0: video 1 needs"):
        vlm.masks(swapped)
