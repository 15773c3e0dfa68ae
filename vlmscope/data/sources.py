"""Dataset readers: Parquet, JSON/JSONL, `datasets` save_to_disk folders, hub names -> Records.

Every reader streams (Parquet one row group at a time, Arrow batches from a memory map, JSON
line by line or element by element), so a dataset larger than memory reads in flat memory.
Rows are normalised into `Record`s in chat format; a row that cannot become a valid Record is a
*bad record*: by default it is skipped, counted by reason in `Dataset.stats`, the first few are
logged with their row id, and a summary is logged when a pass ends. `strict=True` raises
`BadRecordError` at the first one instead.

Bad-record reasons (the fixed set `REASONS`, also available as `Reason.<NAME>`):

- ``malformed_json``: a JSONL line or JSON-list element that does not parse. In a JSON list the
  parser cannot resynchronise, so the rest of that file is lost (counted once).
- ``missing_column``: a field the schema needs is absent or null (e.g. no ``conversations``).
- ``bad_value``: a field has the wrong type or shape (messages not a list, unknown role, unknown
  content part type, image item of an unknown kind, a JSON line that is not an object).
- ``empty_text``: a plain-text record whose text is empty or whitespace.
- ``empty_conversation``: a conversation with no turns or without any non-empty text.
- ``image_count_mismatch``: number of image placeholders (``<image>`` or ``{"type": "image"}``)
  differs from the number of images, or of ``{"type": "video"}`` parts from the videos.
- ``missing_image``: an image path that does not exist (or a null image / remote URL).
- ``corrupt_image``: bytes PIL cannot identify or fully decode (garbage, truncated).
- ``empty_image``: an image of 0 pixels, or an empty (0-byte) file / payload.
- ``image_too_large``: more pixels than ``max_image_pixels`` (checked from the header before
  decoding) or rejected by PIL as a decompression bomb.
- ``image_outside_root``: an image path that leads outside the image root (``../x.png``, an
  absolute path elsewhere, a symbolic link out of it). Refused before the file is touched, with
  the same message whether or not it exists, so an untrusted dataset cannot probe the disk;
  ``allow_outside_image_root=True`` (``--allow-outside-image-root``) reads such paths.

A file without a single valid row (empty, blank, every line malformed or not UTF-8) is an
error that says so when the dataset is opened, not a pass that yields nothing.
"""

from __future__ import annotations

import contextlib
import copy
import io
import itertools
import json
import logging
import os
import re
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, Protocol, TextIO

from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

logger = logging.getLogger("vlmscope.data")

SchemaName = Literal["auto", "llava", "chat", "processed", "text"]
SCHEMAS: tuple[str, ...] = ("llava", "chat", "processed", "text")

#: Columns of the `processed` schema: a model processor's outputs, one row per sample, plus
#: `labels` (-100 outside the answer) when the dataset marks the answer.
PROCESSED_COLUMNS: tuple[str, ...] = (
    "input_ids",
    "attention_mask",
    "token_type_ids",
    "mm_token_type_ids",
    "pixel_values",
    "image_pixel_values",
    "image_attention_mask",
    "pixel_attention_mask",
    "image_grid_thw",
    "image_sizes",
    "batch_num_images",
    "aspect_ratio_ids",
    "aspect_ratio_mask",
    "cross_attention_mask",
    "labels",
)
#: Processed columns that hold images' pixels (Phi-4-multimodal names its own).
PIXEL_COLUMNS: tuple[str, ...] = ("pixel_values", "image_pixel_values")
DEFAULT_MAX_IMAGE_PIXELS = 64 * 1024 * 1024
"""Default pixel limit per image (64 Mpx): larger images are rejected before decoding."""

IMAGE_TOKEN = "<image>"
ROLES = ("user", "assistant", "system")
_LLAVA_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "model": "assistant",
    "system": "system",
}
_KNOWN_SPLITS = ("train", "test", "validation", "valid", "val", "dev", "eval")


class Reason:
    """The bad-record reasons (plain strings so they work as dict keys and in JSON)."""

    MALFORMED_JSON = "malformed_json"
    MISSING_COLUMN = "missing_column"
    BAD_VALUE = "bad_value"
    EMPTY_TEXT = "empty_text"
    EMPTY_CONVERSATION = "empty_conversation"
    IMAGE_COUNT_MISMATCH = "image_count_mismatch"
    MISSING_IMAGE = "missing_image"
    CORRUPT_IMAGE = "corrupt_image"
    EMPTY_IMAGE = "empty_image"
    IMAGE_TOO_LARGE = "image_too_large"
    IMAGE_OUTSIDE_ROOT = "image_outside_root"


REASONS: tuple[str, ...] = tuple(v for k, v in vars(Reason).items() if k.isupper())


@dataclass
class Record:
    """One normalised example.

    Chat records have ``messages`` (roles user/assistant/system; content a str, or a list of
    ``{"type": "text", "text": ...}`` / ``{"type": "image"}`` / ``{"type": "video"}`` parts),
    ``images`` in the order of the image parts, ``videos`` (each a list of frames) in the order
    of the video parts, and ``text == ""``; plain-text records have ``text`` and no messages.
    LLaVA records with images use list content in every turn; text-only ones use str content.
    ``position`` is the row's index in the whole dataset (bad rows included): resume a run with
    ``skip(position + 1)``. ``source_id`` is the row's own id column, if any. Processed records
    (schema ``processed``) carry the processor's outputs in ``tensors``, as stored (nested
    lists or numpy arrays), and nothing else; the model's check turns them into tensors.
    """

    row_id: str
    messages: list[dict[str, Any]] = field(default_factory=list)
    images: list[Image.Image] = field(default_factory=list)
    videos: list[list[Image.Image]] = field(default_factory=list)
    text: str = ""
    position: int = 0
    source_id: str | None = None
    tensors: dict[str, Any] = field(default_factory=dict)

    @property
    def is_text(self) -> bool:
        """True for a plain-text record (no chat structure, not processed)."""
        return not self.messages and not self.tensors

    def pictures(self) -> list[tuple[Image.Image, bool]]:
        """(picture, is a video) per image or video, in the order of their parts (the order in
        which the masks number them): an image itself, a video's first frame."""
        images, videos = iter(self.images), iter(self.videos)
        out = []
        for msg in self.messages:
            content = msg.get("content")
            for part in content if isinstance(content, list) else []:
                if part.get("type") == "image":
                    out.append((next(images), False))
                elif part.get("type") == "video":
                    out.append((next(videos)[0], True))
        return out


