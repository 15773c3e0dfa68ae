"""The live source's data paths: --pack (default for text-only models on plain text, resumes
mid-document bit-exactly) and the choices around it."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from vlmscope.models.hooked import HookedVLM
from vlmscope.training.bundle import DictionaryBundle
from vlmscope.training.config import parse_train_args
from vlmscope.training.sources import LiveSource, TrainState
from vlmscope.training.trainer import Trainer, TrainingError, train

WORDS = [
    "red",
    "blue",
    "green",
    "circle",
    "square",
    "triangle",
    "star",
    "left",
    "right",
    "top",
    "bottom",
    "small",
    "big",
    "the",
    "a",
]


def documents(path: Path, n: int = 12) -> Path:
    """Plain-text documents of mixed lengths, from 2 words to far beyond the context."""
    g = torch.Generator().manual_seed(0)
    lengths = [2, 40, 3, 90, 5, 1, 25, 60, 4, 7, 33, 2][:n]
    rows = []
    for i, n_words in enumerate(lengths):
        picks = torch.randint(len(WORDS), (n_words,), generator=g).tolist()
        rows.append({"id": str(i), "text": " ".join(WORDS[j] for j in picks)})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def flags(model: Path, data: Path, out: Path, name: str, extra: str = "") -> Any:
    return parse_train_args(
        f"{model} {data} --sae.expansion-factor 2 --sae.k 4 --layers 1 --ctx-len 16 "
        f"--batch-size 2 --max-steps 4 --save-every 2 --output-dir {out} --run-name {name} "
        f"{extra}".split()
    )


@pytest.fixture(scope="module")
def llama(zoo_path: Any) -> HookedVLM:
    return HookedVLM.from_pretrained(zoo_path("llama"), device="cpu", dtype=torch.float32)


def test_packed_training_resumes_mid_document_bit_exactly(
    tmp_path: Path, zoo_path: Any, llama: HookedVLM, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, data = zoo_path("llama"), documents(tmp_path / "docs.jsonl")
    full = train(flags(model, data, tmp_path, "full"), llama, progress=False)
    batches = LiveSource.batches

    def crash_after_three(self: LiveSource, state: TrainState) -> Iterator[Any]:
        for i, batch in enumerate(batches(self, state)):
            if i == 3:  # step 3 trained, checkpoint at step 2
                raise RuntimeError("simulated crash")
            yield batch

    monkeypatch.setattr(LiveSource, "batches", crash_after_three)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(flags(model, data, tmp_path, "crashed"), llama, progress=False)
    monkeypatch.undo()
    saved = json.loads((tmp_path / "crashed" / "checkpoint" / "state.json").read_text())
    cursor = saved["train_state"]
    assert cursor["step"] == 2 and cursor["offset"] > 0, cursor  # inside a document
    resumed = train(flags(model, data, tmp_path, "crashed", "--resume"), llama, progress=False)
    assert (resumed.step, resumed.tokens) == (full.step, full.tokens)
    a = DictionaryBundle.load(full.dictionaries).state_dict()
    b = DictionaryBundle.load(resumed.dictionaries).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def documents_with_empty_ones(path: Path) -> tuple[Path, list[int]]:
    """`documents` with four empty texts among them, which the reader rejects; their rows."""
    rows = [json.loads(line) for line in documents(path).read_text().splitlines()]
    for p in (1, 4, 9, 13):
        rows.insert(p, {"id": f"empty{p}", "text": " "})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path, [i for i, r in enumerate(rows) if not r["text"].strip()]


def checked_skips(run_dir: Path, bad: dict[str, list[int]]) -> dict[str, Any]:
    """The run's checkpointed train state, its skip counts checked against the bad rows (by
    reason) before its cursor (epoch, rows): every pass before holds all of them."""
    state = json.loads((run_dir / "checkpoint" / "state.json").read_text())["train_state"]
    truth = {r: state["epoch"] * len(rows) + sum(p < state["rows"] for p in rows)
             for r, rows in bad.items()}  # fmt: skip
    assert state["skips"] == {r: n for r, n in truth.items() if n}, state
    return state  # type: ignore[no-any-return]


def test_packed_skip_counts_hold_the_rows_before_the_cursor(
    tmp_path: Path, zoo_path: Any, llama: HookedVLM
) -> None:
    """The packer tokenises documents in groups, far ahead of the chunks trained on (here
    across several passes of a small file); a checkpoint's skip counts are the bad rows before
    its cursor (epoch, rows) all the same, so a run stopped at step 2 and resumed to step 4
    counts what an uninterrupted run counts."""
    model, (data, bad) = zoo_path("llama"), documents_with_empty_ones(tmp_path / "docs.jsonl")

    def run(name: str, extra: str) -> dict[str, Any]:
        train(flags(model, data, tmp_path, name, extra), llama, progress=False)
        return checked_skips(tmp_path / name, {"empty_text": bad})

    stopped = run("crashed", "--max-steps 2")
    assert stopped["skips"]  # bad rows lie before the cursor and after it
    resumed = run("crashed", "--resume")
    whole = run("full", "")
    assert resumed["skips"] == whole["skips"]
    assert (resumed["epoch"], resumed["rows"]) == (whole["epoch"], whole["rows"])


def test_pack_is_the_default_for_text_only_models_on_plain_text(
    tmp_path: Path, zoo_path: Any, llama: HookedVLM
) -> None:
    data = documents(tmp_path / "docs.jsonl")
    model = zoo_path("llama")
    packed = Trainer(flags(model, data, tmp_path, "a"), llama, progress=False)
    assert packed.source.packer is not None  # type: ignore[attr-defined]
    batch = next(packed.source._packed_batches(TrainState()))[0]  # type: ignore[attr-defined]
    assert batch.inputs["input_ids"].shape == (2, 16) and bool(batch.inputs["attention_mask"].all())
    unpacked = Trainer(flags(model, data, tmp_path, "b", "--no-pack"), llama, progress=False)
    assert unpacked.source.packer is None  # type: ignore[attr-defined]
    vlm = HookedVLM.from_pretrained(zoo_path("llava"), device="cpu", dtype=torch.float32)
    on_vlm = Trainer(flags(zoo_path("llava"), data, tmp_path, "c"), vlm, progress=False)
    assert on_vlm.source.packer is None  # type: ignore[attr-defined]
    forced = Trainer(flags(zoo_path("llava"), data, tmp_path, "d", "--pack"), vlm, progress=False)
    assert forced.source.packer is not None  # type: ignore[attr-defined]
    with pytest.raises(TrainingError, match="--pack joins plain-text documents, but 'shapes:4'"):
        Trainer(flags(zoo_path("llava"), "shapes:4", tmp_path, "e", "--pack"), vlm)  # type: ignore[arg-type]


def test_packed_training_on_two_ranks_equals_one_process_on_the_global_batch(
    tmp_path: Path, zoo_path: Any
) -> None:
    """--pack under torchrun: 2 ranks x --batch-size 2 train the one-process dictionaries of
    batch 4 (SGD; each rank packs the same stream and takes its share of every window), and
    the checkpoint's cursor is the one process's, mid-document."""
    from .test_store_source import two_ranks_against_one

    model, data = zoo_path("llama"), documents(tmp_path / "docs.jsonl")
    base = (f"{model} {data} --sae.expansion-factor 2 --sae.k 4 --layers 1 --ctx-len 16 "
            f"--max-steps 5 --save-every 5 --lr 0.05 --device cpu --pack "
            f"--output-dir {tmp_path}")  # fmt: skip
    results, res = two_ranks_against_one(tmp_path, base)
    assert results[0]["tokens"] == res.tokens
    cursors = [json.loads((tmp_path / n / "checkpoint" / "state.json").read_text())["train_state"]
               for n in ("two", "one")]  # fmt: skip
    assert cursors[0] == cursors[1] and cursors[0]["offset"] > 0, cursors


@pytest.mark.parametrize("pack", [True, False])
def test_two_ranks_count_the_bad_rows_before_the_global_cursor_once(
    tmp_path: Path, zoo_path: Any, pack: bool
) -> None:
    """Under torchrun each rank counts the rows it reads and the checkpoint sums them: packed,
    every rank reads the whole stream (rank 0 alone counts it); unpacked, a rank reads its
    next window's first sample before its batch of this one is trained on."""
    from tests.training.test_trainer import llava_rows_with_bad_ones

    from .test_store_source import store_ranks

    if pack:
        model, (data, bad_rows) = zoo_path("llama"), documents_with_empty_ones(tmp_path / "d.jsonl")
        bad = {"empty_text": bad_rows}
        extra = "--layers 1 --ctx-len 16 --max-steps 2 --pack"
    else:
        model, (data, bad_rows) = zoo_path("llava"), llava_rows_with_bad_ones(tmp_path)
        # every third row is bad, missing and corrupt images in turn
        bad = {r: bad_rows[i::2] for i, r in enumerate(("missing_image", "corrupt_image"))}
        extra = "--sae.transcode --max-steps 1"
    cfg = parse_train_args(
        f"{model} {data} --sae.expansion-factor 2 --sae.k 4 --batch-size 2 --device cpu "
        f"--output-dir {tmp_path} --run-name two {extra}".split()
    )
    results = store_ranks(2, tmp_path / "r2", cfg)
    assert all(r["ok"] for r in results), results
    state = checked_skips(tmp_path / "two", bad)
    assert state["skips"]  # bad rows lie before the cursor


