"""One acceptance suite over every zoo family, gated by the adapters' capability flags.

Truth comes from transformers itself: its hidden_states and eager attentions, its logits without
hooks, per-sample runs, and the processor's own count of image placeholder tokens.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
import torch

from tests.conftest import random_image
from vlmscope.models import zoo
from vlmscope.models.hooked import HookedVLM

PROMPTS = ["what colour is the circle", "how many squares are there in the image"]


def samples(multimodal: bool) -> list[tuple[str, list[Any]]]:
    """Two samples with different lengths and (for VLMs) 1 and 2 images of different sizes."""
    if not multimodal:
        return [(PROMPTS[0], []), (PROMPTS[1] + " and how many circles", [])]
    return [
        (PROMPTS[0], [random_image(32, 40, seed=1)]),
        (PROMPTS[1], [random_image(48, 32, seed=2), random_image(32, 32, seed=3)]),
    ]


def batch(vlm: HookedVLM, items: list[tuple[str, list[Any]]], side: str | None = "right") -> Any:
    """The samples as one batch; `side` None keeps the processor's own padding side."""
    return vlm.prepare(
        [p for p, _ in items], images=[im for _, im in items] if items[0][1] else None,
        padding_side=side,
    )  # fmt: skip


# transformers 5.24's Phi4MultimodalForCausalLM crashes when asked for hidden states or
# attentions with images (its image embedding reads the vision tower's hidden states, which
# the outer recording of outputs replaces by None), and once asked, every later forward with
# images crashes too (the recording hooks stay installed).
EMBEDS_FIRST = {"phi4_multimodal"}


def hf_forward(vlm: HookedVLM, inputs: Any, **flags: Any) -> Any:
    """transformers' own forward pass, the truth the hooks are checked against. For the
    families in EMBEDS_FIRST: the input embeddings (images merged in) are taken from a plain
    forward, then fed with the output flags and no pixels to a copy of the model."""
    if vlm.adapter.family not in EMBEDS_FIRST:
        return vlm.model(**inputs, use_cache=False, **flags)
    got: dict[str, torch.Tensor] = {}

    def grab(_m: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        got["embeds"] = args[0] if args else kwargs["hidden_states"]

    handle = vlm.adapter.block(0).register_forward_pre_hook(grab, with_kwargs=True)
    try:
        vlm.model(**inputs, use_cache=False)
    finally:
        handle.remove()
    return copy.deepcopy(vlm.model)(
        inputs_embeds=got["embeds"], attention_mask=inputs["attention_mask"], use_cache=False,
        **flags,
    )  # fmt: skip


def test_resid_post_equals_hidden_states(family: str, load: Callable[..., HookedVLM]) -> None:
    vlm = load(family)
    inputs = batch(vlm, samples(zoo.spec(family).multimodal))
    out, cache = vlm.run_with_cache(
        inputs, names=["lm.blocks.*.hook_resid_post", "lm.blocks.0.hook_resid_pre"]
    )
    hf = hf_forward(vlm, inputs, output_hidden_states=True)
    hs = hf.hidden_states
    n = vlm.adapter.n_layers
    assert len(hs) == n + 1
    torch.testing.assert_close(cache["lm.blocks.0.hook_resid_pre"], hs[0], atol=1e-5, rtol=0)
    for i in range(n - 1):
        torch.testing.assert_close(
            cache[f"lm.blocks.{i}.hook_resid_post"], hs[i + 1], atol=1e-5, rtol=0
        )
    # The last hidden state is after the final norm.
    last = vlm.adapter.norm()(cache[f"lm.blocks.{n - 1}.hook_resid_post"])
    torch.testing.assert_close(last, hs[n], atol=1e-5, rtol=0)
    torch.testing.assert_close(out.logits, hf.logits, atol=0, rtol=0)


def test_residual_stream_strictness(family: str, load: Callable[..., HookedVLM]) -> None:
    vlm = load(family)
    inputs = batch(vlm, samples(zoo.spec(family).multimodal))
    _, cache = vlm.run_with_cache(
        inputs, names=["lm.blocks.*.hook_resid_pre", "lm.blocks.*.hook_resid_post"]
    )
    same = [
        torch.equal(
            cache[f"lm.blocks.{i}.hook_resid_post"], cache[f"lm.blocks.{i + 1}.hook_resid_pre"]
        )
        for i in range(vlm.adapter.n_layers - 1)
    ]
    if vlm.adapter.capabilities.strict_residual_stream:
        assert all(same)
    else:
        assert not all(same), "family flagged non-strict but every layer boundary is exact"


def test_patterns_equal_eager_attentions(family: str, load: Callable[..., HookedVLM]) -> None:
    sdpa, eager = load(family), load(family, "eager")
    inputs = batch(sdpa, samples(zoo.spec(family).multimodal))
    valid = sdpa.masks(inputs).valid
    _, cache = sdpa.run_with_cache(inputs, names="lm.blocks.*.attn.hook_pattern")
    ref = hf_forward(eager, inputs, output_attentions=True).attentions
    assert len(ref) == sdpa.adapter.n_layers
    for i, r in enumerate(ref):
        got = cache[f"lm.blocks.{i}.attn.hook_pattern"]
        # Rows of padding queries are undefined in HF (fully masked); compare real queries.
        q = valid[:, None, :, None].expand_as(got)
        torch.testing.assert_close(got[q], r[q].float(), atol=1e-5, rtol=0)


def test_noop_hooks_leave_logits_exact(family: str, load: Callable[..., HookedVLM]) -> None:
    vlm = load(family)
    inputs = batch(vlm, samples(zoo.spec(family).multimodal))
    clean = vlm.forward(inputs).logits
    calls: list[str] = []

    def identity(t: torch.Tensor, ctx: Any) -> torch.Tensor | None:
        calls.append(ctx.name)
        return None if ctx.name.endswith("hook_pattern") else t.clone()

    hooked = vlm.run_with_hooks(inputs, [("*", identity)]).logits
    assert torch.equal(clean, hooked)
    assert set(calls) == set(vlm.hook_names())


def _count_hooks(model: torch.nn.Module) -> int:
    return sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._forward_hooks_with_kwargs)
        for m in model.modules()
    )


