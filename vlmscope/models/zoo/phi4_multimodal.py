"""Tiny Phi-4-multimodal: SigLIP crops with 2x2 pooling, Phi decoder with fused projections.

The decoder's attention has one fused `qkv_proj` and its MLP one `gate_up_proj`. An image is
its high-resolution crops stitched into one grid (pooled 2x2, a newline token closing each row),
one separator, then the global view's grid with its newlines, all on `<|image|>` tokens.
The model also carries a (tiny) speech encoder, unused here.

The stock image processor needs torchvision, so `Phi4MMImageProcessorPil` below does its
steps with PIL, NumPy and torch: pick the crop grid (ceil of the size over the crop size, or the
closest aspect ratio when that exceeds `dynamic_hd`), resize and pad with white, cut crops, add
the global view, and derive the crop mask and token count. The token count follows the
geometry; the stock class writes the 448 px / 14 px numbers (256 + 16 global tokens) in.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import numpy as np
import torch
from transformers import AutoImageProcessor, BatchFeature
from transformers.image_processing_backends import PilBackend
from transformers.image_utils import PILImageResampling, SizeDict
from transformers.models.phi4_multimodal.configuration_phi4_multimodal import (
    Phi4MultimodalConfig,
)
from transformers.models.phi4_multimodal.feature_extraction_phi4_multimodal import (
    Phi4MultimodalFeatureExtractor,
)
from transformers.models.phi4_multimodal.modeling_phi4_multimodal import (
    Phi4MultimodalForCausalLM,
)
from transformers.models.phi4_multimodal.processing_phi4_multimodal import (
    Phi4MultimodalProcessor,
)
from transformers.processing_utils import ImagesKwargs

from vlmscope.models.zoo import register
from vlmscope.models.zoo.common import register_processor, train_tokenizer
from vlmscope.models.zoo.text import perturb_constant_params

CROP = 32
PATCH = 8
MAX_CROPS = 4

PHI_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|image|>{% elif part['type'] == 'text' %}"
    "{{ part['text'] }}{% endif %}{% endfor %}{% endif %}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def crop_grid(h: int, w: int, crop: int, max_crops: int) -> tuple[int, int]:
    """(columns, rows) of crops: enough to cover the image, or, when that is more than
    `max_crops`, the grid whose aspect ratio is closest to the image's (larger grids win ties
    when the image is big enough to fill more than half of them)."""
    cols, rows = math.ceil(w / crop), math.ceil(h / crop)
    if cols * rows <= max_crops:
        return cols, rows
    grids = sorted(
        {
            (i, j)
            for i in range(1, max_crops + 1)
            for j in range(1, max_crops + 1)
            if i * j <= max_crops
        },
        key=lambda g: g[0] * g[1],
    )
    best, best_diff = (1, 1), float("inf")
    for i, j in grids:
        diff = abs(w / h - i / j)
        if diff < best_diff:
            best, best_diff = (i, j), diff
        elif diff == best_diff and w * h > 0.5 * crop * crop * i * j:
            best = (i, j)
    return best


class Phi4MMImagesKwargs(ImagesKwargs, total=False):
    patch_size: int
    dynamic_hd: int


class Phi4MMImageProcessorPil(PilBackend):
    """Phi-4-multimodal's dynamic-HD image preprocessing without torchvision (see the module
    docstring); outputs `image_pixel_values` [images, 1 + crops, 3, s, s], `image_sizes`,
    `image_attention_mask` and the per-image token counts the processor expands to."""

    resample = PILImageResampling.BICUBIC
    size: ClassVar[dict[str, int]] = {"height": 448, "width": 448}
    patch_size = 14
    dynamic_hd = 36
    image_mean: ClassVar[list[float]] = [0.5, 0.5, 0.5]
    image_std: ClassVar[list[float]] = [0.5, 0.5, 0.5]
    do_resize = True
    do_rescale = True
    do_normalize = True
    do_convert_rgb = True
    valid_kwargs = Phi4MMImagesKwargs
    model_input_names: ClassVar[list[str]] = [
        "image_pixel_values",
        "image_sizes",
        "image_attention_mask",
    ]

    def _preprocess(
        self,
        images: list[np.ndarray],
        size: SizeDict,
        resample: PILImageResampling | None,
        do_rescale: bool,
        rescale_factor: float,
        do_normalize: bool,
        image_mean: float | list[float] | None,
        image_std: float | list[float] | None,
        return_tensors: Any,
        patch_size: int = 14,
        dynamic_hd: int = 36,
        **kwargs: Any,
    ) -> BatchFeature:
        s = int(size.height)
        m = s // patch_size  # mask cells per crop side
        half = m // 2 + m % 2
        pixels, masks, tokens, sizes = [], [], [], []
        for image in images:  # channels first, uint8
            h, w = image.shape[-2:]
            cols, rows = crop_grid(h, w, s, dynamic_hd)
            tw, th = s * cols, s * rows
            if tw / w < th / h:
                nw, nh = tw, int(h * tw / w)
            else:
                nw, nh = int(w * th / h), th
            mask = np.ones((m * rows, m * cols), dtype=np.int64)
            if tw - nw >= patch_size:
                mask[:, -((tw - nw) // patch_size) :] = 0
            if th - nh >= patch_size:
                mask[-((th - nh) // patch_size) :, :] = 0
            x = self.resize(image, SizeDict(height=nh, width=nw), PILImageResampling.BILINEAR)
            x = np.pad(x, ((0, 0), (0, th - nh), (0, tw - nw)), constant_values=255)
            if do_rescale:
                x = self.rescale(x, rescale_factor)
            if do_normalize:
                x = self.normalize(x, image_mean, image_std)
            hd = torch.from_numpy(np.ascontiguousarray(x)).float()
            glob = torch.nn.functional.interpolate(
                hd[None], size=(s, s), mode="bicubic", align_corners=False
            )[0]
            crops = hd.reshape(3, rows, s, cols, s).permute(1, 3, 0, 2, 4).reshape(-1, 3, s, s)
            crop_masks = torch.from_numpy(mask).reshape(rows, m, cols, m).transpose(1, 2)
            crop_masks = crop_masks.reshape(-1, m, m)
            pooled = crop_masks[:, 0::2, 0::2].reshape(rows, cols, half, half).transpose(1, 2)
            pooled = pooled.reshape(rows * half, cols * half)
            tokens.append(half * half + 1 + int(pooled.sum()) + int(pooled[:, 0].sum()) + half)
            pixels.append(torch.cat([glob[None], crops]))
            masks.append(torch.cat([torch.ones(1, m, m, dtype=torch.long), crop_masks]))
            sizes.append([th, tw])
        n = max(len(p) for p in pixels)
        pixels = [torch.cat([p, p.new_zeros(n - len(p), *p.shape[1:])]) for p in pixels]
        masks = [torch.cat([k, k.new_ones(n - len(k), *k.shape[1:])]) for k in masks]
        data = {
            "image_pixel_values": torch.stack(pixels),
            "image_sizes": torch.tensor(sizes),
            "image_attention_mask": torch.stack(masks),
            "num_img_tokens": tokens,
        }
        return BatchFeature(data=data, tensor_type=return_tensors)


AutoImageProcessor.register(
    "vlmscope.zoo:Phi4MMImageProcessorPil",
    image_processor_classes={"pil": Phi4MMImageProcessorPil},
    exist_ok=True,
)


@register_processor
class Phi4MMProcessor(Phi4MultimodalProcessor):
    """Phi4MultimodalProcessor with `chat_template` in its signature: ProcessorMixin passes a
    saved template back only to processors whose `__init__` names it, so the stock class
    loads without the template it saved."""

    def __init__(
        self,
        image_processor: Any,
        audio_processor: Any,
        tokenizer: Any,
        chat_template: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            image_processor, audio_processor, tokenizer, chat_template=chat_template, **kwargs
        )


@register(
    "phi4_multimodal",
    description="Phi-4-multimodal (SigLIP HD crops + fused qkv/gate_up Phi decoder)",
)
def build_phi4_multimodal() -> tuple[Any, Any]:
    """Phi-4-multimodal: fused qkv_proj and gate_up_proj, HD crops + global view per image."""
    tokenizer = train_tokenizer(
        ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>", "<|image|>", "<|audio|>"],
        bos="<|endoftext|>",
        eos="<|end|>",
        pad="<|dummy_pad|>",
        unk=None,
        add_bos=False,
        named_tokens={"image_token": "<|image|>", "audio_token": "<|audio|>"},
        chat_template=PHI_TEMPLATE,
    )
    processor = Phi4MMProcessor(
        Phi4MMImageProcessorPil(
            size={"height": CROP, "width": CROP}, patch_size=PATCH, dynamic_hd=MAX_CROPS
        ),
        Phi4MultimodalFeatureExtractor(),
        tokenizer,
        chat_template=PHI_TEMPLATE,
    )
    ids = tokenizer.convert_tokens_to_ids
    vision = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=CROP,
        patch_size=PATCH,
        crop_size=CROP,
        image_token_id=ids("<|image|>"),
        feature_layer=-2,
        initializer_range=0.2,
    )
    audio = dict(
        hidden_size=32,
        intermediate_size=64,
        num_blocks=1,
        num_attention_heads=2,
        ext_pw_out_channel=32,
        depthwise_separable_out_channel=32,
        nemo_conv_channels=32,
        audio_token_id=ids("<|audio|>"),
    )
    config = Phi4MultimodalConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        original_max_position_embeddings=512,
        initializer_range=0.2,
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 10000.0,
            "partial_rotary_factor": 0.75,
        },
        vision_config=vision,
        audio_config=audio,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    return perturb_constant_params(Phi4MultimodalForCausalLM(config)), processor
