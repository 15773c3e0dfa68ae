"""Records -> model batches, through the model's own processor and chat template.

Each record is processed alone (so one bad record costs only itself), truncated to ctx_len
without ever cutting an image's token block, then collated: per-token tensors are padded,
image tensors concatenated, exactly as the processor would have batched them.
"""

from __future__ import annotations

import inspect
import itertools
import multiprocessing as mp
import queue
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from multiprocessing.pool import AsyncResult
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import torch

from vlmscope.models.chat import add_special_tokens_for_rendered, tokenizer_special_ids
from vlmscope.models.masks import TokenMasks

if TYPE_CHECKING:
    from vlmscope.data.processed import ProcessedSpec
    from vlmscope.data.sources import BadRecord

#: Per-token tensors ([1, seq] per sample) and the value they are padded with (None: pad id).
TOKEN_KEYS: dict[str, int | None] = {
    "input_ids": None,
    "attention_mask": 0,
    "token_type_ids": 0,
    "mm_token_type_ids": 0,
}
#: per-token tensors with more (ragged) dimensions after the sequence: Mllama's
#: cross_attention_mask [batch, seq, images, tiles].
TOKEN_GRID_KEYS = ("cross_attention_mask",)
#: video tensors that keep a frame dimension ([videos, frames, ...]: LLaVA-NeXT-Video's)
FRAME_KEYS = ("pixel_values_videos",)
#: Image tensors that some processors batch by sample rather than by image ([batch, images or
#: views, ...]), a sample without images getting a block of zeros: keyed by the tensor only
#: those processors write. Idefics3/SmolVLM: pixel_values, pixel_attention_mask; Mllama:
#: pixel_values, the aspect ratios and cross_attention_mask.
PER_SAMPLE_IMAGE_KEYS: dict[str, tuple[str, ...]] = {
    "pixel_attention_mask": ("pixel_values", "pixel_attention_mask"),
    "aspect_ratio_ids": (
        "pixel_values",
        "aspect_ratio_ids",
        "aspect_ratio_mask",
        "cross_attention_mask",
    ),
}


class RecordLike(Protocol):
    """What processing needs from a data record (see vlmscope.data.sources.Record; `videos`,
    each a list of frames, is read where the record has it)."""

    row_id: str
    messages: list[dict[str, Any]]
    images: list[Any]
    text: str


class WorkerDiedError(RuntimeError):
    """A data worker process exited while encoding (killed, or crashed in native code)."""


#: seconds between checks that the data workers are alive while waiting on one
_POLL_S = 1.0


class SkipRecord(Exception):
    """A record that cannot become a sample; `reason` is counted, not fatal."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass
class Sample:
    """One processed record: the processor's tensors for it, with a batch dim of 1."""

    row_id: str
    tensors: dict[str, torch.Tensor]
    #: number of answer (last assistant turn) tokens at the end of the sequence.
    n_answer: int = 0
    truncated: bool = False
    #: the record's row index in its dataset (-1 if unknown), to resume after it.
    position: int = -1

    @property
    def length(self) -> int:
        return int(self.tensors["input_ids"].shape[1])


@dataclass
class Batch:
    """Collated model inputs plus what every later stage needs alongside them."""

    inputs: dict[str, torch.Tensor]
    row_ids: list[str]
    #: [batch, seq] bool: tokens of the last assistant turn (the answer).
    answer: torch.Tensor
    #: per-sample token masks of `inputs`, when collate was given the model's masks function.
    masks: TokenMasks | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    #: dataset row index of each sample (-1 if unknown).
    positions: list[int] = field(default_factory=list)

    @property
    def size(self) -> int:
        return len(self.row_ids)

    def to(self, device: torch.device | str) -> Batch:
        inputs = {k: v.to(device) for k, v in self.inputs.items()}
        masks = self.masks.to(device) if self.masks is not None else None
        return Batch(
            inputs, self.row_ids, self.answer.to(device), masks, self.extra, self.positions
        )


