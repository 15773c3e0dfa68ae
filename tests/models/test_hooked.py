"""HookedVLM edits checked against equivalent edits elsewhere in the network, plus bad input."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import CLIPVisionConfig, CLIPVisionModel

from tests.conftest import random_image
from vlmscope.models.adapters.generic import DecoderNotFoundError
from vlmscope.models.hooked import HookedVLM
from vlmscope.models.masks import ImageTokenMismatchError


@pytest.fixture(scope="module")
def llava(zoo_path: Any) -> HookedVLM:
    return HookedVLM.from_pretrained(zoo_path("llava"), device="cpu", dtype=torch.float32)


@pytest.fixture(scope="module")
def gemma2(zoo_path: Any) -> HookedVLM:
    return HookedVLM.from_pretrained(zoo_path("gemma2"), device="cpu", dtype=torch.float32)


def llava_inputs(vlm: HookedVLM) -> Any:
    return vlm.prepare(
        ["what colour is the circle", "how many squares"],
        images=[[random_image(32, 32, 1)], [random_image(32, 32, 2), random_image(40, 32, 3)]],
    )


@pytest.mark.parametrize("which", ["llava", "gemma2"])
def test_resid_mid_edit_equals_attn_out_edit(which: str, request: pytest.FixtureRequest) -> None:
    """attn.hook_out is the attention's contribution to the residual: adding v there and adding
    v to resid_mid must give the same logits (this checks resid_mid's carry-over)."""
    vlm: HookedVLM = request.getfixturevalue(which)
    inputs = llava_inputs(vlm) if which == "llava" else vlm.prepare(["one two three four five six"])
    v = torch.randn(vlm.adapter.d_model, generator=torch.Generator().manual_seed(0))
    a = vlm.run_with_hooks(inputs, [("lm.blocks.1.hook_resid_mid", HookedVLM.add(v))]).logits
    b = vlm.run_with_hooks(inputs, [("lm.blocks.1.attn.hook_out", HookedVLM.add(v))]).logits
    clean = vlm.forward(inputs).logits
    assert (a - clean).abs().max() > 1e-3
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_resid_post_edit_equals_next_resid_pre_edit(llava: HookedVLM) -> None:
    inputs = llava_inputs(llava)
    v = torch.randn(llava.adapter.d_model, generator=torch.Generator().manual_seed(1))
    a = llava.run_with_hooks(inputs, [("lm.blocks.0.hook_resid_post", HookedVLM.add(v))]).logits
    b = llava.run_with_hooks(inputs, [("lm.blocks.1.hook_resid_pre", HookedVLM.add(v))]).logits
    torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_hook_z_head_view(llava: HookedVLM) -> None:
    """Adding u to head h of z equals adding o_proj's columns of head h times u to attn_out."""
    inputs = llava_inputs(llava)
    a = llava.adapter
    h, u = 2, torch.randn(a.d_head, generator=torch.Generator().manual_seed(2))
    w_o = a.part(0, "o").weight  # [d_model, heads * d_head]
    delta = w_o[:, h * a.d_head : (h + 1) * a.d_head] @ u

    def add_head(t: torch.Tensor, ctx: Any) -> torch.Tensor:
        t = t.clone()
        t[:, :, h] += u
        return t

    x = llava.run_with_hooks(inputs, [("lm.blocks.0.attn.hook_z", add_head)]).logits
    y = llava.run_with_hooks(inputs, [("lm.blocks.0.attn.hook_out", HookedVLM.add(delta))]).logits
    torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)


def test_patching_a_whole_stream_transplants_the_run(gemma2: HookedVLM) -> None:
    tok = gemma2.tokenizer
    ids_a = torch.tensor([[tok.bos_token_id, 20, 31, 42, 53, 64, 75, 86, 97, 108, 119]])
    ids_b = torch.tensor([[tok.bos_token_id, 21, 30, 45, 50, 66, 70, 88, 90, 100, 111]])
    a, b = {"input_ids": ids_a}, {"input_ids": ids_b}
    out_b, cache_b = gemma2.run_with_cache(b, names="lm.blocks.1.hook_resid_pre")
    hook = HookedVLM.patch(cache_b["lm.blocks.1.hook_resid_pre"])
    patched = gemma2.run_with_hooks(a, [("lm.blocks.1.hook_resid_pre", hook)]).logits
    torch.testing.assert_close(patched, out_b.logits, atol=0, rtol=0)
    # Patching only the last position changes only the last position's logits.
    pos = torch.zeros(1, ids_a.shape[1], dtype=torch.bool)
    pos[0, -1] = True
    only_last = gemma2.run_with_hooks(
        a,
        [
            (
                "lm.blocks.1.hook_resid_pre",
                HookedVLM.patch(cache_b["lm.blocks.1.hook_resid_pre"], pos),
            )
        ],
    ).logits
    clean_a = gemma2.forward(a).logits
    torch.testing.assert_close(only_last[0, :-1], clean_a[0, :-1], atol=0, rtol=0)
    assert (only_last[0, -1] - clean_a[0, -1]).abs().max() > 1e-3


