"""The zoo's Qwen-VL video processor stand-in against transformers' own image path.

Truth: transformers' Qwen2-VL image processor makes an image one temporal patch whose frames
are the image repeated, and its video processor lays a patch out as (channel, frame, pixel
row, pixel column), padding a clip to a multiple of temporal_patch_size with its last frame.
So a video of identical frames must be the image, to the bit, in the pixels and in what the
vision tower makes of them; distinct frames must sit in their frame slot of every channel.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from tests.conftest import random_image
from tests.replacement.test_model import vlm_for

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_a_video_of_one_repeated_frame_is_the_image(family: str, zoo_path: Any) -> None:
    vlm = vlm_for(family, zoo_path)
    proc = vlm.processor
    frame = random_image(40, 56, seed=3)
    tp = proc.video_processor.temporal_patch_size
    image = proc.image_processor([frame], return_tensors="pt")
    video = proc.video_processor([[frame] * tp])
    assert torch.equal(video["pixel_values_videos"], image["pixel_values"])
    assert torch.equal(video["video_grid_thw"], image["image_grid_thw"])
    model = vlm.model.model
    with torch.no_grad():
        v = model.get_video_features(video["pixel_values_videos"], video["video_grid_thw"])
        i = model.get_image_features(image["pixel_values"], image["image_grid_thw"])
    torch.testing.assert_close(v.pooler_output[0], i.pooler_output[0], atol=0, rtol=0)


def test_frames_fill_their_slot_of_each_temporal_patch(zoo_path: Any) -> None:
    """Three frames: two temporal patches, the second holding frame 2 twice (the last frame
    repeats, as transformers pads a clip); each frame's pixels are the image processor's for
    that frame, in its frame slot of every channel."""
    proc = vlm_for("qwen2_vl", zoo_path).processor
    frames = [random_image(40, 56, seed=s) for s in range(3)]
    out = proc.video_processor([frames])
    t, h, w = out["video_grid_thw"][0].tolist()
    assert t == 2
    pv = out["pixel_values_videos"].reshape(t, h * w, 3, 2, -1)
    for k, f in enumerate([0, 1, 2, 2]):
        alone = proc.image_processor([frames[f]], return_tensors="pt")["pixel_values"]
        assert torch.equal(pv[k // 2, :, :, k % 2], alone.reshape(h * w, 3, 2, -1)[:, :, 0])


def test_the_processor_expands_each_video_placeholder(zoo_path: Any) -> None:
    """The stock processor, given the stand-in's grids, writes video_grid_thw.prod() / m^2
    placeholders per video, and saving and loading keeps the video path."""
    vlm = vlm_for("qwen2_vl", zoo_path)
    frames = [random_image(40, 56, seed=s) for s in range(4)]
    inputs = vlm.prepare("what happens", videos=frames)
    m = vlm.processor.video_processor.merge_size
    n = int((inputs["input_ids"] == vlm.processor.video_token_id).sum())
    assert n == int(inputs["video_grid_thw"].prod()) // m**2 > 0


def test_a_zoo_folder_saved_before_videos_loads_its_processor(zoo_path: Any, tmp_path: Any) -> None:
    """Folders saved at ZOO_VERSION 2 name `Qwen2VLImageOnlyProcessor`; an unregistered name
    would make AutoProcessor return the bare tokenizer, and images would fail later."""
    import shutil

    from vlmscope.models.hooked import HookedVLM

    old = tmp_path / "qwen2_vl-v2"
    shutil.copytree(zoo_path("qwen2_vl"), old)
    for name in ("processor_config.json", "tokenizer_config.json"):
        path = old / name
        text = path.read_text()
        assert "Qwen2VLFramesProcessor" in text
        path.write_text(text.replace("Qwen2VLFramesProcessor", "Qwen2VLImageOnlyProcessor"))
    vlm = HookedVLM.from_pretrained(str(old))
    assert type(vlm.processor).__name__ == "Qwen2VLImageOnlyProcessor"
    want = vlm_for("qwen2_vl", zoo_path).prepare("a picture", images=[random_image(40, 56)])
    got = vlm.prepare("a picture", images=[random_image(40, 56)])
    assert torch.equal(got["pixel_values"], want["pixel_values"])
    assert torch.equal(got["input_ids"], want["input_ids"])
