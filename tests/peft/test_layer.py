"""SaeLayer inside a real VLM: vlmscope's hook points keep working on wrapped modules."""

from __future__ import annotations

import torch
from PIL import Image

from vlmscope.models.hooked import HookedVLM
from vlmscope.models.toy import toy_path
from vlmscope.peft import SaeConfig, SaeLayer, TopKSaeConfig, get_peft_sae_model

LM = r"model\.language_model\.layers"
HOOKS = [
    "vision.blocks.1.hook_resid_post",
    "projector.hook_out",
    "lm.blocks.1.attn.hook_pattern",
    "lm.blocks.2.hook_resid_mid",
    "lm.blocks.2.mlp.hook_out",
    "lm.blocks.3.hook_resid_post",
]


def test_hooks_and_sae_adapters_coexist_on_wrapped_modules(
    toy: HookedVLM, circle: Image.Image
) -> None:
    """Adapters wrap an attention module, a whole decoder layer, a vision block and the
    projector (observing) and layer 2's MLP (replacing). Hook names stay the same, the
    attention pattern is still recomputed with the attention class's own RoPE, hooks see
    what flows on (the reconstruction), and edits by hook act after the adapter."""
    plain = HookedVLM.from_pretrained(toy_path(), device="cpu")
    torch.manual_seed(0)
    rep = TopKSaeConfig(k=4, num_latents=64, target_modules=rf"{LM}\.2\.mlp")
    obs = SaeConfig(
        k=4,
        num_latents=64,
        mode="observe",
        target_modules=rf"{LM}\.(1\.self_attn|3)|model\.vision_tower\.encoder\.layers\.1"
        r"|model\.multi_modal_projector",
    )
    pm = get_peft_sae_model(toy.model, rep, adapter_name="rep")
    pm.add_adapter("obs", obs)
    pm.base_model.set_adapter(["rep", "obs"])
    pm.eval()
    vlm = HookedVLM(pm, toy.processor)
    assert vlm.hook_names() == plain.hook_names()
    wrapped = {n for n, m in pm.named_modules() if isinstance(m, SaeLayer)}
    assert len(wrapped) == 5 and all(n.startswith("base_model.model.model.") for n in wrapped)

    inputs = plain.prepare("What colour is the circle?", images=[circle])
    _, cache = vlm.run_with_cache(inputs, names=HOOKS)
    # The reference: the plain model with layer 2's MLP output swapped by hook for the
    # reconstruction of the adapter's dictionary.
    coder = pm.get_base_model().model.language_model.layers[2].mlp.sae_coders["rep"]

    def swap(y: torch.Tensor, ctx: object) -> torch.Tensor:
        return coder(y.reshape(-1, y.shape[-1])).reconstruction.reshape(y.shape)

    _, ref = plain.run_with_cache(
        inputs, names=HOOKS, fwd_hooks=[("lm.blocks.2.mlp.hook_out", swap)]
    )
    for name in HOOKS:
        torch.testing.assert_close(cache[name], ref[name], atol=1e-5, rtol=1e-5, msg=name)
    seen = set(pm.last_sae_outputs.metrics)
    assert len(seen) == 5 and {k.split("/")[1] for k in seen} == {"rep", "obs"}

    # An edit by hook replaces the adapter's output: the same edit on the plain model.
    zero = [("lm.blocks.2.mlp.hook_out", HookedVLM.zero_ablate())]
    torch.testing.assert_close(
        vlm.run_with_hooks(inputs, zero).logits,
        plain.run_with_hooks(inputs, zero).logits,
        atol=1e-5,
        rtol=1e-5,
    )
    with pm.disable_adapter():
        torch.testing.assert_close(vlm.forward(inputs).logits, plain.forward(inputs).logits)


def test_an_adapter_on_the_vision_layer_the_projector_reads_acts_on_every_forward(
    toy: HookedVLM, circle: Image.Image
) -> None:
    """The toy feeds its projector the vision layer's output that transformers records with
    a hook of its own on that layer (installed on a first forward): a replacing adapter there
    must reach the projector, on the first forward and every later one, exactly as replacing
    the hook point's value with the same dictionary does."""
    import copy

    cfg = toy.model.config
    i = cfg.vision_config.num_hidden_layers + cfg.vision_feature_layer  # the layer it reads
    inputs = toy.prepare("What colour is the circle?", images=[circle])
    clean = toy.forward(inputs).logits  # transformers' recording hooks are installed here
    target = rf"model\.vision_tower\.encoder\.layers\.{i}"
    torch.manual_seed(0)
    pm = get_peft_sae_model(toy.model, TopKSaeConfig(k=4, num_latents=256, target_modules=target))
    pm.eval()
    got = [pm(**inputs).logits for _ in range(2)]
    coder = copy.deepcopy(
        next(m for m in pm.modules() if isinstance(m, SaeLayer)).sae_coders["default"]
    )
    pm.unload()

    def replace(t: torch.Tensor, ctx: object) -> torch.Tensor:
        return coder(t.reshape(-1, t.shape[-1]).float()).reconstruction.reshape(t.shape)

    want = toy.run_with_hooks(inputs, [(f"vision.blocks.{i}.hook_resid_post", replace)]).logits
    assert not torch.allclose(want, clean, atol=1e-3), "the replacement changes the answer"
    for g in got:
        torch.testing.assert_close(g, want, atol=1e-5, rtol=1e-5)


def test_a_hook_edit_on_a_wrapped_vision_layer_reaches_the_projector(
    toy: HookedVLM, circle: Image.Image
) -> None:
    """Zero-ablating the output of the vision layer the projector reads gives the same logits
    with or without a replacing adapter on that layer (the edit acts after the adapter), on
    every forward."""
    cfg = toy.model.config
    i = cfg.vision_config.num_hidden_layers + cfg.vision_feature_layer
    hook = [(f"vision.blocks.{i}.hook_resid_post", HookedVLM.zero_ablate())]
    inputs = toy.prepare("What colour is the circle?", images=[circle])
    toy.forward(inputs)
    want = toy.run_with_hooks(inputs, hook).logits
    target = rf"model\.vision_tower\.encoder\.layers\.{i}"
    pm = get_peft_sae_model(toy.model, TopKSaeConfig(k=4, num_latents=256, target_modules=target))
    pm.eval()
    wrapped = HookedVLM(pm, toy.processor)
    for _ in range(2):
        torch.testing.assert_close(wrapped.run_with_hooks(inputs, hook).logits, want)
    assert not torch.allclose(wrapped.forward(inputs).logits, want, atol=1e-3)
