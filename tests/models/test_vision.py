"""Vision-encoder positions against layouts written out by hand (every family's layout is
checked against its language model's image tokens in tests/acceptance)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from tests.conftest import random_image
from vlmscope.models.hooked import HookedVLM
from vlmscope.models.vision import VisionLayoutError, grid_side, view_layout, vision_row_mask


def test_grid_side_tells_a_cls_token_from_a_square_grid() -> None:
    assert grid_side(16) == (0, 4)
    assert grid_side(17) == (1, 4)
    assert grid_side(1) == (0, 1)
    assert grid_side(18) == (-1, 0)


def test_view_layout_of_a_cls_token_plus_tiles_on_a_stitched_grid() -> None:
    # Image 0: one view; image 1: a base view and two tiles side by side; 2x2 grids + CLS.
    views = [(0, 0, 0, 0), (1, 0, 0, 0), (1, 1, 0, 0), (1, 1, 0, 1)]
    cells = view_layout(views, (4, 5), "vision.blocks.0.hook_resid_post").tolist()
    assert cells[:5] == [[0, 0, -1, -1], [0, 0, 0, 0], [0, 0, 0, 1], [0, 0, 1, 0], [0, 0, 1, 1]]
    assert cells[10:15] == [[1, 1, -1, -1], [1, 1, 0, 0], [1, 1, 0, 1], [1, 1, 1, 0], [1, 1, 1, 1]]
    assert cells[15:] == [[1, 1, -1, -1], [1, 1, 0, 2], [1, 1, 0, 3], [1, 1, 1, 2], [1, 1, 1, 3]]


def test_view_layout_names_the_hook_when_shapes_disagree() -> None:
    with pytest.raises(VisionLayoutError, match=r"projector.hook_out: .*\[3, 4\].* 2 view"):
        view_layout([(0, 0, 0, 0), (1, 0, 0, 0)], (3, 4), "projector.hook_out")
    with pytest.raises(VisionLayoutError, match="neither a square grid nor a CLS"):
        view_layout([(0, 0, 0, 0)], (1, 7), "x")


def test_row_mask_keeps_patches_and_optionally_cls_but_never_padding() -> None:
    layout = torch.tensor([[0, 0, -1, -1], [0, 0, 0, 0], [0, 1, -2, -2], [0, 1, 0, 1]])
    assert vision_row_mask(layout).tolist() == [False, True, False, True]
    assert vision_row_mask(layout, include_special=True).tolist() == [True, True, False, True]


def test_mllama_vision_rows_follow_tiles_padding_and_the_cross_attention_layout(
    zoo_path: Any,
) -> None:
    """Mllama's vision hooks: per sample, image slot and tile, a CLS row, the g x g patches and
    the encoder's padding rows (zeros at block 0's input); after the projector, the layout the
    cross-attention attribution nodes use (`vision_token_grid`), images numbered over the
    batch, and a padding image slot marked."""
    vlm = HookedVLM.from_pretrained(zoo_path("mllama"), device="cpu", dtype=torch.float32)
    inputs = vlm.prepare(
        ["what colour is the circle", "how many squares"],
        images=[[random_image(64, 96, 1)], [random_image(48, 32, 2), random_image(32, 32, 3)]],
    )
    names = ["vision.blocks.0.hook_resid_post", "projector.hook_out"]
    got: dict[str, torch.Tensor] = {}
    block = vlm.adapter.vision_block_list()[0]  # type: ignore[index]

    def grab(_m: Any, args: Any, kwargs: Any) -> None:
        got["in"] = (args[0] if args else next(iter(kwargs.values()))).detach()

    h = block.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        _, cache = vlm.run_with_cache(inputs, names=names)
    finally:
        h.remove()
    pre = got["in"]
    assert pre.shape == cache[names[0]].shape
    layout = vlm.vision_positions(inputs, names[0], pre.shape[:-1])
    rows = pre.reshape(-1, pre.shape[-1])
    padding = layout[:, 2] == -2
    assert bool(padding.any()) and bool((layout[:, 2] >= 0).any())
    real_tile_padding = padding & (layout[:, 0] >= 0)
    assert bool(real_tile_padding.any())
    # Only rows the encoder padded inside a real tile are exactly zero there.
    inside = layout[:, 0] >= 0
    zero = rows.abs().sum(-1) == 0
    assert torch.equal(zero[inside & ~padding], torch.zeros_like(zero[inside & ~padding]))
    tiles = inputs["aspect_ratio_mask"].bool()
    g = vlm.adapter.tile_grid()
    per_tile = len(layout) // tiles.numel()
    pad_rows = torch.arange(per_tile) >= 1 + g * g
    for j, used in enumerate(tiles.reshape(-1).tolist()):
        block = zero[j * per_tile : (j + 1) * per_tile]
        if used and bool(inside[j * per_tile]):
            assert torch.equal(block, pad_rows)
    proj = cache[names[1]]
    layout = vlm.vision_positions(inputs, names[1], proj.shape[:-1])
    per_sample = layout.reshape(proj.shape[0], -1, 4)
    offset = 0
    for b in range(proj.shape[0]):
        grid = vlm.adapter.vision_token_grid(inputs, b)
        mine = per_sample[b].clone()
        real = mine[:, 0] >= 0
        mine[real, 0] -= offset
        on = grid[:, 2] >= 0
        assert torch.equal(mine[on], grid[on])
        assert bool((mine[~on & real, 2] < 0).all())
        offset += vlm.adapter.images_per_sample(inputs)[b]
    assert bool((per_sample[0, :, 0] == -1).any())  # sample 0's padding image slot


def test_llama4_vision_rows_put_each_tiles_cls_token_last(zoo_path: Any) -> None:
    """Llama 4's encoder appends its CLS token to every tile: at block 0's input that row is
    the same learned vector (plus the same position embedding) in every tile, patches are not."""
    vlm = HookedVLM.from_pretrained(zoo_path("llama4"), device="cpu", dtype=torch.float32)
    inputs = vlm.prepare("what colour is the circle", images=[random_image(64, 96, 1)])
    got: dict[str, torch.Tensor] = {}

    def grab(_m: Any, args: Any, kwargs: Any) -> None:
        got["in"] = (args[0] if args else next(iter(kwargs.values()))).detach()

    block = vlm.adapter.vision_block_list()[0]  # type: ignore[index]
    h = block.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        vlm.forward(inputs)
    finally:
        h.remove()
    x = got["in"]
    layout = vlm.vision_positions(inputs, "vision.blocks.0.hook_resid_post", x.shape[:-1])
    rows = x.reshape(-1, x.shape[-1])
    cls = layout[:, 2] == -1
    assert int(cls.sum()) == x.shape[0] > 1  # one per tile
    assert torch.equal(cls.reshape(x.shape[0], -1)[:, -1], torch.ones(x.shape[0], dtype=torch.bool))
    torch.testing.assert_close(rows[cls], rows[cls][:1].expand(int(cls.sum()), -1))
    first = layout[:, 2] == 0
    assert not torch.allclose(rows[first & (layout[:, 3] == 0)][0], rows[first][-1])


def test_llava_next_video_refuses_to_lay_out_the_towers_video_rows(zoo_path: Any) -> None:
    """LLaVA-NeXT-Video's tower also runs over every video frame, rows its adapter does not
    lay out: a vision hook's layout on a batch with a video names the hook and the videos
    (it was a KeyError on image_sizes), and the batch's images alone are still laid out."""
    vlm = HookedVLM.from_pretrained(zoo_path("llava_next_video"), device="cpu", dtype=torch.float32)
    frames = [random_image(40, 48, seed=s) for s in range(2)]
    name = "vision.blocks.0.hook_resid_post"
    for inputs in (
        vlm.prepare("what happens", videos=frames),
        vlm.prepare("what happens", images=[random_image(32, 40, 1)], videos=frames),
    ):
        _, cache = vlm.run_with_cache(inputs, names=name)
        with pytest.raises(VisionLayoutError, match=f"{name}: .*pixel_values_videos"):
            vlm.vision_positions(inputs, name, cache[name].shape[:-1])
    images = vlm.prepare("what is shown", images=[random_image(32, 40, 1)])
    _, cache = vlm.run_with_cache(images, names=name)
    assert len(vlm.vision_positions(images, name, cache[name].shape[:-1])) > 0
