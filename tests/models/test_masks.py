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


def as_video(vlm: Any, inputs: Any) -> dict[str, Any]:
    """A one-image batch as a hub Qwen processor makes the same picture as a one-temporal-patch
    video: <|video_pad|> placeholders, pixel_values_videos and video_grid_thw (transformers'
    image processor repeats an image's frame across the temporal patch, so the pixels are the
    same), and the token types marking video (2) where they marked image (1)."""
    cfg = vlm.model.config
    ids = inputs["input_ids"].clone()
    ids[ids == cfg.image_token_id] = cfg.video_token_id
    kinds = inputs["mm_token_type_ids"].clone()
    kinds[kinds == 1] = 2
    rest = {k: v for k, v in inputs.items() if k not in ("pixel_values", "image_grid_thw")}
    return {**rest, "input_ids": ids, "mm_token_type_ids": kinds,
            "pixel_values_videos": inputs["pixel_values"],
            "video_grid_thw": inputs["image_grid_thw"]}  # fmt: skip


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_a_qwen_image_sent_as_a_video_is_the_same_image(family: str, zoo_path: Any) -> None:
    """The masks mark the <|video_pad|> tokens as the image's tokens, with the image's patch
    map, and the model (transformers' video path) gives the image's logits."""
    from tests.conftest import random_image
    from vlmscope.models.hooked import HookedVLM

    vlm = HookedVLM.from_pretrained(zoo_path(family), device="cpu", dtype=torch.float32)
    image = dict(vlm.prepare("what is shown", images=[random_image(32, 48, seed=1)]))
    video = as_video(vlm, image)
    got, want = vlm.masks(video), vlm.masks(image)
    assert torch.equal(got.image, video["input_ids"] == vlm.model.config.video_token_id)
    assert torch.equal(got.image, want.image) and torch.equal(got.patch_map, want.patch_map)
    assert torch.equal(got.special, want.special)
    torch.testing.assert_close(vlm.forward(video).logits, vlm.forward(image).logits, atol=0, rtol=0)


def test_glm4v_video_inputs_are_refused_by_name(zoo_path: Any) -> None:
    """GLM-4V writes a video's frames as image tokens between timestamps, which its adapter
    does not lay out: its masks refuse videos, naming the family, instead of a KeyError."""
    from tests.conftest import random_image
    from vlmscope.models.hooked import HookedVLM

    vlm = HookedVLM.from_pretrained(zoo_path("glm4v"), device="cpu", dtype=torch.float32)
    image = dict(vlm.prepare("what is shown", images=[random_image(32, 32, seed=1)]))
    with pytest.raises(ImageTokenMismatchError, match="glm4v: video inputs"):
        vlm.masks(as_video(vlm, image))