class SampleEncoder:
    """Turns one record into a Sample with the model's processor and chat template; a
    processed record (one that holds the processor's outputs) goes through `processed`, the
    model's check of such rows (see vlmscope.data.processed)."""

    def __init__(
        self,
        processor: Any,
        ctx_len: int,
        image_token_ids: Sequence[int] = (),
        add_generation_prompt: bool = False,
        processed: ProcessedSpec | None = None,
        videos: bool | None = None,
    ) -> None:
        self.processor = processor
        self.processed = processed
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.ctx_len = int(ctx_len)
        self.image_token_ids = torch.tensor(list(image_token_ids), dtype=torch.long)
        self.special_ids = tokenizer_special_ids(self.tokenizer) - set(image_token_ids)
        self.add_generation_prompt = add_generation_prompt
        self.has_images = hasattr(processor, "image_processor")
        # `videos`: whether the model lays out video tokens (its adapter's capability); a
        # processor may have a video processor the model's vlmscope adapter does not read
        has_processor = getattr(processor, "video_processor", None) is not None
        self.has_videos = has_processor and videos is not False
        self.template = getattr(processor, "chat_template", None) or getattr(
            self.tokenizer, "chat_template", None
        )
        params = inspect.signature(type(processor).__call__).parameters
        self.takes_suffix = "suffix" in params
        #: what the template writes between the generation prompt and a reply's text (e.g.
        #: " " after "ASSISTANT:"): None until learned from the first reply, False when the
        #: template does not render replies verbatim (then every sample renders twice).
        self._gap: str | bool | None = None

    def render(self, record: RecordLike) -> tuple[str, str]:
        """(full text, answer text): the answer is the last assistant turn's rendered suffix."""
        msgs = record.messages
        if not msgs:
            if not record.text or not record.text.strip():
                raise SkipRecord("empty_text")
            return record.text, ""
        if self.template is None:
            # No chat template: the prompt is the user text and the answer the assistant text;
            # a processor that takes a `suffix` (PaliGemma) gets the answer as that suffix.
            user = " ".join(_text_of(m) for m in msgs if m["role"] != "assistant")
            answer = " ".join(_text_of(m) for m in msgs if m["role"] == "assistant")
            if self.takes_suffix:
                return user, answer
            return (f"{user}\n{answer}" if answer else user), answer
        if msgs[-1]["role"] != "assistant":
            return self._apply(msgs, self.add_generation_prompt), ""
        once = self._render_once(msgs)
        if once is not None:
            return once
        full = self._apply(msgs, False)
        prefix = self._apply(msgs[:-1], True)
        return full, full[len(prefix) :] if full.startswith(prefix) else ""

    def _render_once(self, msgs: list[dict[str, Any]]) -> tuple[str, str] | None:
        """(full, answer) from one template render, or None where that cannot be trusted.

        The reply's text is replaced by a marker that no text contains, the conversation is
        rendered once, and the text is put back: full = head + text + tail, and the answer is
        what followed the generation prompt, gap + text + tail. The gap is learned (and the
        whole scheme checked against the two-render result) on the first eligible sample; a
        template that rewrites replies (trims them, splits reasoning out) fails that check, or
        the per-sample guards below, and keeps rendering twice."""
        sole = _sole_text(msgs[-1])
        if self._gap is False or sole is None:
            return None
        text, content = sole
        if text != text.strip() or "think>" in text:
            return None
        marked = self._apply([*msgs[:-1], {**msgs[-1], "content": content}], False)
        if marked.count(_ANSWER_MARK) != 1:
            return None
        head, tail = marked.split(_ANSWER_MARK)
        full = head + text + tail
        if self._gap is None:
            prefix = self._apply(msgs[:-1], True)
            ok = full == self._apply(msgs, False) and head.startswith(prefix)
            self._gap = head[len(prefix) :] if ok else False
            if not ok:
                return None
        assert isinstance(self._gap, str)
        if not head.endswith(self._gap):
            return None
        return full, self._gap + text + tail

    def _apply(self, msgs: list[dict[str, Any]], gen: bool) -> str:
        owner = self.processor if hasattr(self.processor, "apply_chat_template") else self.tokenizer
        return owner.apply_chat_template(msgs, add_generation_prompt=gen, tokenize=False)

    def encode(self, record: RecordLike) -> Sample:
        if getattr(record, "tensors", None):
            if self.processed is None:
                raise ValueError(
                    f"record {record.row_id} holds processed tensors: pass "
                    "processed=ProcessedSpec(vlm) to the SampleEncoder to check them"
                )
            return self._truncate(self.processed.sample(record))  # type: ignore[arg-type]
        text, answer = self.render(record)
        images = list(record.images or [])
        videos = list(getattr(record, "videos", None) or [])
        if images and not self.has_images:
            raise SkipRecord("images_for_text_model", "this model has no image processor")
        if videos and not self.has_videos:
            raise SkipRecord("videos_for_model", "this model's processor takes no videos")
        extra: dict[str, Any] = {}
        if self.template is None and self.takes_suffix and answer:
            extra["suffix"] = [answer]
        kw: dict[str, Any] = {}
        if self.template is not None and record.messages:
            # Template output holds its own BOS where the template writes one: tokenize it as
            # apply_chat_template(tokenize=True) does, so no family gets a second BOS.
            kw["add_special_tokens"] = add_special_tokens_for_rendered(self.processor, [text])
        if videos:  # one flat list of videos, as for a batch (see HookedVLM.prepare)
            kw["videos"] = videos
        try:
            if images:
                out = self.processor(
                    text=[text], images=[images], return_tensors="pt", **extra, **kw
                )
            elif videos:
                out = self.processor(text=[text], return_tensors="pt", **extra, **kw)
            elif self.processor is self.tokenizer:
                out = self.processor([text], return_tensors="pt", **kw)
            else:
                out = self.processor(text=[text], return_tensors="pt", **kw)
        except (ValueError, IndexError, TypeError, RuntimeError) as e:
            raise SkipRecord("processor_error", str(e)[:200]) from e
        # Processors that build training labels (PaliGemma) are not the loss here: drop them.
        tensors = {k: v for k, v in out.items() if isinstance(v, torch.Tensor) and k != "labels"}
        ids = tensors["input_ids"][0]
        if (images or videos) and not bool(torch.isin(ids, self.image_token_ids).any()):
            raise SkipRecord("image_placeholder_mismatch", "no image token in the prompt")
        n_answer = 0
        if extra:
            # The suffix is exactly the tokens marked 1 in token_type_ids (prefix-LM models).
            n_answer = int(tensors["token_type_ids"][0].sum())
        elif answer:
            # The chat template supplies any leading special tokens; count the answer alone.
            n_answer = len(self.tokenizer(answer, add_special_tokens=False)["input_ids"])
        sample = Sample(
            record.row_id,
            tensors,
            n_answer=min(n_answer, len(ids)),
            position=_position(record),
        )
        return self._truncate(sample)

    def _truncate(self, sample: Sample) -> Sample:
        n = sample.length
        if n <= self.ctx_len:
            return sample
        ids = sample.tensors["input_ids"][0]
        img = torch.isin(ids, self.image_token_ids).nonzero()
        if len(img):
            # The block ends after the special tokens right behind the last image token: the
            # closing marker (<|vision_end|>, <end_of_image>, <fake_token_around_image>) is
            # part of it, and a block cut before it is one the model never saw in training.
            end = int(img.max())
            while end + 1 < n and int(ids[end + 1]) in self.special_ids:
                end += 1
            if end >= self.ctx_len:
                raise SkipRecord(
                    "exceeds_ctx_len",
                    f"{n} tokens, the image block (with its closing markers) reaches position "
                    f"{end}",
                )
        per_token = (*TOKEN_KEYS, *TOKEN_GRID_KEYS)
        cut = {
            k: (v[:, : self.ctx_len] if k in per_token else v) for k, v in sample.tensors.items()
        }
        kept_answer = max(0, sample.n_answer - (n - self.ctx_len))
        return Sample(sample.row_id, cut, kept_answer, True, sample.position)


