"""The attribution planner: shapes read from configs match the real model, the batch it picks
is the largest that fits its own accounting, and LLaVA-1.5-7B fits one 80 GB device."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from vlmscope.models.hooked import HookedVLM
from vlmscope.models.toy import toy_path
from vlmscope.plan.attribution import (
    DEVICE_MARGIN,
    DICTIONARY_PAGES,
    choose,
    peak,
    per_copy_bytes,
    plan,
    shape_from_config,
)
from vlmscope.plan.memory import GB


def _bytes(modules: list[torch.nn.Module]) -> int:
    seen = {id(p): p.numel() * p.element_size() for m in modules for p in m.parameters()}
    return sum(seen.values())


def test_shape_from_config_matches_the_loaded_model() -> None:
    """Parameter bytes of the meta model built from the config equal the loaded toy's; what
    the replay does not run is everything but the LM's attention and norms."""
    shape = shape_from_config(toy_path(), "clt:512:8", 40)
    vlm = HookedVLM.from_pretrained(toy_path(), device="cpu")
    a = vlm.adapter
    total = _bytes([vlm.model])
    mlps = _bytes([a.part(i, "mlp") for i in range(a.n_layers)])
    kept = _bytes([a.lm()]) - mlps - _bytes([a.embedding()])
    assert shape.model_bytes == total
    assert shape.unused_bytes == total - kept
    assert shape.mlp_bytes == mlps
    assert (shape.n_layers, shape.d_model, shape.n_units) == (a.n_layers, a.d_model, a.n_layers)
    assert shape.active == [40 * 8] * a.n_layers and shape.n_out == [4, 3, 2, 1]


def test_the_batch_is_the_largest_that_fits() -> None:
    shape = shape_from_config(toy_path(), "clt:512:8", 40, max_feature_nodes=500)
    one = peak(plan(shape, 1, None, "cuda"), shape)
    per_copy = peak(plan(shape, 2, None, "cuda"), shape) - one
    budget = (one + 6.5 * per_copy) / (1 - DEVICE_MARGIN)
    c = choose(shape, budget, offload=None, device_type="cuda")
    assert c.fits and c.batch == 7
    usable = budget * (1 - DEVICE_MARGIN)
    assert (
        peak(plan(shape, 7, None, "cuda"), shape)
        <= usable
        < peak(plan(shape, 8, None, "cuda"), shape)
    )
    tiny = choose(shape, one / 2, offload=None, device_type="cuda")
    assert not tiny.fits


def test_offload_auto_moves_the_decoder_rows_off_a_small_device() -> None:
    """With decoder rows bigger than the device, "auto" streams them from the host."""
    shape = shape_from_config(toy_path(), "clt:512:8", 40)
    big = dataclasses.replace(shape, unique=[10**6] * shape.n_units)
    budget = 2 * peak(plan(big, 64, "cpu", "cuda"), big)
    assert big.decoder_cache_bytes() > budget
    c = choose(big, budget, offload="auto")
    assert c.fits and c.offload == "cpu"
    assert choose(shape, budget, offload="auto").offload is None


def test_mapped_pages_are_the_encoders_and_decoder_rows_are_copied_once() -> None:
    """By hand: every encoder is mapped whole (all features are scored); the decoder rows of
    the distinct active features are read from the files into one copy, (U_s + 1) n_s d b
    (one zero row for padding), on a CPU as on a GPU."""
    shape = shape_from_config(toy_path(), "clt:512:8", 40)
    shape = dataclasses.replace(shape, unique=[3, 5, 7, 11])
    d = shape.d_model
    for device in ("cpu", "cuda"):
        p = plan(shape, 4, None, device)
        assert [x.bytes for x in p.parts if x.name == DICTIONARY_PAGES] == [4 * 512 * d * 4]
        rows = [x.bytes for x in p.parts if x.name == "decoder rows of active features"]
        assert rows == [(4 * 4 + 6 * 3 + 8 * 2 + 12 * 1) * d * 4]


def test_a_copy_costs_the_replayed_layers_live_set() -> None:
    """By hand, per position: float32, the attention block's 5 vectors (20 d bytes) outweigh a
    norm's residual and 2 float32 vectors (12 d); bfloat16, the norm's residual and 3 float32
    vectors (2 + 12 = 14 d bytes) outweigh the attention block's 5 (10 d)."""
    shape = shape_from_config(toy_path(), "clt:512:8", 40)
    n, d = 40, shape.d_model
    assert per_copy_bytes(dataclasses.replace(shape, act_bytes=4)) == n * d * 20
    assert per_copy_bytes(dataclasses.replace(shape, act_bytes=2)) == n * d * 14
    parts = {x.name: x.bytes for x in plan(shape, 3, None, "cuda").parts}
    assert parts["replay / backward activations, per copy"] == 3 * per_copy_bytes(shape)


def _llava_7b_config(folder: Path) -> Path:
    """LLaVA-1.5-7B's published shapes (config only): CLIP ViT-L/14-336, Vicuna-7B."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_attention_heads=16,
                              num_hidden_layers=24, image_size=336, patch_size=14,
                              projection_dim=768)  # fmt: skip
    text = LlamaConfig(vocab_size=32064, hidden_size=4096, intermediate_size=11008,
                       num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                       max_position_embeddings=4096, rms_norm_eps=1e-5)  # fmt: skip
    LlavaConfig(vision_config=vision, text_config=text, image_token_id=32000).save_pretrained(
        folder
    )
    return folder


def test_llava_7b_with_a_32k_clt_at_1000_positions_fits_80_gb(tmp_path: Path) -> None:
    """The issue's configuration: 32 layers, a 32,768-latent CLT writing to all later layers,
    k = 32, 1,000 positions, bf16; worst case (every active feature distinct)."""
    shape = shape_from_config(_llava_7b_config(tmp_path), "clt:32768:32:bfloat16", 1000,
                              dtype="bfloat16")  # fmt: skip
    assert 13.0 * GB < shape.model_bytes < 14.5 * GB  # 7.06B parameters in bf16
    assert sum(shape.n_out) == 528  # source -> target pairs
    c = choose(shape, 80 * GB)
    assert c.fits and c.batch >= 64 and c.device_peak <= 80 * GB
    assert sum(c.seconds.values()) > 0
