"""Tiny InternVL (2.5 / 3): InternViT with a CLS token, pixel shuffle 0.5, Qwen2 decoder.

The image processor crops each image into up to MAX_TILES tiles of the vision tower's size, in
row-major order, plus a thumbnail of the whole image when it made more than one tile. Every
tile becomes IMAGE_SEQ_LENGTH `<IMG_CONTEXT>` tokens between `<img>` and `</img>`. As in the
real processor, batches are padded on the left.
"""

from __future__ import annotations

from typing import Any

from transformers import InternVLConfig, InternVLForConditionalGeneration, InternVLVisionConfig
from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil
from transformers.models.internvl.processing_internvl import InternVLProcessor

from vlmscope.models.zoo import register
from vlmscope.models.zoo.common import register_processor, train_tokenizer
from vlmscope.models.zoo.text import perturb_constant_params, tiny_qwen2_text_config

TILE = 32
PATCH = 8
DOWNSAMPLE = 0.5
# (32 / 8)^2 patches per tile, pixel-shuffled 2x2 into one token each.
IMAGE_SEQ_LENGTH = int((TILE // PATCH) ** 2 * DOWNSAMPLE**2)
MAX_TILES = 4

START, END, CONTEXT, VIDEO = "<img>", "</img>", "<IMG_CONTEXT>", "<video>"

# ChatML as InternVL-3 writes it: an image part is one <IMG_CONTEXT>, which the processor expands.
INTERNVL_CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}" + CONTEXT + "\n"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@register_processor
class InternVLImageOnlyProcessor(InternVLProcessor):
    """InternVLProcessor without its (torchvision) video processor; see ImageOnlyProcessorMixin.

    `image_seq_length` stays in the signature: ProcessorMixin saves exactly the arguments its
    `__init__` names, and a copy loaded without it would expand each tile to 256 tokens."""

    def __init__(
        self,
        image_processor: Any = None,
        tokenizer: Any = None,
        image_seq_length: int = 256,
        chat_template: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            image_processor,
            tokenizer,
            None,
            image_seq_length=image_seq_length,
            chat_template=chat_template,
            **kwargs,
        )


@register("internvl", description="InternVL 2.5/3 (InternViT + pixel shuffle + Qwen2, tiles)")
def build_internvl() -> tuple[Any, Any]:
    """InternVL-3: tiles plus thumbnail, CLS dropped, 2x2 pixel shuffle, left padding."""
    tokenizer = train_tokenizer(
        ["<|im_start|>", "<|im_end|>", START, END, CONTEXT, VIDEO],
        bos=None,
        eos="<|im_end|>",
        pad="<|endoftext|>",
        unk=None,
        add_bos=False,
        named_tokens={
            "start_image_token": START,
            "end_image_token": END,
            "context_image_token": CONTEXT,
            "video_token": VIDEO,
        },
        chat_template=INTERNVL_CHATML,
    )
    processor = InternVLImageOnlyProcessor(
        image_processor=GotOcr2ImageProcessorPil(
            size={"height": TILE, "width": TILE},
            crop_to_patches=True,
            min_patches=1,
            max_patches=MAX_TILES,
            image_mean=[0.485, 0.456, 0.406],
            image_std=[0.229, 0.224, 0.225],
        ),
        tokenizer=tokenizer,
        image_seq_length=IMAGE_SEQ_LENGTH,
        chat_template=INTERNVL_CHATML,
    )
    vision = InternVLVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=[TILE, TILE],
        patch_size=[PATCH, PATCH],
        initializer_range=0.2,
        layer_scale_init_value=1.0,
    )
    text = tiny_qwen2_text_config(
        len(tokenizer),
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.pad_token_id,
    )
    config = InternVLConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=tokenizer.convert_tokens_to_ids(CONTEXT),
        image_seq_length=IMAGE_SEQ_LENGTH,
        downsample_ratio=DOWNSAMPLE,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        tie_word_embeddings=False,
    )
    return perturb_constant_params(InternVLForConditionalGeneration(config)), processor