@dataclass(frozen=True)
class ColumnMap:
    """Column (field) names of the source data, per schema, so any naming can be read."""

    messages: str = "messages"
    images: str = "images"
    videos: str = "videos"
    text: str = "text"
    id: str = "id"
    conversations: str = "conversations"
    image: str = "image"

    def wanted(self, schema: str) -> list[str]:
        """Columns a schema reads; Parquet/Arrow readers fetch only these."""
        return {
            "llava": [self.id, self.conversations, self.image],
            "chat": [self.id, self.messages, self.images, self.videos],
            "text": [self.id, self.text],
            "processed": [self.id, *PROCESSED_COLUMNS],
        }[schema]

    def required(self, schema: str) -> str:
        """The column without which no row of this schema can be valid."""
        return {
            "llava": self.conversations,
            "chat": self.messages,
            "text": self.text,
            "processed": "input_ids",
        }[schema]


def _column_key(cm: ColumnMap, name: str) -> str:
    """The ColumnMap field that holds column `name` (for error messages)."""
    return next(f.name for f in fields(cm) if getattr(cm, f.name) == name)


@dataclass(frozen=True)
class BadRecord:
    """One skipped row: where it is and why it was skipped."""

    row_id: str
    reason: str
    detail: str
    position: int


class BadRecordError(ValueError):
    """Raised in strict mode at the first bad record."""

    def __init__(self, bad: BadRecord) -> None:
        super().__init__(f"bad record {bad.row_id}: {bad.reason} ({bad.detail})")
        self.row_id = bad.row_id
        self.reason = bad.reason
        self.detail = bad.detail
        self.position = bad.position


@dataclass
class BadRecordStats:
    """Bad rows of the latest pass, by reason, with the first few row ids of each as examples."""

    max_examples: int = 5
    counts: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[str]] = field(default_factory=dict)
    rows: int = 0

    @property
    def bad(self) -> int:
        """Number of bad rows seen."""
        return sum(self.counts.values())

    @property
    def good(self) -> int:
        """Number of rows that became Records."""
        return self.rows - self.bad

    def add(self, reason: str, row_id: str) -> None:
        """Count one bad row."""
        self.counts[reason] = self.counts.get(reason, 0) + 1
        ex = self.examples.setdefault(reason, [])
        if len(ex) < self.max_examples:
            ex.append(row_id)

    def reset(self) -> None:
        """Forget everything (a new pass starts)."""
        self.counts.clear()
        self.examples.clear()
        self.rows = 0

    def summary(self) -> str:
        """One line per reason, worst first, e.g. for the end-of-run log."""
        head = f"{self.rows} rows read: {self.good} good, {self.bad} bad"
        lines = [head]
        for reason, n in sorted(self.counts.items(), key=lambda kv: (-kv[1], kv[0])):
            lines.append(f"  {reason}: {n} (e.g. {', '.join(self.examples.get(reason, []))})")
        return "\n".join(lines)


class _Bad(Exception):
    """Internal: a row cannot become a Record."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class _Malformed:
    """Internal: a raw row that is not a record at all (does not parse, or is not an object)."""

    detail: str
    reason: str = Reason.MALFORMED_JSON


Row = dict[str, Any] | _Malformed
BatchHook = Callable[[int], None]


# --------------------------------------------------------------------------------------------
# Images


def to_rgb(image: Image.Image) -> Image.Image:
    """`image` in RGB; transparency composited onto white, as transformers' image processors
    convert an RGBA image they are given (`vlm.prepare` with a PIL image), so a picture read
    from a dataset or a file gives the pixels the same picture passed in memory gives. A plain
    convert("RGB") drops the alpha and keeps whatever colour lies under it (often black)."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


class _ImageLoader:
    """Turns any image item (path, bytes, HF Image struct, PIL image) into a verified image."""

    def __init__(
        self, base: Path | None, max_pixels: int, mode: str | None, confine: bool = True
    ) -> None:
        self.base = base
        self.max_pixels = max_pixels
        self.mode = mode
        self.confine = confine

    def load(self, item: Any) -> Image.Image:
        if item is None:
            raise _Bad(Reason.MISSING_IMAGE, "image is null")
        if isinstance(item, Image.Image):
            return self._finish(item, "PIL image")
        if isinstance(item, dict):
            data, path = item.get("bytes"), item.get("path")
            if data:
                return self._from_bytes(data)
            if path:
                return self._from_path(path)
            if data is not None:
                raise _Bad(Reason.EMPTY_IMAGE, "image bytes are empty")
            raise _Bad(Reason.MISSING_IMAGE, "image struct has neither bytes nor path")
        if isinstance(item, bytes | bytearray | memoryview):
            return self._from_bytes(bytes(item))
        if isinstance(item, str | os.PathLike):
            return self._from_path(item)
        raise _Bad(Reason.BAD_VALUE, f"image item of type {type(item).__name__}")

    def _from_path(self, path: str | os.PathLike[str]) -> Image.Image:
        text = os.fspath(path)
        if text.startswith(("http://", "https://")):
            raise _Bad(Reason.MISSING_IMAGE, f"remote image URL not fetched: {text}")
        p = Path(text).expanduser()
        if not p.is_absolute() and self.base is not None:
            p = self.base / p
        if self.confine:
            p = self._inside_root(p, text)
        if not p.is_file():
            raise _Bad(Reason.MISSING_IMAGE, f"no such file: {p}")
        if p.stat().st_size == 0:
            raise _Bad(Reason.EMPTY_IMAGE, f"empty file: {p}")
        return self._decode(p, str(p))

    def _inside_root(self, p: Path, given: str) -> Path:
        """`p` with every link resolved, if that stays inside the root; else a bad record.

        Only the path's components are resolved (no file is opened), and the message is the
        same whether or not the target exists."""
        root = os.path.realpath(self.base if self.base is not None else Path.cwd())
        real = os.path.realpath(p)
        if os.path.commonpath([root, real]) != root:
            raise _Bad(
                Reason.IMAGE_OUTSIDE_ROOT,
                f"image path {given!r} leads outside the image root {root}; pass "
                "--allow-outside-image-root (allow_outside_image_root=True) to read it",
            )
        return Path(real)

    def _from_bytes(self, data: bytes) -> Image.Image:
        if not data:
            raise _Bad(Reason.EMPTY_IMAGE, "image bytes are empty")
        return self._decode(io.BytesIO(data), f"{len(data)} bytes")

    def _decode(self, source: Path | io.BytesIO, what: str) -> Image.Image:
        # We enforce our own pixel limit from the header, so PIL's warning (which fires only
        # when the user set max_pixels above PIL's) is noise; PIL's hard error still counts.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            try:
                im = Image.open(source)
            except Image.DecompressionBombError as e:
                raise _Bad(Reason.IMAGE_TOO_LARGE, f"{what}: {e}") from None
            except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
                raise _Bad(Reason.CORRUPT_IMAGE, f"{what}: {e}") from None
            with im:
                return self._finish(im, what)

    def _finish(self, im: Image.Image, what: str) -> Image.Image:
        w, h = im.size
        if w * h == 0:
            raise _Bad(Reason.EMPTY_IMAGE, f"{what}: size {w}x{h}")
        if w * h > self.max_pixels:
            raise _Bad(Reason.IMAGE_TOO_LARGE, f"{what}: {w}x{h} > {self.max_pixels} pixels")
        try:
            im.load()  # full decode: truncated or broken data fails here, not in the model
            # upright as a viewer shows it, as transformers' own image loading turns it
            upright = ImageOps.exif_transpose(im)
            if self.mode == "RGB" and upright.mode != "RGB":
                return to_rgb(upright)
            if self.mode and upright.mode != self.mode:
                return upright.convert(self.mode)
            return upright if upright is not im else im.copy()
        except Exception as e:  # decoders raise many types on hostile data
            raise _Bad(Reason.CORRUPT_IMAGE, f"{what}: {type(e).__name__}: {e}") from None