def test_no_hook_remains_after_exception(family: str, load: Callable[..., HookedVLM]) -> None:
    vlm = load(family)
    inputs = batch(vlm, samples(zoo.spec(family).multimodal))
    before = _count_hooks(vlm.model)

    def boom(t: torch.Tensor, ctx: Any) -> None:
        if ctx.layer == vlm.adapter.n_layers - 1:
            raise RuntimeError("hook failed")

    with pytest.raises(RuntimeError, match="hook failed"):
        vlm.run_with_hooks(
            inputs,
            [
                ("lm.blocks.*.hook_resid_post", boom),
                ("lm.blocks.*.attn.hook_pattern", lambda t, c: None),
            ],
        )
    assert _count_hooks(vlm.model) == before
    with pytest.raises(KeyError), vlm.hooks([("lm.blocks.*.mlp.hook_in", lambda t, c: None)]):
        assert _count_hooks(vlm.model) > before
        raise KeyError("inside the block")
    assert _count_hooks(vlm.model) == before
    assert vlm._handles == []


@pytest.mark.parametrize("side", ["right", "left"])
def test_padded_batch_equals_single_runs(
    family: str, side: str, load: Callable[..., HookedVLM]
) -> None:
    vlm = load(family)
    items = samples(zoo.spec(family).multimodal)
    inputs = batch(vlm, items, side)
    valid = vlm.masks(inputs).valid
    names = ["lm.blocks.*.hook_resid_post"]
    out, cache = vlm.run_with_cache(inputs, names=names)
    masks = vlm.masks(inputs)
    for b, item in enumerate(items):
        single = batch(vlm, [item], side)
        s_out, s_cache = vlm.run_with_cache(single, names=names)
        pos = valid[b]
        assert int(pos.sum()) == single["input_ids"].shape[1]
        if vlm.adapter.capabilities.cross_attention and (
            masks.images_per_sample()[b] < inputs["pixel_values"].shape[1]
        ):
            # transformers lets text rows that see no image attend to every image slot of the
            # batch (adapters/mllama.py), so a sample whose image slots the batch pads is not
            # its single run; the others must be exactly.
            diff = (out.logits[b][pos] - s_out.logits[0]).abs().max()
            assert diff > 1e-3, "Mllama's padded image slots no longer leak: tighten this test"
            continue
        torch.testing.assert_close(out.logits[b][pos], s_out.logits[0], atol=1e-4, rtol=0)
        for k in s_cache:
            torch.testing.assert_close(cache[k][b][pos], s_cache[k][0], atol=1e-4, rtol=0)