# --- Mllama: batches without images skip the cross-attention layers ----------------------------
def mllama_rows(folder: Path, images: list[bool]) -> Path:
    """LLaVA-style rows, with a red picture where `images` says."""
    from .test_model_sharding import chat_rows

    folder.mkdir(parents=True, exist_ok=True)
    return chat_rows(folder, ["red.png" if im else None for im in images])


@pytest.mark.parametrize("kind", ["--sae.kind sae", "--sae.kind clt"])
def test_mllama_batches_without_images_are_left_out_where_the_run_reads_skipped_layers(
    tmp_path: Path, zoo_path: Any, kind: str
) -> None:
    """Transformers runs no cross-attention layer (1 and 3 in the zoo model) for a batch
    without images, so their hooks give no rows: an SAE on every layer stopped before its first
    step (its hook-width probe was text alone) and a CLT at the first such batch. Such a batch
    is left out, said once, and the run trains what it trains on the image rows alone."""
    model = zoo_path("mllama")
    flags = f"--batch-size 2 --max-steps 1 --sae.expansion-factor 2 --sae.k 4 {kind}"
    mixed = mllama_rows(tmp_path / "mixed", [False, False, True, True])
    only = mixed.with_name("image_rows.jsonl")  # the same image rows alone
    only.write_text("".join(mixed.read_text().splitlines(keepends=True)[2:]))
    got = {}
    for name, data in (("mixed", mixed), ("only", only)):
        cfg = parse_train_args(f"{model} {data} {flags} --output-dir {tmp_path} "
                               f"--run-name {name}".split())  # fmt: skip
        with pytest.warns(UserWarning, match=r"layers \[1, 3\].*left out") if name == "mixed" \
                else contextlib.nullcontext():  # fmt: skip
            res = train(cfg, progress=False)
        assert res.step == 1
        got[name] = DictionaryBundle.load(res.run_dir / "dictionaries").state_dict()
    assert got["mixed"].keys() == got["only"].keys()
    for k, t in got["only"].items():
        assert torch.equal(got["mixed"][k], t), k


