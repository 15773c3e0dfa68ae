"""Tiny Qwen2.5-VL: windowed-attention ViT with RMSNorm and gated MLP, Qwen2 decoder with M-RoPE."""

from __future__ import annotations

from typing import Any

from transformers import (
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
)

from vlmscope.models.zoo import register
from vlmscope.models.zoo.common import CHATML_VISION
from vlmscope.models.zoo.qwen2_vl import (
    INIT_RANGE,
    MERGE,
    MROPE_SECTION_QWEN2,
    PATCH,
    TEMPORAL_PATCH,
    TEXT_HIDDEN,
    QwenVideoProcessorMixin,
    qwen_image_processor,
    qwen_text_kwargs,
    qwen_tokenizer,
    register_processor,
    token_ids,
)

# Window of 2x2 merged tokens (32 pixels): images above 32x32 are split into several windows, so
# the window permutation (and its inverse after the merger) is really exercised.
WINDOW_SIZE = 2 * MERGE * PATCH


@register_processor
class Qwen2_5_VLFramesProcessor(QwenVideoProcessorMixin, Qwen2_5_VLProcessor):
    """Qwen2_5_VLProcessor with videos through `qwen2_vl.QwenFramesAsVideo`."""


@register_processor
class Qwen2_5_VLImageOnlyProcessor(Qwen2_5_VLFramesProcessor):
    """The name zoo folders saved before videos (ZOO_VERSION 2) record: they load with it
    (an unregistered name would load as the bare tokenizer)."""


@register(
    "qwen2_5_vl", description="Qwen2.5-VL (window-attention ViT + merger + Qwen2 with M-RoPE)"
)
def build_qwen2_5_vl() -> tuple[Any, Any]:
    """Adds what 2.5 changed: RMSNorm + gated-MLP ViT with windowed attention blocks."""
    tokenizer = qwen_tokenizer()
    processor = Qwen2_5_VLFramesProcessor(
        image_processor=qwen_image_processor(),
        tokenizer=tokenizer,
        chat_template=CHATML_VISION,
    )
    vision = dict(
        depth=2,
        hidden_size=32,
        intermediate_size=64,
        num_heads=2,
        out_hidden_size=TEXT_HIDDEN,
        patch_size=PATCH,
        spatial_merge_size=MERGE,
        temporal_patch_size=TEMPORAL_PATCH,
        window_size=WINDOW_SIZE,
        fullatt_block_indexes=[1],  # block 0 windowed, block 1 full, like the real 7:1 pattern
        initializer_range=INIT_RANGE,
    )
    text = dict(
        qwen_text_kwargs(len(tokenizer), tokenizer),
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 1e6,
            "mrope_section": MROPE_SECTION_QWEN2,
        },
    )
    config = Qwen2_5_VLConfig(vision_config=vision, text_config=text, **token_ids(tokenizer))
    return Qwen2_5_VLForConditionalGeneration(config), processor
