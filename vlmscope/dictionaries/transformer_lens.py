"""vlmscope hook names -> TransformerLens hook names, for SAEs exported to SAELens.

SAELens attaches an SAE to a model through TransformerLens (`HookedSAETransformer`), by the
TransformerLens hook name in the SAE's config and the model's Hugging Face id. TransformerLens
has text decoders only: of vlmscope's families it covers llama, qwen2, qwen3 and gemma2. The
names below are equivalent hook points when the TransformerLens model is loaded without weight
processing (`HookedSAETransformer.from_pretrained_no_processing`), so its residual stream is the
Hugging Face model's, the one the SAE was trained on. Hooks without an exact TransformerLens
counterpart (q/k/v before RoPE and norms, the MLP input after the norm's weight, attention
patterns) are not mapped.
"""

from __future__ import annotations

import os
import re

#: vlmscope families whose models TransformerLens can load.
TL_FAMILIES = frozenset({"llama", "qwen2", "qwen3", "gemma2"})
#: whether the family's tokenizer starts every text with BOS, so that SAELens, which tokenizes
#: with `prepend_bos` from the SAE's config (its ActivationsStore), feeds the SAE the token
#: streams it was trained on. Qwen's tokenizers have no BOS (TransformerLens's own Qwen configs
#: say default_prepend_bos=False); other families are assumed to add one.
PREPENDS_BOS = {"llama": True, "gemma2": True, "qwen2": False, "qwen3": False}


def prepends_bos(family: str | None) -> bool:
    """SAELens' `prepend_bos` for an SAE trained on a model of `family`."""
    return PREPENDS_BOS.get(family or "", True)


_MAP = [
    (re.compile(r"lm\.blocks\.(\d+)\.hook_resid_(pre|mid|post)$"), "blocks.{0}.hook_resid_{1}"),
    (re.compile(r"lm\.blocks\.(\d+)\.attn\.hook_z$"), "blocks.{0}.attn.hook_z"),
    (re.compile(r"lm\.blocks\.(\d+)\.attn\.hook_out$"), "blocks.{0}.hook_attn_out"),
    (re.compile(r"lm\.blocks\.(\d+)\.mlp\.hook_out$"), "blocks.{0}.hook_mlp_out"),
]
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def tl_hook_name(hook: str) -> str | None:
    """The TransformerLens name of a vlmscope hook point (None when there is none)."""
    for pattern, template in _MAP:
        m = pattern.match(hook)
        if m is not None:
            return template.format(*m.groups())
    return None


def hub_id(name: str | None) -> str | None:
    """`name` if it reads as a Hugging Face model id (`org/name`, not a local folder)."""
    if not name or os.path.exists(name) or not _HUB_ID.fullmatch(name):
        return None
    return name


def transformer_lens_names(
    hook: str, family: str | None, model: str | None
) -> tuple[str | None, str | None, str]:
    """(TransformerLens hook name, HF model id, why not) for an SAE on `hook` of `model`; the
    first two are None, and the reason says why, where SAELens cannot hook the model."""
    if family not in TL_FAMILIES:
        return (
            None,
            None,
            (
                f"TransformerLens has no {family or 'unknown'} models (it covers the text decoders "
                f"{', '.join(sorted(TL_FAMILIES))}): SAELens can load this SAE and encode/decode "
                "activations, but HookedSAETransformer cannot attach it"
            ),
        )
    tl = tl_hook_name(hook)
    if tl is None:
        return None, None, f"{hook} has no exact TransformerLens hook point"
    mid = hub_id(model)
    if mid is None:
        return (
            tl,
            None,
            (
                f"the run's model {model!r} is not a Hugging Face id; pass model_name='org/name' "
                "so SAELens knows which model to load"
            ),
        )
    return tl, mid, ""
