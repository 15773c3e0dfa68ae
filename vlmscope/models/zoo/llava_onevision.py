"""Tiny LLaVA-OneVision: SigLIP vision tower, anyres_max_9 tiling, Qwen2 decoder, ChatML.

As in the real model, a single image per sample is tiled (base view, then the unpadded high-res
grid with a newline per row, bilinearly shrunk when it exceeds 9 tiles' worth of features), while
samples with several images get only the base view plus one newline per image.
"""

from __future__ import annotations

from typing import Any

from transformers import (
    AutoProcessor,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionProcessor,
    SiglipVisionConfig,
)
from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
    LlavaOnevisionImageProcessorPil,
)

from vlmscope.models.zoo import register
from vlmscope.models.zoo.common import train_tokenizer
from vlmscope.models.zoo.text import perturb_constant_params, tiny_qwen2_text_config

IMAGE_SIZE = 32
PATCH = 8
TOKENS_PER_TILE = (IMAGE_SIZE // PATCH) ** 2  # SigLIP has no CLS token
# The real grid: every (rows x cols) tiling from 1x1 to 6x6 of the base size (384 -> 32 here).
GRID_PINPOINTS = [[IMAGE_SIZE * r, IMAGE_SIZE * c] for r in range(1, 7) for c in range(1, 7)]

# ChatML with the image placeholder on its own line, in the style of the real OneVision template.
ONEVISION_CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image>\n{% elif part['type'] == 'video' %}<video>\n"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


class ImageOnlyLlavaOnevisionProcessor(LlavaOnevisionProcessor):
    """LlavaOnevisionProcessor without its video processor.

    The stock class requires a `video_processor` of type BaseVideoProcessor, and every video
    processor needs torchvision; passing None fails the type check. Dropping the argument from
    `__init__` removes it from `get_attributes()`, so neither construction, `save_pretrained` nor
    `from_pretrained` looks for one; images and text are processed exactly as by the stock class.
    The class is registered with AutoProcessor below so saved copies load back through it.
    """

    def __init__(
        self,
        image_processor: Any = None,
        tokenizer: Any = None,
        num_image_tokens: int | None = None,
        vision_feature_select_strategy: str | None = None,
        chat_template: str | None = None,
        image_token: str = "<image>",
        video_token: str = "<video>",
        vision_aspect_ratio: str = "anyres_max_9",
        **kwargs: Any,
    ) -> None:
        # The stock __init__ forwards (image_processor, tokenizer, None) positionally; the mixin
        # zips them with get_attributes() == [image_processor, tokenizer], ignoring the None.
        super().__init__(
            image_processor=image_processor,
            tokenizer=tokenizer,
            video_processor=None,
            num_image_tokens=num_image_tokens,
            vision_feature_select_strategy=vision_feature_select_strategy,
            chat_template=chat_template,
            image_token=image_token,
            video_token=video_token,
            vision_aspect_ratio=vision_aspect_ratio,
            **kwargs,
        )


# Saved processors name this class; AutoProcessor resolves such names through its registry.
AutoProcessor.register(LlavaOnevisionConfig, ImageOnlyLlavaOnevisionProcessor, exist_ok=True)


@register("llava_onevision", description="LLaVA-OneVision (SigLIP + anyres_max_9 + Qwen2)")
def build_llava_onevision() -> tuple[Any, Any]:
    """OneVision: SigLIP (no CLS, strategy "full"), last vision layer, Qwen2 with tied head."""
    tokenizer = train_tokenizer(
        ["<|im_start|>", "<|im_end|>", "<image>", "<video>"],
        bos=None,
        eos="<|im_end|>",
        pad="<|endoftext|>",
        unk=None,
        add_bos=False,
        named_tokens={"image_token": "<image>", "video_token": "<video>"},
        chat_template=ONEVISION_CHATML,
    )
    image_processor = LlavaOnevisionImageProcessorPil(
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        image_grid_pinpoints=GRID_PINPOINTS,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )
    processor = ImageOnlyLlavaOnevisionProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        num_image_tokens=TOKENS_PER_TILE,
        vision_feature_select_strategy="full",
        vision_aspect_ratio="anyres_max_9",
        chat_template=ONEVISION_CHATML,
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
    # Tied input/output embeddings, as in the 0.5B checkpoint (Qwen2-0.5B ties them).
    text = tiny_qwen2_text_config(
        len(tokenizer),
        tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config = LlavaOnevisionConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        video_token_id=tokenizer.convert_tokens_to_ids("<video>"),
        image_grid_pinpoints=GRID_PINPOINTS,
        vision_aspect_ratio="anyres_max_9",
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
    )
    return perturb_constant_params(LlavaOnevisionForConditionalGeneration(config)), processor