def test_video_rows_train_a_video_model_and_are_counted_for_another(
    tmp_path: Path, zoo_path: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """Qwen2-VL trains on rows whose videos are lists of frames; LLaVA, whose processor takes
    no video, skips them by reason, and a pass where every row was skipped names them (its
    message said "no records skipped": the pass's skips were counted after it)."""
    from PIL import Image

    for i in range(2):
        Image.new("RGB", (40, 32), (90 * i, 40, 200)).save(tmp_path / f"f{i}.png")
    part = {"type": "video", "video": ["f0.png", "f1.png"]}
    rows = [{"messages": [{"role": "user", "content": [part, {"type": "text", "text": f"{i}?"}]},
                          {"role": "assistant", "content": f"It is {i}."}]}
            for i in range(4)]  # fmt: skip
    data = tmp_path / "videos.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    flags = f"{data} --sae.transcode --max-steps 2 --batch-size 2 --sae.k 4 --output-dir {tmp_path}"
    res = train(parse_train_args(f"{zoo_path('qwen2_vl')} {flags}".split()), progress=False)
    assert res.step == 2 and res.tokens > 0
    with pytest.raises(TrainingError, match=r"no usable samples \(4 records skipped.*videos_for"):
        train(parse_train_args(f"{zoo_path('llava')} {flags}".split()), progress=False)
    # --strict stops at the first such row with one line, not a traceback
    from vlmscope.cli import main

    strict = [str(zoo_path("llava")), *flags.split(), "--strict", "--run-name", "strict"]
    assert main(["train", *strict]) == 1
    err = capsys.readouterr().err
    assert "vlmscope train: error: videos_for_model: row videos.jsonl:0" in err
