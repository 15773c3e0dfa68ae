"""The `processed` schema: rows that already hold a model processor's outputs.

Teams often run the model's processor over a dataset once (``datasets.map``, or
``vlmscope data process``) and keep ``input_ids`` + ``pixel_values`` plus the family's extras
(``attention_mask``, ``image_grid_thw``, ``image_sizes``, ``pixel_attention_mask``,
``mm_token_type_ids``, ...), one row per sample, as nested lists or arrays in Parquet,
`datasets` folders or JSONL. Such a row becomes a Sample without the processor; what the
processor would have guaranteed is checked against the model instead. `ProcessedSpec` learns
the model's side once, from the processor's outputs for a few probe prompts:

- each key's dtype kind and rank. A row stored without its leading dimension (``[T]`` for the
  processor's ``[1, T]``, ``[C, H, W]`` for one image's ``[1, C, H, W]``) gets it back;
- the vocabulary: the model's embedding rows;
- the dimensions of ``pixel_values`` that the processor never varies (channels, height and
  width; the flattened patch width for Qwen-style processors): they are what the vision tower
  takes.

A row then becomes a Sample after these checks; one that fails is skipped and counted with a
reason that says what disagrees (``bad_dtype``, ``bad_shape``, ``token_out_of_vocab``,
``token_length_mismatch``, ``image_token_mismatch``). The image-token check is the one raw
data gets (``HookedVLM.masks`` with the family's layout), so masks and the patch map of a
processed row are exactly those of the same record processed on the fly. Truncation to
``ctx_len`` is the raw path's too (never inside an image's token block).

Some disagreements mean the dataset as a whole was made for another model, and stop with a
`ProcessedDataError` before the first batch (`check_dataset`): ``pixel_values`` whose fixed
dimensions do not fit the vision tower (also mid-run, naming the row and the shapes); columns
the model's processor does not make (``image_grid_thw`` for LLaVA) or lacks; a manifest
(``processed.json``, written by `vlmscope data process`) whose tokenizer and processor
fingerprint differ; or none of the first rows passing. A dataset without ``pixel_values`` for
a VLM trains as text, with a warning that names it.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import itertools
import json
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image

from vlmscope import VlmscopeWarning
from vlmscope.data.processing import TOKEN_KEYS, Sample, SampleEncoder, SkipRecord
from vlmscope.data.sources import PROCESSED_COLUMNS, Record
from vlmscope.models.masks import ImageTokenMismatchError

if TYPE_CHECKING:
    from vlmscope.data.sources import Dataset
    from vlmscope.models.hooked import HookedVLM

#: The manifest `vlmscope data process` writes next to the Parquet files.
MANIFEST = "processed.json"
#: Per-token keys besides TOKEN_KEYS: the answer's labels (-100 elsewhere).
PER_TOKEN_KEYS = (*TOKEN_KEYS, "labels")
#: Rows the check before the first batch reads.
PREFLIGHT_ROWS = 8


class ProcessedDataError(ValueError):
    """A processed dataset that cannot train this model at all (made for another one)."""


@dataclass(frozen=True)
class KeySpec:
    """What the model's processor gives for one key: rank, dtype, and fixed dimensions
    (index from the end -> size) that every sample shares."""

    rank: int
    dtype: torch.dtype
    fixed: dict[int, int] = field(default_factory=dict)

    def shape_text(self) -> str:
        dims = ["N"] * self.rank
        for d, size in self.fixed.items():
            dims[d] = str(size)
        return "[" + ", ".join(dims) + "]"


class ProcessedSpec:
    """A model's processor outputs, learnt from probe prompts, to check processed rows.

    Picklable (it travels to encoding workers): it keeps a weightless copy of the model's
    adapter for the image-token layout, not the model.
    """

    def __init__(self, vlm: HookedVLM, name: str = "") -> None:
        from vlmscope.models.hooked import HookedVLM

        adapter = copy.copy(vlm.adapter)
        adapter.model = None  # type: ignore[assignment]  # the layout reads config and ids only
        self.layout = HookedVLM(None, vlm.processor, adapter)  # type: ignore[arg-type]
        self.name = name or str(getattr(vlm.model.config, "_name_or_path", "")) or "the model"
        self.family = vlm.adapter.family
        self.vocab_size = int(vlm.model.get_input_embeddings().num_embeddings)
        self.image_token_ids = tuple(vlm.adapter.image_token_ids())
        self.has_vision = hasattr(vlm.processor, "image_processor") and bool(self.image_token_ids)
        self.text_keys, self.image_keys, legacy = _probe(vlm, self.image_token_ids, self.has_vision)
        #: the column holding the images' pixels: ``pixel_values`` for most families, the
        #: adapter's own key otherwise (Phi-4-multimodal's ``image_pixel_values``)
        self.pixel_key = next(
            (k for k in vlm.adapter.pixel_keys if k in self.image_keys), "pixel_values"
        )
        self.fingerprint = _fingerprint(vlm.tokenizer, self.keys, self.image_token_ids)
        # Qwen-VL adapters counted video placeholders as image tokens from 2026-12-02 on: data
        # processed before (video tokens are never in it) is as valid as it was
        video = getattr(vlm.model.config, "video_token_id", None)
        before_videos = tuple(i for i in self.image_token_ids if i != video)
        # and fixed dimensions were read from two probes before that day's portrait and
        # two-image probes (Mllama's images per sample, Pixtral's width passed for fixed)
        before_probes = {**self.text_keys, **legacy}
        self._accepted = {
            _fingerprint(vlm.tokenizer, keys, ids)
            for keys in (self.keys, before_probes)
            for ids in (self.image_token_ids, before_videos)
        }

    @property
    def keys(self) -> dict[str, KeySpec]:
        return {**self.text_keys, **self.image_keys}

    # --- one row ------------------------------------------------------------------------------
    def sample(self, record: Record) -> Sample:
        """The row as a Sample (before truncation); SkipRecord when it disagrees with the
        model, ProcessedDataError when its pixels cannot fit the vision tower."""
        row, rid = record.tensors, record.row_id
        keys = self.keys
        if self.pixel_key not in row:  # a text row: image extras without images mean nothing
            row = {k: v for k, v in row.items() if k not in self.image_keys}
        tensors = {k: self._tensor(k, v, rid) for k, v in row.items() if k in keys or k == "labels"}
        ids = tensors["input_ids"]
        if ids.shape[0] != 1:
            raise SkipRecord(
                "bad_shape", f"input_ids has shape {tuple(ids.shape)}: one sample per row"
            )
        n = int(ids.shape[1])
        for k in PER_TOKEN_KEYS:
            t = tensors.get(k)
            if t is not None and tuple(t.shape[:2]) != (1, n):
                raise SkipRecord(
                    "token_length_mismatch",
                    f"{k} has shape {tuple(t.shape)} but input_ids {tuple(ids.shape)}",
                )
        if n and (int(ids.min()) < 0 or int(ids.max()) >= self.vocab_size):
            raise SkipRecord(
                "token_out_of_vocab",
                f"input_ids range {int(ids.min())}..{int(ids.max())} but {self.name} has "
                f"{self.vocab_size} token embeddings (0..{self.vocab_size - 1})",
            )
        if "attention_mask" in self.text_keys and "attention_mask" not in tensors:
            tensors["attention_mask"] = torch.ones(
                1, n, dtype=self.text_keys["attention_mask"].dtype
            )
        labels = tensors.pop("labels", None)
        try:
            self.layout.masks(tensors)
        except ImageTokenMismatchError as e:
            raise SkipRecord("image_token_mismatch", str(e)) from None
        except (IndexError, ValueError, RuntimeError, KeyError) as e:
            raise SkipRecord("bad_shape", f"{type(e).__name__}: {e}") from None
        return Sample(rid, tensors, n_answer=_answer_length(labels), position=record.position)

    def _tensor(self, key: str, value: Any, row_id: str) -> torch.Tensor:
        """A stored value as a tensor of the processor's dtype and rank, or a skip/stop."""
        want = self.keys.get(key) or KeySpec(2, torch.long)  # labels: like input_ids
        try:
            arr = value if isinstance(value, np.ndarray) else np.asarray(value)
        except ValueError:  # ragged nesting
            arr = np.empty(0, dtype=object)
        if arr.dtype == object:
            raise SkipRecord("bad_shape", f"{key} is ragged (not a rectangular array)")
        floating = want.dtype.is_floating_point
        if arr.dtype.kind not in ("f" if floating else "biu"):
            wanted = "floating-point numbers" if floating else "integers"
            hint = " (raw pixels? process the images)" if key == self.pixel_key else ""
            raise SkipRecord(
                "bad_dtype",
                f"{key} holds {arr.dtype} values{hint}; {self.name}'s processor gives "
                f"{str(want.dtype).removeprefix('torch.')} ({wanted})",
            )
        if not arr.flags.writeable:  # zero-copy from Arrow: torch wants its own memory
            arr = arr.copy()
        t = torch.from_numpy(np.ascontiguousarray(arr)).to(want.dtype)
        if t.dim() == want.rank - 1:
            t = t.unsqueeze(0)  # stored without its leading sample / image dimension
        if t.dim() != want.rank:
            raise SkipRecord(
                "bad_shape",
                f"{key} has shape {tuple(arr.shape)}; {self.name}'s processor gives "
                f"{want.shape_text()}",
            )
        bad = [d for d, size in want.fixed.items() if t.shape[d] != size]
        if bad and key == self.pixel_key:
            raise ProcessedDataError(
                f"row {row_id}: {key} has shape {tuple(arr.shape)}, which does not fit "
                f"{self.name}'s vision tower: its processor makes {want.shape_text()} (N varies "
                "per image); was this dataset processed for another model?"
            )
        if bad:
            raise SkipRecord(
                "bad_shape",
                f"{key} has shape {tuple(arr.shape)}; {self.name}'s processor gives "
                f"{want.shape_text()}",
            )
        return t

    # --- the whole dataset --------------------------------------------------------------------
    def check_dataset(self, dataset: Dataset, what: str | None = None) -> None:
        """Before the first batch: stop with a ProcessedDataError if the dataset was made for
        another model (columns, manifest, first rows); warn if a VLM gets no pixels."""
        what = what or dataset.description
        pixels = self.pixel_key
        cols = set(dataset.column_names)
        known = set(PROCESSED_COLUMNS) - {"labels"}
        made = sorted(self.keys)
        extra = (cols & known) - set(self.keys)
        ignored = sorted(extra & set(TOKEN_KEYS))  # e.g. a tokenizer's token_type_ids
        if ignored:
            warnings.warn(
                f"{what} has columns {ignored}, which {self.name}'s processor does not make: "
                "they are not passed to the model",
                category=VlmscopeWarning,
                stacklevel=2,
            )
        foreign = sorted(extra - set(TOKEN_KEYS))  # another family's image layout
        if foreign:
            raise ProcessedDataError(
                f"{what} has columns {foreign}, which {self.name}'s processor does not make "
                f"(it makes {made}): processed for another model? Process the raw data for "
                f"this one with `vlmscope data process {self.name} DATASET --out DIR`"
            )
        if pixels in cols and not self.has_vision:
            raise ProcessedDataError(
                f"{what} has {pixels} but {self.name} reads no images (a text-only "
                "model): processed for another model?"
            )
        missing = sorted(set(self.image_keys) - cols) if pixels in cols else []
        if missing:
            raise ProcessedDataError(
                f"{what} lacks columns {missing}, which {self.name}'s processor makes with "
                f"{pixels} (it makes {made}): processed for another model?"
            )
        if self.has_vision and pixels not in cols:
            warnings.warn(
                f"{what} has no {pixels} column: {self.name} is a vision-language model, "
                "but this dataset trains it on text only",
                category=VlmscopeWarning,
                stacklevel=2,
            )
        manifest = find_manifest(dataset)
        if manifest is not None and manifest.get("fingerprint") not in {None, *self._accepted}:
            raise ProcessedDataError(
                f"{what} was processed for {manifest.get('model')!r} ({manifest.get('family')}), "
                f"whose tokenizer or processor differ from {self.name!r}'s ({self.family}); "
                f"process the raw data again with `vlmscope data process {self.name} DATASET "
                "--out DIR`"
            )
        self._check_first_rows(dataset, what)

    def _check_first_rows(self, dataset: Dataset, what: str) -> None:
        view = dataset.skip(0)
        view.on_bad_record, view.log_first, view.strict = None, 0, False
        reasons: dict[str, str] = {}
        tried = 0
        for record in itertools.islice(view, PREFLIGHT_ROWS):
            tried += 1
            try:
                self.sample(record)
                return
            except SkipRecord as e:
                reasons.setdefault(e.reason, f"{record.row_id}: {e.detail}")
        if tried:
            listed = "; ".join(f"{r} ({d})" for r, d in reasons.items())
            raise ProcessedDataError(
                f"none of the first {tried} rows of {what} fits {self.name}: {listed}; "
                "processed for another model?"
            )