# --------------------------------------------------------------------------------------------
# Row -> Record


def _as_list(value: Any) -> Any:
    """JSON-encoded lists (some datasets store messages as a string) become lists."""
    if isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value


def _source_id(row: dict[str, Any], cm: ColumnMap) -> str | None:
    value = row.get(cm.id)
    return None if value is None else str(value)


def _split_image_tokens(value: str) -> list[dict[str, Any]]:
    """LLaVA text with ``<image>`` markers -> parts; the marker and its adjacent newline go."""
    pieces = value.split(IMAGE_TOKEN)
    parts: list[dict[str, Any]] = []
    for i, piece in enumerate(pieces):
        if i > 0:
            parts.append({"type": "image"})
            piece = piece.removeprefix("\n")
        if i < len(pieces) - 1:
            piece = piece.removesuffix("\n")
        if piece:
            parts.append({"type": "text", "text": piece})
    return parts


def _image_items(value: Any) -> list[Any]:
    """An image column value -> list of items (a single item is wrapped; null is none)."""
    if value is None:
        return []
    if isinstance(value, list | tuple):
        return list(value)
    return [value]


def _column_hint(row: dict[str, Any], column: str, key: str) -> str:
    """For a row with image placeholders but no images: if it lacks the image column, the
    likelier cause is that its images are under another name; say which names it has."""
    if column in row:
        return ""
    return (
        f"; the row has no {column!r} column (it has {sorted(row)[:8]}): name yours with "
        f"--columns {key}=NAME"
    )


def _llava_record(row: dict[str, Any], cm: ColumnMap, loader: _ImageLoader) -> Record:
    conv = _as_list(row.get(cm.conversations))
    if conv is None:
        raise _Bad(Reason.MISSING_COLUMN, f"no {cm.conversations!r}")
    if not isinstance(conv, list):
        raise _Bad(Reason.BAD_VALUE, f"{cm.conversations!r} is {type(conv).__name__}, not a list")
    if not conv:
        raise _Bad(Reason.EMPTY_CONVERSATION, "no turns")
    items = _image_items(row.get(cm.image))
    turns: list[tuple[str, str]] = []
    for i, turn in enumerate(conv):
        if not isinstance(turn, dict):
            raise _Bad(Reason.BAD_VALUE, f"turn {i} is {type(turn).__name__}, not an object")
        who = turn.get("from", turn.get("role"))
        value = turn.get("value", turn.get("content"))
        if who not in _LLAVA_ROLES:
            raise _Bad(Reason.BAD_VALUE, f"turn {i}: unknown speaker {who!r}")
        if not isinstance(value, str):
            raise _Bad(Reason.BAD_VALUE, f"turn {i}: value is {type(value).__name__}, not str")
        turns.append((_LLAVA_ROLES[who], value))
    if not any(v.replace(IMAGE_TOKEN, "").strip() for _, v in turns):
        raise _Bad(Reason.EMPTY_CONVERSATION, "no text in any turn")
    n_tokens = sum(v.count(IMAGE_TOKEN) for _, v in turns)
    if n_tokens != len(items):
        hint = _column_hint(row, cm.image, "image")
        raise _Bad(
            Reason.IMAGE_COUNT_MISMATCH, f"{n_tokens} <image> tokens, {len(items)} images{hint}"
        )
    if items:
        messages = [{"role": r, "content": _split_image_tokens(v)} for r, v in turns]
    else:
        messages = [{"role": r, "content": v} for r, v in turns]
    images = [loader.load(item) for item in items]
    return Record(row_id="", messages=messages, images=images, source_id=_source_id(row, cm))


def _clean_part(part: Any, i: int, j: int) -> tuple[dict[str, Any], Any]:
    """One content part -> (part without null fields, inline image source or None; for a
    video part, its inline list of frames or None)."""
    if not isinstance(part, dict):
        raise _Bad(Reason.BAD_VALUE, f"message {i} part {j} is {type(part).__name__}")
    kind = part.get("type")
    if kind == "text":
        if not isinstance(part.get("text"), str):
            raise _Bad(Reason.BAD_VALUE, f"message {i} part {j}: text part without str text")
        return {k: v for k, v in part.items() if v is not None}, None
    if kind == "image":
        # Arrow structs give every part every field (null where unused); drop those, and lift
        # an inline image source ({"type": "image", "image"|"path"|"url": ...}) out of the part.
        keys = ("image", "path", "url")
        inline = next((part[k] for k in keys if part.get(k) is not None), None)
        clean = {k: v for k, v in part.items() if v is not None and k not in keys}
        return clean, inline
    if kind == "video":
        keys = ("video", "frames", "path", "url")
        inline = next((part[k] for k in keys if part.get(k) is not None), None)
        if inline is not None and not isinstance(inline, list | tuple):
            raise _Bad(
                Reason.BAD_VALUE,
                f"message {i} part {j}: a video as {type(inline).__name__}; give its frames "
                "as a list of images (video files are not decoded here)",
            )
        return {k: v for k, v in part.items() if v is not None and k not in keys}, inline
    raise _Bad(Reason.BAD_VALUE, f"message {i} part {j}: unsupported part type {kind!r}")


