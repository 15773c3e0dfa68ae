"""Tiny Aya Vision: SigLIP tiles, pixel-shuffle + SwiGLU projector, Cohere2 decoder.

Cohere2's decoder layers are parallel blocks: one LayerNorm (mean-centred, no bias) feeds both
attention and the MLP, and both add to the residual stream. Sliding-window layers use RoPE,
the global layer none. An image is `<|START_OF_IMG|>`, then per tile `TILE_k` and its patch
tokens, then `TILE_GLOBAL` and the whole image's tokens, then `<|END_OF_IMG|>`; the processor
pads on the left.
"""

from __future__ import annotations

from typing import Any

from transformers import (
    AyaVisionConfig,
    AyaVisionForConditionalGeneration,
    Cohere2Config,
    SiglipVisionConfig,
)
from transformers.models.aya_vision.processing_aya_vision import AyaVisionProcessor
from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

from vlmscope.models.zoo import register
from vlmscope.models.zoo.common import train_tokenizer
from vlmscope.models.zoo.text import perturb_constant_params

TILE = 32
PATCH = 8
DOWNSAMPLE = 2  # pixel shuffle: (32 / 8 / 2)^2 = 4 tokens per tile
MAX_TILES = 4

IMAGE_MARKERS = (
    "<image>",
    "<|START_OF_IMG|>",
    "<|END_OF_IMG|>",
    "<|IMG_PATCH|>",
    "<|IMG_LINE_BREAK|>",
    "TILE",
    "TILE_GLOBAL",
)
TURNS = ("<|START_OF_TURN_TOKEN|>", "<|END_OF_TURN_TOKEN|>", "<|USER_TOKEN|>", "<|CHATBOT_TOKEN|>")

# Command-R turns, starting with the BOS text like the real template.
AYA_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|START_OF_TURN_TOKEN|>"
    "{% if message['role'] == 'user' %}<|USER_TOKEN|>{% else %}<|CHATBOT_TOKEN|>{% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image>{% elif part['type'] == 'text' %}{{ part['text'] }}"
    "{% endif %}{% endfor %}{% endif %}<|END_OF_TURN_TOKEN|>{% endfor %}"
    "{% if add_generation_prompt %}<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>{% endif %}"
)


@register(
    "aya_vision", description="Aya Vision (SigLIP tiles + pixel shuffle + Cohere2 parallel blocks)"
)
def build_aya_vision() -> tuple[Any, Any]:
    """Aya Vision: parallel attention/MLP blocks, LayerNorm, RoPE on sliding layers only."""
    tokenizer = train_tokenizer(
        [*TURNS, *IMAGE_MARKERS],
        bos="<BOS_TOKEN>",
        eos="<|END_OF_TURN_TOKEN|>",
        pad="<PAD>",
        unk="<UNK>",
        add_bos=True,
        chat_template=AYA_TEMPLATE,
    )
    processor = AyaVisionProcessor(
        image_processor=GotOcr2ImageProcessorPil(
            size={"height": TILE, "width": TILE},
            crop_to_patches=True,
            min_patches=1,
            max_patches=MAX_TILES,
            image_mean=[0.5, 0.5, 0.5],
            image_std=[0.5, 0.5, 0.5],
        ),
        tokenizer=tokenizer,
        patch_size=PATCH,
        img_size=TILE,
        downsample_factor=DOWNSAMPLE,
        chat_template=AYA_TEMPLATE,
    )
    vision = SiglipVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=TILE,
        patch_size=PATCH,
        vision_use_head=False,
    )
    text = Cohere2Config(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        initializer_range=0.2,
        layer_norm_eps=1e-5,
        sliding_window=8,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"],
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config = AyaVisionConfig(
        vision_config=vision,
        text_config=text,
        downsample_factor=DOWNSAMPLE,
        image_token_index=tokenizer.convert_tokens_to_ids("<|IMG_PATCH|>"),
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        tie_word_embeddings=True,
    )
    return perturb_constant_params(AyaVisionForConditionalGeneration(config)), processor
