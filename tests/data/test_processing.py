"""Per-record encoding + collation must equal the processor's own batching, for every family."""

from __future__ import annotations

import copy
import json
import multiprocessing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.conftest import random_image
from vlmscope.data.processing import (
    STREAM_CHUNK,
    EncoderPool,
    SampleEncoder,
    SkipCounter,
    SkipJournal,
    SkipRecord,
    batches,
    collate,
    encode_stream,
)
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


def with_images(r: Rec) -> list[dict[str, Any]]:
    """The record's messages with its images in the image parts, as apply_chat_template
    takes them."""
    images = iter(r.images)
    return [
        {
            **m,
            "content": [
                {"type": "image", "image": next(images)} if p["type"] == "image" else p
                for p in m["content"]
            ],
        }
        for m in r.messages
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
    collated_as_the_processor_batches(vlm, enc, recs)


MIXED = [name for name in zoo.names() if zoo.spec(name).multimodal and name != "paligemma"]


@pytest.mark.parametrize("text_first", [False, True], ids=["image-first", "text-first"])
@pytest.mark.parametrize("name", MIXED)
def test_a_batch_mixing_rows_with_and_without_images_collates_as_the_processor_batches_it(
    name: str, text_first: bool, zoo_path: Any
) -> None:
    """Idefics3/SmolVLM and Mllama batch image tensors by sample: a row without images gets
    zeros there. Collate gave fewer rows than samples, and the batch's masks raised, so any
    dataset mixing such rows could not be trained on. (PaliGemma wants an image per row.)"""
    vlm = vlm_for(name, zoo_path)
    enc = SampleEncoder(vlm.processor, ctx_len=4096, image_token_ids=vlm.adapter.image_token_ids())
    recs = [Rec("a", chat("what colour is the circle", "red", 1), [random_image(32, 40, 1)]),
            Rec("b", chat("how many squares are there", "two", 0))]  # fmt: skip
    batch = collated_as_the_processor_batches(vlm, enc, recs[::-1] if text_first else recs)
    assert vlm.masks(batch.inputs).images_per_sample() == ([0, 1] if text_first else [1, 0])


def collated_as_the_processor_batches(vlm: HookedVLM, enc: SampleEncoder, recs: list[Rec]) -> Any:
    """The samples of `recs` collated: the processor's own batch of them, tensor for tensor,
    and a batch the model runs."""
    batch = collate([enc.encode(r) for r in recs], vlm.tokenizer.pad_token_id, "right")
    if enc.template is not None:
        # transformers' own tokenization of the conversations, images included.
        ref = vlm.processor.apply_chat_template(
            [with_images(r) for r in recs], tokenize=True, padding=True, return_dict=True,
            return_tensors="pt", padding_side="right",  # some processors default to left
        )  # fmt: skip
    else:  # PaliGemma: no chat template; prompt and answer (suffix) go to the processor
        texts, answers = zip(*(enc.render(r) for r in recs), strict=True)
        ref = vlm.processor(
            text=list(texts), images=[r.images for r in recs], suffix=list(answers),
            padding=True, return_tensors="pt",
        )  # fmt: skip
    ref = {k: v for k, v in ref.items() if isinstance(v, torch.Tensor) and k != "labels"}
    assert set(batch.inputs) == set(ref)
    for k, v in ref.items():
        assert torch.equal(batch.inputs[k], v), k
    bos = vlm.tokenizer.bos_token_id
    if bos is not None:  # one BOS per sample where the family uses one, never two
        n_bos = (batch.inputs["input_ids"] == bos).sum(1).tolist()
        assert n_bos in ([1, 1], [0, 0])  # Phi-4's template writes none
        assert n_bos == (ref["input_ids"] == bos).sum(1).tolist()
    # The answer mask covers the rendered answer, which starts with the answer word.
    for b, r in enumerate(recs):
        ans_ids = batch.inputs["input_ids"][b][batch.answer[b]]
        word = r.messages[-1]["content"][0]["text"]
        assert vlm.tokenizer.decode(ans_ids).strip().startswith(word)
    vlm.forward(batch.inputs)
    return batch


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


@pytest.mark.parametrize(
    ("name", "closer"),
    [
        ("qwen2_vl", "<|vision_end|>"),
        ("qwen2_5_vl", "<|vision_end|>"),
        ("gemma3", "<end_of_image>"),
        ("idefics3", "<fake_token_around_image>"),
        ("smolvlm", "<fake_token_around_image>"),
        ("llava", None),  # no closing marker: the block ends with its last image token
    ],
)
def test_truncation_keeps_the_image_blocks_closing_marker(
    name: str, closer: str | None, zoo_path: Any
) -> None:
    vlm = vlm_for(name, zoo_path)
    ids = vlm.adapter.image_token_ids()
    rec = Rec("r", chat("what colour is the circle " * 5, "red", 1), [random_image(32, 32)])
    full = SampleEncoder(vlm.processor, 4096, ids).encode(rec)
    full_ids = full.tensors["input_ids"][0]
    last_img = int(torch.isin(full_ids, torch.tensor(ids)).nonzero().max())
    tok = vlm.tokenizer
    if closer is None:
        end = last_img
        assert tok.convert_ids_to_tokens(int(full_ids[end + 1])) not in tok.all_special_tokens
    else:
        end = last_img + 1
        assert tok.convert_ids_to_tokens(int(full_ids[end])) == closer
        # Cutting right after the last image token would drop the closer: the record is skipped.
        with pytest.raises(SkipRecord) as e:
            SampleEncoder(vlm.processor, last_img + 1, ids).encode(rec)
        assert e.value.reason == "exceeds_ctx_len"
    cut = SampleEncoder(vlm.processor, end + 1, ids).encode(rec)
    assert cut.truncated and torch.equal(cut.tensors["input_ids"][0], full_ids[: end + 1])
    for k, v in full.tensors.items():
        if k not in ("input_ids", "attention_mask", "token_type_ids", "mm_token_type_ids"):
            assert torch.equal(cut.tensors[k], v), k
    vlm.forward(cut.tensors)  # the kept block is one the model accepts


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


def test_a_skip_journal_hands_over_the_records_before_a_cursor_in_stream_order() -> None:
    """Workers note a rejection of the reader (read ahead) before one of the encoder at an
    earlier row, and the packer reads the next pass before this one is trained on: `take`
    gives what lies before a cursor (epoch, rows), in the stream's order."""
    from vlmscope.data.sources import BadRecord

    journal = SkipJournal()
    journal.note_bad(BadRecord("f:5", "corrupt_image", "detail", 5))  # the reader, ahead
    journal.note(2, "empty_text", "f:2")  # the encoder, behind it
    journal.note(1, "processor_error", "f:1")
    journal.epoch = 1
    journal.note(0, "missing_image", "f:0")
    assert journal.take((0, 2)) == [("processor_error", "f:1")]
    assert journal.take((0, 5)) == [("empty_text", "f:2")]  # row 5 itself is not passed
    assert journal.take((1, 0)) == [("corrupt_image", "f:5")]
    assert journal.take() == [("missing_image", "f:0")]
    assert journal.take() == []
    counter = SkipCounter()
    counter.add_all([("empty_text", "f:2"), ("empty_text", "f:7")])
    assert (counter.counts, counter.examples) == ({"empty_text": 2}, {"empty_text": ["f:2", "f:7"]})


def test_worker_processes_give_the_same_samples_reading_ahead_a_bounded_window(
    zoo_path: Any,
) -> None:
    """Workers give the serial samples in order, and read only a bounded window of records
    ahead of the consumer (a larger-than-memory dataset must stream with flat memory)."""
    vlm = vlm_for("llava", zoo_path)
    enc = SampleEncoder(vlm.processor, 4096, vlm.adapter.image_token_ids())
    texts = [Rec(f"t{i}", chat(f"say {i}", "ok", 0)) for i in range(12)]
    recs = [*records(True), Rec("empty", [], [], ""), *records(True), *texts]
    pulled = 0

    def source() -> Any:
        nonlocal pulled
        for r in recs:
            pulled += 1
            yield r

    skips_a, skips_b = SkipCounter(), SkipCounter()
    a = list(encode_stream(recs, enc, skips_a))
    stream = encode_stream(source(), enc, skips_b, workers=1)
    b = [next(stream)]
    # 2 tasks per worker in flight plus the one refilled after the first result.
    assert pulled <= (2 * 1 + 1) * STREAM_CHUNK < len(recs)
    b += list(stream)
    assert pulled == len(recs)
    assert skips_a.counts == skips_b.counts == {"empty_text": 1}
    assert skips_b.examples == {"empty_text": ["empty"]}
    assert [s.row_id for s in a] == [s.row_id for s in b] and len(b) == len(recs) - 1
    for x, y in zip(a, b, strict=True):
        assert x.tensors.keys() == y.tensors.keys()
        for k in x.tensors:
            assert x.tensors[k].dtype == y.tensors[k].dtype
            assert torch.equal(x.tensors[k], y.tensors[k])
    # One pool kept for several passes, as a trainer keeps it across epochs: a pass left
    # after its first sample does not disturb the next, and the workers are the same ones.
    with EncoderPool(enc, 1) as pool:
        workers = {p.pid for p in multiprocessing.active_children()}
        next(encode_stream(recs, enc, SkipCounter(), pool=pool))
        again = list(encode_stream(recs, enc, SkipCounter(), pool=pool))
        assert {p.pid for p in multiprocessing.active_children()} == workers
    assert [s.row_id for s in again] == [s.row_id for s in a]
    assert all(torch.equal(x.tensors["input_ids"], y.tensors["input_ids"])
               for x, y in zip(a, again, strict=True))  # fmt: skip
    assert not any(p.pid in workers for p in multiprocessing.active_children())


@pytest.mark.parametrize("name", zoo.names())
def test_batches_carry_the_token_masks(name: str, zoo_path: Any) -> None:
    """Batch.masks, filled by the batching step, is what the model computes for the batch, and
    its counts match the records and the processor's placeholders."""
    vlm = vlm_for(name, zoo_path)
    enc = SampleEncoder(vlm.processor, 4096, vlm.adapter.image_token_ids())
    recs = records(zoo.spec(name).multimodal)
    pad = vlm.tokenizer.pad_token_id
    (batch,) = batches([enc.encode(r) for r in recs], 2, pad, "left", masks=vlm.masks)
    m, ref = batch.masks, vlm.masks(batch.inputs)
    assert m is not None
    for f in ("input_ids", "valid", "image", "special", "patch_map"):
        assert torch.equal(getattr(m, f), getattr(ref, f)), f
    assert m.image_sample == ref.image_sample
    assert torch.equal(m.valid, batch.inputs["attention_mask"].bool())
    assert m.images_per_sample() == [len(r.images) for r in recs]
    if zoo.spec(name).multimodal:
        # The model's placeholder id (Llama 4's processor names its <|image|> marker instead).
        cfg = vlm.model.config
        image_id = next(
            getattr(c, k) for c in (cfg, getattr(cfg, "vision_config", None))
            for k in ("image_token_id", "image_token_index") if getattr(c, k, None) is not None
        )  # fmt: skip
        assert m.image_token_counts() == (batch.inputs["input_ids"] == image_id).sum(1).tolist()
    assert batch.to("cpu").masks is not None
    assert collate([enc.encode(recs[0])], pad).masks is None  # no masks function, no masks


@pytest.mark.parametrize("name", zoo.names())
def test_one_template_render_per_sample_matches_two(name: str, zoo_path: Any) -> None:
    """render() renders each conversation once; the full text and the answer equal what the
    two-render definition (whole conversation; its prefix with the generation prompt) gives,
    for every family's template, and the template runs once per sample after the first."""
    vlm = vlm_for(name, zoo_path)
    enc = SampleEncoder(vlm.processor, ctx_len=4096, image_token_ids=vlm.adapter.image_token_ids())
    if enc.template is None:
        pytest.skip("no chat template: nothing is rendered")
    recs = records(zoo.spec(name).multimodal)
    turns = chat("what is two plus two", "four", 0) + chat("and three plus three", "six", 0)
    recs.append(Rec("two turns", turns))
    calls = 0
    apply = enc._apply

    def counted(msgs: Any, gen: bool) -> str:
        nonlocal calls
        calls += 1
        return apply(msgs, gen)

    enc._apply = counted  # type: ignore[method-assign]
    got = [enc.render(r) for r in recs]
    assert calls == len(recs) + 2  # the first sample also checks the scheme (two more renders)
    for r, (full, answer) in zip(recs, got, strict=True):
        want_full = apply(r.messages, False)
        prefix = apply(r.messages[:-1], True)
        assert full == want_full
        assert answer == want_full[len(prefix) :]


def test_a_worker_killed_mid_stream_is_an_error_not_a_hang(zoo_path: Any) -> None:
    """The pool replaces a dead worker but the chunk it held never answers: the stream names
    the death (SIGKILL, as the out-of-memory killer sends) instead of waiting forever. And the
    pool still closes when the worker died holding the result queue's lock, which the workers
    share (the killer does not wait for a result to be sent): Pool.terminate() waits on it for
    ever. The test holds that lock as such a worker would, to make that case certain."""
    import os
    import signal
    import threading

    from vlmscope.data.processing import WorkerDiedError

    vlm = vlm_for("llava", zoo_path)
    enc = SampleEncoder(vlm.processor, 4096, vlm.adapter.image_token_ids())
    recs = [*records(True)] * 40
    pool = EncoderPool(enc, 1)
    lock = pool._pool._outqueue._wlock  # type: ignore[attr-defined]
    held = False
    try:
        stream = encode_stream(recs, enc, SkipCounter(), pool=pool)
        next(stream)
        (worker,) = [p for p in multiprocessing.active_children() if p.pid in
                     {q.pid for q in pool._processes}]  # fmt: skip
        held = lock.acquire()
        os.kill(worker.pid, signal.SIGKILL)
        with pytest.raises(WorkerDiedError, match=r"died: killed by signal 9.*out of memory"):
            list(stream)
        closer = threading.Thread(target=pool.close, daemon=True)
        closer.start()
        closer.join(60)
        assert not closer.is_alive(), "closing the pool waits on the lock the dead worker held"
        assert all(p.exitcode is not None for p in pool._pool._pool)  # type: ignore[attr-defined]
    finally:
        if held:
            lock.release()


@pytest.mark.parametrize("name", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "llava_next_video"])
def test_video_rows_become_the_samples_vlm_prepare_makes(
    name: str, zoo_path: Any, tmp_path: Path
) -> None:
    """A chat row's `{"type": "video"}` part takes its frames inline (a list of images) or
    from a `videos` column; the sample is the one `HookedVLM.prepare` makes of the same
    conversation and frames (checked against transformers there), its masks count a video as
    one image, and the record's pictures follow the parts' order (a video's first frame)."""
    from vlmscope.data import open_dataset

    for i in range(4):
        random_image(32, 40, 10 + i).save(tmp_path / f"f{i}.png")
    random_image(36, 36, 20).save(tmp_path / "im.png")
    frames = [f"f{i}.png" for i in range(4)]
    rows = [
        {"messages": [{"role": "user", "content": [{"type": "video", "video": frames},
                                                   {"type": "text", "text": "What moves?"}]},
                      {"role": "assistant", "content": "A dot."}]},
        {"messages": [{"role": "user", "content": [{"type": "image"},
                                                   {"type": "text", "text": "and"},
                                                   {"type": "video"}]},
                      {"role": "assistant", "content": "Both."}],
         "images": ["im.png"], "videos": [frames[:3]]},
    ]  # fmt: skip
    (tmp_path / "v.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    vlm = vlm_for(name, zoo_path)
    enc = SampleEncoder(vlm.processor, 4096, vlm.adapter.image_token_ids())
    records = list(open_dataset(tmp_path / "v.jsonl"))
    assert [len(r.videos) for r in records] == [1, 1] and len(records[1].videos[0]) == 3
    for rec, n_pictures in zip(records, (1, 2), strict=True):
        sample = enc.encode(rec)
        want = vlm.prepare([rec.messages], images=[rec.images] if rec.images else None,
                           videos=[rec.videos], add_generation_prompt=False)  # fmt: skip
        assert sample.tensors.keys() == set(want.keys())
        for k, t in want.items():
            assert torch.equal(sample.tensors[k], t), k
        assert sample.n_answer > 0
        assert vlm.masks(sample.tensors).images_per_sample() == [n_pictures]
    assert records[1].pictures()[0] == (records[1].images[0], False)  # the image part first
    assert records[1].pictures()[1] == (records[1].videos[0][0], True)


def test_video_rows_are_skipped_for_a_model_whose_adapter_reads_no_videos(
    zoo_path: Any, tmp_path: Path
) -> None:
    """Whether video rows are read is the model's (its adapter lays video tokens out), not
    the processor's: with torchvision installed LLaVA-OneVision's processor has a video
    processor while vlmscope lays out its images only, and its video tokens would have trained
    as text. Simulated by giving the zoo processor a video processor."""
    from vlmscope.data.processing import SkipRecord
    from vlmscope.models.zoo.llava_next_video import FramesAsImages

    vlm = vlm_for("llava_onevision", zoo_path)
    assert not vlm.adapter.capabilities.video
    processor = copy.copy(vlm.processor)
    processor.video_processor = FramesAsImages(32)
    frames = [random_image(32, 32, 30), random_image(32, 32, 31)]
    content = [{"type": "video"}, {"type": "text", "text": "What moves?"}]
    rec = Rec("v", [{"role": "user", "content": content},
                    {"role": "assistant", "content": "A dot."}])  # fmt: skip
    rec.videos = [frames]  # type: ignore[attr-defined]
    assert SampleEncoder(processor, 4096, vlm.adapter.image_token_ids()).has_videos
    enc = SampleEncoder(processor, 4096, vlm.adapter.image_token_ids(), videos=False)
    with pytest.raises(SkipRecord, match="videos_for_model"):
        enc.encode(rec)


def test_videos_of_different_lengths_are_not_padded_into_one_batch() -> None:
    """LLaVA-NeXT-Video's videos are [videos, frames, ...]: padding a 2-frame video to 3
    frames gave it a blank frame its prompt has no tokens for, and the masks failed with a
    traceback. The batch is refused by name; Qwen's flattened patches still concatenate."""
    from vlmscope.data.processing import CollateError, Sample

    def video(frames: int, dims: int = 5) -> Sample:
        pixels = torch.zeros(1, frames, 3, 4, 4) if dims == 5 else torch.zeros(frames * 8, 12)
        return Sample(f"r{frames}", {"input_ids": torch.ones(1, 3, dtype=torch.long),
                                     "pixel_values_videos": pixels})  # fmt: skip

    with pytest.raises(CollateError, match=r"\['r3', 'r2'\] hold videos of \[2, 3\] frames"):
        collate([video(3), video(2)], 0)
    assert collate([video(3), video(3)], 0).inputs["pixel_values_videos"].shape[1] == 3
    flat = collate([video(3, dims=2), video(2, dims=2)], 0).inputs["pixel_values_videos"]
    assert flat.shape == (40, 12)
