"""Tiny PaliGemma (1): SigLIP vision tower, linear projector, Gemma decoder with a prefix-LM mask.

PaliGemma has no chat template: its processor formats every prompt itself as
`<image>` x (tokens per image, per image) + `<bos>` + prompt + `\\n`, and returns `token_type_ids`
(0 for the image+prompt prefix, 1 for a `suffix`), which the model turns into a bidirectional
attention block over the prefix.
"""

from __future__ import annotations

from typing import Any

from transformers import (
    GemmaConfig,
    PaliGemmaConfig,
    PaliGemmaForConditionalGeneration,
    PaliGemmaProcessor,
    SiglipVisionConfig,
)
from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

from vlmscope.models.zoo import register
from vlmscope.models.zoo.common import train_tokenizer
from vlmscope.models.zoo.idefics3 import perturb_norms

IMAGE_SIZE = 32
PATCH = 8
IMAGE_SEQ_LEN = (IMAGE_SIZE // PATCH) ** 2  # 16 tokens per image, no pooling
HIDDEN = 64


@register("paligemma", description="PaliGemma (SigLIP + linear projector + Gemma, prefix-LM)")
def build_paligemma() -> tuple[Any, Any]:
    """PaliGemma 1 (Gemma decoder); 16 image tokens per image, prefix-LM via token_type_ids."""
    # The processor writes BOS itself (after the image tokens) and switches the tokenizer's own
    # BOS off; a BPE post-processor cannot be switched off that way, so none is installed.
    tokenizer = train_tokenizer(
        ["<image>"],
        bos="<bos>",
        eos="<eos>",
        pad="<pad>",
        unk="<unk>",
        add_bos=False,
        named_tokens={"image_token": "<image>"},
    )
    image_processor = SiglipImageProcessorPil(
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, image_seq_length=IMAGE_SEQ_LEN
    )
    # Adds PaliGemma's 1024 <locXXXX> and 128 <segXXX> tokens: size the vocabulary after this.
    processor = PaliGemmaProcessor(image_processor=image_processor, tokenizer=tokenizer)
    vocab = len(tokenizer)
    vision = SiglipVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=IMAGE_SIZE,
        patch_size=PATCH,
        vision_use_head=False,
    )
    text = GemmaConfig(
        vocab_size=vocab,
        hidden_size=HIDDEN,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=1,  # multi-query attention, as in PaliGemma-3B
        head_dim=16,
        max_position_embeddings=512,
        initializer_range=0.2,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    config = PaliGemmaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        vocab_size=vocab,
        projection_dim=HIDDEN,
        hidden_size=HIDDEN,
        pad_token_id=tokenizer.pad_token_id,
    )
    return perturb_norms(PaliGemmaForConditionalGeneration(config)), processor