def _chat_record(row: dict[str, Any], cm: ColumnMap, loader: _ImageLoader) -> Record:
    raw = _as_list(row.get(cm.messages))
    if raw is None:
        raise _Bad(Reason.MISSING_COLUMN, f"no {cm.messages!r}")
    if not isinstance(raw, list):
        raise _Bad(Reason.BAD_VALUE, f"{cm.messages!r} is {type(raw).__name__}, not a list")
    if not raw:
        raise _Bad(Reason.EMPTY_CONVERSATION, "no messages")
    messages: list[dict[str, Any]] = []
    inline: list[Any] = []
    inline_videos: list[Any] = []
    n_parts = n_video_parts = 0
    has_text = False
    for i, msg in enumerate(raw):
        if not isinstance(msg, dict):
            raise _Bad(Reason.BAD_VALUE, f"message {i} is {type(msg).__name__}, not an object")
        role, content = msg.get("role"), msg.get("content")
        if role not in ROLES:
            raise _Bad(Reason.BAD_VALUE, f"message {i}: unknown role {role!r}")
        if isinstance(content, str):
            has_text = has_text or bool(content.strip())
            messages.append({"role": role, "content": content})
            continue
        if not isinstance(content, list):
            raise _Bad(Reason.BAD_VALUE, f"message {i}: content is {type(content).__name__}")
        parts = []
        for j, part in enumerate(content):
            clean, src = _clean_part(part, i, j)
            if clean["type"] == "image":
                n_parts += 1
                if src is not None:
                    inline.append(src)
            elif clean["type"] == "video":
                n_video_parts += 1
                if src is not None:
                    inline_videos.append(src)
            else:
                has_text = has_text or bool(clean["text"].strip())
            parts.append(clean)
        messages.append({"role": role, "content": parts})
    if not has_text:
        raise _Bad(Reason.EMPTY_CONVERSATION, "no text in any message")
    items = _image_items(row.get(cm.images))
    if not items and inline and len(inline) == n_parts:
        items = inline
    if n_parts != len(items):
        hint = _column_hint(row, cm.images, "images") if not inline else ""
        raise _Bad(Reason.IMAGE_COUNT_MISMATCH, f"{n_parts} image parts, {len(items)} images{hint}")
    videos = _image_items(row.get(cm.videos))
    if not videos and inline_videos and len(inline_videos) == n_video_parts:
        videos = inline_videos
    if n_video_parts != len(videos):
        hint = _column_hint(row, cm.videos, "videos") if not inline_videos else ""
        raise _Bad(
            Reason.IMAGE_COUNT_MISMATCH,
            f"{n_video_parts} video parts, {len(videos)} videos{hint}",
        )
    for v, frames in enumerate(videos):
        if not isinstance(frames, list | tuple) or not frames:
            raise _Bad(Reason.BAD_VALUE, f"video {v} is not a non-empty list of frames")
    images = [loader.load(item) for item in items]
    return Record(
        row_id="",
        messages=messages,
        images=images,
        videos=[[loader.load(f) for f in frames] for frames in videos],
        source_id=_source_id(row, cm),
    )


def _text_record(row: dict[str, Any], cm: ColumnMap, loader: _ImageLoader) -> Record:
    text = row.get(cm.text)
    if text is None:
        raise _Bad(Reason.MISSING_COLUMN, f"no {cm.text!r}")
    if not isinstance(text, str):
        raise _Bad(Reason.BAD_VALUE, f"{cm.text!r} is {type(text).__name__}, not str")
    if not text.strip():
        raise _Bad(Reason.EMPTY_TEXT, "text is empty")
    return Record(row_id="", text=text, source_id=_source_id(row, cm))


def _processed_record(row: dict[str, Any], cm: ColumnMap, loader: _ImageLoader) -> Record:
    if row.get("input_ids") is None:
        raise _Bad(Reason.MISSING_COLUMN, "no 'input_ids'")
    tensors = {k: v for k, v in row.items() if k in PROCESSED_COLUMNS and v is not None}
    return Record(row_id="", tensors=tensors, source_id=_source_id(row, cm))


_CONVERTERS: dict[str, Callable[[dict[str, Any], ColumnMap, _ImageLoader], Record]] = {
    "llava": _llava_record,
    "chat": _chat_record,
    "text": _text_record,
    "processed": _processed_record,
}


def detect_schema(columns: set[str] | list[str], cm: ColumnMap | None = None) -> str:
    """Schema from column names: input_ids with pixel_values -> processed (what a processor
    wrote, whatever raw columns were kept beside it), conversations -> llava, messages ->
    chat, input_ids -> processed (tokenized text), text -> text."""
    cm = cm or ColumnMap()
    cols = set(columns)
    if "input_ids" in cols and cols & set(PIXEL_COLUMNS):
        return "processed"
    order = (("llava", cm.conversations), ("chat", cm.messages), ("processed", "input_ids"))
    for schema, col in (*order, ("text", cm.text)):
        if col in cols:
            return schema
    raise ValueError(
        f"cannot detect the schema from columns {sorted(cols)}: expected {cm.conversations!r} "
        f"(llava), {cm.messages!r} (chat), 'input_ids' (processed, with 'pixel_values' for "
        f"images) or {cm.text!r} (text); map other names with columns=ColumnMap(...) (on the "
        "command line: --columns messages=NAME ...)"
    )


# --------------------------------------------------------------------------------------------
# Sources: one per file (or one for a hub dataset), streaming raw rows


class _Source(Protocol):
    name: str

    def cheap_num_rows(self) -> int | None: ...
    def count_rows(self) -> int: ...
    def columns(self) -> set[str]: ...
    def rows(self, skip: int, columns: list[str], on_batch: BatchHook | None) -> Iterator[Row]: ...


def _emit(batch: Any, batch_rows: int, on_batch: BatchHook | None) -> Iterator[Row]:
    """Arrow batch -> Python dicts, at most batch_rows at a time (bounds Python memory).

    Columns of nested lists of numbers (a processed dataset's tensors) arrive as numpy arrays,
    one per row, without a Python object per number."""
    numeric = [
        n for n, f in zip(batch.schema.names, batch.schema, strict=True) if _is_tensor(f.type)
    ]
    for off in range(0, batch.num_rows, batch_rows):
        part = batch.slice(off, batch_rows)
        if numeric:
            arrays = {n: [_to_numpy(v) for v in part.column(n)] for n in numeric}
            rows = part.drop_columns(numeric).to_pylist()
            for i, row in enumerate(rows):
                row.update({n: arrays[n][i] for n in numeric})
        else:
            rows = part.to_pylist()
        if on_batch is not None:
            on_batch(len(rows))
        yield from rows


def _storage(t: Any) -> Any:
    """An extension type's storage (`datasets` ArrayXD columns), else the type itself."""
    return getattr(t, "storage_type", t)


def _is_list(t: Any) -> bool:
    import pyarrow as pa

    return pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)


def _is_tensor(t: Any) -> bool:
    """A (nested) list of numbers or booleans."""
    import pyarrow as pa

    t = _storage(t)
    if not _is_list(t):
        return False
    while _is_list(t):
        t = _storage(t.value_type)
    return pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t)