def find_manifest(dataset: Dataset) -> dict[str, Any] | None:
    """The processed.json in a local dataset's folder, if any (a broken one counts as none)."""
    path = Path(dataset.description)
    manifest = (path if path.is_dir() else path.parent) / MANIFEST
    try:
        data = json.loads(manifest.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _answer_length(labels: torch.Tensor | None) -> int:
    """Tokens at the end whose label is not -100: the answer a processed row marks."""
    if labels is None:
        return 0
    unmarked = (labels[0] == -100).nonzero()
    return int(labels.shape[1]) - 1 - int(unmarked.max()) if len(unmarked) else int(labels.shape[1])


# --- probing the processor ---------------------------------------------------------------------
#: (height, width) of the one-image probes: square, landscape, portrait (a processor that keeps
#: aspect ratios varies both sides); one more probe holds the first two images
_PROBE_SIZES = ((64, 64), (40, 112), (112, 40))


def _probe(
    vlm: HookedVLM, image_ids: tuple[int, ...], vision: bool
) -> tuple[dict[str, KeySpec], dict[str, KeySpec], dict[str, KeySpec]]:
    """(text keys, image keys, image keys as probed before 2026-12-02) of the model's
    processor, from probe records; an image key's fixed dimensions are those equal in every
    image probe (dimension 0 is never fixed; Mllama's images per sample vary with two images,
    Pixtral's width with a portrait). Before, two probes decided (the third value)."""
    encoder = SampleEncoder(vlm.processor, 1 << 30, image_ids)

    def run(images: list[Image.Image]) -> Mapping[str, torch.Tensor]:
        content: list[dict[str, Any]] = [{"type": "image"} for _ in images]
        content.append({"type": "text", "text": "a"})
        messages = [
            {"role": "user", "content": content},
            {"role": "assistant", "content": [{"type": "text", "text": "b"}]},
        ]
        return encoder.encode(Record("probe", messages=messages, images=images)).tensors

    pictures = [Image.new("RGB", (w, h), (120, 90, 60)) for h, w in _PROBE_SIZES]
    probes = [run([p]) for p in pictures] if vision else [{}, {}]
    if vision:
        with contextlib.suppress(SkipRecord):  # a processor that takes one image per prompt
            probes.append(run(pictures[:2]))
    a = probes[0]
    try:
        text = {k: KeySpec(v.dim(), v.dtype) for k, v in run([]).items()}
    except SkipRecord:  # a processor that needs an image (PaliGemma): its per-token keys
        text = {k: KeySpec(v.dim(), v.dtype) for k, v in a.items() if k in TOKEN_KEYS}

    def keys(others: list[Mapping[str, torch.Tensor]]) -> dict[str, KeySpec]:
        image: dict[str, KeySpec] = {}
        for k, v in a.items():
            if k in text:
                continue
            same = [o[k] for o in others if k in o and o[k].dim() == v.dim()]
            fixed = {d - v.dim(): int(v.shape[d]) for d in range(1, v.dim())
                     if same and all(o.shape[d] == v.shape[d] for o in same)}  # fmt: skip
            image[k] = KeySpec(v.dim(), v.dtype, fixed if k in vlm.adapter.pixel_keys else {})
        return image

    return text, keys(probes[1:]), keys(probes[1:2])


def _fingerprint(tokenizer: Any, keys: Mapping[str, KeySpec], image_ids: tuple[int, ...]) -> str:
    """Hash of what makes processed rows valid for a model: its vocabulary, image tokens and
    the processor's keys, ranks, dtypes and pixel dimensions."""
    vocab = sorted(tokenizer.get_vocab().items()) if tokenizer is not None else []
    layout = {k: [s.rank, str(s.dtype), sorted(s.fixed.items())] for k, s in sorted(keys.items())}
    blob = json.dumps([vocab, list(image_ids), layout], sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