#: stands in for a reply's text while the template renders (private-use code points).
_ANSWER_MARK = "\ue000vlmscope-answer\ue001"


def _sole_text(message: Mapping[str, Any]) -> tuple[str, Any] | None:
    """(text, the same content with the text replaced by the mark) when the message's content
    is that text alone: a str, or a list of one text part."""
    c = message["content"]
    if isinstance(c, str):
        text, marked = c, _ANSWER_MARK
    elif isinstance(c, list) and len(c) == 1 and c[0].get("type") == "text":
        text, marked = c[0].get("text", ""), [{**c[0], "text": _ANSWER_MARK}]
    else:
        return None
    return (text, marked) if isinstance(text, str) and _ANSWER_MARK not in text else None


def _text_of(message: Mapping[str, Any]) -> str:
    c = message["content"]
    if isinstance(c, str):
        return c
    return " ".join(p.get("text", "") for p in c if p.get("type") == "text")


#: Computes a processed batch's token masks: HookedVLM.masks, which knows the adapter.
MasksFn = Callable[[Mapping[str, torch.Tensor]], TokenMasks]


def collate(
    samples: Sequence[Sample],
    pad_token_id: int,
    padding_side: str = "right",
    masks: MasksFn | None = None,
) -> Batch:
    """Pad per-token tensors to the longest sample, concatenate image tensors along their
    first dim (zero-padding ragged trailing dims, as processors pad tiles and patches).

    With `masks` (e.g. `vlm.masks`) the batch carries its token masks, computed (and its images
    checked against their placeholders) here, once, rather than by every stage that reads it."""
    if not samples:
        raise ValueError("cannot collate an empty list of samples")
    longest = max(s.length for s in samples)
    keys = dict.fromkeys(k for s in samples for k in s.tensors)
    per_sample = {k for sig, ks in PER_SAMPLE_IMAGE_KEYS.items() if sig in keys for k in ks}
    inputs: dict[str, torch.Tensor] = {}
    for k in keys:
        if k in per_sample:  # a sample without images gets zeros, as the processor gives it
            parts = [_tensor_or_zeros(s, k, samples) for s in samples]
        else:
            parts = [s.tensors[k] for s in samples if k in s.tensors]
        if k in TOKEN_KEYS:
            fill = pad_token_id if TOKEN_KEYS[k] is None else TOKEN_KEYS[k]
            inputs[k] = torch.cat([_pad_seq(p, longest, fill, padding_side) for p in parts])  # type: ignore[arg-type]
        elif k in TOKEN_GRID_KEYS:
            inputs[k] = _cat_ragged([_pad_grid_seq(p, longest, padding_side) for p in parts])
        else:
            if k in FRAME_KEYS:
                _same_frame_counts(k, parts, samples)
            inputs[k] = _cat_ragged(parts)
            if k == "aspect_ratio_mask":
                # Mllama's processor marks the first tile of a padding image slot as present
                # (an all-masked image would give its vision attention nothing to attend to).
                inputs[k][..., 0] = 1
    answer = torch.zeros(len(samples), longest, dtype=torch.bool)
    for b, s in enumerate(samples):
        end = s.length if padding_side == "right" else longest
        if s.n_answer:
            answer[b, end - s.n_answer : end] = True
    return Batch(
        inputs,
        [s.row_id for s in samples],
        answer,
        masks=masks(inputs) if masks is not None else None,
        positions=[s.position for s in samples],
    )


