"""SAE adapters trained by Hugging Face's Trainer take the same steps as `vlmscope train`."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch
from transformers import Trainer

from vlmscope.models.hooked import HookedVLM
from vlmscope.peft import TopKSaeConfig, get_peft_sae_model
from vlmscope.peft.training import SaeCallback, SaeTrainingData, sae_training_arguments
from vlmscope.training.bundle import DictionaryBundle
from vlmscope.training.config import SaeArgs, TrainConfig
from vlmscope.training.trainer import open_training_data

HOOK = "lm.blocks.2.mlp.hook_out"
TARGET = r"model\.language_model\.layers\.2\.mlp"


def test_hf_trainer_steps_equal_vlmscope_training_steps_on_image_tokens(
    toy: HookedVLM, tmp_path: Path
) -> None:
    """Two optimiser steps of HF's Trainer on an adapter reading image tokens only end with
    the weights that two steps of vlmscope's own training maths give on the same batches:
    clean activations at the image tokens, data init of b_dec, bundle loss, decoder-norm
    constraint, Adam at the same learning rate."""
    torch.manual_seed(0)
    records = open_training_data(TrainConfig(model="toy", dataset="shapes:8", output_dir="x"))
    data = SaeTrainingData(toy, records, tokens="image")
    cfg = TopKSaeConfig(k=8, num_latents=256, target_modules=TARGET)
    plain = HookedVLM(toy.model, toy.processor)  # the same weights, read before wrapping
    samples = list(itertools.islice(iter(data), 4))
    batches = [data.collator(samples[:2]), data.collator(samples[2:])]
    ref_inputs = []
    for b in batches:
        inputs = {k: v for k, v in b.items() if k != "sae_mask"}
        _, cache = plain.run_with_cache(inputs, names=[HOOK], mask=toy.masks(inputs).image)
        ref_inputs.append(cache[HOOK].float())
    pm = get_peft_sae_model(toy.model, cfg)
    layer = pm.get_base_model().model.language_model.layers[2].mlp
    coder = layer.sae_coders["default"]
    bundle = DictionaryBundle.create(
        coder.cfg, [HOOK], [HOOK], 128, 128, {"name": "toy"}, device="cpu"
    )
    bundle.coders[0].load_state_dict(coder.state_dict())

    args = sae_training_arguments(
        str(tmp_path), max_steps=2, num_latents=256, batch_size=2, lr=1e-3,
        warmup_fraction=0.0, decay_fraction=0.0,
    )  # fmt: skip
    trainer = Trainer(
        model=pm, args=args, train_dataset=data, data_collator=data.collator,
        callbacks=[SaeCallback()],
    )  # fmt: skip
    trainer.train()
    metrics = pm.last_sae_outputs.metrics[f"{TARGET.replace(chr(92), '')}/default"]
    vc = toy.model.config.vision_config
    per_image = (vc.image_size // vc.patch_size) ** 2  # image tokens per sample
    assert metrics["rows"] == ref_inputs[1].shape[0] == 2 * per_image

    opt = torch.optim.Adam(bundle.parameters(), lr=1e-3)
    bundle.train()
    for i, x in enumerate(ref_inputs):
        if i == 0:
            bundle.init_from_data([x], [x])
        bundle([x], [x]).loss.backward()
        bundle.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        opt.zero_grad()
        bundle.set_decoder_norm_to_unit_norm()
    want = bundle.coders[0].state_dict()
    for k, v in coder.state_dict().items():
        torch.testing.assert_close(v, want[k], atol=2e-6, rtol=1e-5, msg=k)
    torch.testing.assert_close(coder.W_dec.norm(dim=1), torch.ones(256))

    trainer.save_model(str(tmp_path / "final"))
    saved = {p.name for p in (tmp_path / "final").iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors"} <= saved


def test_vision_and_projector_adapters_read_image_patches(toy: HookedVLM) -> None:
    """The collator's sae_mask gives modules of the vision tower and the projector their own
    rows: the patches of each image (not the CLS token), whatever the language-model token
    selection."""
    records = open_training_data(TrainConfig(model="toy", dataset="shapes:8", output_dir="x"))
    data = SaeTrainingData(toy, records, tokens="text")
    cfg = TopKSaeConfig(
        k=4,
        num_latents=64,
        mode="observe",
        target_modules=r"model\.vision_tower\.encoder\.layers\.1|model\.multi_modal_projector"
        r"|model\.language_model\.layers\.1",
    )
    pm = get_peft_sae_model(toy.model, cfg)
    pm.eval()
    batch = data.collator(list(itertools.islice(iter(data), 3)))
    with torch.no_grad():
        pm(**batch)
    rows = {k.split("/")[0]: m["rows"] for k, m in pm.last_sae_outputs.metrics.items()}
    text = batch["sae_mask"]["model.language_model.*"]
    vc = toy.model.config.vision_config
    per_image = (vc.image_size // vc.patch_size) ** 2
    assert rows == {
        "model.vision_tower.encoder.layers.1": 3 * per_image,
        "model.multi_modal_projector": 3 * per_image,
        "model.language_model.layers.1": int(text.sum()),
    }


@pytest.mark.parametrize("kind", ["sae", "transcoder"])
@pytest.mark.parametrize("norm", ["none", "mean_norm"])
def test_the_default_rate_is_vlmscope_trains_adam_rate_for_the_kind(kind: str, norm: str) -> None:
    """Transcoders on normalised activations start 10x higher under `vlmscope train` (their
    decoders start at zero); adapters of the same kind get the same rate."""
    sae = SaeArgs(kind=kind, normalize_activations=norm, num_latents=4096)
    run = TrainConfig(model="toy", dataset="shapes", output_dir="unused", optimizer="adam", sae=sae)
    args = sae_training_arguments(
        "unused", max_steps=10, num_latents=4096, kind=kind, normalize_activations=norm
    )
    assert args.learning_rate == run.lr_for(4096)