def _to_numpy(value: Any) -> Any:
    """One row's nested list scalar -> numpy array of its shape; None for null; a ragged or
    partly null nesting -> the Python lists, for the check to reject."""
    import numpy as np

    if not value.is_valid:
        return None
    if hasattr(value, "storage"):  # extension scalar
        value = value.storage
    arr, shape = value.values, []
    shape.append(len(arr))
    while _is_list(_storage(arr.type)):
        if hasattr(arr, "storage"):
            arr = arr.storage
        lengths = arr.value_lengths()
        if arr.null_count or (
            len(lengths) and lengths.to_numpy().min() != lengths.to_numpy().max()
        ):
            return value.as_py()
        shape.append(int(lengths[0].as_py()) if len(lengths) else 0)
        arr = arr.flatten()
    if hasattr(arr, "storage"):
        arr = arr.storage
    if arr.null_count:
        return value.as_py()
    flat = arr.to_numpy(zero_copy_only=False)
    return np.asarray(flat).reshape(shape)


class _ParquetSource:
    """A Parquet file read one row group at a time (skips whole row groups from metadata)."""

    def __init__(self, path: Path, name: str, batch_rows: int) -> None:
        self.path, self.name, self.batch_rows = path, name, batch_rows
        self._num_rows: int | None = None

    def cheap_num_rows(self) -> int:
        import pyarrow.parquet as pq

        if self._num_rows is None:
            self._num_rows = pq.read_metadata(self.path).num_rows  # footer only
        return self._num_rows

    def count_rows(self) -> int:
        return self.cheap_num_rows()

    def columns(self) -> set[str]:
        import pyarrow.parquet as pq

        return set(pq.read_schema(self.path).names)

    def rows(self, skip: int, columns: list[str], on_batch: BatchHook | None) -> Iterator[Row]:
        import pyarrow.parquet as pq

        with pq.ParquetFile(self.path) as pf:
            cols = [c for c in dict.fromkeys(columns) if c in pf.schema_arrow.names]
            for rg in range(pf.num_row_groups):
                n = pf.metadata.row_group(rg).num_rows
                if skip >= n:
                    skip -= n
                    continue
                # One row group per call: pyarrow's multi-group readahead buffers many groups.
                for batch in pf.iter_batches(
                    batch_size=self.batch_rows, row_groups=[rg], columns=cols, use_threads=False
                ):
                    if skip >= batch.num_rows:
                        skip -= batch.num_rows
                        continue
                    yield from _emit(batch.slice(skip), self.batch_rows, on_batch)
                    skip = 0


class _ArrowSource:
    """An Arrow IPC file (stream format as `datasets` writes it; file format also accepted)."""

    def __init__(self, path: Path, name: str, batch_rows: int) -> None:
        self.path, self.name, self.batch_rows = path, name, batch_rows
        self._num_rows: int | None = None

    def _batches(self) -> Iterator[Any]:
        import pyarrow as pa

        with pa.memory_map(str(self.path)) as src:
            try:
                reader = pa.ipc.open_stream(src)
            except pa.ArrowInvalid:
                src.seek(0)
                f = pa.ipc.open_file(src)
                for i in range(f.num_record_batches):
                    yield f.get_batch(i)
                return
            yield from reader

    def cheap_num_rows(self) -> int:
        # Batches come zero-copy from the memory map, so counting only touches batch headers.
        if self._num_rows is None:
            self._num_rows = sum(b.num_rows for b in self._batches())
        return self._num_rows

    def count_rows(self) -> int:
        return self.cheap_num_rows()

    def columns(self) -> set[str]:
        import pyarrow as pa

        with pa.memory_map(str(self.path)) as src:
            try:
                return set(pa.ipc.open_stream(src).schema.names)
            except pa.ArrowInvalid:
                src.seek(0)
                return set(pa.ipc.open_file(src).schema.names)

    def rows(self, skip: int, columns: list[str], on_batch: BatchHook | None) -> Iterator[Row]:
        for batch in self._batches():
            if skip >= batch.num_rows:
                skip -= batch.num_rows
                continue
            names = batch.schema.names
            batch = batch.select([c for c in dict.fromkeys(columns) if c in names])
            yield from _emit(batch.slice(skip), self.batch_rows, on_batch)
            skip = 0


def _not_object(obj: Any) -> _Malformed:
    kind = {list: "list", str: "string", int: "number", float: "number", bool: "boolean"}.get(
        type(obj), "null"
    )
    return _Malformed(f"a JSON {kind}, not an object", Reason.BAD_VALUE)


def _parse_line(line: bytes, lineno: int) -> Row:
    try:
        obj = json.loads(line)
    except UnicodeDecodeError as e:
        return _Malformed(f"line {lineno}: not UTF-8 ({e.reason} at byte {e.start})")
    except ValueError as e:
        return _Malformed(f"line {lineno}: {e}")
    if isinstance(obj, dict):
        return obj
    bad = _not_object(obj)
    return _Malformed(f"line {lineno}: {bad.detail}", bad.reason)


#: rows searched for a first valid one before a JSON file is declared to have none.
_SCAN_ROWS = 10_000


def _json_columns(rows: Iterator[Row]) -> set[str]:
    """Keys of the first 100 valid rows, searching up to _SCAN_ROWS rows for the first."""
    keys: set[str] = set()
    valid = 0
    for i, row in enumerate(rows):
        if isinstance(row, dict):
            keys.update(row)
            valid += 1
        if valid >= 100 or (i >= _SCAN_ROWS and not valid):
            break
    return keys


def _why_no_rows(path: Path, name: str, rows: Iterator[Row]) -> str:
    """Why a JSON file gave no columns: it is empty, or its first rows all are malformed."""
    with open(path, "rb") as f:
        if not any(line.strip() for line in f):
            return f"{name} is empty (no rows)"
    n, details = 0, []
    for row in itertools.islice(rows, _SCAN_ROWS):
        n += 1
        if isinstance(row, _Malformed) and len(details) < 3:
            details.append(row.detail)
    if n == 0:
        return f"{name} is empty (no rows)"
    first = f"{n} row{'s' * (n > 1)}" if n < _SCAN_ROWS else f"the first {n} rows"
    return f"{name} has no valid rows: {first}, none a JSON object ({'; '.join(details)})"