class CollateError(ValueError):
    """Samples that one batch cannot hold together (the processor would refuse them too)."""


def _same_frame_counts(key: str, parts: list[torch.Tensor], samples: Sequence[Sample]) -> None:
    """Videos as [videos, frames, ...] (LLaVA-NeXT-Video) batch only at one frame count:
    padding the frames would give a shorter video blank frames its prompt has no tokens for."""
    if any(p.dim() < 3 for p in parts):
        return  # flattened patches (Qwen-VL): nothing to pad
    counts = {int(p.shape[1]) for p in parts}
    if len(counts) > 1:
        rows = [s.row_id for s in samples if key in s.tensors]
        raise CollateError(
            f"rows {rows[:4]} hold videos of {sorted(counts)} frames in one batch, and this "
            "processor batches videos of one length only: give every video the same number "
            "of frames (sample them beforehand), or use --batch-size 1"
        )


def _tensor_or_zeros(sample: Sample, key: str, samples: Sequence[Sample]) -> torch.Tensor:
    """`sample`'s tensor `key`, or zeros shaped like another sample's (per-token grids over
    this sample's own length) where it has none: an image tensor batched by sample."""
    if key in sample.tensors:
        return sample.tensors[key]
    like = next(s.tensors[key] for s in samples if key in s.tensors)
    rest = (sample.length, *like.shape[2:]) if key in TOKEN_GRID_KEYS else like.shape[1:]
    return like.new_zeros(1, *rest)


