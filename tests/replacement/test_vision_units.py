"""Dictionaries on the vision tower in evaluation and the replacement model, against the same
replacement done by hand with hooks on the plain model."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from tests.conftest import random_image
from vlmscope.dictionaries import SparseCoderConfig, fvu
from vlmscope.models.hooked import HookContext, HookedVLM
from vlmscope.models.toy import toy_path
from vlmscope.replacement.evaluate import evaluate, next_token_ce
from vlmscope.replacement.model import ReplacementModel
from vlmscope.training.bundle import DictionaryBundle, ModelMismatchError

pytestmark = pytest.mark.usefixtures("one_thread")

READ, WRITE = "vision.blocks.1.mlp.hook_in", "vision.blocks.1.mlp.hook_out"


def test_a_vision_mlp_transcoder_is_replaced_at_image_patches_only() -> None:
    """Evaluation's reconstruction metrics, replaced and zero-ablated CE equal what the same
    transcoder gives when spliced in by hand at the patch rows of each image (the CLS row
    keeps the MLP's own output, as the dictionaries never trained on it)."""
    vlm = HookedVLM.from_pretrained(toy_path(), device="cpu")
    torch.manual_seed(0)
    cfg = SparseCoderConfig(kind="transcoder", k=8, num_latents=256)
    info = {"name": "toy", "family": "llava", "dims": vlm.adapter.dims(), "tokens": "all"}
    bundle = DictionaryBundle.create(cfg, [READ], [WRITE], 128, 128, info)
    with torch.no_grad():
        for p in bundle.coders[0].parameters():
            p.normal_(0, 0.05)
    coder = bundle.coders[0]
    inputs = vlm.prepare(
        ["What colour is the circle?", "How many squares?"],
        images=[[random_image(64, 64, 1)], [random_image(64, 64, 2)]],
    )
    report = evaluate(vlm, bundle, inputs, progress=False)

    vc = vlm.model.config.vision_config
    patch = torch.ones(2, 1 + (vc.image_size // vc.patch_size) ** 2, 1, dtype=torch.bool)
    patch[:, 0] = False
    seen: dict[str, torch.Tensor] = {}

    def read(t: torch.Tensor, ctx: HookContext) -> None:
        seen["x"] = t

    def swap(t: torch.Tensor, ctx: HookContext) -> torch.Tensor:
        seen["y"] = t
        y_hat = coder(seen["x"].reshape(-1, 128), t.reshape(-1, 128)).reconstruction
        return torch.where(patch, y_hat.reshape(t.shape), t)

    def zero(t: torch.Tensor, ctx: HookContext) -> torch.Tensor:
        return t.masked_fill(patch, 0.0)

    valid = inputs["attention_mask"].bool()
    with torch.no_grad():
        replaced = vlm.run_with_hooks(inputs, [(READ, read), (WRITE, swap)]).logits
        zeroed = vlm.run_with_hooks(inputs, [(WRITE, zero)]).logits
    res = report.next_token["all"]["all_layers"]
    want_replaced = float(next_token_ce(replaced, inputs["input_ids"], valid))
    assert res["ce_replaced"] == pytest.approx(want_replaced, rel=1e-5)
    assert res["ce_zero_ablation"] == pytest.approx(
        float(next_token_ce(zeroed, inputs["input_ids"], valid)), rel=1e-5
    )
    assert report.next_token["all"]["per_layer"][READ]["ce_replaced"] == pytest.approx(
        want_replaced, rel=1e-5
    )
    x, y = seen["x"][:, 1:].reshape(-1, 128), seen["y"][:, 1:].reshape(-1, 128)
    recon = report.reconstruction["all"]["per_unit"][READ]
    assert report.reconstruction["all"]["n_tokens"] == x.shape[0] == 2 * (patch.shape[1] - 1)
    with torch.no_grad():
        want_fvu = float(fvu(y, coder(x, y).reconstruction))
    assert recon["fvu"] == pytest.approx(want_fvu, rel=1e-4)
    assert report.reconstruction["text"]["n_tokens"] == 0

    # The ReplacementModel's forward is the same replaced model.
    rm = ReplacementModel(vlm, bundle)
    with torch.no_grad():
        torch.testing.assert_close(rm.forward(inputs).logits, replaced, atol=1e-5, rtol=1e-5)
    assert res["kl"] > 0  # the replacement changes the answer distribution


def test_vision_dictionaries_on_a_text_only_model_are_refused_clearly(zoo_path: Any) -> None:
    vlm = HookedVLM.from_pretrained(zoo_path("llama"), device="cpu")
    cfg = SparseCoderConfig(kind="transcoder", k=2, num_latents=16)
    info = {"name": "toy", "family": "llava"}
    bundle = DictionaryBundle.create(cfg, [READ], [WRITE], 64, 64, info)
    with pytest.raises(ModelMismatchError, match=r"text-only model .* no vision tower"):
        ReplacementModel(vlm, bundle)
