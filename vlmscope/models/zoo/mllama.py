"""Tiny Mllama (Llama 3.2 Vision): tiled ViT, and a Llama decoder with cross-attention layers.

Images never enter the token sequence: the prompt holds one `<|image|>` marker per image, and
every cross-attention layer reads the projected vision features (all tiles of all images of the
sample, CLS token first in each tile) through tanh-gated cross-attention and MLP. Text tokens
before a sample's first image see no image (their cross-attention rows are masked out).
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import MllamaConfig, MllamaForConditionalGeneration
from transformers.models.mllama.image_processing_pil_mllama import MllamaImageProcessorPil
from transformers.models.mllama.processing_mllama import MllamaProcessor

from vlmscope.models.zoo import register
from vlmscope.models.zoo.common import train_tokenizer
from vlmscope.models.zoo.text import LLAMA3_TEXT, perturb_constant_params

TILE = 16
PATCH = 8
MAX_TILES = 4
CROSS_LAYERS = [1, 3]

# Llama 3 turns with image parts, as the Llama 3.2 Vision template writes them.
MLLAMA_TEMPLATE = LLAMA3_TEXT.replace(
    "{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}",
    "{% if part['type'] == 'image' %}<|image|>{% elif part['type'] == 'text' %}"
    "{{ part['text'] }}{% endif %}",
)


@register("mllama", description="Mllama / Llama 3.2 Vision (tiled ViT + gated cross-attention)")
def build_mllama() -> tuple[Any, Any]:
    """Mllama: 4 text layers, 1 and 3 cross-attention; the gates (zero at init, which would
    switch the image off) are drawn at random like every other constant parameter."""
    tokenizer = train_tokenizer(
        ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|image|>"],
        bos="<|begin_of_text|>",
        eos="<|eot_id|>",
        pad="<|finetune_right_pad_id|>",
        unk=None,
        named_tokens={"image_token": "<|image|>"},
        chat_template=MLLAMA_TEMPLATE,
    )
    processor = MllamaProcessor(
        image_processor=MllamaImageProcessorPil(
            size={"height": TILE, "width": TILE}, max_image_tiles=MAX_TILES
        ),
        tokenizer=tokenizer,
        chat_template=MLLAMA_TEMPLATE,
    )
    vision = dict(
        hidden_size=32,
        num_hidden_layers=2,
        num_global_layers=1,
        attention_heads=2,
        intermediate_size=64,
        intermediate_layers_indices=[0],
        vision_output_dim=64,  # hidden x (1 + intermediate layers)
        image_size=TILE,
        patch_size=PATCH,
        max_num_tiles=MAX_TILES,
        initializer_range=0.2,
    )
    text = dict(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        cross_attention_layers=CROSS_LAYERS,
        max_position_embeddings=512,
        initializer_range=0.2,
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config = MllamaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids("<|image|>"),
    )
    model = perturb_constant_params(MllamaForConditionalGeneration(config))
    with torch.no_grad():
        for p in model.parameters():
            if p.numel() == 1:  # tanh gates of cross-attention layers and vision tiles
                p.normal_(0.0, 1.0)
    return model, processor
