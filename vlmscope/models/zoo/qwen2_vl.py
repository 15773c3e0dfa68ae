"""Tiny Qwen2-VL: ViT with 2D RoPE and 2x2 patch merger, Qwen2 decoder with M-RoPE.

Also holds what the three Qwen-VL entries share (tokenizer, image processor, the stand-in for
the video processor and the processor mixin that installs it), so `qwen2_5_vl.py` and
`qwen3_vl.py` import them from here.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from transformers import (
    BatchFeature,
    PreTrainedTokenizerFast,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLProcessor,
)
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
from transformers.video_utils import make_batched_metadata, make_batched_videos

from vlmscope.models.zoo import register
from vlmscope.models.zoo.common import (
    CHATML_VISION,
    ImageOnlyProcessorMixin,
    register_processor,
    train_tokenizer,
)

# Vision geometry shared by the three families: 8-pixel patches merged 2x2, so one LLM token
# covers 16x16 pixels; the pixel budget keeps every image between 2x2 and 4x4 merged tokens.
PATCH = 8
MERGE = 2
TEMPORAL_PATCH = 2
MIN_PIXELS = 32 * 32
MAX_PIXELS = 64 * 64

# Text decoder shared shape: 4 query heads over 2 KV heads (GQA), head_dim 32, so M-RoPE has 16
# frequency pairs to split between the temporal, height and width sections.
TEXT_HIDDEN = 128
TEXT_HEADS = 4
TEXT_KV_HEADS = 2
TEXT_LAYERS = 3
TEXT_INTERMEDIATE = 256
# Raised from 0.02 so activations and logits are O(1), not ~0, and numerical comparisons mean
# something. 0.14 = 0.2 * sqrt(64 / 128): the LLaVA entry's per-layer gain at twice its width, so
# the residual stream stays at std ~1-6 and logits at std ~1.6 (0.2 here gives residuals ~17).
INIT_RANGE = 0.14
# Qwen2/2.5-VL use [16, 24, 24] of 64 pairs; the same 2:3:3 proportions over 16 pairs.
MROPE_SECTION_QWEN2 = [4, 6, 6]

# The real Qwen tokenizers' control tokens. No BOS is ever added; `<|im_end|>` ends a turn (EOS of
# the instruct models) and `<|endoftext|>` pads.
IMAGE_TOKEN = "<|image_pad|>"
VIDEO_TOKEN = "<|video_pad|>"
VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"
QWEN_SPECIAL_TOKENS = (
    "<|im_start|>",
    "<|im_end|>",
    VISION_START,
    VISION_END,
    IMAGE_TOKEN,
    VIDEO_TOKEN,
)


def qwen_tokenizer() -> PreTrainedTokenizerFast:
    """A tiny BPE tokenizer with Qwen's special tokens, EOS/PAD choice and no BOS."""
    return train_tokenizer(
        QWEN_SPECIAL_TOKENS,
        bos=None,
        eos="<|im_end|>",
        pad="<|endoftext|>",
        unk=None,
        add_bos=False,
        named_tokens={
            "image_token": IMAGE_TOKEN,
            "video_token": VIDEO_TOKEN,
            "vision_start_token": VISION_START,
            "vision_end_token": VISION_END,
        },
        chat_template=CHATML_VISION,
    )


def qwen_image_processor(**overrides: Any) -> Qwen2VLImageProcessorPil:
    """The PIL Qwen2-VL image processor (all three families use it) at the zoo's tiny geometry."""
    kw: dict[str, Any] = dict(
        patch_size=PATCH,
        merge_size=MERGE,
        temporal_patch_size=TEMPORAL_PATCH,
        min_pixels=MIN_PIXELS,
        max_pixels=MAX_PIXELS,
    )
    kw.update(overrides)
    return Qwen2VLImageProcessorPil(**kw)


def token_ids(tokenizer: PreTrainedTokenizerFast) -> dict[str, int]:
    """The special-token ids the Qwen-VL configs need, looked up in the zoo tokenizer."""
    ids = tokenizer.convert_tokens_to_ids
    return dict(
        image_token_id=ids(IMAGE_TOKEN),
        video_token_id=ids(VIDEO_TOKEN),
        vision_start_token_id=ids(VISION_START),
        vision_end_token_id=ids(VISION_END),
    )


