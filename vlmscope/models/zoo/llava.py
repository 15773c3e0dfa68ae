"""Tiny LLaVA-1.5: CLIP vision tower, two-layer MLP projector, Llama decoder."""

from __future__ import annotations

from typing import Any

from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
)
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from vlmscope.models.zoo import register
from vlmscope.models.zoo.common import LLAVA_USER_ASSISTANT, train_tokenizer

IMAGE_SIZE = 32
PATCH = 8


def tiny_llama_text_config(vocab_size: int, **overrides: Any) -> LlamaConfig:
    """A 3-layer Llama decoder with GQA; init scale raised so activations are O(1), not ~0."""
    kw: dict[str, Any] = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        initializer_range=0.2,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
    )
    kw.update(overrides)
    return LlamaConfig(**kw)


def llava_processor(tokenizer: Any, image_size: int, patch_size: int) -> LlavaProcessor:
    """LLaVA-1.5's processor around `tokenizer`: square CLIP images of `image_size` px, one
    image token per patch (plus CLS, dropped by the "default" feature strategy), USER/ASSISTANT
    chat template. Shared by the zoo, the toy VLM and the LLaVA-7B-shaped benchmark model."""
    return LlavaProcessor(
        image_processor=CLIPImageProcessorPil(
            size={"shortest_edge": image_size},
            crop_size={"height": image_size, "width": image_size},
        ),
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=LLAVA_USER_ASSISTANT,
    )


@register("llava", description="LLaVA-1.5 (CLIP + MLP projector + Llama)")
def build_llava() -> tuple[Any, Any]:
    tokenizer = train_tokenizer(
        ["<image>"], named_tokens={"image_token": "<image>"}, chat_template=LLAVA_USER_ASSISTANT
    )
    processor = llava_processor(tokenizer, IMAGE_SIZE, PATCH)
    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=IMAGE_SIZE,
        patch_size=PATCH,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=tiny_llama_text_config(len(tokenizer)),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        pad_token_id=tokenizer.pad_token_id,
    )
    return LlavaForConditionalGeneration(config), processor
