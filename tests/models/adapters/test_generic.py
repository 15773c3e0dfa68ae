"""The generic adapter alone, the explicit adapters out of the way: VLMs it was never told
about go through train, eval and attribute; MoE, parallel, fused and cross-attention layers
are found by structure; layout guesses and missing processor packages are announced."""

from __future__ import annotations

import json
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

from tests.acceptance.test_pipeline import PROMPT, check_image_nodes, run_pipeline
from tests.conftest import random_image
from vlmscope.models.adapters.generic import GenericAdapter
from vlmscope.models.hooked import HookedVLM, load_hf
from vlmscope.models.registry import adapter_class_for

_GENERIC: dict[str, HookedVLM] = {}


def generic_vlm(name: str, zoo_path: Callable[[str], Path]) -> HookedVLM:
    """A zoo model loaded as a user would, wrapped with the generic adapter instead of its
    family's (which must exist: these are families the registry knows)."""
    if name not in _GENERIC:
        model, processor = load_hf(zoo_path(name), dtype=torch.float32)
        assert adapter_class_for(model.config) is not None
        _GENERIC[name] = HookedVLM(model, processor, adapter=GenericAdapter(model, processor))
    return _GENERIC[name]


# Tiles and pixel shuffle; a parallel (Cohere) block; a fused qkv projection; four norms and
# M-RoPE: each with its own image-token layout.
@pytest.mark.parametrize("name", ["internvl", "aya_vision", "phi4_multimodal", "glm4v"])
def test_generic_adapter_alone_trains_evaluates_and_attributes(
    name: str, zoo_path: Callable[[str], Path], tmp_path: Path
) -> None:
    vlm = generic_vlm(name, zoo_path)
    a = vlm.adapter
    assert isinstance(a, GenericAdapter) and a.capabilities.has_vision
    assert a.vision_blocks is not None and a.projector is not None
    assert a.capabilities.parallel_block == (name == "aya_vision")
    assert (a.layer_map.qkv is not None) == (name == "phi4_multimodal")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # layout guesses (tested below)
        graph = run_pipeline(vlm, zoo_path(name), tmp_path)
        inputs = vlm.prepare(PROMPT, images=[random_image(32, 40, 7)])
        check_image_nodes(vlm, graph, inputs, tmp_path)


def test_generic_layout_matches_the_explicit_adapter_where_the_config_says_it(
    zoo_path: Callable[[str], Path],
) -> None:
    """InternVL: tokens per tile from the downsample ratio; a one-tile image gets the same
    2x2 grid as the InternVL adapter gives it, with no warning."""
    generic = generic_vlm("internvl", zoo_path)
    explicit = HookedVLM.from_pretrained(zoo_path("internvl"), device="cpu")
    inputs = generic.prepare(PROMPT, images=[random_image(32, 32, 3)])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = generic.masks(inputs)
    assert torch.equal(got.patch_map, explicit.masks(inputs).patch_map)
    assert generic.adapter.view_grid()[0] == 2  # type: ignore[attr-defined]


def test_generic_layout_guess_is_announced(zoo_path: Callable[[str], Path]) -> None:
    """Mistral 3's rows of [IMG] between [IMG_BREAK] markers fit no grid from the config:
    the adapter says what it guessed."""
    vlm = generic_vlm("mistral3", zoo_path)
    inputs = vlm.prepare(PROMPT, images=[random_image(32, 40, 1)])
    with pytest.warns(UserWarning, match=r"generic adapter \(mistral3\): guessed a 1-D order"):
        masks = vlm.masks(inputs)
    assert int(masks.image.sum()) == int(
        (inputs["input_ids"] == vlm.model.config.image_token_index).sum()
    )


def _hidden_states_match(vlm: HookedVLM, inputs: Any) -> None:
    _, cache = vlm.run_with_cache(inputs, names="lm.blocks.*.hook_resid_post")
    hs = vlm.model(**inputs, output_hidden_states=True, use_cache=False).hidden_states
    for i in range(vlm.adapter.n_layers - 1):
        torch.testing.assert_close(
            cache[f"lm.blocks.{i}.hook_resid_post"], hs[i + 1], atol=1e-5, rtol=0
        )


def test_generic_maps_cross_attention_layers(zoo_path: Callable[[str], Path]) -> None:
    """Mllama: layers 1 and 3 are cross-attention layers; every layer is hooked."""
    vlm = generic_vlm("mllama", zoo_path)
    a = vlm.adapter
    assert a.cross_layers == {1, 3} and a.capabilities.cross_attention  # type: ignore[attr-defined]
    assert a.layer_map_of(1).attn == "cross_attn" and a.layer_map_of(0).attn == "self_attn"
    inputs = vlm.prepare(PROMPT, images=[random_image(32, 40, 7)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _hidden_states_match(vlm, inputs)
        _, cache = vlm.run_with_cache(inputs, names="lm.blocks.1.attn.hook_pattern")
    pattern = cache["lm.blocks.1.attn.hook_pattern"]
    ref = HookedVLM.from_pretrained(zoo_path("mllama"), device="cpu")
    _, want = ref.run_with_cache(inputs, names="lm.blocks.1.attn.hook_pattern")
    torch.testing.assert_close(pattern, want["lm.blocks.1.attn.hook_pattern"])


def test_generic_maps_mixture_of_experts_blocks() -> None:
    """A Qwen3-MoE decoder (no vlmscope adapter): mlp.hook_out is the whole MoE block."""
    torch.manual_seed(0)
    cfg = Qwen3MoeConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
        num_experts=4, num_experts_per_tok=2, initializer_range=0.2,
    )  # fmt: skip
    model = Qwen3MoeForCausalLM(cfg).eval()
    with pytest.warns(UserWarning, match="generic adapter"):
        vlm = HookedVLM(model)
    assert vlm.adapter.capabilities.moe_mlp and not vlm.adapter.capabilities.has_vision
    inputs = {"input_ids": torch.randint(0, 64, (2, 7))}
    _hidden_states_match(vlm, inputs)
    names = ["hook_resid_mid", "hook_resid_post", "mlp.hook_out"]
    _, cache = vlm.run_with_cache(inputs, names=[f"lm.blocks.0.{n}" for n in names])
    mid, post, mlp = (cache[f"lm.blocks.0.{n}"] for n in names)
    torch.testing.assert_close(post, mid + mlp, atol=1e-5, rtol=0)


def test_processor_import_error_names_the_package(
    zoo_path: Callable[[str], Path], tmp_path: Path
) -> None:
    """A Mistral 3 folder naming the stock PixtralProcessor, which needs torchvision: the
    model still loads, with the tokenizer and a warning that says which package is missing."""
    folder = tmp_path / "mistral3"
    shutil.copytree(zoo_path("mistral3"), folder)
    cfg = folder / "processor_config.json"
    data = json.loads(cfg.read_text())
    data["processor_class"] = "PixtralProcessor"
    cfg.write_text(json.dumps(data))
    with pytest.warns(UserWarning, match=r"needs the `torchvision` package.*text only"):
        _, processor = load_hf(folder)
    assert not hasattr(processor, "image_processor")
    assert processor("a red circle")["input_ids"]