class QwenFramesAsVideo:
    """Stands in for the Qwen-VL video processors, which need torchvision.

    Those resize every frame as an image (`smart_resize` to multiples of patch x merge),
    rescale, normalise, repeat the last frame up to a multiple of `temporal_patch_size`, and cut
    the clip into patches of temporal_patch_size frames x patch x patch, in merge-group order:
    rows [t, h/m, w/m, m, m] of (channel, frame, pixel row, pixel column). Here each frame goes
    through the family's own image processor with a temporal patch of one frame, and the frames
    of a temporal patch are interleaved channel by channel, which is that layout (an image is
    the same patch with its one frame repeated). Frames are used as given: no sampling. The
    metadata (`return_metadata`) is transformers' default for a list of frames: no fps, frame
    indices 0..n-1 (Qwen2.5-VL's and Qwen3-VL's processors read it for the temporal positions
    and the timestamps). Qwen3-VL's own processor budgets pixels over the whole clip, not per
    frame; the zoo's tiny frames fit either budget."""

    def __init__(self, image_processor: Qwen2VLImageProcessorPil) -> None:
        self.image_processor = image_processor
        self.patch_size = int(image_processor.patch_size)
        self.merge_size = int(image_processor.merge_size)
        self.temporal_patch_size = int(image_processor.temporal_patch_size)

    def __call__(
        self,
        videos: Any,
        video_metadata: Any = None,
        return_metadata: bool = False,
        **kwargs: Any,
    ) -> BatchFeature:
        clips = make_batched_videos(videos)
        metadata = make_batched_metadata(clips, video_metadata=video_metadata)
        tp = self.temporal_patch_size
        rows, grids = [], []
        for clip in clips:
            frames = [np.asarray(f) for f in clip]
            frames += [frames[-1]] * (-len(frames) % tp)
            out = self.image_processor(frames, temporal_patch_size=1, return_tensors="pt")
            thw = out["image_grid_thw"]
            if not bool((thw == thw[0]).all()):
                raise ValueError("every frame of a video must have the same size")
            _, h, w = thw[0].tolist()
            pv = out["pixel_values"].reshape(len(frames) // tp, tp, h * w, 3, -1)
            rows.append(pv.permute(0, 2, 3, 1, 4).reshape(len(frames) // tp * h * w, -1))
            grids.append([len(frames) // tp, h, w])
        data: dict[str, Any] = {
            "pixel_values_videos": torch.cat(rows),
            "video_grid_thw": torch.tensor(grids),
        }
        if return_metadata:
            data["video_metadata"] = metadata
        return BatchFeature(data)


class QwenVideoProcessorMixin(ImageOnlyProcessorMixin):
    """A Qwen-VL processor whose videos go through `QwenFramesAsVideo` (no torchvision).

    `ImageOnlyProcessorMixin` keeps the video processor out of `__init__`, so ProcessorMixin
    neither checks its class nor saves it; it is rebuilt from the image processor here, also
    on load. The stock processor then expands each `<|video_pad|>` as it does with its own."""

    def __init__(
        self,
        image_processor: Any = None,
        tokenizer: Any = None,
        chat_template: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(image_processor, tokenizer, chat_template, **kwargs)
        self.video_processor = QwenFramesAsVideo(self.image_processor)


@register_processor
class Qwen2VLFramesProcessor(QwenVideoProcessorMixin, Qwen2VLProcessor):
    """Qwen2VLProcessor with videos through `QwenFramesAsVideo`."""


@register_processor
class Qwen2VLImageOnlyProcessor(Qwen2VLFramesProcessor):
    """The name zoo folders saved before videos (ZOO_VERSION 2) record: they load with it
    (an unregistered name would load as the bare tokenizer)."""


def qwen_text_kwargs(vocab_size: int, tokenizer: PreTrainedTokenizerFast) -> dict[str, Any]:
    """Text-config fields shared by the three families (3 layers, GQA, O(1) init)."""
    return dict(
        vocab_size=vocab_size,
        hidden_size=TEXT_HIDDEN,
        intermediate_size=TEXT_INTERMEDIATE,
        num_hidden_layers=TEXT_LAYERS,
        num_attention_heads=TEXT_HEADS,
        num_key_value_heads=TEXT_KV_HEADS,
        max_position_embeddings=1024,
        initializer_range=INIT_RANGE,
        rms_norm_eps=1e-6,
        bos_token_id=tokenizer.pad_token_id,  # Qwen's bos_token_id is <|endoftext|>, never added
        eos_token_id=tokenizer.eos_token_id,
    )


@register("qwen2_vl", description="Qwen2-VL (ViT with 2D RoPE + patch merger + Qwen2 with M-RoPE)")
def build_qwen2_vl() -> tuple[Any, Any]:
    """The original M-RoPE family: LayerNorm ViT, full vision attention, q/k/v biases."""
    tokenizer = qwen_tokenizer()
    processor = Qwen2VLFramesProcessor(
        image_processor=qwen_image_processor(),
        tokenizer=tokenizer,
        chat_template=CHATML_VISION,
    )
    vision = dict(
        depth=2,
        embed_dim=32,
        hidden_size=TEXT_HIDDEN,  # the merger's output width: the decoder's hidden size
        mlp_ratio=2,
        num_heads=2,
        patch_size=PATCH,
        spatial_merge_size=MERGE,
        temporal_patch_size=TEMPORAL_PATCH,
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
    config = Qwen2VLConfig(vision_config=vision, text_config=text, **token_ids(tokenizer))
    return Qwen2VLForConditionalGeneration(config), processor