def test_zero_ablation_at_image_positions(llava: HookedVLM) -> None:
    inputs = llava_inputs(llava)
    masks = llava.masks(inputs)
    _, cache = llava.run_with_cache(
        inputs,
        names="lm.blocks.0.hook_resid_pre",
        fwd_hooks=[("lm.blocks.0.hook_resid_pre", HookedVLM.zero_ablate(masks.image))],
    )
    x = cache["lm.blocks.0.hook_resid_pre"]
    assert (x[masks.image] == 0).all()
    assert (x[masks.text].abs().sum(-1) > 0).all()


def test_masked_cache_keeps_selected_tokens(llava: HookedVLM) -> None:
    inputs = llava_inputs(llava)
    names = [
        "lm.blocks.1.hook_resid_mid",
        "lm.blocks.1.attn.hook_q",
        "lm.blocks.1.attn.hook_pattern",
    ]
    _, full = llava.run_with_cache(inputs, names=names)
    _, img = llava.run_with_cache(inputs, names=names, mask="image")
    m = img.masks.image
    assert img["lm.blocks.1.hook_resid_mid"].shape == (int(m.sum()), llava.adapter.d_model)
    torch.testing.assert_close(
        img["lm.blocks.1.hook_resid_mid"], full["lm.blocks.1.hook_resid_mid"][m]
    )
    torch.testing.assert_close(img["lm.blocks.1.attn.hook_q"], full["lm.blocks.1.attn.hook_q"][m])
    pat = full["lm.blocks.1.attn.hook_pattern"].transpose(1, 2)[m]
    torch.testing.assert_close(img["lm.blocks.1.attn.hook_pattern"], pat)


def test_pattern_is_read_only(llava: HookedVLM) -> None:
    with pytest.raises(RuntimeError, match="read-only"):
        llava.run_with_hooks(
            llava_inputs(llava), [("lm.blocks.0.attn.hook_pattern", lambda t, c: t * 2)]
        )


def test_wrong_shape_from_hook(llava: HookedVLM) -> None:
    with pytest.raises(ValueError, match=r"lm\.blocks\.0\.mlp\.hook_out returned shape"):
        llava.run_with_hooks(
            llava_inputs(llava), [("lm.blocks.0.mlp.hook_out", lambda t, c: t[:, :1])]
        )


def test_unknown_hook_lists_close_matches(llava: HookedVLM) -> None:
    with pytest.raises(KeyError, match=r"did you mean lm\.blocks\.1\.hook_resid_post"):
        llava.hook_names("lm.blocks.1.hook_resid_pst")
    with pytest.raises(KeyError, match="no hook point matches"):
        llava.hook_names("lm.blocks.7.hook_resid_post")
    assert len(llava.hook_names("lm.blocks.*.attn.hook_*")) == 6 * llava.adapter.n_layers


def _forward_counter(vlm: HookedVLM) -> tuple[list[int], Any]:
    calls: list[int] = []
    h = vlm.model.register_forward_pre_hook(lambda *a: calls.append(1))
    return calls, h


def test_one_lost_placeholder_names_the_sample(llava: HookedVLM) -> None:
    inputs = dict(llava_inputs(llava))
    calls, h = _forward_counter(llava)
    try:
        img = llava.adapter.image_token_ids()[0]
        ids = inputs["input_ids"].clone()
        first = (ids[1] == img).nonzero()[0, 0]
        ids[1, first] = llava.tokenizer.convert_tokens_to_ids("the")
        with pytest.raises(ImageTokenMismatchError, match="sample 1 has 31 image tokens"):
            llava.forward({**inputs, "input_ids": ids})
        no_img = ids.masked_fill(ids == img, 5)
        with pytest.raises(ImageTokenMismatchError, match="no sample contains an image token"):
            llava.forward({**inputs, "input_ids": no_img})
        assert calls == []
    finally:
        h.remove()