class _JsonlSource:
    """JSON Lines, read line by line; blank lines are not rows."""

    def __init__(self, path: Path, name: str) -> None:
        self.path, self.name = path, name
        self._num_rows: int | None = None

    def cheap_num_rows(self) -> None:
        return self._num_rows  # known only after a count (a full scan)

    def count_rows(self) -> int:
        if self._num_rows is None:
            with open(self.path, "rb") as f:
                self._num_rows = sum(1 for line in f if line.strip())
        return self._num_rows

    def columns(self) -> set[str]:
        return _json_columns(self.rows(0, [], None))

    def why_no_rows(self) -> str:
        return _why_no_rows(self.path, self.name, self.rows(0, [], None))

    def rows(self, skip: int, columns: list[str], on_batch: BatchHook | None) -> Iterator[Row]:
        with open(self.path, "rb") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                if skip:
                    skip -= 1
                    continue
                yield _parse_line(line, lineno)


def iter_json_list(f: TextIO, chunk_chars: int = 1 << 20) -> Iterator[Any]:
    """Stream the elements of a top-level JSON list without loading the document.

    Yields each element; on a syntax error yields one `_Malformed` and stops, because a JSON
    list cannot be resynchronised after an error. Memory is one element plus one chunk.
    """
    dec = json.JSONDecoder()
    buf, pos, eof, want = "", 0, False, chunk_chars

    def more() -> bool:
        nonlocal buf, pos, eof
        data = f.read(want)
        if not data:
            eof = True
            return False
        buf = buf[pos:] + data  # drop what was consumed, so memory stays one element + chunk
        pos = 0
        return True

    def skip_ws() -> bool:
        nonlocal pos
        while True:
            while pos < len(buf) and buf[pos] in " \t\r\n":
                pos += 1
            if pos < len(buf):
                return True
            if not more():
                return False

    if not skip_ws() or buf[pos] != "[":
        yield _Malformed("not a JSON list")
        return
    pos += 1
    index, need_comma = 0, False
    while True:
        if not skip_ws():
            yield _Malformed(f"element {index}: unexpected end of file")
            return
        if need_comma:
            if buf[pos] == "]":
                return
            if buf[pos] != ",":
                yield _Malformed(f"element {index}: expected ',' or ']', got {buf[pos]!r}")
                return
            pos += 1
            need_comma = False
            continue
        if index == 0 and buf[pos] == "]":
            return
        try:
            obj, end = dec.raw_decode(buf, pos)
            # A number may go on past the buffer's end, even past characters the decoder
            # stopped at ("12." then "5"): complete once what follows it is in the buffer.
            tail = _NUMBER_TAIL.match(buf, end) if isinstance(obj, int | float) else None
            complete = eof or (tail.end() if tail else end) < len(buf)
        except json.JSONDecodeError as e:
            if eof:
                yield _Malformed(f"element {index}: {e}")
                return
            complete = False
        if not complete:
            want = max(want, 2 * (len(buf) - pos))  # grow, so a big element costs O(n) total
            more()
            continue
        want = chunk_chars
        yield obj
        pos, index, need_comma = end, index + 1, True


#: characters that can continue a JSON number the decoder stopped before
_NUMBER_TAIL = re.compile(r"[0-9eE.+-]*")


class _JsonListSource:
    """A JSON file holding one list of records (e.g. llava_instruct_150k.json), streamed."""

    def __init__(self, path: Path, name: str) -> None:
        self.path, self.name = path, name
        self._num_rows: int | None = None

    def _elements(self) -> Iterator[Row]:
        with open(self.path, encoding="utf-8", errors="strict") as f:
            try:
                for obj in iter_json_list(f):
                    yield obj if isinstance(obj, _Malformed | dict) else _not_object(obj)
            except UnicodeDecodeError as e:
                yield _Malformed(f"not UTF-8: {e}")

    def cheap_num_rows(self) -> None:
        return self._num_rows

    def count_rows(self) -> int:
        if self._num_rows is None:
            self._num_rows = sum(1 for _ in self._elements())
        return self._num_rows

    def columns(self) -> set[str]:
        return _json_columns(self._elements())

    def why_no_rows(self) -> str:
        return _why_no_rows(self.path, self.name, self._elements())

    def rows(self, skip: int, columns: list[str], on_batch: BatchHook | None) -> Iterator[Row]:
        for i, row in enumerate(self._elements()):
            if i >= skip:
                yield row


class _HubSource:
    """A Hugging Face hub dataset through the optional `datasets` package."""

    def __init__(self, ds: Any, name: str, num_rows: int | None) -> None:
        self.ds, self.name, self._num_rows = ds, name, num_rows

    def cheap_num_rows(self) -> int | None:
        return self._num_rows

    def count_rows(self) -> int:
        if self._num_rows is None:
            self._num_rows = sum(1 for _ in self.ds)
        return self._num_rows

    def columns(self) -> set[str]:
        names = getattr(self.ds, "column_names", None)
        if names:
            return set(names)
        for row in self.ds:
            return set(row)
        return set()

    def rows(self, skip: int, columns: list[str], on_batch: BatchHook | None) -> Iterator[Row]:
        if not skip:
            rows: Any = self.ds
        elif hasattr(self.ds, "skip"):
            rows = self.ds.skip(skip)
        else:
            rows = itertools.islice(self.ds, skip, None)
        for row in rows:
            yield dict(row)


# --------------------------------------------------------------------------------------------
# Dataset