def _pad_seq(t: torch.Tensor, length: int, fill: int, side: str) -> torch.Tensor:
    n = length - t.shape[1]
    if n == 0:
        return t
    pad = torch.full((t.shape[0], n, *t.shape[2:]), fill, dtype=t.dtype)
    return torch.cat([t, pad] if side == "right" else [pad, t], dim=1)


def _pad_grid_seq(t: torch.Tensor, length: int, side: str) -> torch.Tensor:
    """Pad a [1, seq, ...] per-token grid to `length` as the processor would have built it:
    padding after the text repeats the last row (images stay visible to the end), padding
    before it is zeros."""
    n = length - t.shape[1]
    if n == 0:
        return t
    if side == "right":
        return torch.cat([t, t[:, -1:].expand(-1, n, *t.shape[2:])], dim=1)
    return torch.cat([t.new_zeros(t.shape[0], n, *t.shape[2:]), t], dim=1)


def _cat_ragged(parts: list[torch.Tensor]) -> torch.Tensor:
    if all(p.shape[1:] == parts[0].shape[1:] for p in parts):
        return torch.cat(parts)
    shape = [max(p.shape[d] for p in parts) for d in range(1, parts[0].dim())]
    out = []
    for p in parts:
        q = torch.zeros(p.shape[0], *shape, dtype=p.dtype)
        q[(slice(None), *(slice(0, s) for s in p.shape[1:]))] = p
        out.append(q)
    return torch.cat(out)


@dataclass
class SkipCounter:
    """Counts skipped records by reason and keeps the first few row ids of each."""

    counts: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[str]] = field(default_factory=dict)
    keep: int = 5

    def add(self, reason: str, row_id: str) -> None:
        self.counts[reason] = self.counts.get(reason, 0) + 1
        ex = self.examples.setdefault(reason, [])
        if len(ex) < self.keep:
            ex.append(row_id)

    def merge(self, counts: Mapping[str, int], examples: Mapping[str, Sequence[str]]) -> None:
        """Add another counter's counts and examples (e.g. a Dataset's BadRecordStats)."""
        for reason, n in counts.items():
            self.counts[reason] = self.counts.get(reason, 0) + n
            ex = self.examples.setdefault(reason, [])
            ex.extend(list(examples.get(reason, []))[: max(0, self.keep - len(ex))])

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> str:
        if not self.counts:
            return "no records skipped"
        parts = [
            f"{r}: {n} (e.g. {', '.join(self.examples[r][:3])})" for r, n in self.counts.items()
        ]
        return f"{self.total} records skipped - " + "; ".join(parts)

    def note(self, position: int, reason: str, row_id: str) -> None:
        """As `SkipJournal.note`: counted at once (where nothing reads ahead)."""
        self.add(reason, row_id)

    def add_all(self, skipped: Iterable[tuple[str, str]]) -> None:
        """Count (reason, row id) pairs, such as those a SkipJournal hands over."""
        for reason, row_id in skipped:
            self.add(reason, row_id)


