"""Per-sample token masks (image, text, padding, special) and the image-patch map of a batch.

Every later stage selects tokens with these masks: training on image tokens only, evaluating
text tokens separately, mapping an attribution graph's image nodes back to patches.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

TokenKind = Literal["all", "image", "text"]


class ImageTokenMismatchError(ValueError):
    """The prompts' image placeholders and the images given disagree."""


@dataclass
class TokenMasks:
    """Boolean [batch, seq] masks of one processed batch, plus the patch map.

    `patch_map[b, s]` is (image index within sample b, view, row, col) for image tokens and -1
    elsewhere; view 0 is the whole image (or its base view), tiles / high-res views count from 1,
    col -1 marks a row-separator token, row -1 and col -1 a token outside the grid.
    """

    input_ids: torch.Tensor
    valid: torch.Tensor
    image: torch.Tensor
    special: torch.Tensor
    patch_map: torch.Tensor
    #: sample index of every image, in the order of pixel_values.
    image_sample: list[int]

    @property
    def pad(self) -> torch.Tensor:
        return ~self.valid

    @property
    def text(self) -> torch.Tensor:
        """Ordinary text tokens: not padding, not image, not special."""
        return self.valid & ~self.image & ~self.special

    def images_per_sample(self) -> list[int]:
        counts = [0] * self.input_ids.shape[0]
        for b in self.image_sample:
            counts[b] += 1
        return counts

    def image_token_counts(self) -> list[int]:
        return self.image.sum(dim=1).tolist()

    def select(self, tokens: TokenKind = "all", include_special: bool = False) -> torch.Tensor:
        """Mask of positions to use: padding always excluded, special tokens unless asked."""
        if tokens == "image":
            return self.image.clone()
        base = self.valid if include_special else self.valid & ~self.special
        if tokens == "text":
            return base & ~self.image
        if tokens == "all":
            return base.clone()
        raise ValueError(f"tokens must be 'all', 'image' or 'text', not {tokens!r}")

    def to(self, device: torch.device | str) -> TokenMasks:
        return TokenMasks(
            self.input_ids.to(device),
            self.valid.to(device),
            self.image.to(device),
            self.special.to(device),
            self.patch_map.to(device),
            list(self.image_sample),
        )


def compute_masks(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    image_token_ids: Sequence[int],
    special_token_ids: Sequence[int],
    image_grids: list[torch.Tensor] | None,
    images_given: bool | None = None,
) -> TokenMasks:
    """Build TokenMasks and check that image placeholders match the images.

    `image_grids` holds, per image in pixel_values order, the (view, row, col) of each of its
    tokens (None when the batch has no images). Images are assigned to samples in order; a
    sample whose image-token count is not a whole number of images is an error naming it.
    `images_given=True` with no grids means the layout is unknown: only presence is checked.
    """
    ids = input_ids.cpu()
    b, s = ids.shape
    valid = (
        torch.ones(b, s, dtype=torch.bool)
        if attention_mask is None
        else attention_mask.cpu().bool()
        if attention_mask.dim() == 2
        else torch.ones(b, s, dtype=torch.bool)
    )
    image = torch.isin(ids, torch.tensor(list(image_token_ids), dtype=ids.dtype)) & valid
    special = torch.isin(ids, torch.tensor(list(special_token_ids), dtype=ids.dtype))
    special &= valid & ~image
    patch_map = torch.full((b, s, 4), -1, dtype=torch.long)
    counts = image.sum(dim=1).tolist()
    image_sample: list[int] = []

    if images_given and image_grids is None:
        if sum(counts) == 0:
            raise ImageTokenMismatchError(
                "images were given but no sample contains an image token "
                f"(ids {list(image_token_ids)})"
            )
        return TokenMasks(ids, valid, image, special, patch_map, image_sample)
    if not image_grids:
        bad = [i for i, c in enumerate(counts) if c]
        if bad:
            raise ImageTokenMismatchError(
                f"sample(s) {bad} contain {[counts[i] for i in bad]} image tokens but no "
                "images were given (pixel_values is missing)"
            )
        return TokenMasks(ids, valid, image, special, patch_map, image_sample)

    if sum(counts) == 0:
        raise ImageTokenMismatchError(
            f"{len(image_grids)} image(s) were given but no sample contains an image token "
            f"(ids {list(image_token_ids)}); the prompt lost its image placeholder - build "
            "prompts with the processor's chat template or HookedVLM.prepare()"
        )
    nxt = 0
    for bi in range(b):
        need, got, first = counts[bi], 0, nxt
        while got < need and nxt < len(image_grids):
            got += image_grids[nxt].shape[0]
            nxt += 1
        if got != need:
            raise ImageTokenMismatchError(_short_of_images(bi, need, got, first, image_grids, nxt))
        pos = image[bi].nonzero().squeeze(1)
        if need:
            cells = torch.cat(
                [
                    torch.cat([torch.full((g.shape[0], 1), k), g.long()], dim=1)
                    for k, g in enumerate(image_grids[first:nxt])
                ]
            )
            patch_map[bi, pos] = cells
        image_sample += [bi] * (nxt - first)
    if nxt != len(image_grids):
        raise ImageTokenMismatchError(
            f"{len(image_grids)} images were given but the prompts' image tokens account for "
            f"only {nxt}; samples have {counts} image tokens"
        )
    return TokenMasks(ids, valid, image, special, patch_map, image_sample)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _short_of_images(
    sample: int, need: int, got: int, first: int, image_grids: list[torch.Tensor], nxt: int
) -> str:
    """Why sample `sample`'s image tokens do not match the images assigned to it in order."""
    given = _plural(len(image_grids), "image")
    if first >= len(image_grids):
        return (
            f"sample {sample} has {need} image tokens but no images are left for it "
            f"({given} given for the batch, all taken by the samples before it); the prompts' "
            "image placeholders and the images passed disagree"
        )
    sizes = [g.shape[0] for g in image_grids[first:nxt]]
    which = f"image {first}" if nxt - first == 1 else f"images {first}..{nxt - 1}"
    return (
        f"sample {sample} has {need} image tokens, but the images assigned to it in order "
        f"({which} of the {given} given, {sizes} tokens each) give {got}; the prompt's "
        "image placeholders and the images passed disagree"
    )


def check_images_per_sample(per_sample: Sequence[int], n_given: int, source: str) -> None:
    """Raise ImageTokenMismatchError, naming the sample, when `per_sample` image counts (as
    `source` declares them) do not add up to the `n_given` images of the batch."""
    start = 0
    for b, n in enumerate(per_sample):
        if start + n > n_given:
            left = max(0, n_given - start)
            rest = (
                "no images are"
                if not left
                else f"only {_plural(left, 'image')} " + ("is" if left == 1 else "are")
            )
            raise ImageTokenMismatchError(
                f"sample {b} should have {_plural(n, 'image')} ({source}) but {rest} left for "
                f"it ({_plural(n_given, 'image')} given for the batch)"
            )
        start += n
    if start != n_given:
        raise ImageTokenMismatchError(
            f"{_plural(n_given, 'image')} given for the batch but {source} accounts for only "
            f"{start} ({list(per_sample)} per sample)"
        )
