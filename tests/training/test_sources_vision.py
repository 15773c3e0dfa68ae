"""The live source on vision and projector hooks: image patches only, CLS on request, and no
language-model layers run for them."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from vlmscope.models.hooked import HookedVLM
from vlmscope.models.toy import toy_path
from vlmscope.models.vision import vision_row_mask
from vlmscope.training.config import parse_train_args
from vlmscope.training.sources import LiveSource, TrainState

pytestmark = pytest.mark.usefixtures("one_thread")

HOOKS = ["vision.blocks.1.hook_resid_post", "projector.hook_out"]


@pytest.mark.parametrize("special", [False, True])
def test_vision_rows_are_the_patches_and_the_language_model_never_runs(special: bool) -> None:
    flags = ["toy", "shapes:4", "--batch-size", "2", "--hookpoints", *HOOKS]
    cfg = parse_train_args(flags + (["--include-special-tokens"] if special else []))
    vlm = HookedVLM.from_pretrained(toy_path(), device="cpu")
    source = LiveSource(cfg)
    source.open_data()
    source.bind_model(vlm)
    assert (source.d_in, source.d_out) == (128, 128)
    calls = []
    handle = vlm.adapter.unembed().register_forward_hook(lambda *a: calls.append(1))
    try:
        batch = next(iter(source.batches(TrainState())))
    finally:
        handle.remove()
    assert calls == []  # the forward stopped before the language model's layers
    # Two images of g x g patches: 2 g^2 patch rows, plus the CLS row of each image if asked;
    # the projector drops CLS, so it always has 2 g^2.
    vc = vlm.model.config.vision_config
    rows = 2 * (vc.image_size // vc.patch_size) ** 2
    assert [x.shape for x in batch.xs] == [(rows + 2 if special else rows, 128), (rows, 128)]
    inputs = vlm.prepare(["a", "b"], images=[[_image(0)], [_image(1)]])
    # The rows are the cached activation's patch rows, in (image, row, col) order.
    _, cache = vlm.run_with_cache(inputs, names=HOOKS)
    first = cache[HOOKS[0]]
    want = first.reshape(-1, 128) if special else first[:, 1:].reshape(-1, 128)
    got = source._rows(inputs, HOOKS[0], first, 128)
    torch.testing.assert_close(got, want)


def test_a_projector_that_runs_once_per_image_gives_every_images_rows(zoo_path: Any) -> None:
    """Phi-4-multimodal's projector fires once per image: the training rows are the patch rows
    of all of them, in order (what the module itself returned, newline and separator rows
    left out), and run_with_cache joins them the same way."""
    path = zoo_path("phi4_multimodal")
    flags = [str(path), "shapes:4", "--batch-size", "2", "--hookpoints", "projector.hook_out"]
    vlm = HookedVLM.from_pretrained(path, device="cpu")
    source = LiveSource(parse_train_args(flags))
    source.open_data()
    source.bind_model(vlm)
    module = vlm.adapter.projector_module()
    assert module is not None
    fired: list[torch.Tensor] = []
    handle = module.register_forward_hook(lambda _m, _a, out: fired.append(out.detach()))
    inputs = vlm.prepare(["a", "b"], images=[[_image(0)], [_image(1), _image(2)]])
    try:
        _, cache = vlm.run_with_cache(inputs, names="projector.hook_out")
        assert len(fired) == 3  # one firing per image
        whole = torch.cat([f.reshape(-1, f.shape[-1]) for f in fired])
        torch.testing.assert_close(cache["projector.hook_out"], whole)
        got = source._vision_cache(inputs, ["projector.hook_out"], vlm.masks(inputs))
    finally:
        handle.remove()
    layout = vlm.vision_positions(inputs, "projector.hook_out", whole.shape[:-1])
    patches = vision_row_mask(layout)
    assert 0 < int(patches.sum()) < len(whole)  # newlines and the separator left out
    rows = source._rows(inputs, "projector.hook_out", got["projector.hook_out"], whole.shape[-1])
    torch.testing.assert_close(rows, whole[patches])


def _image(i: int):  # type: ignore[no-untyped-def]
    from tests.conftest import random_image

    return random_image(64, 64, i)
