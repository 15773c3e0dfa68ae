"""Baseline saliency maps on the shipped toy, checked against finite differences, completeness
and the model's own (eager) attention weights."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from vlmscope.attribution import baselines as bl
from vlmscope.data import shapes
from vlmscope.models.hooked import HookedVLM
from vlmscope.models.toy import toy_path


@pytest.fixture(scope="module")
def case() -> tuple[HookedVLM, Any, int]:
    vlm = HookedVLM.from_pretrained(toy_path(), device="cpu", dtype=torch.float32)
    sample = shapes.example_with_one("circle")
    inputs = vlm.prepare("What colour is the circle?", images=[sample.image])
    colour = next(o.colour for o in sample.objects if o.shape == "circle")
    token = vlm.tokenizer(" " + colour, add_special_tokens=False)["input_ids"][0]
    return vlm, inputs, token


def test_gradient_x_input_matches_finite_differences(case: tuple[HookedVLM, Any, int]) -> None:
    """x_p . df/dx_p is the derivative of f along scaling patch p's embedding: measure it on
    the patches that matter (the largest values: a difference quotient of a logit near 8 in
    fp32, whose norms compute in fp32 even in an fp64 model, cannot resolve tiny ones). The
    step is 1e-2: fp32 logits near 8 are spaced ~1e-6 apart, so at h = 1e-3 the quotient moves
    in steps of ~2e-3 (2.5% of these values, past the tolerance), while the central
    difference's own error at 1e-2 is O(h^2), under 0.3% here."""
    vlm, inputs, token = case
    heat = bl.gradient_x_input(vlm, inputs, token)
    pos, rows, cols = bl.image_grid(vlm, inputs)
    x = bl._embeddings(vlm, inputs)
    h = 1e-2
    big = (heat >= 0.1 * heat.max()).nonzero().tolist()
    assert 1 <= len(big) < heat.numel()
    for r, c in big:
        p = int(pos[(rows == r) & (cols == c)][0])
        up, down = x.clone(), x.clone()
        up[0, p] *= 1 + h
        down[0, p] *= 1 - h
        with torch.no_grad():
            f = bl._logits_at(vlm, inputs, torch.cat([up, down]), token)
        measured = abs(float(f[0] - f[1]) / (2 * h))
        assert measured == pytest.approx(float(heat[r, c]), rel=1e-2)


def test_integrated_gradients_are_complete(case: tuple[HookedVLM, Any, int]) -> None:
    """The signed attributions add up to f(x) - f(blank image), and the map is their size on
    the image patches; the blank baseline changes image positions only."""
    vlm, inputs, token = case
    pos, _, _ = bl.image_grid(vlm, inputs)
    signed: dict[str, torch.Tensor] = {}
    heat = bl.integrated_gradients(vlm, inputs, token, steps=64, signed=signed)
    delta = float(signed["delta"])
    assert abs(delta) > 0.1
    assert float(signed["all"].sum()) == pytest.approx(delta, rel=1e-3)
    text = torch.ones(signed["all"].shape[0], dtype=torch.bool)
    text[pos] = False
    assert float(signed["all"][text].abs().max()) == 0.0
    assert float(heat.sum()) == pytest.approx(float(signed["all"][pos].abs().sum()))
    with pytest.raises(ValueError, match="baseline"):
        bl.integrated_gradients(vlm, inputs, token, baseline="noise")


def test_attention_maps_match_the_models_own_weights(case: tuple[HookedVLM, Any, int]) -> None:
    vlm, inputs, _ = case
    ours = bl.attention_from_answer(vlm, inputs), bl.attention_rollout(vlm, inputs)
    pos, rows, cols = bl.image_grid(vlm, inputs)
    impl = vlm.model.config._attn_implementation
    vlm.model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            att = [a[0].float() for a in vlm.forward(inputs, output_attentions=True).attentions]
    finally:
        vlm.model.set_attn_implementation(impl)
    mean = torch.stack([a.mean(0)[-1] for a in att]).mean(0)
    roll = torch.eye(att[0].shape[-1])
    for a in att:
        step = 0.5 * a.mean(0) + 0.5 * torch.eye(a.shape[-1])
        roll = (step / step.sum(-1, keepdim=True)) @ roll
    for got, want in zip(ours, (mean, roll[-1]), strict=True):
        expected = torch.zeros_like(got)
        expected[rows, cols] = want[pos].double()
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)