class SkipJournal:
    """Skipped records noted where they lie in the stream, to be counted once a cursor passes
    them.

    Read-ahead (a prefetch thread, --workers processes, the packer's tokenizer groups) meets a
    bad record before the consumer reaches it. Counted then, a checkpoint's counts would hold
    rows past its cursor, which a resumed run reads and counts again; and a run that stops
    early would report rows it never used. The journal keeps each record's pass and position
    instead, and `take` hands over those before a cursor, to be counted with the batch that
    ends there. Note and take from one thread: the one that reads.
    """

    def __init__(self, epoch: int = 0) -> None:
        #: the pass being read: positions start again at each one.
        self.epoch = epoch
        self._notes: list[tuple[int, int, str, str]] = []

    def note(self, position: int, reason: str, row_id: str) -> None:
        self._notes.append((self.epoch, position, reason, row_id))

    def note_bad(self, bad: BadRecord) -> None:
        """A reader's `on_bad_record`: note the row it rejected."""
        self.note(bad.position, bad.reason, bad.row_id)

    def take(self, before: tuple[int, int] | None = None) -> list[tuple[str, str]]:
        """(reason, row id) of the records before the cursor `before` (epoch, rows), or of
        all without one, in stream order (workers note a rejection of the reader before one
        of the encoder at an earlier row); they leave the journal."""
        out = [n for n in self._notes if before is None or n[:2] < before]
        self._notes = [n for n in self._notes if before is not None and n[:2] >= before]
        return [(reason, row_id) for _, _, reason, row_id in sorted(out, key=lambda n: n[:2])]


# --- worker processes ------------------------------------------------------------------------
_WORKER_ENCODER: SampleEncoder | None = None
#: records per task sent to a worker; each worker has at most two tasks in flight.
STREAM_CHUNK = 4


def _init_worker(factory: Callable[[], SampleEncoder]) -> None:
    global _WORKER_ENCODER
    torch.set_num_threads(1)
    _WORKER_ENCODER = factory()


#: what a worker sends back per record: a skip, or a Sample's fields with numpy arrays
_Wire = tuple[str, dict[str, Any], int, bool, int]


def _encode_chunk_in_worker(records: list[Any]) -> list[_Wire | SkipRecord]:
    """The chunk's samples as numpy arrays (or skips). A Pool result holding torch tensors
    is pickled by torch's reductions, which move every tensor through a shared-memory file
    whose descriptor the parent fetches over a socket; numpy arrays pickle as plain bytes,
    about 20x faster for the toy's small samples, which made one worker slower than none."""
    assert _WORKER_ENCODER is not None
    out: list[_Wire | SkipRecord] = []
    for record in records:
        try:
            x = _WORKER_ENCODER.encode(record)
        except SkipRecord as e:
            out.append(e)
            continue
        arrays = {k: v.numpy() if v.dtype in _NUMPY_DTYPES else v for k, v in x.tensors.items()}
        out.append((x.row_id, arrays, x.n_answer, x.truncated, x.position))
    return out


_NUMPY_DTYPES = {torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool,
                 torch.float64, torch.float32, torch.float16}  # fmt: skip


def _from_wire(res: _Wire | SkipRecord) -> Sample | SkipRecord:
    if isinstance(res, SkipRecord):
        return res
    row_id, arrays, n_answer, truncated, position = res
    tensors = {k: v if isinstance(v, torch.Tensor) else torch.from_numpy(v)
               for k, v in arrays.items()}  # fmt: skip
    return Sample(row_id, tensors, n_answer, truncated, position)