_LOADED: dict[str, HookedVLM] = {}

#: family -> expected error for: pixel_values with text-only prompts; sample 0's prompt with
#: 2 image placeholders but 1 image for it; sample 1's image missing.
MISMATCH = {
    "llava": (
        "2 image.s. were given but no sample contains an image token",
        r"sample 1 has 16 image tokens but no images are left for it \(2 images given for the "
        "batch",
        r"sample 1 has 16 image tokens but no images are left for it \(1 image given for the "
        "batch",
    ),
    "llava_onevision": (
        "2 image.s. were given but no sample contains an image token",
        # 2 images of a multi-image sample: a 4x4 base grid + 1 newline each; 1 image: tiled.
        r"sample 0 has 34 image tokens, but the images assigned to it in order \(image 0 of "
        r"the 2 images given, \[36\] tokens each\) give 36",
        r"sample 1 should have 1 image \(batch_num_images\) but no images are left for it "
        r"\(1 image given for the batch\)",
    ),
    "idefics3": (
        r"sample 0 has no image tokens but pixel_values holds 5 real image view\(s\)",
        r"sample 0 has image tokens for 10 view\(s\) \(2 image\(s\).* holds 5 real",
        r"sample 1 has image tokens for 5 view\(s\) .* holds 0 real image",
    ),
    "smolvlm": (
        r"sample 0 has no image tokens but pixel_values holds 5 real image view\(s\)",
        r"sample 0 has image tokens for 10 view\(s\) \(2 image\(s\).* holds 5 real",
        r"sample 1 has image tokens for 5 view\(s\) .* holds 0 real image",
    ),
}


@pytest.mark.parametrize("family", sorted(MISMATCH))
def test_images_and_placeholders_disagree_before_forward(family: str, zoo_path: Any) -> None:
    """Prompts and images that disagree fail in masks(), naming the sample, before the model
    runs (where transformers would fail with its own error, or silently misplace images)."""
    if family not in _LOADED:
        _LOADED[family] = HookedVLM.from_pretrained(zoo_path(family), device="cpu")
    vlm = _LOADED[family]
    prompts = ["what colour is the circle", "how many squares"]
    a, b, c = random_image(32, 32, 1), random_image(32, 32, 2), random_image(40, 32, 3)
    one = dict(vlm.prepare(prompts, images=[[a], [b]]))
    two = dict(vlm.prepare(prompts, images=[[a, c], [b]]))
    text = dict(vlm.prepare(prompts))
    images = {k: v for k, v in one.items() if k not in text}
    if "pixel_attention_mask" in one:  # Idefics3/SmolVLM: sample 1's views become padding
        missing = {**one, "pixel_values": one["pixel_values"].clone()}
        missing["pixel_values"][1] = 0
    else:
        missing = {k: v[:1] if k in ("pixel_values", "image_sizes") else v for k, v in one.items()}
    cases = [
        {**text, **images},
        {**one, "input_ids": two["input_ids"], "attention_mask": two["attention_mask"]},
        missing,
    ]
    calls, h = _forward_counter(vlm)
    try:
        for inputs, expected in zip(cases, MISMATCH[family], strict=True):
            with pytest.raises(ImageTokenMismatchError, match=expected):
                vlm.forward(inputs)
        assert calls == []
        vlm.forward(one)  # the consistent batch runs
        assert calls == [1]
    finally:
        h.remove()


def test_prepare_rejects_wrong_number_of_image_lists(llava: HookedVLM) -> None:
    with pytest.raises(ValueError, match="got 1 image lists for 2 prompts"):
        llava.prepare(["a", "b"], images=[[random_image(32, 32)]])


def test_checkpoint_without_decoder_is_a_clear_error(tmp_path: Path) -> None:
    """A saved vision-only model fails with vlmscope's error, not transformers' list of every
    causal-LM config class."""
    cfg = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        image_size=16, patch_size=8,
    )  # fmt: skip
    CLIPVisionModel(cfg).save_pretrained(tmp_path / "clip")
    with pytest.raises(
        DecoderNotFoundError, match=r"model_type='clip_vision_model'.*AutoModelForCausalLM"
    ):
        HookedVLM.from_pretrained(tmp_path / "clip", device="cpu")


