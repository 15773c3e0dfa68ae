"""LLaVA-NeXT-Video: LLaVA-NeXT's anyres images, plus videos as frames of pooled grids.

A video's frames go through the same vision tower, are average-pooled (stride 2 by default)
and written frame after frame as `<video>` tokens. In the masks a video counts as one image
whose frames are its views: `patch_map` gives (video, frame, row, col) of the pooled grid.
Images and videos may be mixed; their grids follow the order of their tokens in the batch.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from vlmscope.models.adapter import Capabilities
from vlmscope.models.adapters.llava import LlavaNextAdapter, grid_cells
from vlmscope.models.masks import ImageTokenMismatchError
from vlmscope.models.registry import register_adapter
from vlmscope.models.vision import VisionLayoutError


@register_adapter
class LlavaNextVideoAdapter(LlavaNextAdapter):
    family = "llava_next_video"
    model_types = ("llava_next_video",)
    architectures = ("LlavaNextVideoForConditionalGeneration",)
    capabilities = Capabilities(contiguous_image_tokens=True, video=True)

    def image_token_ids(self) -> tuple[int, ...]:
        """Image and video placeholders: both receive vision features."""
        video = getattr(self.config, "video_token_id", None)
        return tuple(dict.fromkeys([*super().image_token_ids(), *([video] if video else [])]))

    def video_grids(self, inputs: Mapping[str, Any]) -> list[torch.Tensor]:
        """(frame, row, col) of every token of each video in pixel_values_videos."""
        pv = inputs.get("pixel_values_videos")
        if pv is None:
            return []
        vc = self.config.vision_config
        g = int(vc.image_size) // int(vc.patch_size) // int(self.config.spatial_pool_stride)
        frames = int(pv.shape[1])
        one = torch.cat([grid_cells(g, g, view=f) for f in range(frames)])
        return [one] * int(pv.shape[0])

    def image_token_grids(self, inputs: Mapping[str, Any]) -> list[torch.Tensor]:
        """Image and video grids in the order their tokens appear, sample after sample."""
        images = super().image_token_grids(inputs) if "pixel_values" in inputs else []
        videos = self.video_grids(inputs)
        video_id = getattr(self.config, "video_token_id", None)
        visual = set(self.image_token_ids())
        out: list[torch.Tensor] = []
        for b, row in enumerate(inputs["input_ids"].tolist()):
            s = 0
            while s < len(row):
                t = row[s]
                if t not in visual:
                    s += 1
                    continue
                queue, what = (videos, "video") if t == video_id else (images, "image")
                if not queue:
                    raise ImageTokenMismatchError(
                        f"sample {b} has {what} tokens at position {s} but no {what} is left "
                        f"for them; the prompts' placeholders and the {what}s passed disagree"
                    )
                grid = queue.pop(0)
                if row[s : s + len(grid)] != [t] * len(grid):
                    raise ImageTokenMismatchError(
                        f"sample {b}: the {what} at position {s} needs {len(grid)} {what} "
                        "tokens in a row; the prompt's placeholders and the inputs disagree"
                    )
                out.append(grid)
                s += len(grid)
        if images or videos:
            raise ImageTokenMismatchError(
                f"{len(images)} image(s) and {len(videos)} video(s) given have no placeholder "
                "tokens in the prompts"
            )
        return out

    def vision_layout(
        self, inputs: Mapping[str, Any], name: str, shape: tuple[int, ...]
    ) -> torch.Tensor:
        """Images as LLaVA-NeXT lays them out. The tower's second run, over the videos'
        frames (whose projector rows are pooled first), has no layout here: refused by name
        rather than failing on the missing image_sizes or laying out the wrong rows."""
        if inputs.get("pixel_values_videos") is not None:
            raise VisionLayoutError(
                f"{name}: {self.family} lays out the vision rows of images only, and this batch "
                "has videos (pixel_values_videos), whose frames the tower runs over too; use "
                "language-model hooks on video batches, or pass the frames as images"
            )
        return super().vision_layout(inputs, name, shape)