class Dataset:
    """An iterable of Records over one or more sources, with bad-record accounting.

    ``stats`` describes the latest pass (it resets when a new iteration starts). ``skip(n)``
    returns a view starting n rows later (rows, not Records: bad rows count too, so positions
    are stable); rows skipped this way are not read, so they are not in ``stats``.
    """

    def __init__(
        self,
        sources: list[_Source],
        schema: str,
        *,
        columns: ColumnMap,
        loader: _ImageLoader,
        strict: bool = False,
        on_bad_record: Callable[[BadRecord], None] | None = None,
        log_first: int = 10,
        description: str = "",
        start: int = 0,
        column_names: set[str] | None = None,
    ) -> None:
        self._sources = sources
        self.column_names: set[str] = set(column_names or ())
        """Columns of the first file (what the schema was detected from)."""
        self.schema = schema
        self.columns = columns
        self.strict = strict
        self.on_bad_record = on_bad_record
        self.log_first = log_first
        self.description = description
        self.start = start
        self._loader = loader
        self.stats = BadRecordStats()
        #: rows (by position) this view reads; others are passed over before any decoding.
        self.keep: Callable[[int], bool] | None = None
        self.on_batch: BatchHook | None = None
        """Debug hook: called with the number of rows each time Arrow rows become Python."""

    # -- size and position

    @property
    def num_rows(self) -> int | None:
        """Rows left from the start position, when cheap to know (Parquet, Arrow); else None."""
        total = 0
        for src in self._sources:
            n = src.cheap_num_rows()
            if n is None:
                return None
            total += n
        return max(total - self.start, 0)

    def __len__(self) -> int:
        n = self.num_rows
        if n is None:
            raise TypeError(f"length of {self.description} is not known cheaply; use count_rows()")
        return n

    def __bool__(self) -> bool:
        return True

    def count_rows(self) -> int:
        """Rows left from the start position, scanning JSON files if needed."""
        return max(sum(src.count_rows() for src in self._sources) - self.start, 0)

    def skip(self, n: int) -> Dataset:
        """A view starting ``n`` rows later; resume a run with ``skip(rows_consumed)``."""
        if n < 0:
            raise ValueError(f"skip(n) needs n >= 0, got {n}")
        view = copy.copy(self)
        view.start = self.start + n
        view.stats = BadRecordStats(max_examples=self.stats.max_examples)
        return view

    def select(self, keep: Callable[[int], bool]) -> Dataset:
        """A view that reads only the rows whose position satisfies `keep` (e.g. one rank's
        share of the data); the others are passed over without being converted or loaded."""
        view = copy.copy(self)
        view.keep = keep
        view.stats = BadRecordStats(max_examples=self.stats.max_examples)
        return view

    # -- iteration

    def __iter__(self) -> Iterator[Record]:
        self.stats.reset()
        if ImageFile.LOAD_TRUNCATED_IMAGES:
            logger.warning(
                "PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True (set by other code): "
                "truncated images will not be detected"
            )
        convert = _CONVERTERS[self.schema]
        wanted = self.columns.wanted(self.schema)
        remaining, position, logged = self.start, 0, 0
        hinted = False  # the "is image_root right?" hint is given once per pass
        for k, src in enumerate(self._sources):
            if remaining:
                last = k == len(self._sources) - 1
                n = src.cheap_num_rows()
                if n is None and not last:
                    n = src.count_rows()
                if n is not None and remaining >= n:
                    remaining -= n
                    position += n
                    continue
            position += remaining
            for index, raw in enumerate(src.rows(remaining, wanted, self.on_batch), remaining):
                if self.keep is not None and not self.keep(position):
                    position += 1
                    continue
                row_id = f"{src.name}:{index}"
                self.stats.rows += 1
                try:
                    if isinstance(raw, _Malformed):
                        raise _Bad(raw.reason, raw.detail)
                    record = convert(raw, self.columns, self._loader)
                except _Bad as b:
                    bad = BadRecord(row_id, b.reason, b.detail, position)
                    if self.strict:
                        raise BadRecordError(bad) from None
                    self.stats.add(b.reason, row_id)
                    if self.on_bad_record is not None:
                        self.on_bad_record(bad)
                    if logged < self.log_first:
                        logged += 1
                        logger.warning("skipping %s: %s (%s)", row_id, b.reason, b.detail)
                    missing = self.stats.counts.get(Reason.MISSING_IMAGE, 0)
                    if not hinted and missing >= 20 and self.stats.good == 0:
                        hinted = True
                        logger.warning(
                            "no good record yet and %d missing images: is image_root right? "
                            "(now %s)",
                            missing,
                            self._loader.base,
                        )
                else:
                    record.row_id = row_id
                    record.position = position
                    yield record
                position += 1
            remaining = 0
        if self.stats.bad:
            logger.warning("%s: %s", self.description, self.stats.summary())

    def __repr__(self) -> str:
        return (
            f"Dataset({self.description!r}, schema={self.schema!r}, "
            f"sources={len(self._sources)}, start={self.start})"
        )


# --------------------------------------------------------------------------------------------
# open_dataset


def _split_of(rel: Path) -> str:
    """The split a file belongs to in the HF hub layouts: a folder named for a known split
    (`test/...`), else its name up to the first "." or "-" (`train-00000-of-00002.parquet`,
    `train_sft-00000-of-00003.parquet`, `test.jsonl`)."""
    for part in rel.parts[:-1]:
        if part in _KNOWN_SPLITS:
            return part
    return rel.name.split(".")[0].split("-")[0]


def _filter_split(files: list[Path], root: Path, split: str) -> list[Path]:
    """Files of one split when the folder names splits (HF hub layout); else all files. A
    split is matched whole: `train` is not `train_sft` (ultrachat_200k has train_sft and
    train_gen; matching by prefix read both as one)."""
    names = [_split_of(f.relative_to(root)) for f in files]
    found = sorted({n for n in names for k in _KNOWN_SPLITS if n == k or n.startswith(k + "_")})
    if not found:
        return files
    chosen = [f for f, n in zip(files, names, strict=True) if n == split]
    if not chosen:
        raise ValueError(f"no files for split {split!r} in {root}; splits found: {found}")
    return chosen


def _state_files(folder: Path) -> list[Path]:
    """Arrow files of a `datasets` save_to_disk folder, in order, from its state.json."""
    state = json.loads((folder / "state.json").read_text())
    if state.get("_indices_data_files"):
        raise ValueError(
            f"{folder} was saved with an indices mapping (old `datasets`); "
            "re-save it after `dataset.flatten_indices()`"
        )
    files = [folder / f["filename"] for f in state.get("_data_files", [])]
    if not files:
        files = sorted(folder.glob("*.arrow"))
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"save_to_disk folder {folder} lacks {missing}")
    return files


def _json_source(path: Path, name: str) -> Any:
    """JSONL, or a JSON list; a .json file that starts with '{' is taken as JSON lines."""
    if path.suffix in (".jsonl", ".ndjson"):
        return _JsonlSource(path, name)
    with open(path, "rb") as f:
        head = f.read(4096).lstrip()
        if head.startswith(b"{"):
            f.seek(0)
            first = next((ln for ln in f if ln.strip()), b"")
            try:
                json.loads(first)
            except ValueError:
                raise ValueError(
                    f"{path} holds one JSON object; expected a JSON list or JSON lines"
                ) from None
            return _JsonlSource(path, name)
    return _JsonListSource(path, name)


def _file_sources(files: list[Path], root: Path, batch_rows: int) -> list[Any]:
    sources: list[Any] = []
    for f in files:
        name = f.relative_to(root).as_posix() if f != root else f.name
        if f.suffix == ".parquet":
            sources.append(_ParquetSource(f, name, batch_rows))
        elif f.suffix == ".arrow":
            sources.append(_ArrowSource(f, name, batch_rows))
        elif f.suffix in (".json", ".jsonl", ".ndjson"):
            sources.append(_json_source(f, name))
        else:
            raise ValueError(f"unsupported file type {f.suffix!r}: {f}")
    return sources