def encode_stream(
    records: Iterable[RecordLike],
    encoder: SampleEncoder,
    skips: SkipCounter | SkipJournal,
    *,
    strict: bool = False,
    workers: int = 0,
    on_skip: Callable[[str, str, str], None] | None = None,
    pool: EncoderPool | None = None,
) -> Iterator[Sample]:
    """Encode records in order, skipping the ones that cannot be processed: counted in
    `skips`, or noted with their positions when it is a SkipJournal (a consumer that reads
    ahead counts them as its cursor passes them).

    With `workers > 0` encoding runs in that many processes, or in `pool`'s (kept by a caller
    that streams several passes); order is kept, and memory stays flat: at most 2 * workers
    chunks of STREAM_CHUNK records are read ahead of the consumer.
    """

    def handle(record_id: str, position: int, result: Sample | SkipRecord) -> Sample | None:
        if isinstance(result, SkipRecord):
            if strict:
                raise SkipRecord(result.reason, f"row {record_id}: {result.detail}")
            skips.note(position, result.reason, record_id)
            if on_skip is not None:
                on_skip(result.reason, record_id, result.detail)
            return None
        return result

    if pool is None and workers > 0:
        with EncoderPool(encoder, workers) as own:
            yield from _encode_in(own, records, handle)
        return
    if pool is not None:
        yield from _encode_in(pool, records, handle)
        return
    if workers <= 0:
        for r in records:
            try:
                res: Sample | SkipRecord = encoder.encode(r)
            except SkipRecord as e:
                res = e
            s = handle(r.row_id, _position(r), res)
            if s is not None:
                yield s
        return


def _position(record: RecordLike) -> int:
    """The record's row in its dataset (-1 for a record that does not say)."""
    return int(getattr(record, "position", -1))


def _encode_in(
    pool: EncoderPool,
    records: Iterable[RecordLike],
    handle: Callable[[str, int, Sample | SkipRecord], Sample | None],
) -> Iterator[Sample]:
    source = iter(records)
    # A bounded window of chunks in flight: workers never run more than `window` chunks ahead
    # of the consumer, so a dataset larger than memory streams with flat memory.
    window = 2 * pool.workers
    pending: deque[tuple[list[tuple[str, int]], AsyncResult[list[_Wire | SkipRecord]]]] = deque()

    def submit() -> None:
        while len(pending) < window:
            chunk = list(itertools.islice(source, STREAM_CHUNK))
            if not chunk:
                return
            pending.append(([(r.row_id, _position(r)) for r in chunk], pool.submit(chunk)))

    submit()
    while pending:
        row_ids, task = pending.popleft()
        while True:  # a worker killed mid-task (out of memory, a crashing decoder) never answers
            try:
                results = task.get(timeout=_POLL_S)
                break
            except mp.TimeoutError:
                pool.check_alive()
        pool.check_alive()  # and one killed between tasks is as much a sign to stop
        submit()
        for (record_id, position), res in zip(row_ids, results, strict=True):
            s = handle(record_id, position, _from_wire(res))
            if s is not None:
                yield s


#: seconds close() gives each stage of stopping a pool one of whose workers died
_CLOSE_WAIT_S = 2.0


