"""compute_masks on hand-built batches: counts, padding, special tokens, mismatch errors."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from vlmscope.models.masks import ImageTokenMismatchError, check_images_per_sample, compute_masks

IMG, BOS, PAD = 9, 1, 0


def grid(n: int) -> torch.Tensor:
    return torch.tensor([[0, i // 2, i % 2] for i in range(n)])


def test_masks_and_patch_map_with_padding_and_two_images() -> None:
    ids = torch.tensor(
        [
            [PAD, PAD, BOS, 5, IMG, IMG, 6, 7],  # left-padded, one image of 2 tokens
            [BOS, IMG, IMG, 5, IMG, IMG, 6, PAD],  # two images
        ]
    )
    attn = (ids != PAD).long()
    m = compute_masks(ids, attn, [IMG], [BOS, PAD], [grid(2), grid(2), grid(2)])
    assert m.image_token_counts() == [2, 4]
    assert m.images_per_sample() == [1, 2]
    assert m.pad.sum(1).tolist() == [2, 1]
    assert m.special.sum(1).tolist() == [1, 1]
    assert m.text.sum(1).tolist() == [3, 2]
    # Second image of sample 1 sits at positions 4, 5 with image index 1.
    assert m.patch_map[1, 4].tolist() == [1, 0, 0, 0]
    assert m.patch_map[1, 5].tolist() == [1, 0, 0, 1]
    assert (m.patch_map[0, :4] == -1).all()
    assert m.select("image").sum() == 6
    assert m.select("text").sum() == 5
    assert m.select("all").sum() == 11
    assert m.select("all", include_special=True).sum() == 13


def test_count_mismatch_names_the_sample() -> None:
    ids = torch.tensor([[BOS, IMG, IMG, 5], [BOS, IMG, 5, 6]])
    with pytest.raises(ImageTokenMismatchError, match="sample 1 has 1 image tokens"):
        compute_masks(ids, None, [IMG], [BOS], [grid(2), grid(2)])


def test_sample_with_no_image_left_says_so() -> None:
    ids = torch.tensor([[BOS, IMG, IMG, 5], [BOS, IMG, IMG, 6]])
    with pytest.raises(
        ImageTokenMismatchError,
        match=r"^sample 1 has 2 image tokens but no images are left for it \(1 image given for "
        r"the batch, all taken by the samples before it\)",
    ):
        compute_masks(ids, None, [IMG], [BOS], [grid(2)])


def test_declared_images_per_sample_must_add_up() -> None:
    check_images_per_sample([1, 2], 3, "batch_num_images")
    with pytest.raises(
        ImageTokenMismatchError,
        match=r"^sample 1 should have 2 images \(batch_num_images\) but only 1 image is left "
        r"for it \(2 images given for the batch\)$",
    ):
        check_images_per_sample([1, 2], 2, "batch_num_images")
    with pytest.raises(ImageTokenMismatchError, match=r"^4 images given for the batch but "):
        check_images_per_sample([1, 2], 4, "batch_num_images")


def test_images_without_placeholders() -> None:
    ids = torch.tensor([[BOS, 5, 6]])
    with pytest.raises(ImageTokenMismatchError, match="no sample contains an image token"):
        compute_masks(ids, None, [IMG], [BOS], [grid(2)])


def test_placeholders_without_images() -> None:
    ids = torch.tensor([[BOS, 5, 6], [BOS, IMG, 6]])
    with pytest.raises(ImageTokenMismatchError, match=r"sample\(s\) \[1\]"):
        compute_masks(ids, None, [IMG], [BOS], None)


def test_too_many_images() -> None:
    ids = torch.tensor([[BOS, IMG, IMG]])
    with pytest.raises(ImageTokenMismatchError, match="3 images were given"):
        compute_masks(ids, None, [IMG], [BOS], [grid(2), grid(2), grid(2)])


def test_select_rejects_unknown_kind() -> None:
    m = compute_masks(torch.tensor([[BOS, 5]]), None, [IMG], [BOS], None)
    with pytest.raises(ValueError, match="tokens must be"):
        m.select("video")  # type: ignore[arg-type]


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_qwen_video_inputs_are_refused_by_name(family: str, zoo_path: Any) -> None:
    """A hub Qwen processor makes video inputs (the zoo's has no video processor): the image
    placeholders become <|video_pad|> and the pixels pixel_values_videos, which transformers
    runs and vlmscope's masks do not lay out yet."""
    from tests.conftest import random_image
    from vlmscope.models.hooked import HookedVLM

    vlm = HookedVLM.from_pretrained(zoo_path(family), device="cpu", dtype=torch.float32)
    inputs = dict(vlm.prepare("what is shown", images=[random_image(32, 32, seed=1)]))
    cfg = vlm.model.config
    ids = inputs["input_ids"].clone()
    ids[ids == cfg.image_token_id] = cfg.video_token_id
    video = {**{k: v for k, v in inputs.items() if k not in ("pixel_values", "image_grid_thw")},
             "input_ids": ids, "pixel_values_videos": inputs["pixel_values"],
             "video_grid_thw": inputs["image_grid_thw"]}  # fmt: skip
    with pytest.raises(ImageTokenMismatchError, match=f"{family}: video inputs"):
        vlm.masks(video)
