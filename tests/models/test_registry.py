"""Adapter resolution from configs (never names), the generic fallback, and its errors."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import CLIPVisionConfig, CLIPVisionModel, MistralConfig, MistralForCausalLM

from vlmscope.models import zoo
from vlmscope.models.adapters.generic import DecoderNotFoundError, GenericAdapter
from vlmscope.models.hooked import HookedVLM
from vlmscope.models.registry import families, resolve_adapter


def test_every_family_has_a_zoo_model_and_back() -> None:
    assert set(families()) == set(zoo.names())
    assert len(families()) >= 21


def test_adapter_comes_from_config_not_from_the_name(zoo_path: Any, tmp_path: Path) -> None:
    misleading = tmp_path / "Qwen2-VL-7B-Instruct"
    shutil.copytree(zoo_path("llava"), misleading)
    vlm = HookedVLM.from_pretrained(misleading, device="cpu")
    assert vlm.adapter.family == "llava"


def test_unknown_decoder_uses_generic_adapter_with_warning() -> None:
    torch.manual_seed(0)
    cfg = MistralConfig(
        vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, initializer_range=0.2,
    )  # fmt: skip
    model = MistralForCausalLM(cfg).eval()
    with pytest.warns(UserWarning, match="generic adapter.*'model'"):
        vlm = HookedVLM(model)
    assert isinstance(vlm.adapter, GenericAdapter)
    ids = torch.randint(0, 100, (2, 9))
    _, cache = vlm.run_with_cache({"input_ids": ids}, names="lm.blocks.*.hook_resid_post")
    hs = model(input_ids=ids, output_hidden_states=True).hidden_states
    torch.testing.assert_close(cache["lm.blocks.0.hook_resid_post"], hs[1], atol=1e-5, rtol=0)


def test_model_without_decoder_is_a_clear_error() -> None:
    vision = CLIPVisionModel(
        CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, image_size=16, patch_size=8)
    )  # fmt: skip
    with pytest.raises(DecoderNotFoundError, match=r"model_type='clip_vision_model'.*embed_tokens"):
        resolve_adapter(vision)


def test_listing_imports_no_model_code() -> None:
    """`vlmscope models` and `vlmscope zoo list` read declarations: no transformers model
    module is imported (importing them all is what made listing take seconds)."""
    code = (
        "import sys\n"
        "from vlmscope.cli import main\n"
        "assert main(['models']) == 0 and main(['zoo', 'list']) == 0\n"
        "from vlmscope.models import zoo\n"
        "assert zoo.spec('llava').multimodal and 'llava' in zoo.names()\n"
        "print(sorted(m for m in sys.modules if m.startswith('transformers.models.')))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300
    ).stdout
    assert "qwen2_vl" in out and "LLaVA-1.5" in out  # the tables were printed
    assert out.strip().splitlines()[-1] == "[]"


def test_zoo_declarations_match_the_registered_builders() -> None:
    """What listing reads from the source is what importing the modules registers."""
    from vlmscope.models.zoo import _BUILDERS

    for name in zoo.names():
        assert zoo.spec(name).builder is _BUILDERS[name]
    assert sorted(_BUILDERS) == sorted(zoo.names())


def test_importing_one_adapter_module_first_hides_no_family() -> None:
    code = (
        "import vlmscope.models.adapters.llava\n"
        "from vlmscope.models.registry import families\n"
        "print(sorted(families()))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300
    ).stdout
    assert "'llama4'" in out and "'mllama'" in out and "'llava'" in out
