"""Per-record encoding + collation must equal the processor's own batching, for every family."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest
import torch

from tests.conftest import random_image
from vlmscope.data.processing import SampleEncoder, SkipCounter, SkipRecord, collate, encode_stream
from vlmscope.models import zoo
from vlmscope.models.hooked import HookedVLM


@dataclass
class Rec:
    row_id: str
    messages: list[dict[str, Any]]
    images: list[Any] = field(default_factory=list)
    text: str = ""


def chat(question: str, answer: str, n_images: int) -> list[dict[str, Any]]:
    content = [{"type": "image"}] * n_images + [{"type": "text", "text": question}]
    return [
        {"role": "user", "content": content},
        {"role": "assistant", "content": [{"type": "text", "text": answer}]},
    ]


def records(multimodal: bool) -> list[Rec]:
    if not multimodal:
        return [Rec("a", chat("what colour is the circle", "red", 0)),
                Rec("b", chat("how many squares are there", "two", 0))]  # fmt: skip
    return [
        Rec("a", chat("what colour is the circle", "red", 1), [random_image(32, 40, 1)]),
        Rec(
            "b",
            chat("how many squares", "two", 2),
            [random_image(48, 32, 2), random_image(32, 32, 3)],
        ),
    ]


_VLMS: dict[str, HookedVLM] = {}


def vlm_for(name: str, zoo_path: Any) -> HookedVLM:
    if name not in _VLMS:
        _VLMS[name] = HookedVLM.from_pretrained(zoo_path(name), device="cpu", dtype=torch.float32)
    return _VLMS[name]


@pytest.mark.parametrize("name", zoo.names())
def test_collate_equals_processor_batching(name: str, zoo_path: Any) -> None:
    vlm = vlm_for(name, zoo_path)
    enc = SampleEncoder(vlm.processor, ctx_len=4096, image_token_ids=vlm.adapter.image_token_ids())
    recs = records(zoo.spec(name).multimodal)
    batch = collate([enc.encode(r) for r in recs], vlm.tokenizer.pad_token_id, "right")
    texts = [enc.render(r)[0] for r in recs]
    suffix = {"suffix": [enc.render(r)[1] for r in recs]} if enc.takes_suffix else {}
    if recs[0].images:
        ref = vlm.processor(
            text=texts, images=[r.images for r in recs], padding=True, return_tensors="pt", **suffix
        )
    else:
        ref = vlm.processor(texts, padding=True, return_tensors="pt")
    ref = {k: v for k, v in ref.items() if isinstance(v, torch.Tensor) and k != "labels"}
    assert set(batch.inputs) == set(ref)
    for k, v in ref.items():
        assert torch.equal(batch.inputs[k], v), k
    # The answer mask covers the rendered answer, which starts with the answer word.
    for b, r in enumerate(recs):
        ans_ids = batch.inputs["input_ids"][b][batch.answer[b]]
        word = r.messages[-1]["content"][0]["text"]
        assert vlm.tokenizer.decode(ans_ids).strip().startswith(word)
    vlm.forward(batch.inputs)


def test_truncation_never_cuts_an_image_block(zoo_path: Any) -> None:
    vlm = vlm_for("llava", zoo_path)
    ids = vlm.adapter.image_token_ids()
    rec = Rec("r", chat("what colour is the circle " * 5, "red", 1), [random_image(32, 32)])
    full = SampleEncoder(vlm.processor, 4096, ids).encode(rec)
    img_pos = torch.isin(full.tensors["input_ids"][0], torch.tensor(ids)).nonzero()
    last_img = int(img_pos.max())
    # A cut after the image keeps it and shortens the text.
    cut = SampleEncoder(vlm.processor, last_img + 3, ids).encode(rec)
    assert cut.truncated and cut.length == last_img + 3
    assert torch.equal(cut.tensors["input_ids"][0], full.tensors["input_ids"][0, : last_img + 3])
    assert torch.equal(cut.tensors["pixel_values"], full.tensors["pixel_values"])
    # A cut inside the image block drops the record.
    with pytest.raises(SkipRecord) as e:
        SampleEncoder(vlm.processor, last_img, ids).encode(rec)
    assert e.value.reason == "exceeds_ctx_len"


def test_stream_counts_skips_and_keeps_order(zoo_path: Any) -> None:
    vlm = vlm_for("llava", zoo_path)
    enc = SampleEncoder(vlm.processor, 4096, vlm.adapter.image_token_ids())
    good = records(True)
    bad = [
        Rec("empty", [], [], ""),
        Rec("no-placeholder", [{"role": "user", "content": "hi"}], [random_image(32, 32)]),
    ]
    skips = SkipCounter()
    out = list(encode_stream([good[0], bad[0], bad[1], good[1]], enc, skips))
    assert [s.row_id for s in out] == ["a", "b"]
    assert skips.counts == {"empty_text": 1, "image_placeholder_mismatch": 1} or skips.counts == {
        "empty_text": 1,
        "processor_error": 1,
    }
    with pytest.raises(SkipRecord, match="row empty"):
        list(encode_stream([good[0], bad[0]], enc, SkipCounter(), strict=True))


def test_worker_processes_give_the_same_samples(zoo_path: Any) -> None:
    vlm = vlm_for("llava", zoo_path)
    enc = SampleEncoder(vlm.processor, 4096, vlm.adapter.image_token_ids())
    recs = records(True) * 2
    a = list(encode_stream(recs, enc, SkipCounter()))
    b = list(encode_stream(recs, enc, SkipCounter(), workers=2))
    assert [s.row_id for s in a] == [s.row_id for s in b]
    for x, y in zip(a, b, strict=True):
        assert x.tensors.keys() == y.tensors.keys()
        for k in x.tensors:
            assert torch.equal(x.tensors[k], y.tensors[k])
