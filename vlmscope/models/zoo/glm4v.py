"""Tiny GLM-4V (GLM-4.1V): Qwen-style ViT with 2x2 merger, GLM decoder with M-RoPE.

GLM's decoder layers have four norms (a post-norm after attention and after the MLP, as in
Gemma 2) and one fused gate/up projection; RoPE rotates half of each head (partial rotary)
with M-RoPE sections. Images are `<|begin_of_image|>`, one `<|image|>` per merged patch,
`<|end_of_image|>`.
"""

from __future__ import annotations

from typing import Any

from transformers import Glm4vConfig, Glm4vForConditionalGeneration
from transformers.models.glm4v.image_processing_pil_glm4v import Glm4vImageProcessorPil
from transformers.models.glm4v.processing_glm4v import Glm4vProcessor

from vlmscope.models.zoo import register
from vlmscope.models.zoo.common import ImageOnlyProcessorMixin, register_processor, train_tokenizer
from vlmscope.models.zoo.text import perturb_constant_params

PATCH = 8
MERGE = 2
TEMPORAL = 2
MIN_PIXELS = 32 * 32
MAX_PIXELS = 64 * 64

SPECIALS = (
    "[gMASK]",
    "<sop>",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|begin_of_image|>",
    "<|end_of_image|>",
    "<|image|>",
    "<|begin_of_video|>",
    "<|end_of_video|>",
    "<|video|>",
)

# GLM-4.1V turns: "[gMASK]<sop>" opens the conversation (it is the prefix, not a BOS token).
GLM_TEMPLATE = (
    "[gMASK]<sop>{% for message in messages %}<|{{ message['role'] }}|>\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|begin_of_image|><|image|><|end_of_image|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


@register_processor
class Glm4vImageOnlyProcessor(ImageOnlyProcessorMixin, Glm4vProcessor):
    """Glm4vProcessor without its (torchvision) video processor; see ImageOnlyProcessorMixin."""


@register("glm4v", description="GLM-4.1V (ViT + 2x2 merger + GLM: 4 norms, partial M-RoPE)")
def build_glm4v() -> tuple[Any, Any]:
    """GLM-4.1V: post-norms after attention and MLP, fused gate_up, M-RoPE on half the head."""
    tokenizer = train_tokenizer(
        SPECIALS,
        bos=None,
        eos="<|user|>",
        pad="<|endoftext|>",
        unk=None,
        add_bos=False,
        named_tokens={"image_token": "<|image|>", "video_token": "<|video|>"},
        chat_template=GLM_TEMPLATE,
    )
    processor = Glm4vImageOnlyProcessor(
        image_processor=Glm4vImageProcessorPil(
            size={"shortest_edge": MIN_PIXELS, "longest_edge": MAX_PIXELS},
            patch_size=PATCH,
            merge_size=MERGE,
            temporal_patch_size=TEMPORAL,
        ),
        tokenizer=tokenizer,
        chat_template=GLM_TEMPLATE,
    )
    ids = tokenizer.convert_tokens_to_ids
    vision = dict(
        depth=2,
        hidden_size=32,
        intermediate_size=64,
        num_heads=2,
        image_size=32,
        patch_size=PATCH,
        spatial_merge_size=MERGE,
        temporal_patch_size=TEMPORAL,
        out_hidden_size=64,
        initializer_range=0.2,
    )
    text = dict(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        initializer_range=0.2,
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 10000.0,
            "partial_rotary_factor": 0.5,
            "mrope_section": [2, 1, 1],
        },
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    config = Glm4vConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=ids("<|image|>"),
        video_token_id=ids("<|video|>"),
        image_start_token_id=ids("<|begin_of_image|>"),
        image_end_token_id=ids("<|end_of_image|>"),
        video_start_token_id=ids("<|begin_of_video|>"),
        video_end_token_id=ids("<|end_of_video|>"),
        tie_word_embeddings=False,
    )
    return perturb_constant_params(Glm4vForConditionalGeneration(config)), processor
