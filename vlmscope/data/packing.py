"""Packing plain-text documents into full `ctx_len` chunks (`vlmscope train --pack`).

Truncating each document to ctx_len and padding the short ones spends compute on padding and
throws away everything past ctx_len of a long document. Packing instead tokenizes each
document without special tokens, ends it with the tokenizer's EOS and cuts the stream

    doc_0 EOS doc_1 EOS doc_2 EOS ...

into chunks, as sparsify's `chunk_and_tokenize` does, except that the remainder of a chunk
flows into the next one instead of being dropped. A chunk is ``[BOS] + body`` where the
tokenizer has a BOS (every chunk starts the way the model's inputs start, so position 0 and its
attention sink look as in training) and the body is the next ``ctx_len - 1`` stream tokens, so
every chunk is exactly ctx_len long: a batch has no padding, and no token of any document is
lost. BOS and EOS are special tokens, which training skips unless --include-special-tokens.
Attention crosses document boundaries within a chunk, as in sparsify.

The stream runs on across epochs: the tail of one pass is completed by the start of the next.

The cursor after a chunk is `Cursor(epoch, rows, offset)`: the dataset row of the document that
holds the next stream token and how many of its tokens (its EOS included) earlier chunks took.
Resuming skips `rows` rows and drops `offset` tokens of the first document read, so the chunks
that follow are bit-identical to those of an uninterrupted run, even mid-document.
Tokenization is per document, so it does not depend on where a run resumed.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from vlmscope.data.processing import Batch, MasksFn, Sample, collate

#: Documents tokenized in one call of the tokenizer.
TOKENIZE_GROUP = 64


@dataclass(frozen=True)
class Cursor:
    """Where the packed stream continues: row `rows` of epoch `epoch`, `offset` tokens in."""

    epoch: int
    rows: int
    offset: int

    def as_state(self) -> dict[str, int]:
        """The TrainState fields of this cursor."""
        return {"epoch": self.epoch, "rows": self.rows, "offset": self.offset}


@dataclass(frozen=True)
class Document:
    """One plain-text record of a pass: its epoch, its dataset row and row id, its text."""

    epoch: int
    position: int
    row_id: str
    text: str


class Packer:
    """Cuts a stream of documents into ctx_len chunks (see the module docstring)."""

    def __init__(self, tokenizer: Any, ctx_len: int) -> None:
        self.tokenizer = tokenizer
        eos = getattr(tokenizer, "eos_token_id", None)
        if eos is None:
            raise ValueError(
                "--pack separates documents with the tokenizer's EOS token, but "
                "this tokenizer has none"
            )
        self.eos = int(eos)
        self.bos = _bos_it_adds(tokenizer)
        self.ctx_len = int(ctx_len)
        self.body = self.ctx_len - (self.bos is not None)
        if self.body < 1:
            raise ValueError(f"--ctx-len {ctx_len} leaves no room for text after the BOS token")

    def tokens(self, texts: list[str]) -> list[list[int]]:
        """Each document's ids without special tokens, followed by EOS."""
        ids = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        return [[*map(int, t), self.eos] for t in ids]

    def chunks(self, docs: Iterable[Document], offset: int = 0) -> Iterator[tuple[Sample, Cursor]]:
        """(chunk, cursor after it) for a stream of documents; `offset` tokens of the first
        document were taken by chunks before this stream (a resumed run). A tail shorter than a
        chunk at the end of a finite stream is returned last, as a shorter chunk."""
        buf: list[int] = []
        start_id = ""
        it = iter(docs)
        cursor: Cursor | None = None
        while True:
            group = list(itertools.islice(it, TOKENIZE_GROUP))
            if not group:
                break
            for doc, ids in zip(group, self.tokens([d.text for d in group]), strict=True):
                pos, offset = offset, 0
                while pos < len(ids):
                    if not buf:
                        start_id = f"{doc.row_id}@{pos}"
                    take = min(self.body - len(buf), len(ids) - pos)
                    buf += ids[pos : pos + take]
                    pos += take
                    done = pos == len(ids)
                    cursor = Cursor(doc.epoch, doc.position + done, 0 if done else pos)
                    if len(buf) == self.body:
                        yield self._sample(buf, start_id), cursor
                        buf = []
        if buf and cursor is not None:
            yield self._sample(buf, start_id), cursor

    def _sample(self, body: list[int], row_id: str) -> Sample:
        ids = ([self.bos] if self.bos is not None else []) + body
        t = torch.tensor([ids], dtype=torch.long)
        return Sample(row_id, {"input_ids": t, "attention_mask": torch.ones_like(t)})


def _bos_it_adds(tokenizer: Any) -> int | None:
    """The BOS id the tokenizer puts in front of text by default, if it does."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return None
    ids = tokenizer("a")["input_ids"]
    return int(bos) if ids and int(ids[0]) == int(bos) else None


def packed_batches(
    chunks: Iterable[tuple[Sample, Cursor]],
    batch_size: int,
    pad_token_id: int,
    masks: MasksFn | None = None,
    part: tuple[int, int] = (0, 1),
) -> Iterator[tuple[Batch | None, Cursor]]:
    """Collated batches of chunks with the cursor after each batch's last chunk.

    `part=(rank, world)`: every rank reads the same chunk stream, cut into windows of
    world x batch_size chunks, and collates chunks [rank B, (rank + 1) B) of each, so the
    ranks' batches together are one process's batch of world x B and the cursor is global.
    None for a rank whose share of the stream's last window is empty."""
    rank, world = part
    window = batch_size * world
    buf: list[Sample] = []
    for sample, cursor in chunks:
        buf.append(sample)
        if len(buf) == window:
            yield collate(buf[rank * batch_size : (rank + 1) * batch_size], pad_token_id,
                          masks=masks), cursor  # fmt: skip
            buf = []
    if buf:
        mine = buf[rank * batch_size : (rank + 1) * batch_size]
        yield (collate(mine, pad_token_id, masks=masks) if mine else None), cursor