def test_integrated_gradients_frozen_along_the_path(case: tuple[HookedVLM, Any, int]) -> None:
    """freeze_path holds each point's own patterns and norm scales for its gradient: the map
    equals the mean of gradients taken one point at a time, each in a replay recorded at that
    point alone, times (x - x'); and it differs from the live map (the frozen parts matter)."""
    from vlmscope.attribution.freeze import FreezeState, frozen

    vlm, inputs, token = case
    pos, rows, cols = bl.image_grid(vlm, inputs)
    x = bl._embeddings(vlm, inputs)
    base = bl._embeddings(vlm, bl.blank_inputs(inputs))
    grads = []
    for a in (0.25, 0.75):  # the midpoints of 2 steps
        point = base + a * (x - base)
        state = FreezeState(mode="record")
        with torch.no_grad(), frozen(vlm, state):
            bl._logits_at(vlm, inputs, point, token)
        state.mode = "replay"
        with frozen(vlm, state):
            grads.append(bl._gradients(vlm, inputs, point, token))
    per_pos = ((x - base)[0] * torch.stack(grads).mean(0)[0]).sum(-1)
    want = bl.to_grid(per_pos[pos].abs(), rows, cols)
    got = bl.integrated_gradients(vlm, inputs, token, steps=2, freeze_path=True)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * float(want.max()))
    live = bl.integrated_gradients(vlm, inputs, token, steps=2)
    assert float((live - got).abs().max()) > 1e-2 * float(want.max())


@pytest.mark.parametrize("family", ["llava", "llava_next", "idefics3", "internvl", "qwen2_vl"])
def test_a_blank_image_is_one_colour_across_tiles_and_channels(family: str, zoo_path: Any) -> None:
    """The top-left pixel's colour everywhere: one value per channel over every image and tile
    ([..., C, H, W]), or over every row of flattened patches ([patches, C x T x P x P])."""
    from PIL import Image

    from tests.replacement.test_model import vlm_for

    pic = Image.new("RGB", (64, 48), (0, 0, 255))
    pic.paste((255, 0, 0), (0, 0, 32, 24))  # the top-left quadrant red, the rest blue
    vlm = vlm_for(family, zoo_path)
    pv = vlm.prepare("what is shown", images=[pic])["pixel_values"]
    blank = bl.blank_inputs({"pixel_values": pv})["pixel_values"]
    assert blank.shape == pv.shape
    if pv.dim() >= 4:
        first = pv.reshape(-1, *pv.shape[-3:])[0, :, 0, 0]
        channels = blank.movedim(-3, 0).reshape(pv.shape[-3], -1)
        assert torch.equal(channels, first[:, None].expand_as(channels))
    else:
        block = pv.shape[1] // 3
        want = pv[0, ::block].repeat_interleave(block)
        assert torch.equal(blank, want.expand_as(pv))
        assert len(set(pv[0, ::block].tolist())) > 1  # red: the channels differ


@pytest.mark.parametrize("family", ["llava_next_video", "qwen2_vl"])
def test_a_blank_video_takes_the_first_images_colour(family: str, zoo_path: Any) -> None:
    """Videos are blanked with the images, every frame in the first image's top-left colour
    (the first video's without an image): a blank left the videos as they were, so a video's
    patches were measured from themselves."""
    from PIL import Image

    from tests.conftest import random_image
    from tests.replacement.test_model import vlm_for

    vlm = vlm_for(family, zoo_path)
    pic = Image.new("RGB", (64, 48), (255, 0, 0))
    frames = [random_image(40, 48, seed=s) for s in range(3)]
    both = vlm.prepare("what is shown", images=[pic], videos=frames)
    alone = vlm.prepare("what is shown", videos=frames)
    for inputs, key in ((both, "pixel_values"), (alone, "pixel_values_videos")):
        blank = bl.blank_inputs(inputs)
        first = bl.blank_inputs({key: inputs[key]})[key]  # the one colour, as images get it
        pv, vid = inputs["pixel_values_videos"], blank["pixel_values_videos"]
        assert vid.shape == pv.shape and not torch.equal(vid, pv)
        if pv.dim() >= 4:
            colour = first.reshape(-1, *first.shape[-3:])[0, :, 0, 0]
            assert torch.equal(vid, colour[:, None, None].expand_as(pv))
        else:
            assert torch.equal(vid, first[:1].expand_as(pv))
    with pytest.raises(ValueError, match="no pixel_values or pixel_values_videos"):
        bl.blank_inputs({"input_ids": both["input_ids"]})