def test_left_padding_numbers_positions_from_the_first_real_token(
    family: str, load: Callable[..., HookedVLM]
) -> None:
    """The left-padding decision, stated: a left-padded sample runs at positions 0, 1, ...
    from its first real token, as when run alone and as generate() numbers it, so its
    activations do not depend on the batch. That is HF's forward given those position_ids,
    exactly; `model(**inputs)` instead counts the padding, which RoPE (relative) turns into
    rounding-level differences only. Families whose model derives positions from the mask
    itself (M-RoPE, PaliGemma) get no position_ids and equal `model(**inputs)` exactly."""
    vlm = load(family)
    inputs = batch(vlm, samples(zoo.spec(family).multimodal), side="left")
    mask = inputs["attention_mask"]
    assert bool((mask[:, 0] == 0).any()), "the shorter sample is padded on the left"
    got = vlm.forward(inputs).logits
    plain = vlm.model(**inputs, use_cache=False).logits
    valid = mask.bool()
    if vlm.adapter.positions_from_padding:
        positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
        ref = vlm.model(**inputs, position_ids=positions, use_cache=False).logits
        torch.testing.assert_close(got, ref, atol=0, rtol=0)
        torch.testing.assert_close(got[valid], plain[valid], atol=1e-4, rtol=0)
    else:
        torch.testing.assert_close(got, plain, atol=0, rtol=0)