class EncoderPool:
    """`workers` processes that encode records with `encoder`, for as long as the caller keeps
    them: a trainer keeps one for the whole run, because starting a worker (a fresh interpreter
    importing torch and transformers) takes seconds, which a pool per pass over a small
    dataset paid at every epoch (text training with one worker ran at a quarter of the rate
    with none). Chunks left unread by an abandoned stream are computed and dropped."""

    def __init__(self, encoder: SampleEncoder, workers: int) -> None:
        self.workers = workers
        ctx = mp.get_context("spawn")
        self._pool = ctx.Pool(workers, initializer=_init_worker,
                              initargs=(_EncoderFactory(encoder),))  # fmt: skip
        # The pool replaces a worker that dies, but the chunk it held is lost and its result
        # never comes: the processes it started are watched instead (`check_alive`).
        self._processes = list(self._pool._pool)  # type: ignore[attr-defined]

    def check_alive(self) -> None:
        """Raise WorkerDiedError if a worker process has exited (they only end at close)."""
        for proc in self._processes:
            if proc.exitcode is not None:
                how = (f"killed by signal {-proc.exitcode}" if proc.exitcode < 0
                       else f"exit code {proc.exitcode}")  # fmt: skip
                raise WorkerDiedError(
                    f"a data worker process (pid {proc.pid}) died: {how}; SIGKILL (9) is "
                    "usually the system out of memory: fewer --workers, a smaller --batch-size "
                    "or --ctx-len, or --workers 0 to see the error in this process"
                )

    def submit(self, chunk: list[Any]) -> AsyncResult[list[_Wire | SkipRecord]]:
        return self._pool.apply_async(_encode_chunk_in_worker, (chunk,))

    def close(self) -> None:
        """Stop the workers (idempotent; after a worker died, in seconds at most)."""
        if not any(p.exitcode is not None for p in self._processes):
            self._pool.terminate()
            self._pool.join()
            return
        # The pool's workers share one lock per queue; a worker killed while it held one (the
        # out-of-memory killer does not wait for a result to be sent) leaves it held for good,
        # and terminate() waits on it for ever. It runs aside, where its first steps stop the
        # pool from starting replacements; the workers are then killed, and a terminate still
        # waiting is left to its daemon thread.
        stopper = threading.Thread(target=self._pool.terminate, daemon=True)
        stopper.start()
        stopper.join(_CLOSE_WAIT_S)
        for proc in {*self._processes, *self._pool._pool}:  # type: ignore[attr-defined]
            if proc.exitcode is None:
                proc.kill()
                proc.join(_CLOSE_WAIT_S)
        stopper.join(_CLOSE_WAIT_S)

    def __enter__(self) -> EncoderPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _EncoderFactory:
    """Picklable recipe that rebuilds an encoder inside a worker process."""

    def __init__(self, encoder: SampleEncoder) -> None:
        self.processor = encoder.processor
        self.ctx_len = encoder.ctx_len
        self.image_token_ids = encoder.image_token_ids.tolist()
        self.add_generation_prompt = encoder.add_generation_prompt
        self.processed = encoder.processed
        self.videos = encoder.has_videos

    def __call__(self) -> SampleEncoder:
        return SampleEncoder(
            self.processor,
            self.ctx_len,
            self.image_token_ids,
            self.add_generation_prompt,
            self.processed,
            self.videos,
        )


def batches(
    samples: Iterable[Sample],
    batch_size: int,
    pad_token_id: int,
    padding_side: str = "right",
    masks: MasksFn | None = None,
) -> Iterator[Batch]:
    """Group samples into collated batches of `batch_size` (the last one may be smaller); with
    `masks` (e.g. `vlm.masks`) each batch carries its token masks."""
    buf: list[Sample] = []
    for s in samples:
        buf.append(s)
        if len(buf) == batch_size:
            yield collate(buf, pad_token_id, padding_side, masks)
            buf = []
    if buf:
        yield collate(buf, pad_token_id, padding_side, masks)


# --- read-ahead off the training loop ----------------------------------------------------------
T = TypeVar("T")


def prefetch(items: Iterable[T], depth: int = 2) -> Iterator[T]:
    """Yield `items` in order while a background thread computes up to `depth` of them ahead.

    Data preparation (reading, encoding here or in `encode_stream`'s worker processes,
    collating, token masks) then runs while the consumer trains on the batch before; torch,
    tokenizers and image decoding release the GIL for their heavy parts. An exception in the
    producer re-raises here, in order; closing this iterator (or leaving a loop over it early)
    stops the thread and closes `items` in it. Anything the producer does besides yielding
    (counting skipped records, say) happens ahead of the consumer: carry it with the items.
    """
    done = object()
    out: queue.Queue[tuple[bool, Any]] = queue.Queue(maxsize=max(1, depth))
    stop = threading.Event()

    def put(entry: tuple[bool, Any]) -> bool:
        while not stop.is_set():
            try:
                out.put(entry, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        it = iter(items)
        try:
            for item in it:
                if not put((True, item)):
                    return
            put((True, done))
        except BaseException as e:  # re-raised in the consumer
            put((False, e))
        finally:
            close = getattr(it, "close", None)
            if close is not None:
                close()

    thread = threading.Thread(target=produce, name="vlmscope-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            ok, item = out.get()
            if not ok:
                raise item
            if item is done:
                return
            yield item
    finally:
        stop.set()
        thread.join()
