"""Tiny Gemma 3 (multimodal): SigLIP tower, pooled RMSNorm projector, Gemma 3 decoder.

Keeps what makes Gemma 3 different: sliding-window layers (window 8, shorter than any prompt)
interleaved with a full-attention layer, per-type RoPE bases, q/k norms, four norms per layer,
query_pre_attn_scalar different from head_dim, tied embeddings scaled by sqrt(hidden), and
bidirectional attention inside each image's run of soft tokens (token_type_ids from the processor).
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import (
    Gemma3Config,
    Gemma3ForConditionalGeneration,
    Gemma3Processor,
    Gemma3TextConfig,
    SiglipVisionConfig,
)
from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

from vlmscope.models.zoo import register
from vlmscope.models.zoo.common import gemma_template, train_tokenizer
from vlmscope.models.zoo.idefics3 import perturb_norms

IMAGE_SIZE = 32
PATCH = 4  # 8x8 patches
MM_TOKENS_PER_IMAGE = 16  # avg-pooled 2x2 -> 4x4 soft tokens per image
SLIDING_WINDOW = 8
LAYER_TYPES = ["sliding_attention", "full_attention", "sliding_attention"]

BOI = "<start_of_image>"
EOI = "<end_of_image>"
IMAGE_SOFT = "<image_soft_token>"


@register("gemma3", description="Gemma 3 (SigLIP + pooled projector + Gemma 3, sliding window)")
def build_gemma3() -> tuple[Any, Any]:
    """Gemma 3 with layers [sliding, full, sliding], window 8, 16 soft tokens per image."""
    template = gemma_template(BOI)
    tokenizer = train_tokenizer(
        [BOI, EOI, IMAGE_SOFT, "<start_of_turn>", "<end_of_turn>"],
        bos="<bos>",
        eos="<eos>",
        pad="<pad>",
        unk="<unk>",
        named_tokens={"boi_token": BOI, "eoi_token": EOI, "image_token": IMAGE_SOFT},
        chat_template=template,
    )
    image_processor = Gemma3ImageProcessorPil(
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, do_pan_and_scan=False
    )
    processor = Gemma3Processor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        chat_template=template,
        image_seq_length=MM_TOKENS_PER_IMAGE,
    )
    vision = SiglipVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=IMAGE_SIZE,
        patch_size=PATCH,
        vision_use_head=False,
    )
    text = Gemma3TextConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=len(LAYER_TYPES),
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        query_pre_attn_scalar=32,  # scaling 32**-0.5, deliberately not head_dim**-0.5
        sliding_window=SLIDING_WINDOW,
        layer_types=LAYER_TYPES,
        max_position_embeddings=512,
        initializer_range=0.2,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    config = Gemma3Config(
        vision_config=vision,
        text_config=text,
        mm_tokens_per_image=MM_TOKENS_PER_IMAGE,
        boi_token_index=tokenizer.convert_tokens_to_ids(BOI),
        eoi_token_index=tokenizer.convert_tokens_to_ids(EOI),
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_SOFT),
        initializer_range=0.2,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = Gemma3ForConditionalGeneration(config)
    # Gemma 3 initialises the projector to zeros, which would make every image token embed to 0.
    with torch.no_grad():
        model.model.multi_modal_projector.mm_input_projection_weight.normal_(0.0, 0.2)
    return perturb_norms(model), processor
