"""`vlmscope attribute`'s input checks that need the model's processor."""

from __future__ import annotations

from typing import Any

import pytest
from PIL import Image

from vlmscope.attribution.cli import input_warnings
from vlmscope.models.toy import toy_path


@pytest.fixture(scope="module")
def processor() -> Any:
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(toy_path())


def test_an_image_far_below_the_processor_resolution_is_warned_about(processor: Any) -> None:
    side = processor.image_processor.crop_size["height"]  # the toy's CLIP crop: 64 px
    tiny = Image.new("RGB", (1, 1))
    quarter = Image.new("RGB", (side // 4, side // 4))
    fine = Image.new("RGB", (side // 4 + 1, side))
    warned = input_warnings(processor, [tiny, fine, quarter], "What colour is the circle?")
    assert len(warned) == 2
    assert warned[0].startswith("image 0 is 1x1 px") and warned[1].startswith("image 2 is")


def test_a_prompt_with_fewer_placeholders_than_images_is_warned_about(processor: Any) -> None:
    img = Image.new("RGB", (64, 64))
    token = processor.image_token
    assert input_warnings(processor, [img, img], "What colour is the circle?") == []
    warned = input_warnings(processor, [img, img], f"{token} What colour is the circle?")
    assert len(warned) == 1 and "1 image placeholder(s)" in warned[0] and "2 image(s)" in warned[0]
