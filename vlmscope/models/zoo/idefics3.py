"""Tiny Idefics3: SigLIP-style vision tower, pixel-shuffle connector, Llama decoder, tiled images.

Images are split into TILE x TILE tiles plus a downscaled global image, as the real model does, so
adapters see the `<fake_token_around_image><row_r_col_c><image>...` layout with several tiles.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import Idefics3Config, Idefics3ForConditionalGeneration, Idefics3Processor
from transformers.models.idefics3.configuration_idefics3 import Idefics3VisionConfig
from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

from vlmscope.models.zoo import register
from vlmscope.models.zoo.common import train_tokenizer
from vlmscope.models.zoo.llava import tiny_llama_text_config

TILE = 32  # max_image_size: side of one tile and of the global image
MAX_SIDE = 2 * TILE  # size["longest_edge"]: images are resized to this first, so at most 2x2 tiles
PATCH = 4  # 8x8 patches per tile
SCALE = 2  # pixel shuffle factor of the real Idefics3: 8x8 patches -> 4x4 = 16 tokens per tile
IMAGE_SEQ_LEN = (TILE // PATCH) ** 2 // SCALE**2
MAX_GRID = MAX_SIDE // TILE

IMAGE_TOKEN = "<image>"
FAKE_TOKEN = "<fake_token_around_image>"
GLOBAL_TOKEN = "<global-img>"
END_OF_UTTERANCE = "<end_of_utterance>"

# Idefics3's own template, minus its leading BOS: the tokenizer adds BOS itself, and keeping both
# would put two BOS tokens in every prompt.
IDEFICS3_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] | capitalize }}"
    "{% if message['content'] is string %}{{ ': ' + message['content'] }}"
    "{% else %}{% if message['content'][0]['type'] == 'image' %}{{ ':' }}"
    "{% else %}{{ ': ' }}{% endif %}"
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'text' %}{{ part['text'] }}"
    "{% elif part['type'] == 'image' %}{{ '<image>' }}{% endif %}"
    "{% endfor %}{% endif %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)


def perturb_norms(model: torch.nn.Module, std: float = 0.1) -> torch.nn.Module:
    """Add noise to every norm's parameters so that no two norms compute the same function.

    Freshly initialised norms are all identical (weight 1, or Gemma's zero offset), so a test could
    not tell `post_attention_layernorm` from `pre_feedforward_layernorm`, or a hook on the wrong
    norm from the right one. Trained models never have identical norms either.
    """
    with torch.no_grad():
        for module in model.modules():
            if "norm" in type(module).__name__.lower():
                for param in module.parameters(recurse=False):
                    param.add_(torch.randn_like(param) * std)
    return model


def grid_tokens(max_grid: int) -> list[str]:
    """The `<row_r_col_c>` tile markers for every grid up to max_grid x max_grid (1-based)."""
    return [f"<row_{r}_col_{c}>" for r in range(1, max_grid + 1) for c in range(1, max_grid + 1)]


@register("idefics3", description="Idefics3 (SigLIP + pixel shuffle + Llama, image splitting)")
def build_idefics3() -> tuple[Any, Any]:
    """Idefics3 with image splitting on: a 64-px image gives 2x2 tiles + global, 16 tokens each."""
    tokenizer = train_tokenizer(
        [FAKE_TOKEN, IMAGE_TOKEN, GLOBAL_TOKEN, END_OF_UTTERANCE, *grid_tokens(MAX_GRID)],
        bos="<|begin_of_text|>",
        eos="<|end_of_text|>",
        named_tokens={"image_token": IMAGE_TOKEN},
        chat_template=IDEFICS3_TEMPLATE,
    )
    image_processor = Idefics3ImageProcessorPil(
        size={"longest_edge": MAX_SIDE},
        max_image_size={"longest_edge": TILE},
        do_image_splitting=True,
    )
    processor = Idefics3Processor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        image_seq_len=IMAGE_SEQ_LEN,
        chat_template=IDEFICS3_TEMPLATE,
    )
    vision = Idefics3VisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=TILE,
        patch_size=PATCH,
        initializer_range=0.2,
    )
    text = tiny_llama_text_config(len(tokenizer), pad_token_id=tokenizer.pad_token_id)
    config = Idefics3Config(
        vision_config=vision,
        text_config=text,
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        scale_factor=SCALE,
        pad_token_id=tokenizer.pad_token_id,
    )
    return perturb_norms(Idefics3ForConditionalGeneration(config)), processor
