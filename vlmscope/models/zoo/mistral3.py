"""Tiny Mistral 3 (Mistral Small 3.1): Pixtral vision tower, 2x2 patch merger, Mistral decoder.

Pixtral sees each image at its own aspect ratio. The processor writes one `[IMG]` per merged
patch, row by row, with `[IMG_BREAK]` closing each row and `[IMG_END]` the last one; only the
`[IMG]` positions receive image features, the two markers are ordinary embedded tokens.
"""

from __future__ import annotations

import sys
import types
from typing import Any

from transformers import (
    Mistral3Config,
    Mistral3ForConditionalGeneration,
    MistralConfig,
    PixtralVisionConfig,
)
from transformers.models.pixtral import image_processing_pil_pixtral as pil

from vlmscope.models.zoo import register
from vlmscope.models.zoo.common import register_processor, train_tokenizer
from vlmscope.models.zoo.text import perturb_constant_params

PATCH = 8
MERGE = 2
LONGEST_EDGE = 64  # at most 4x4 merged tokens per image


def _import_pixtral_processor() -> type:
    """The stock PixtralProcessor class, imported without torchvision.

    Its module imports one helper, `get_resize_output_image_size`, from the torchvision image
    processor's module (only to count tokens); the PIL image processor's module defines the same
    helper. For the duration of the import only, that module name points at a stand-in holding
    the PIL helper; afterwards the name is removed again, so nothing else sees the stand-in."""
    name = "transformers.models.pixtral.image_processing_pixtral"
    done = "transformers.models.pixtral.processing_pixtral"
    if done not in sys.modules and name not in sys.modules:
        stand_in = types.ModuleType(name)
        stand_in.get_resize_output_image_size = pil.get_resize_output_image_size  # type: ignore[attr-defined]
        sys.modules[name] = stand_in
        try:
            __import__(done)
        finally:
            del sys.modules[name]
    return sys.modules[done].PixtralProcessor  # type: ignore[no-any-return]


@register_processor
class PixtralPilProcessor(_import_pixtral_processor()):  # type: ignore[misc]
    """PixtralProcessor as transformers writes it, with the PIL image processor.

    The stock class is declared to need torchvision, so `transformers.PixtralProcessor` is a
    placeholder that raises ImportError without it (as `AutoProcessor` does for every Mistral 3
    checkpoint here). Registered under a private key, so saved zoo copies load back through it
    while real checkpoints still resolve to the stock class."""


# Mistral's [INST] turns with the BOS text first; images become [IMG], expanded by the processor.
MISTRAL_INST = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'user' %}[INST]{% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}[IMG]{% elif part['type'] == 'text' %}{{ part['text'] }}"
    "{% endif %}{% endfor %}{% endif %}"
    "{% if message['role'] == 'user' %}[/INST]{% else %}{{ eos_token }}{% endif %}"
    "{% endfor %}"
)


@register("mistral3", description="Mistral 3 (Pixtral ViT, native aspect + patch merger + Mistral)")
def build_mistral3() -> tuple[Any, Any]:
    """Mistral Small 3.1's layout: [IMG] rows closed by [IMG_BREAK] / [IMG_END], tied head off."""
    tokenizer = train_tokenizer(
        ["[INST]", "[/INST]", "[IMG]", "[IMG_BREAK]", "[IMG_END]"],
        named_tokens={"image_token": "[IMG]"},
        chat_template=MISTRAL_INST,
    )
    processor = PixtralPilProcessor(
        image_processor=pil.PixtralImageProcessorPil(
            size={"longest_edge": LONGEST_EDGE},
            patch_size={"height": PATCH, "width": PATCH},
        ),
        tokenizer=tokenizer,
        patch_size=PATCH,
        spatial_merge_size=MERGE,
        chat_template=MISTRAL_INST,
    )
    vision = PixtralVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        head_dim=16,
        image_size=LONGEST_EDGE,
        patch_size=PATCH,
        initializer_range=0.2,
    )
    text = MistralConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=512,
        initializer_range=0.2,
        rms_norm_eps=1e-5,
        sliding_window=None,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config = Mistral3Config(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids("[IMG]"),
        spatial_merge_size=MERGE,
        vision_feature_layer=-1,
        tie_word_embeddings=False,
    )
    return perturb_constant_params(Mistral3ForConditionalGeneration(config)), processor
