"""Packing plain text: chunks are the EOS-joined documents cut by hand, nothing is lost, and
the stream resumes from any cursor with the same chunks."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from transformers import AutoTokenizer

from vlmscope.data.packing import Cursor, Document, Packer, packed_batches

TEXTS = [
    "a red circle",
    "two blue squares on the left and one green triangle at the top right of the picture",
    "yes",
    "the purple star is above the small orange circle",
    "no",
]


@pytest.fixture(scope="module", params=["llama", "qwen2"])  # with a BOS, and without one
def tokenizer(request: pytest.FixtureRequest, zoo_path: Any) -> Any:
    return AutoTokenizer.from_pretrained(zoo_path(request.param))


def docs(epochs: int = 1) -> list[Document]:
    return [Document(e, i, f"d.jsonl:{i}", t) for e in range(epochs) for i, t in enumerate(TEXTS)]


def test_chunks_are_the_eos_joined_stream_cut_at_ctx_len(tokenizer: Any) -> None:
    ctx = 7
    packer = Packer(tokenizer, ctx)
    eos, bos = tokenizer.eos_token_id, tokenizer.bos_token_id
    stream: list[int] = []
    for t in TEXTS:  # by hand: each document's own ids, then EOS
        stream += tokenizer(t, add_special_tokens=False)["input_ids"] + [eos]
    body = ctx - (bos is not None)
    want = [stream[i : i + body] for i in range(0, len(stream), body)]
    got = list(packer.chunks(docs()))
    assert [s.tensors["input_ids"][0].tolist() for s, _ in got] == [
        ([bos] if bos is not None else []) + w for w in want
    ]
    assert all(s.length == ctx for s, _ in got[:-1]) and got[-1][0].length <= ctx
    assert all(bool(s.tensors["attention_mask"].all()) for s, _ in got)
    # The cursor after a chunk points at the stream's next token.
    starts = [0]
    for t in TEXTS:
        starts.append(starts[-1] + len(tokenizer(t, add_special_tokens=False)["input_ids"]) + 1)
    for k, (_, cur) in enumerate(got[:-1]):
        nxt = (k + 1) * body
        row = max(i for i, s in enumerate(starts[:-1]) if s <= nxt)
        assert (cur.rows, cur.offset) == (row, nxt - starts[row]), k
    assert got[-1][1] == Cursor(0, len(TEXTS), 0)


def test_resuming_from_any_cursor_gives_the_same_chunks(tokenizer: Any) -> None:
    packer = Packer(tokenizer, 6)
    full = list(packer.chunks(docs(epochs=3)))  # the stream runs across epochs
    ids = [s.tensors["input_ids"] for s, _ in full]
    assert any(c.offset for _, c in full), "some chunk must end mid-document"
    for k, (_, cur) in enumerate(full[:-1]):
        rest = [d for d in docs(epochs=3) if (d.epoch, d.position) >= (cur.epoch, cur.rows)]
        again = [s.tensors["input_ids"] for s, _ in packer.chunks(rest, offset=cur.offset)]
        assert len(again) == len(ids) - k - 1
        assert all(torch.equal(a, b) for a, b in zip(again, ids[k + 1 :], strict=True)), k


def test_batches_have_no_padding_and_carry_the_last_cursor(tokenizer: Any) -> None:
    packer = Packer(tokenizer, 8)
    chunks = list(packer.chunks(docs(epochs=4)))
    got = list(packed_batches(chunks, 3, pad_token_id=-1))
    full = [b for b, _ in got[:-1]]
    assert all(b.inputs["input_ids"].shape == (3, 8) for b in full)
    assert all(bool((b.inputs["input_ids"] != -1).all()) for b in full)
    assert [c for _, c in got] == [chunks[min(i + 2, len(chunks) - 1)][1]
                                   for i in range(0, len(chunks), 3)]  # fmt: skip


def test_a_tokenizer_without_eos_or_a_tiny_ctx_len_is_refused(zoo_path: Any) -> None:
    tok = AutoTokenizer.from_pretrained(zoo_path("llama"))
    with pytest.raises(ValueError, match="--ctx-len 1 leaves no room"):
        Packer(tok, 1)
    tok.eos_token = None
    with pytest.raises(ValueError, match="EOS token"):
        Packer(tok, 8)
