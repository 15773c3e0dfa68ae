"""Text-only decoders (Llama, Qwen2, Qwen3, Gemma 2), so results compare with LM tools."""

from __future__ import annotations

from vlmscope.models.adapter import GEMMA_LAYER, Capabilities, LayerMap, ModelAdapter
from vlmscope.models.registry import register_adapter

TEXT_ONLY = Capabilities(has_vision=False, contiguous_image_tokens=False, patch_grid=False)


class TextAdapter(ModelAdapter):
    """Shared paths of HF causal LMs: `model` is the decoder, `lm_head` the unembedding."""

    language_model = "model"
    capabilities = TEXT_ONLY

    def image_token_ids(self) -> tuple[int, ...]:
        return ()


@register_adapter
class LlamaAdapter(TextAdapter):
    family = "llama"
    model_types = ("llama",)
    architectures = ("LlamaForCausalLM",)


@register_adapter
class Qwen2Adapter(TextAdapter):
    family = "qwen2"
    model_types = ("qwen2",)
    architectures = ("Qwen2ForCausalLM",)


@register_adapter
class Qwen3Adapter(TextAdapter):
    family = "qwen3"
    model_types = ("qwen3",)
    architectures = ("Qwen3ForCausalLM",)
    layer_map = LayerMap(q_norm="self_attn.q_norm", k_norm="self_attn.k_norm")


@register_adapter
class Gemma2Adapter(TextAdapter):
    family = "gemma2"
    model_types = ("gemma2",)
    architectures = ("Gemma2ForCausalLM",)
    layer_map = GEMMA_LAYER
    capabilities = Capabilities(
        has_vision=False,
        contiguous_image_tokens=False,
        patch_grid=False,
        sliding_window=True,
        attn_softcap=True,
    )
