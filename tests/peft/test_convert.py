"""PEFT SAE adapters <-> vlmscope dictionary runs: identical weights, identical outputs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from vlmscope.dictionaries import SparseCoderConfig
from vlmscope.models.hooked import HookedVLM
from vlmscope.models.toy import toy_path
from vlmscope.peft import PeftSaeModel, TopKSaeConfig, get_peft_sae_model
from vlmscope.peft.convert import ConversionError, from_bundle, to_bundle
from vlmscope.replacement.model import ReplacementModel
from vlmscope.training.bundle import DictionaryBundle

HOOK = "lm.blocks.2.mlp.hook_out"


def trained_like_bundle(vlm: HookedVLM) -> DictionaryBundle:
    """A run as `vlmscope train --hookpoints lm.blocks.2.mlp.hook_out` writes it, with every
    tensor (scales, dead counters included) set to distinct values."""
    cfg = SparseCoderConfig(kind="sae", k=4, num_latents=64, normalize_activations="mean_norm")
    info = {"name": "toy", "family": "llava", "dims": vlm.adapter.dims(), "tokens": "all"}
    bundle = DictionaryBundle.create(cfg, [HOOK], [HOOK], 128, 128, info)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for t in bundle.coders[0].state_dict().values():
            if t.is_floating_point():
                t.copy_(torch.rand(t.shape, generator=gen) + 0.5)
            else:
                t.copy_(torch.randint(0, 1000, t.shape, generator=gen))
    return bundle


def test_a_run_becomes_an_adapter_and_back_with_identical_weights_and_outputs(
    toy: HookedVLM, tmp_path: Path, circle: Image.Image
) -> None:
    bundle = trained_like_bundle(toy)
    bundle.save(tmp_path / "run")
    pm = from_bundle(toy.model, tmp_path / "run")
    assert isinstance(pm, PeftSaeModel)
    layer = pm.get_base_model().model.language_model.layers[2].mlp
    want = bundle.coders[0].state_dict()
    for k, v in layer.sae_coders["default"].state_dict().items():
        assert torch.equal(v, want[k]), k

    back = to_bundle(pm)
    assert back.reads == back.writes == [HOOK] and back.kind == "sae"
    for k, v in back.coders[0].state_dict().items():
        assert torch.equal(v, want[k]), k
    back.save(tmp_path / "back")
    reloaded = DictionaryBundle.load(tmp_path / "back")
    for k, v in reloaded.coders[0].state_dict().items():
        assert torch.equal(v, want[k]), k

    # The adapter in replace mode computes what vlmscope's ReplacementModel computes.
    plain = HookedVLM.from_pretrained(toy_path(), device="cpu")
    inputs = plain.prepare(["What colour is the circle?"], images=[[circle]])
    rm = ReplacementModel(plain, tmp_path / "run", replace_tokens="all")
    pm.eval()
    with torch.no_grad():
        got = HookedVLM(pm, toy.processor).forward(inputs).logits
        torch.testing.assert_close(got, rm.forward(inputs).logits, atol=1e-5, rtol=1e-5)


def test_an_adapter_added_to_a_peft_model_and_saved_in_peft_layout(
    toy: HookedVLM, tmp_path: Path
) -> None:
    pm = get_peft_sae_model(
        toy.model, TopKSaeConfig(k=2, num_latents=32, target_modules=r".*layers\.1\.mlp")
    )
    bundle = trained_like_bundle(toy)
    from_bundle(pm, bundle, adapter_name="run", mode="observe")
    assert pm.peft_config["run"].mode == "observe"
    pm.save_pretrained(tmp_path)
    assert (tmp_path / "run" / "adapter_model.safetensors").is_file()
    fresh = HookedVLM.from_pretrained(toy_path(), device="cpu")
    loaded = PeftSaeModel.from_pretrained(fresh.model, tmp_path / "run", adapter_name="run")
    got = to_bundle(loaded, "run").coders[0].state_dict()
    for k, v in bundle.coders[0].state_dict().items():
        assert torch.equal(got[k], v), k


def test_dictionaries_without_an_adapter_form_are_refused_with_the_reason(
    toy: HookedVLM,
) -> None:
    info = {"name": "toy", "family": "llava", "dims": toy.adapter.dims()}
    cfg = SparseCoderConfig(kind="transcoder", k=2, num_latents=16)
    mid, out = "lm.blocks.1.hook_resid_mid", "lm.blocks.1.mlp.hook_out"
    tc = DictionaryBundle.create(cfg, [mid], [out], 128, 128, info)
    with pytest.raises(ConversionError, match="hook_resid_mid, the input of the MLP's norm"):
        from_bundle(toy.model, tc)
    clt_cfg = SparseCoderConfig(kind="clt", k=2, num_latents=16)
    reads = [f"lm.blocks.{i}.hook_resid_mid" for i in (0, 1)]
    writes = [f"lm.blocks.{i}.mlp.hook_out" for i in (0, 1)]
    clt = DictionaryBundle.create(clt_cfg, reads, writes, 128, 128, info)
    with pytest.raises(ConversionError, match="CLTs have no adapter form"):
        from_bundle(toy.model, clt)
    resid_pre = DictionaryBundle.create(
        SparseCoderConfig(kind="sae", k=2, num_latents=16),
        ["lm.blocks.1.hook_resid_pre"],
        ["lm.blocks.1.hook_resid_pre"],
        128,
        128,
        info,
    )
    with pytest.raises(ConversionError, match="reads the output of one module"):
        from_bundle(toy.model, resid_pre)


def test_a_vision_mlp_transcoder_adapter_is_a_vision_transcoder_run(toy: HookedVLM) -> None:
    cfg = TopKSaeConfig(
        kind="transcoder",
        k=4,
        num_latents=64,
        target_modules=r"model\.vision_tower\.encoder\.layers\.1\.mlp",
    )
    pm = get_peft_sae_model(toy.model, cfg)
    bundle = to_bundle(pm)
    assert bundle.kind == "transcoder"
    assert bundle.reads == ["vision.blocks.1.mlp.hook_in"]
    assert bundle.writes == ["vision.blocks.1.mlp.hook_out"]
    fresh = HookedVLM.from_pretrained(toy_path(), device="cpu")
    back = from_bundle(fresh.model, bundle)
    layer = back.get_base_model().model.vision_tower.encoder.layers[1].mlp
    want = pm.get_base_model().model.vision_tower.encoder.layers[1].mlp.sae_coders["default"]
    for k, v in want.state_dict().items():
        assert torch.equal(layer.sae_coders["default"].state_dict()[k], v), k
