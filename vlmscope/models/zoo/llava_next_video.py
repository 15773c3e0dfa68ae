"""Tiny LLaVA-NeXT-Video: LLaVA-NeXT's anyres images plus videos pooled 2x2 per frame.

Images take the LLaVA-NeXT path (base view, then the unpadded tiles with a newline per row).
A video is a list of frames: each frame is resized and centre-cropped as a CLIP image, encoded,
average-pooled 2x2, and written as (grid/2)^2 `<video>` tokens per frame, frame after frame.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from transformers import (
    BatchFeature,
    CLIPVisionConfig,
    LlavaNextVideoConfig,
    LlavaNextVideoForConditionalGeneration,
)
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
from transformers.models.llava_next.image_processing_pil_llava_next import (
    LlavaNextImageProcessorPil,
)
from transformers.models.llava_next_video.processing_llava_next_video import (
    LlavaNextVideoProcessor,
)

from vlmscope.models.zoo import register
from vlmscope.models.zoo.common import register_processor, train_tokenizer
from vlmscope.models.zoo.llava import tiny_llama_text_config
from vlmscope.models.zoo.llava_next import GRID_PINPOINTS, IMAGE_SIZE, PATCH
from vlmscope.models.zoo.text import perturb_constant_params

# USER/ASSISTANT turns as in the LLaVA-NeXT-Video template, with <video> parts.
LLAVA_VIDEO_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: {% else %}ASSISTANT: {% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image>\n{% elif part['type'] == 'video' %}<video>\n"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{% if message['role'] == 'user' %} {% else %}</s>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


class FramesAsImages:
    """Stands in for LlavaNextVideoVideoProcessor, which needs torchvision.

    That processor resizes each frame's shortest edge, centre-crops, rescales and normalises
    with CLIP's statistics: exactly the CLIP image pipeline, applied here frame by frame with the
    PIL CLIP image processor. It returns `pixel_values_videos` [videos, frames, 3, H, W]; a video
    is a list of frames (PIL images or HxWx3 arrays) of one size."""

    def __init__(self, size: int) -> None:
        self.frames = CLIPImageProcessorPil(
            size={"shortest_edge": size}, crop_size={"height": size, "width": size}
        )

    def __call__(self, videos: Any, **kwargs: Any) -> BatchFeature:
        videos = [videos] if not isinstance(videos[0], (list, tuple)) else videos
        out = []
        for frames in videos:
            pv = self.frames([np.asarray(f) for f in frames], return_tensors="pt")["pixel_values"]
            out.append(pv)
        return BatchFeature({"pixel_values_videos": torch.stack(out)})


@register_processor
class LlavaNextVideoFramesProcessor(LlavaNextVideoProcessor):
    """LlavaNextVideoProcessor whose videos go through `FramesAsImages` (no torchvision).

    The video processor is not an `__init__` argument, so ProcessorMixin neither checks its
    class nor saves it; it is rebuilt from the image processor's crop size on load."""

    def __init__(
        self,
        image_processor: Any = None,
        tokenizer: Any = None,
        chat_template: str | None = None,
        patch_size: int | None = None,
        vision_feature_select_strategy: str | None = None,
        video_token: str = "<video>",
        image_token: str = "<image>",
        num_additional_image_tokens: int = 0,
        **kwargs: Any,
    ) -> None:
        # The stock __init__ hands (video_processor, image_processor, tokenizer) on to
        # ProcessorMixin positionally, which zips them with get_attributes() ==
        # [image_processor, tokenizer]: shifting them by one puts each where it belongs (the
        # stock code reads its `tokenizer` argument itself, so that one stays the tokenizer).
        super().__init__(
            image_processor,
            tokenizer,
            tokenizer,
            chat_template=chat_template,
            patch_size=patch_size,
            vision_feature_select_strategy=vision_feature_select_strategy,
            video_token=video_token,
            image_token=image_token,
            num_additional_image_tokens=num_additional_image_tokens,
            **kwargs,
        )
        self.video_processor = FramesAsImages(int(image_processor.crop_size["height"]))


@register(
    "llava_next_video",
    description="LLaVA-NeXT-Video (anyres images + 2x2-pooled video frames + Llama)",
)
def build_llava_next_video() -> tuple[Any, Any]:
    """LLaVA-NeXT-Video: LLaVA-NeXT's image path, plus videos through the same CLIP tower."""
    tokenizer = train_tokenizer(
        ["<image>", "<video>"],
        named_tokens={"image_token": "<image>", "video_token": "<video>"},
        chat_template=LLAVA_VIDEO_TEMPLATE,
    )
    processor = LlavaNextVideoFramesProcessor(
        image_processor=LlavaNextImageProcessorPil(
            size={"shortest_edge": IMAGE_SIZE},
            crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
            image_grid_pinpoints=GRID_PINPOINTS,
        ),
        tokenizer=tokenizer,
        patch_size=PATCH,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=LLAVA_VIDEO_TEMPLATE,
    )
    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=IMAGE_SIZE,
        patch_size=PATCH,
    )
    config = LlavaNextVideoConfig(
        vision_config=vision,
        text_config=tiny_llama_text_config(
            len(tokenizer),
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        video_token_id=tokenizer.convert_tokens_to_ids("<video>"),
        image_grid_pinpoints=GRID_PINPOINTS,
        image_seq_length=(IMAGE_SIZE // PATCH) ** 2,
        video_seq_length=(IMAGE_SIZE // PATCH // 2) ** 2,
        spatial_pool_stride=2,
        spatial_pool_mode="average",
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        pad_token_id=tokenizer.pad_token_id,
    )
    return perturb_constant_params(LlavaNextVideoForConditionalGeneration(config)), processor
