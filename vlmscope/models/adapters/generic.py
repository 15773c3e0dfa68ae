"""Structural fallback adapter for decoders vlmscope does not list.

It finds the text decoder as the module that owns a token embedding and a list of layers with
attention and an MLP, then names each layer's parts by their standard HF attribute names.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from vlmscope.models.adapter import GEMMA_LAYER, Capabilities, LayerMap, ModelAdapter

_ATTN_NAMES = ("self_attn", "attention", "attn")
_PROJ = ("q_proj", "k_proj", "v_proj", "o_proj")


class DecoderNotFoundError(ValueError):
    """Raised when no usable decoder can be found in a model."""


def _find_decoder(model: nn.Module) -> tuple[str, str]:
    """(path of the text decoder, attribute name of its layer list)."""
    text_cfg = model.config.get_text_config(decoder=True)
    want = getattr(text_cfg, "num_hidden_layers", None)
    candidates = []
    for name, mod in model.named_modules():
        layers = getattr(mod, "layers", None)
        if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
            continue
        if not isinstance(getattr(mod, "embed_tokens", None), nn.Embedding):
            continue
        if _layer_map(layers[0]) is None:
            continue
        candidates.append((len(layers) == want, name))
    if not candidates:
        raise DecoderNotFoundError(
            f"no usable decoder in model_type={model.config.model_type!r} "
            f"({type(model).__name__}): searched every submodule for one with `embed_tokens` "
            f"(nn.Embedding) and `layers` (nn.ModuleList) whose layers have an attention module "
            f"({'/'.join(_ATTN_NAMES)} with {', '.join(_PROJ)}) and an `mlp`"
        )
    candidates.sort(key=lambda c: (not c[0], len(c[1])))
    return candidates[0][1], "layers"


def _layer_map(layer: nn.Module) -> LayerMap | None:
    attn = next((n for n in _ATTN_NAMES if hasattr(layer, n)), None)
    if attn is None or not hasattr(layer, "mlp"):
        return None
    a = getattr(layer, attn)
    if not all(hasattr(a, p) for p in _PROJ):
        return None
    children = dict(layer.named_children())
    gemma_style = (
        "pre_feedforward_layernorm" in children and "post_feedforward_layernorm" in children
    )
    base = GEMMA_LAYER if gemma_style else LayerMap()
    if not gemma_style and (
        "input_layernorm" not in children or "post_attention_layernorm" not in children
    ):
        return None
    mlp_proj = {
        k: f"mlp.{k}_proj" for k in ("gate", "up", "down") if hasattr(layer.mlp, f"{k}_proj")
    }
    return LayerMap(
        attn=attn,
        q=f"{attn}.q_proj",
        k=f"{attn}.k_proj",
        v=f"{attn}.v_proj",
        o=f"{attn}.o_proj",
        q_norm=f"{attn}.q_norm" if hasattr(a, "q_norm") else None,
        k_norm=f"{attn}.k_norm" if hasattr(a, "k_norm") else None,
        attn_in_norm=base.attn_in_norm,
        attn_out=base.attn_out if gemma_style else f"{attn}.o_proj",
        mlp="mlp",
        mlp_in_norm=base.mlp_in_norm,
        mlp_out=base.mlp_out,
        mlp_projections=mlp_proj,
    )


class GenericAdapter(ModelAdapter):
    """Adapter whose component mapping is discovered from the module structure."""

    family = "generic"

    def __init__(self, model: nn.Module, processor: Any = None) -> None:
        super().__init__(model, processor)
        model = self.model  # a PEFT-wrapped model's paths are those of the model inside
        path, layers = _find_decoder(model)
        self.language_model = path  # type: ignore[misc]
        self.layers = layers  # type: ignore[misc]
        lmap = _layer_map(self.blocks()[0])
        assert lmap is not None
        self.layer_map = lmap  # type: ignore[misc]
        head = model.get_output_embeddings()
        self.lm_head = next(n for n, m in model.named_modules() if m is head)  # type: ignore[misc]
        self.capabilities = Capabilities(  # type: ignore[misc]
            has_vision=False, patch_grid=False, strict_residual_stream=True
        )

    def image_token_grids(self, inputs: Any) -> list[torch.Tensor]:
        raise NotImplementedError(
            f"the generic adapter does not know how {self.config.model_type!r} lays out image "
            "tokens; image and text masks are available, the patch map is not"
        )