def _local_sources(path: Path, split: str, batch_rows: int) -> tuple[list[Any], Path]:
    """(sources, the dataset folder that relative image paths resolve against)."""
    if path.is_file():
        return _file_sources([path], path, batch_rows), path.parent
    if (path / "state.json").is_file():
        return _file_sources(_state_files(path), path, batch_rows), path
    if (path / "dataset_dict.json").is_file():
        splits = json.loads((path / "dataset_dict.json").read_text()).get("splits", [])
        if split not in splits:
            raise ValueError(f"split {split!r} not in {path} (splits: {splits})")
        inner, base = _local_sources(path / split, split, batch_rows)
        return [_rename(src, f"{split}/{src.name}") for src in inner], base
    for patterns in (("*.parquet",), ("*.arrow",), ("*.jsonl", "*.ndjson", "*.json")):
        files = sorted(
            p
            for pat in patterns
            for p in path.rglob(pat)
            if p.is_file() and not any(s.startswith(".") for s in p.relative_to(path).parts)
        )
        if files:
            return _file_sources(_filter_split(files, path, split), path, batch_rows), path
    raise FileNotFoundError(f"no .parquet, .arrow, .jsonl or .json files under {path}")


def _no_rows(src: Any) -> str:
    """Why a source has no columns (JSON sources know; Arrow ones always have a schema)."""
    why = getattr(src, "why_no_rows", None)
    return why() if why is not None else f"{src.name} has no columns"


def _rename(src: Any, name: str) -> Any:
    src.name = name
    return src


def _offline() -> bool:
    flags = (os.environ.get(k, "") for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))
    return any(v.upper() in ("1", "ON", "YES", "TRUE") for v in flags)


def _hub_source(name: str, split: str) -> _HubSource:
    """Open a hub dataset with `datasets` (streaming online, from the local cache offline)."""
    try:
        import datasets  # type: ignore[import-not-found]
    except ImportError:
        raise ImportError(
            f"{name!r} is not a local file or folder, and loading it from the Hugging Face Hub "
            "needs the optional `datasets` package: `pip install datasets` (or download the "
            "dataset's Parquet files and pass their folder)"
        ) from None
    offline = _offline() or bool(getattr(getattr(datasets, "config", None), "HF_HUB_OFFLINE", 0))
    try:
        if offline:
            ds = datasets.load_dataset(name, split=split)
        else:
            ds = datasets.load_dataset(name, split=split, streaming=True)
    except Exception as e:
        if offline:
            raise RuntimeError(
                f"cannot load hub dataset {name!r} (split {split!r}): offline mode "
                "(HF_HUB_OFFLINE / HF_DATASETS_OFFLINE) prevents downloading it and it is not in "
                f"the local cache; unset offline mode or download it first ({e})"
            ) from e
        raise RuntimeError(f"cannot load hub dataset {name!r} (split {split!r}): {e}") from e
    num_rows = None
    with contextlib.suppress(TypeError):
        num_rows = len(ds)  # a cached (offline) dataset knows its length; a stream does not
    return _HubSource(ds, f"{name}:{split}", num_rows)


def _looks_like_path(text: str) -> bool:
    suffixes = (".parquet", ".arrow", ".json", ".jsonl", ".ndjson")
    return text.startswith((".", "/", "~")) or text.endswith(suffixes)


def open_dataset(
    path_or_name: str | os.PathLike[str],
    schema: SchemaName = "auto",
    *,
    image_root: str | os.PathLike[str] | None = None,
    columns: ColumnMap | None = None,
    strict: bool = False,
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    split: str = "train",
    image_mode: str | None = "RGB",
    on_bad_record: Callable[[BadRecord], None] | None = None,
    log_first: int = 10,
    batch_rows: int = 64,
    allow_outside_image_root: bool = False,
) -> Dataset:
    """Open a dataset for streaming Records.

    ``path_or_name``: a .parquet/.arrow/.jsonl/.json file; a folder of such files (a hub
    snapshot layout: ``split`` picks files named/foldered by split); a `datasets` save_to_disk
    folder (state.json) or DatasetDict folder (dataset_dict.json, ``split`` picks); or else a
    hub dataset name (needs the optional `datasets` package). ``schema``: "llava", "chat",
    "text", or "auto" (from the columns). Relative image paths resolve against ``image_root``,
    else the dataset's folder, and must stay inside it (``..``, absolute paths elsewhere and
    links out of it are bad records) unless ``allow_outside_image_root``. Images are converted
    to ``image_mode`` (None keeps the mode). Bad rows are skipped and counted in
    ``Dataset.stats``; each goes to ``on_bad_record``, the first ``log_first`` are logged
    (logger "vlmscope.data"); ``strict`` raises instead.
    ``max_image_pixels`` rejects larger images from their header (PIL's own hard limit, twice
    ``Image.MAX_IMAGE_PIXELS``, still applies above it). ``batch_rows`` bounds how many rows
    are turned into Python objects at once. Folders are read in sorted file order; a folder
    with Parquet files ignores its JSON files (e.g. the shapes world's labels).
    """
    cm = columns or ColumnMap()
    if schema not in ("auto", "llava", "chat", "text"):
        raise ValueError(f"schema must be auto, llava, chat or text, got {schema!r}")
    if batch_rows < 1:
        raise ValueError(f"batch_rows must be >= 1, got {batch_rows}")
    text = os.fspath(path_or_name)
    path = Path(text).expanduser()
    if path.exists():
        sources, base = _local_sources(path, split, batch_rows)
    elif _looks_like_path(text):
        raise FileNotFoundError(f"no such file or folder: {text}")
    else:
        sources, base = [_hub_source(text, split)], None
    cols: set[str] = set()
    for src in sources:  # the first file with columns (an empty file has none)
        cols = src.columns()
        if cols:
            break
    if not cols and sources:
        reasons = [_no_rows(src) for src in sources[:3]]
        more = f" (and {len(sources) - 3} more files)" if len(sources) > 3 else ""
        raise ValueError(f"no rows to read: {'; '.join(reasons)}{more}")
    if schema == "auto":
        schema = detect_schema(cols, cm)  # type: ignore[assignment]
    elif cm.required(schema) not in cols:
        raise ValueError(
            f"schema {schema!r} needs column {cm.required(schema)!r} but {sources[0].name} has "
            f"{sorted(cols)}; map other names with columns=ColumnMap(...) (on the command line: "
            f"--columns {_column_key(cm, cm.required(schema))}=NAME)"
        )
    loader = _ImageLoader(
        Path(image_root).expanduser() if image_root is not None else base,
        max_image_pixels,
        image_mode,
        confine=not allow_outside_image_root,
    )
    return Dataset(
        sources,
        schema,
        columns=cm,
        loader=loader,
        strict=strict,
        on_bad_record=on_bad_record,
        log_first=log_first,
        description=text,
        column_names=cols,
    )