def processor_token_counts(family: str, proc: Any, single: Any, im: Any) -> list[int]:
    """Image placeholders of a one-image sample by the processor's own per-image formula."""
    if family in ("idefics3", "smolvlm"):
        # Their formula counts the tile markers too; placeholders are image_seq_len per view
        # (tiles + global image), and padding views in pixel_values are all zeros.
        views = int((single["pixel_values"][0].flatten(1) != 0).any(1).sum())
        return [views * proc.image_seq_len]
    if family == "llama4":
        # No token-count helper: expand the image as the processor does, count <|patch|>.
        text = proc.replace_image_token(proc.image_processor([im], return_tensors="pt"), 0)
        return [text.count(proc.img_patch_token)]
    if family == "phi4_multimodal":
        return list(proc.image_processor([im])["num_img_tokens"])  # no token-count helper
    if family == "mllama":
        return [1]  # one <|image|> marker; the image enters through cross-attention
    if family == "mistral3":
        # Its formula counts the [IMG_BREAK] / [IMG_END] row markers too: expand the image's
        # placeholder as the processor does and count the [IMG] tokens in it.
        text = proc.replace_image_token({"image_sizes": single["image_sizes"].tolist()}, 0)
        return [text.count(proc.image_token)]
    data = proc._get_num_multimodal_tokens(image_sizes=[(im.height, im.width)])
    if family in ("internvl", "aya_vision"):
        # Their counts include the image and tile markers: placeholders are tiles x the
        # tokens of one tile.
        per_tile = (
            getattr(proc, "image_seq_length", None) or (proc.img_size // proc.patch_size) ** 2
        )
        return [n * per_tile for n in data["num_image_patches"]]
    return list(data["num_image_tokens"])


def test_image_mask_and_patch_map(family: str, load: Callable[..., HookedVLM]) -> None:
    vlm = load(family)
    if not vlm.adapter.capabilities.has_vision:
        pytest.skip("text-only family")
    items = samples(True)
    inputs = batch(vlm, items)
    masks = vlm.masks(inputs)
    proc = vlm.processor
    # The model's own placeholder id (Llama 4's processor names its <|image|> marker instead).
    cfg = vlm.model.config
    image_id = next(
        getattr(c, k) for c in (cfg, getattr(cfg, "vision_config", None))
        for k in ("image_token_id", "image_token_index") if getattr(c, k, None) is not None
    )  # fmt: skip
    assert masks.image_token_counts() == (inputs["input_ids"] == image_id).sum(1).tolist()
    # The adapter's layout has as many tokens as the processor's own per-image formula says.
    # (Only for a one-image sample: OneVision packs images of multi-image samples differently,
    # which that formula ignores; masks() checked those against the real token counts.)
    single = batch(vlm, items[:1])
    expected = processor_token_counts(family, proc, single, items[0][1][0])
    assert [len(g) for g in vlm.adapter.image_token_grids(single)] == expected
    assert masks.images_per_sample() == [len(im) for _, im in items]
    assert not (masks.image & masks.special).any() and not (masks.image & masks.pad).any()
    if not vlm.adapter.capabilities.patch_grid:
        return
    pm = masks.patch_map
    for b, (_, images) in enumerate(items):
        for k in range(len(images)):
            cells = pm[b][(pm[b, :, 0] == k)]
            assert len(cells) > 0
            for view in cells[:, 1].unique().tolist():
                grid = cells[(cells[:, 1] == view) & (cells[:, 3] >= 0)][:, 2:]
                rows, cols = int(grid[:, 0].max()) + 1, int(grid[:, 1].max()) + 1
                # Every cell of the view's grid exactly once.
                assert len(grid) == rows * cols
                assert len({tuple(c) for c in grid.tolist()}) == rows * cols


def test_prepare_tokenizes_as_transformers_does(
    family: str, load: Callable[..., HookedVLM]
) -> None:
    """prepare() gives exactly the ids of the processor's own apply_chat_template(tokenize=True)
    (one BOS where the template writes one, not a second from the tokenizer)."""
    vlm = load(family)
    proc, tok = vlm.processor, vlm.tokenizer
    items = samples(zoo.spec(family).multimodal)
    got = batch(vlm, items, side=None)
    if getattr(proc, "chat_template", None) is None:  # PaliGemma: the processor, no template
        ref = proc(text=[p for p, _ in items], images=[im for _, im in items], padding=True,
                   return_tensors="pt")  # fmt: skip
    else:
        convs = [
            [{"role": "user", "content": [{"type": "image", "image": i} for i in im]
              + [{"type": "text", "text": p}]}]
            for p, im in items
        ]  # fmt: skip
        ref = proc.apply_chat_template(
            convs, tokenize=True, add_generation_prompt=True, padding=True, return_dict=True,
            return_tensors="pt",
        )  # fmt: skip
    assert torch.equal(got["input_ids"], ref["input_ids"])
    assert torch.equal(got["attention_mask"], ref["attention_mask"])
    if tok.bos_token_id is not None:
        bos = (got["input_ids"] == tok.bos_token_id).sum(1)
        assert bos.tolist() == (ref["input_ids"] == tok.bos_token_id).sum(1).tolist()
        # One BOS where the template writes one (Phi-4's template writes none).
        assert bos.tolist() in ([1, 1], [0, 0])


def test_saved_model_loads_with_same_logits(family: str, load: Callable[..., HookedVLM]) -> None:
    in_memory, processor = zoo.build(family)
    vlm = load(family)
    ref = HookedVLM(in_memory, processor)
    inputs = batch(ref, samples(zoo.spec(family).multimodal))
    torch.testing.assert_close(
        ref.forward(inputs).logits, vlm.forward(inputs).logits, atol=0, rtol=0
    )


def test_video_frames_are_views_of_one_image(family: str, load: Callable[..., HookedVLM]) -> None:
    """Families that lay videos out (`capabilities.video`): a video (a list of frames) next to
    an image in another sample. Its tokens, exactly the model's video placeholders, count as
    one image whose views are the frames (Qwen-VL: the temporal patches of
    `video_grid_thw`), each a whole grid, as many tokens as the processor writes; hooks equal
    HF's hidden states; the batch equals the samples alone."""
    vlm = load(family)
    if not vlm.adapter.capabilities.video:
        pytest.skip("no video path in this family's adapter")
    proc, cfg = vlm.processor, vlm.model.config
    frames = [random_image(40, 48, seed=s) for s in range(3)]
    prompts = ["what happens in the video", "what colour is the circle"]
    images, videos = [[], [random_image(32, 40, seed=5)]], [[frames], []]
    inputs = vlm.prepare(prompts, images=images, videos=videos)
    masks = vlm.masks(inputs)
    ids = inputs["input_ids"]
    is_video = ids[0] == cfg.video_token_id
    assert torch.equal(masks.image[0], is_video)
    if "video_grid_thw" in inputs:  # Qwen-VL: temporal patches of merged grids
        m = int(cfg.vision_config.spatial_merge_size)
        t, h, w = inputs["video_grid_thw"][0].tolist()
        n_views, grid, expected = t, (h // m, w // m), t * h * w // m**2
    else:
        pv = {"pixel_values_videos": inputs["pixel_values_videos"]}
        expected = proc.replace_video_token(pv, 0).count(proc.video_token)
        n_views, grid = len(frames), None
    assert int(is_video.sum()) == expected > 0
    assert masks.images_per_sample() == [1, 1]
    cells = masks.patch_map[0][masks.image[0]]
    assert cells[:, 0].unique().tolist() == [0]  # one "image": the video
    assert cells[:, 1].unique().tolist() == list(range(n_views))  # its frames are views
    for f in range(n_views):
        got = cells[cells[:, 1] == f][:, 2:]
        rows, cols = grid or (int(got[:, 0].max()) + 1, int(got[:, 1].max()) + 1)
        assert sorted(map(tuple, got.tolist())) == [
            (r, c) for r in range(rows) for c in range(cols)
        ]
    out, cache = vlm.run_with_cache(inputs, names="lm.blocks.*.hook_resid_post")
    hs = vlm.model(**inputs, output_hidden_states=True, use_cache=False).hidden_states
    for i in range(vlm.adapter.n_layers - 1):
        torch.testing.assert_close(
            cache[f"lm.blocks.{i}.hook_resid_post"], hs[i + 1], atol=1e-5, rtol=0
        )
    alone = vlm.prepare(prompts[0], videos=frames)
    single = vlm.forward(alone).logits[0]
    torch.testing.assert_close(out.logits[0][masks.valid[0]], single, atol=1e-4, rtol=0)


def test_block_contributions_add_up(family: str, load: Callable[..., HookedVLM]) -> None:
    """resid_mid is the stream the MLP's norm reads, and attention and MLP outputs are each
    block's whole update: sequential blocks give resid_mid = resid_pre + attn_out and
    resid_post = resid_mid + mlp_out; parallel (Cohere-style) blocks give resid_mid =
    resid_pre and resid_post = resid_pre + attn_out + mlp_out."""
    vlm = load(family)
    inputs = batch(vlm, samples(zoo.spec(family).multimodal))
    names = ["hook_resid_pre", "hook_resid_mid", "hook_resid_post", "attn.hook_out", "mlp.hook_out"]
    _, cache = vlm.run_with_cache(inputs, names=[f"lm.blocks.*.{n}" for n in names])
    parallel = vlm.adapter.capabilities.parallel_block
    for i in range(vlm.adapter.n_layers):
        pre, mid, post, attn, mlp = (cache[f"lm.blocks.{i}.{n}"] for n in names)
        if i in getattr(vlm.adapter, "cross_layers", ()):
            # Mllama's cross-attention layers add tanh(gate) x output; the MLP's is also
            # zeroed on rows that see no image.
            gate_a, gate_m = (float(getattr(vlm.adapter.block(i), f"cross_attn_{g}_gate").tanh())
                              for g in ("attn", "mlp"))  # fmt: skip
            torch.testing.assert_close(mid, pre + gate_a * attn, atol=1e-5, rtol=0)
            sees = (post - mid).abs().amax(-1) > 0
            torch.testing.assert_close(post[sees], (mid + gate_m * mlp)[sees], atol=1e-5, rtol=0)
            continue
        if parallel:
            assert torch.equal(mid, pre)
            torch.testing.assert_close(post, pre + attn + mlp, atol=1e-5, rtol=0)
        else:
            torch.testing.assert_close(mid, pre + attn, atol=1e-5, rtol=0)
            torch.testing.assert_close(post, mid + mlp, atol=1e-5, rtol=0)


def test_vision_mlp_edits_equal_stream_edits_on_every_forward(
    family: str, load: Callable[..., HookedVLM]
) -> None:
    """An MLP's output is its block's contribution to the vision stream: adding a vector to
    `vision.blocks.{i}.mlp.hook_out` changes the logits as adding it to the block's
    `hook_resid_post` does. The MLP edit reaches everything downstream by the model's own
    arithmetic; the stream edit only if vlmscope's hook runs before the hooks transformers
    installs on a first forward to record hidden states (which a LLaVA-style projector reads),
    and with a layer scale (InternViT) only if the hook shows the scaled contribution."""
    vlm = load(family)
    if not (vlm.adapter.capabilities.has_vision and vlm.adapter.has_vision_mlp()):
        pytest.skip("no vision MLP hook points")
    inputs = batch(vlm, samples(True)[:1])
    clean = vlm.forward(inputs).logits  # after this, transformers' recording hooks exist

    def add(t: torch.Tensor, ctx: Any) -> torch.Tensor:
        g = torch.Generator().manual_seed(0)
        return t + 0.5 * torch.randn(t.shape, generator=g).to(t.dtype)

    moved = 0
    for i in range(vlm.adapter.n_vision_layers):
        via_mlp = vlm.run_with_hooks(inputs, [(f"vision.blocks.{i}.mlp.hook_out", add)]).logits
        via_stream = vlm.run_with_hooks(inputs, [(f"vision.blocks.{i}.hook_resid_post", add)])
        torch.testing.assert_close(via_stream.logits, via_mlp, atol=2e-4, rtol=1e-4)
        moved += not torch.allclose(via_mlp, clean, atol=1e-3)
    assert moved, "no vision edit reached the logits"
