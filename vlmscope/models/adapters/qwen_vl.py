"""Qwen2-VL, Qwen2.5-VL and Qwen3-VL: ViT with 2x2 patch merger, M-RoPE decoder.

M-RoPE needs no special handling here: the rotary module mixes the (t, h, w) sections into
cos/sin, and attention applies them with the plain rotate-half function.

Videos. The processor cuts a video into temporal patches of `temporal_patch_size` frames (2;
a clip with an odd count repeats its last frame), each an h x w grid of patches merged m x m
like an image's: `video_grid_thw` = (temporal patches, h, w). The language model gets one
`<|video_pad|>` per merge group, temporal patch after temporal patch; Qwen2/2.5-VL write them
as one run, Qwen3-VL as one run per temporal patch between a text timestamp (`<0.5 seconds>`)
and vision start/end tokens, which stay text and special tokens. In the masks a video counts
as one image whose views are its temporal patches: `patch_map` gives (video, temporal patch,
row, col) of the merged grid, view t covering frames t*T .. t*T + T - 1. Images and videos may
be mixed; they are numbered together in the order of their tokens, as the masks number them.
The vision tower runs twice on such a batch, over the images and then over the videos (each
run is a separate firing of a vision hook); `vision_layout` lays out their joined rows, what
`run_with_cache` records.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from vlmscope.models.adapter import Capabilities, LayerMap, ModelAdapter
from vlmscope.models.adapters.llava import grid_cells
from vlmscope.models.masks import ImageTokenMismatchError
from vlmscope.models.registry import register_adapter
from vlmscope.models.vision import VisionLayoutError


def has_videos(inputs: Mapping[str, Any]) -> bool:
    """Whether a batch carries video inputs (pixels or their grids)."""
    return inputs.get("pixel_values_videos") is not None or inputs.get("video_grid_thw") is not None


class QwenVLAdapter(ModelAdapter):
    """Shared layout: each image is one row-major grid of merged patches per frame; a video
    (where `capabilities.video`) one image whose views are its temporal patches."""

    vision_blocks = "model.visual.blocks"
    projector = "model.visual.merger"
    positions_from_padding = False

    def image_token_ids(self) -> tuple[int, ...]:
        """Image placeholders, and video ones where videos are laid out: both receive vision
        features."""
        ids = super().image_token_ids()
        video = getattr(self.config, "video_token_id", None)
        if self.capabilities.video and isinstance(video, int) and video >= 0:
            ids = tuple(dict.fromkeys([*ids, video]))
        return ids

    def _grids(self, inputs: Mapping[str, Any], key: str) -> list[list[int]]:
        """(t, h, w) rows of `key` (image_grid_thw / video_grid_thw), none when absent."""
        thw = inputs.get(key)
        return [] if thw is None else [[int(x) for x in row] for row in thw.tolist()]

    def _check_videos_supported(self) -> None:
        if not self.capabilities.video:
            # Their placeholders would be neither image nor text in the masks, and the tower's
            # second run (the videos) has no layout here: say so, not KeyError.
            raise ImageTokenMismatchError(
                f"{self.family}: video inputs (pixel_values_videos) are not supported yet; "
                "pass a video's frames as images"
            )

    def visual_order(self, inputs: Mapping[str, Any]) -> list[tuple[str, int]]:
        """("image", i) or ("video", j) for every image and video of the batch, in the order of
        their placeholder tokens, sample after sample: the masks' numbering. A video's tokens
        may be split into runs (Qwen3-VL's timestamps between temporal patches) but never
        interleave with another image's or video's."""
        self._check_videos_supported()
        m2 = int(self.config.vision_config.spatial_merge_size) ** 2
        sizes = {
            kind: [t * h * w // m2 for t, h, w in self._grids(inputs, f"{kind}_grid_thw")]
            for kind in ("image", "video")
        }
        cfg = self.config
        kind_of = {int(cfg.image_token_id): "image", int(cfg.video_token_id): "video"}
        taken = {"image": 0, "video": 0}
        order: list[tuple[str, int]] = []
        for b, row in enumerate(inputs["input_ids"].tolist()):
            kinds = [kind_of[t] for t in row if t in kind_of]
            s = 0
            while s < len(kinds):
                kind = kinds[s]
                i = taken[kind]
                if i >= len(sizes[kind]):
                    raise ImageTokenMismatchError(
                        f"sample {b} has {kind} tokens but no {kind} is left for them "
                        f"({len(sizes[kind])} given for the batch); the prompts' placeholders "
                        f"and the {kind}s passed disagree"
                    )
                n = sizes[kind][i]
                if kinds[s : s + n] != [kind] * n:
                    run = next((k for k, x in enumerate(kinds[s:]) if x != kind), len(kinds) - s)
                    raise ImageTokenMismatchError(
                        f"sample {b}: {kind} {i} needs {n} {kind} tokens before the next image "
                        f"or video, but {run} come there; the prompt's placeholders and the "
                        "grids (image_grid_thw / video_grid_thw) disagree"
                    )
                order.append((kind, i))
                taken[kind] += 1
                s += n
        left = {k: len(sizes[k]) - taken[k] for k in sizes}
        if any(left.values()):
            raise ImageTokenMismatchError(
                f"{left['image']} image(s) and {left['video']} video(s) given have no "
                "placeholder tokens in the prompts"
            )
        return order

    def _token_cells(self, t: int, h: int, w: int) -> torch.Tensor:
        """(view, row, col) of the tokens of one image or video: a merged grid per frame."""
        m = int(self.config.vision_config.spatial_merge_size)
        return torch.cat([grid_cells(h // m, w // m, view=f) for f in range(t)])

    def image_token_grids(self, inputs: Mapping[str, Any]) -> list[torch.Tensor]:
        """Images (and videos) in the order of their tokens; without videos, pixel order."""
        images = [self._token_cells(*thw) for thw in self._grids(inputs, "image_grid_thw")]
        if not has_videos(inputs):
            return images
        videos = [self._token_cells(*thw) for thw in self._grids(inputs, "video_grid_thw")]
        return [(images if k == "image" else videos)[i] for k, i in self.visual_order(inputs)]

    def vision_layout(
        self, inputs: Mapping[str, Any], name: str, shape: tuple[int, ...]
    ) -> torch.Tensor:
        """Flat rows: per image and frame (view), the merge groups of the merged grid in
        row-major order, and inside the tower each group's m x m patches; the projector's
        output has one row per group. With videos, the images' run and then the videos' run
        (a video's views are its temporal patches), each image and video numbered in token
        order."""
        runs = [("image", self._grids(inputs, "image_grid_thw"))]
        number = {"image": list(range(len(runs[0][1]))), "video": []}
        if has_videos(inputs):
            runs.append(("video", self._grids(inputs, "video_grid_thw")))
            number = {"image": [], "video": []}
            for g, (kind, _) in enumerate(self.visual_order(inputs)):
                number[kind].append(g)
        merged = name.startswith("projector.")
        parts = [self._run_layout(grids, number[kind], merged) for kind, grids in runs if grids]
        cells = torch.cat(parts) if parts else torch.zeros(0, 4, dtype=torch.long)
        if len(shape) == 1 and shape[0] == len(cells):
            return cells
        if len(shape) == 1 and len(parts) == 2 and shape[0] in (len(p) for p in parts):
            raise VisionLayoutError(
                f"{name}: an activation of {shape[0]} rows is one run of the vision tower, but "
                f"this batch runs it twice, over its images ({len(parts[0])} rows) and then its "
                f"videos ({len(parts[1])} rows); only their joined rows can be laid out "
                "(run_with_cache joins them): pass images and videos in separate batches"
            )
        grids = "image_grid_thw and video_grid_thw" if len(runs) > 1 else "image_grid_thw"
        raise VisionLayoutError(
            f"{name}: activation of shape {list(shape)} (width left out), but the grids "
            f"({grids}) give {len(cells)} rows"
        )

    def _run_layout(self, grids: list[list[int]], number: list[int], merged: bool) -> torch.Tensor:
        """[rows, 4] (image, view, row, col) of one run of the tower over `grids`, the k-th
        grid numbered `number[k]`."""
        m = int(self.config.vision_config.spatial_merge_size)
        parts = []
        for i, (t, h, w) in zip(number, grids, strict=True):
            f, hb, wb = torch.meshgrid(
                torch.arange(t), torch.arange(h // m), torch.arange(w // m), indexing="ij"
            )
            groups = torch.stack([torch.full_like(f, i), f, hb, wb], -1).reshape(-1, 1, 4)
            if not merged:
                mr, mc = torch.meshgrid(torch.arange(m), torch.arange(m), indexing="ij")
                inner = torch.stack([mr, mc], -1).reshape(1, m * m, 2)
                groups = groups.expand(-1, m * m, 4).clone()
                groups[..., 2:] = groups[..., 2:] * m + inner
            parts.append(groups)
        cells = torch.cat(parts)
        order = self._window_order(torch.tensor(grids, dtype=torch.long))
        if order is not None:
            cells = cells[order]
        return cells.reshape(-1, 4)

    def _window_order(self, grid_thw: torch.Tensor) -> torch.Tensor | None:
        """The order of merge groups inside the tower for one run over `grid_thw`, where it
        is not the images' own."""
        return None


@register_adapter
class Qwen2VLAdapter(QwenVLAdapter):
    family = "qwen2_vl"
    model_types = ("qwen2_vl",)
    architectures = ("Qwen2VLForConditionalGeneration",)
    capabilities = Capabilities(video=True)


@register_adapter
class Qwen2_5VLAdapter(QwenVLAdapter):
    """Vision blocks run in window-permuted token order; hooks there see that order."""

    family = "qwen2_5_vl"
    model_types = ("qwen2_5_vl",)
    architectures = ("Qwen2_5_VLForConditionalGeneration",)
    capabilities = Capabilities(video=True)

    def _window_order(self, grid_thw: torch.Tensor) -> torch.Tensor | None:
        """Window attention permutes the merge groups inside the tower (and the projector's
        output, which the model un-permutes afterwards): the window index of transformers,
        computed per run (images, videos) as the model does."""
        from transformers.vision_utils import get_vision_window_index

        vc = self.config.vision_config
        index, _ = get_vision_window_index(
            grid_thw,
            spatial_merge_size=int(vc.spatial_merge_size),
            window_size=int(vc.window_size),
            patch_size=int(vc.patch_size),
        )
        return index


@register_adapter
class Qwen3VLAdapter(QwenVLAdapter):
    """DeepStack adds vision features to image positions after the first layers, outside the
    decoder layers: resid_post[i] and resid_pre[i+1] differ there. A video's tokens are one run
    per temporal patch, after its timestamp."""

    family = "qwen3_vl"
    model_types = ("qwen3_vl",)
    architectures = ("Qwen3VLForConditionalGeneration",)
    layer_map = LayerMap(q_norm="self_attn.q_norm", k_norm="self_attn.k_norm")
    capabilities = Capabilities(
        strict_residual_stream=False, contiguous_image_tokens=False, video=True
    )