def test_from_pretrained_accepts_dtype_names(zoo_path: Any, tmp_path: Path) -> None:
    vlm = HookedVLM.from_pretrained(zoo_path("llama"), device="cpu", dtype="bfloat16")
    assert vlm.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="unknown dtype"):
        HookedVLM.from_pretrained(zoo_path("llama"), device="cpu", dtype="float8")


def test_fused_qkv_hooks_are_slices_and_edit_their_own(zoo_path: Any) -> None:
    """Phi-4-multimodal projects q, k and v with one qkv_proj: hook_q/k/v read its slices, and
    an edit through hook_v reaches the values only (zero values: zero per-head outputs, the
    same attention pattern)."""
    from tests.replacement.test_model import vlm_for

    vlm = vlm_for("phi4_multimodal", zoo_path)
    a = vlm.adapter
    inputs = vlm.prepare("what colour is the circle", images=[random_image(32, 40, 1)])
    seen: list[torch.Tensor] = []
    qkv = vlm.model.model.layers[1].self_attn.qkv_proj
    handle = qkv.register_forward_hook(lambda _m, _a, out: seen.append(out.detach().clone()))
    try:
        _, cache = vlm.run_with_cache(inputs, names="lm.blocks.1.attn.hook_*")
    finally:
        handle.remove()
    nq, nkv = a.n_heads * a.d_head, a.n_kv_heads * a.d_head
    whole = seen.pop()
    torch.testing.assert_close(cache["lm.blocks.1.attn.hook_q"].flatten(-2), whole[..., :nq])
    torch.testing.assert_close(
        cache["lm.blocks.1.attn.hook_k"].flatten(-2), whole[..., nq : nq + nkv]
    )
    torch.testing.assert_close(cache["lm.blocks.1.attn.hook_v"].flatten(-2), whole[..., nq + nkv :])
    assert cache["lm.blocks.1.attn.hook_z"].abs().max() > 0
    names = ["lm.blocks.1.attn.hook_z", "lm.blocks.1.attn.hook_pattern"]
    _, edited = vlm.run_with_cache(
        inputs, names=names, fwd_hooks=[("lm.blocks.1.attn.hook_v", HookedVLM.zero_ablate())]
    )
    assert bool((edited["lm.blocks.1.attn.hook_z"] == 0).all())
    torch.testing.assert_close(
        edited["lm.blocks.1.attn.hook_pattern"], cache["lm.blocks.1.attn.hook_pattern"]
    )


def test_stop_early_records_the_same_values_without_running_later_layers(
    llava: HookedVLM,
) -> None:
    """run_with_cache(stop_early=True) ends the forward at the last hook it records: the
    same values as a whole forward, the last block never runs and there are no logits."""
    inputs = llava_inputs(llava)
    names = ["vision.blocks.0.hook_resid_post", "projector.hook_out",
             "lm.blocks.0.hook_resid_mid", "lm.blocks.1.mlp.hook_out"]  # fmt: skip
    last = llava.adapter.block(llava.adapter.n_layers - 1)
    runs: list[int] = []
    handle = last.register_forward_hook(lambda *_: runs.append(1))
    try:
        out, full = llava.run_with_cache(inputs, names=names, mask="all")
        assert out is not None and runs == [1]
        stopped, early = llava.run_with_cache(inputs, names=names, mask="all", stop_early=True)
        assert stopped is None and runs == [1]  # the last block did not run again
    finally:
        handle.remove()
    for n in names:
        torch.testing.assert_close(early[n], full[n], rtol=0, atol=0, msg=n)
    only_vision, cache = llava.run_with_cache(inputs, names=names[:2], stop_early=True)
    assert only_vision is not None  # nothing in the language model to stop at: a whole run
    torch.testing.assert_close(cache[names[1]], full[names[1]], rtol=0, atol=0)
    # A batch without images never fires the vision hooks; it stops where one with images does
    # (ranks of a sharded model must run the same layers)
    handle = last.register_forward_hook(lambda *_: runs.append(1))
    try:
        text, cache = llava.run_with_cache(llava.prepare(["no picture"]), names=names,
                                           mask="all", stop_early=True)  # fmt: skip
        assert text is None and runs == [1] and set(cache) == set(names[2:])
    finally:
        handle.remove()
