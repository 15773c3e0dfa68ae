"""Tiny SmolVLM: Idefics3's architecture with SmolVLM's 4x pixel shuffle, tokens and chat template.

Images are split into TILE x TILE tiles plus a downscaled global image, as the real model does.

The processor is `SmolVLMImageTextProcessor`, the real SmolVLMProcessor minus its video processor.
Without torchvision, transformers cannot build or load any processor that has a video processor
(`VideoProcessorMixin` and `AutoVideoProcessor` are import-time dummies, so even `None` fails the
type check), and SmolVLMProcessor also insists on the optional `num2words` package, used only to
spell out video frame counts. Image and text processing (prompt expansion, tiles, chat template)
is the real class's code, unchanged. Importing this module registers the subclass with
AutoProcessor, so `AutoProcessor.from_pretrained` on a saved copy works in any process that has
imported it (the zoo registry imports it).
"""

from __future__ import annotations

from typing import Any

from transformers import (
    AutoProcessor,
    SmolVLMConfig,
    SmolVLMForConditionalGeneration,
    SmolVLMProcessor,
)
from transformers.models.smolvlm import processing_smolvlm
from transformers.models.smolvlm.configuration_smolvlm import SmolVLMVisionConfig
from transformers.models.smolvlm.image_processing_pil_smolvlm import SmolVLMImageProcessorPil
from transformers.processing_utils import ProcessorMixin

from vlmscope.models.zoo import register
from vlmscope.models.zoo.common import train_tokenizer
from vlmscope.models.zoo.idefics3 import (
    END_OF_UTTERANCE,
    FAKE_TOKEN,
    GLOBAL_TOKEN,
    IMAGE_TOKEN,
    grid_tokens,
    perturb_norms,
)
from vlmscope.models.zoo.llava import tiny_llama_text_config

TILE = 32  # max_image_size: side of one tile and of the global image
MAX_SIDE = 2 * TILE  # size["longest_edge"]: images are resized to this first, so at most 2x2 tiles
PATCH = 2  # 16x16 patches per tile
SCALE = 4  # pixel shuffle factor of the real SmolVLM-256M/500M: 16x16 patches -> 4x4 = 16 tokens
IMAGE_SEQ_LEN = (TILE // PATCH) ** 2 // SCALE**2
MAX_GRID = MAX_SIDE // TILE

# SmolVLM's own template: BOS `<|im_start|>` is written by the template and the tokenizer adds
# nothing, as with the real SmolLM2 tokenizer.
SMOLVLM_TEMPLATE = processing_smolvlm.DEFAULT_CHAT_TEMPLATE


class SmolVLMImageTextProcessor(SmolVLMProcessor):
    """SmolVLMProcessor for images and text only: no video processor, no `num2words` needed."""

    def __init__(
        self,
        image_processor: Any,
        tokenizer: Any,
        image_seq_len: int = 169,
        chat_template: str | None = None,
        **kwargs: Any,
    ) -> None:
        # SmolVLMProcessor.__init__ minus the num2words check and the video processor.
        self.fake_image_token = getattr(tokenizer, "fake_image_token", "<fake_token_around_image>")
        self.image_token = getattr(tokenizer, "image_token", "<image>")
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.end_of_utterance_token = getattr(
            tokenizer, "end_of_utterance_token", "<end_of_utterance>"
        )
        self.global_image_token = getattr(tokenizer, "global_image_token", "<global-img>")
        self.image_seq_len = image_seq_len
        self.video_token = getattr(tokenizer, "video_token", "<video>")
        ProcessorMixin.__init__(
            self, image_processor, tokenizer, chat_template=chat_template, **kwargs
        )

    def apply_chat_template(
        self, conversation: Any, chat_template: str | None = None, **kwargs: Any
    ) -> Any:
        """The generic template path: SmolVLM's override only adds video frame-sampling defaults."""
        return ProcessorMixin.apply_chat_template(self, conversation, chat_template, **kwargs)


AutoProcessor.register(SmolVLMConfig, SmolVLMImageTextProcessor, exist_ok=True)


@register("smolvlm", description="SmolVLM (SigLIP + 4x pixel shuffle + Llama, image splitting)")
def build_smolvlm() -> tuple[Any, Any]:
    """SmolVLM with image splitting on and SmolVLM's 4x pixel shuffle: 16 tokens per tile."""
    tokenizer = train_tokenizer(
        [FAKE_TOKEN, IMAGE_TOKEN, GLOBAL_TOKEN, END_OF_UTTERANCE, *grid_tokens(MAX_GRID)],
        bos="<|im_start|>",
        eos=END_OF_UTTERANCE,
        pad="<|im_end|>",
        unk="<|endoftext|>",
        add_bos=False,
        named_tokens={
            "image_token": IMAGE_TOKEN,
            "fake_image_token": FAKE_TOKEN,
            "global_image_token": GLOBAL_TOKEN,
            "end_of_utterance_token": END_OF_UTTERANCE,
        },
        chat_template=SMOLVLM_TEMPLATE,
    )
    image_processor = SmolVLMImageProcessorPil(
        size={"longest_edge": MAX_SIDE},
        max_image_size={"longest_edge": TILE},
        do_image_splitting=True,
    )
    processor = SmolVLMImageTextProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        image_seq_len=IMAGE_SEQ_LEN,
        chat_template=SMOLVLM_TEMPLATE,
    )
    vision = SmolVLMVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=TILE,
        patch_size=PATCH,
        initializer_range=0.2,
    )
    text = tiny_llama_text_config(len(tokenizer), pad_token_id=tokenizer.pad_token_id)
    config = SmolVLMConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        scale_factor=SCALE,
        pad_token_id=tokenizer.pad_token_id,
    )
    return perturb_norms(SmolVLMForConditionalGeneration(config)), processor
