"""The processed schema: rows holding a processor's outputs train exactly as the raw records
they were made from, are checked against the model, and a dataset made for another model
stops before the first batch."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from vlmscope.cli import main
from vlmscope.data.convert import process_dataset
from vlmscope.models import zoo
from vlmscope.models.hooked import HookedVLM
from vlmscope.training.bundle import DictionaryBundle
from vlmscope.training.config import parse_train_args
from vlmscope.training.sources import open_training_data
from vlmscope.training.trainer import TrainingError, train

SHAPES = "shapes:2"


def train_flags(model: Path, data: str | Path, out: Path, name: str, extra: str = "") -> Any:
    flags = (
        f"{model} {data} --sae.transcode --sae.expansion-factor 2 --sae.k 4 --layers 0 1 "
        f"--batch-size 2 --max-steps 1 --output-dir {out} --run-name {name} {extra}"
    )
    return parse_train_args(flags.split())


def cli_process(model: Path, data: str, out: Path, *extra: str) -> int:
    return main(["data", "process", str(model), data, "--out", str(out), "--no-progress", *extra])


@pytest.mark.parametrize(
    "name",
    zoo.names(multimodal=True),
)
def test_processed_shapes_train_the_same_dictionaries_as_raw_shapes(
    name: str, tmp_path: Path, zoo_path: Any
) -> None:
    model = zoo_path(name)
    vlm = HookedVLM.from_pretrained(model, device="cpu", dtype=torch.float32)
    folder = tmp_path / "processed"
    if name == "llava":  # the command (weightless model), once; the function elsewhere
        assert cli_process(model, SHAPES, folder) == 0
    else:
        folder.mkdir()
        process_dataset(vlm, open_training_data(train_flags(model, SHAPES, tmp_path, "-")), folder)
    raw = train(train_flags(model, SHAPES, tmp_path, "raw"), vlm, progress=False)
    proc = train(train_flags(model, folder, tmp_path, "proc"), vlm, progress=False)
    a = DictionaryBundle.load(raw.dictionaries).state_dict()
    b = DictionaryBundle.load(proc.dictionaries).state_dict()
    assert a.keys() == b.keys() and raw.tokens == proc.tokens > 0
    for k in a:
        assert torch.equal(a[k], b[k]), k
    if name == "llava":  # eval reads processed rows too, to the same report
        from vlmscope.data import open_dataset
        from vlmscope.replacement.evaluate import evaluate

        raw_data = open_training_data(train_flags(model, SHAPES, tmp_path, "-"))
        reports = [evaluate(vlm, raw.dictionaries, d, per_layer=False, batch_size=2,
                            progress=False).to_dict()
                   for d in (raw_data, open_dataset(folder))]  # fmt: skip
        assert reports[0]["n_tokens"] == reports[1]["n_tokens"] > 0
        for key in ("reconstruction", "next_token"):
            assert reports[0][key] == reports[1][key], key


# --------------------------------------------------------------------------------------------
# Row checks, formats, and datasets made for another model (on the zoo LLaVA: 32 px images,
# 16 image tokens, a vocabulary of 445)


@pytest.fixture(scope="module")
def llava_rows(zoo_path: Any, tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Path, list]:
    """(model, folder written by `vlmscope data process` from shapes:4, its rows as lists)."""
    model = zoo_path("llava")
    folder = tmp_path_factory.mktemp("llava") / "processed"
    assert cli_process(model, "shapes:4", folder) == 0
    rows = pq.read_table(next(folder.glob("*.parquet"))).to_pylist()
    return model, folder, rows


def encoded(model: Path, data: Path) -> tuple[list[Any], dict[str, int], list[str]]:
    """Samples a training run would get from `data`, with the skip counts and examples."""
    from vlmscope.data import open_dataset
    from vlmscope.data.processing import SampleEncoder, SkipCounter, encode_stream

    vlm = _vlm(model)
    ds = open_dataset(data)
    assert ds.schema == "processed"
    enc = SampleEncoder(vlm.processor, 2048, vlm.adapter.image_token_ids(), processed=_spec(model))
    skips = SkipCounter()
    details: list[str] = []
    samples = list(encode_stream(ds, enc, skips, on_skip=lambda r, i, d: details.append(d)))
    return samples, skips.counts, details


_VLMS: dict[Path, HookedVLM] = {}
_SPECS: dict[Path, Any] = {}


def _vlm(model: Path) -> HookedVLM:
    if model not in _VLMS:
        _VLMS[model] = HookedVLM.from_pretrained(model, device="cpu", dtype=torch.float32)
    return _VLMS[model]


def _spec(model: Path) -> Any:
    from vlmscope.data.processed import ProcessedSpec

    if model not in _SPECS:
        _SPECS[model] = ProcessedSpec(_vlm(model), "llava")
    return _SPECS[model]


def test_rows_in_every_storage_form_become_the_raw_samples(llava_rows: Any, tmp_path: Path) -> None:
    model, folder, rows = llava_rows
    reference, counts, _ = encoded(model, folder)
    assert len(reference) == 4 and counts == {}
    raw = _vlm(model)
    from vlmscope.data import open_dataset
    from vlmscope.data.processing import SampleEncoder

    enc = SampleEncoder(raw.processor, 2048, raw.adapter.image_token_ids())
    for sample, record in zip(reference, open_dataset(open_training_data(
            train_flags(model, "shapes:4", tmp_path, "-")).description), strict=True):  # fmt: skip
        direct = enc.encode(record)
        assert sample.tensors.keys() == direct.tensors.keys()
        for k, t in direct.tensors.items():
            assert torch.equal(sample.tensors[k], t), k
        assert sample.n_answer == direct.n_answer > 0  # the answer travels in `labels`
    # The processor's own [1, T] and [1, 3, H, W], and a single image without its image dim.
    batched = [{**r, "input_ids": [r["input_ids"]], "attention_mask": [r["attention_mask"]]}
               for r in rows]  # fmt: skip
    squeezed = [{**r, "pixel_values": r["pixel_values"][0]} for r in rows]
    forms = {
        "batched.parquet": batched,
        "squeezed.jsonl": squeezed,
        "plain.json": rows,
    }
    for name, form in forms.items():
        path = tmp_path / name
        if name.endswith(".parquet"):
            pq.write_table(pa.Table.from_pylist(form), path)
        elif name.endswith(".jsonl"):
            path.write_text("".join(json.dumps(r) + "\n" for r in form))
        else:
            path.write_text(json.dumps(form))
        samples, counts, _ = encoded(model, path)
        assert counts == {}, name
        for a, b in zip(samples, reference, strict=True):
            for k, t in b.tensors.items():
                assert torch.equal(a.tensors[k], t), (name, k)
    # A `datasets` save_to_disk folder: Arrow IPC stream files and state.json, pixel_values as
    # `datasets` writes an Array4D feature (its storage, with the extension's field metadata).
    from tests.data.test_sources import save_to_disk_like

    schema = pa.Table.from_pylist(rows).schema
    ext = {"ARROW:extension:name": "datasets.features.features.Array4DExtensionType",
           "ARROW:extension:metadata": '[[null, 3, 32, 32], "float32"]'}  # fmt: skip
    i = schema.get_field_index("pixel_values")
    schema = schema.set(i, schema.field(i).with_type(
        pa.list_(pa.list_(pa.list_(pa.list_(pa.float32()))))).with_metadata(ext))  # fmt: skip
    save_to_disk_like(tmp_path / "saved", rows, schema, shards=2)
    samples, counts, _ = encoded(model, tmp_path / "saved")
    assert counts == {} and len(samples) == 4
    assert all(torch.equal(a.tensors["pixel_values"], b.tensors["pixel_values"])
               for a, b in zip(samples, reference, strict=True))  # fmt: skip


def test_rows_that_disagree_with_the_model_are_skipped_with_a_reason(
    llava_rows: Any, tmp_path: Path
) -> None:
    model, _, rows = llava_rows
    good = rows[0]
    ids = list(good["input_ids"])
    image_at = ids.index(4)  # the image token of the zoo LLaVA
    text_only = {"input_ids": [1, 20, 21, 22], "attention_mask": [1, 1, 1, 1]}
    bad = {
        "beyond_vocab": {**good, "input_ids": [*ids[:-1], 445]},
        "negative_id": {**good, "input_ids": [-1, *ids[1:]]},
        "float_ids": {**good, "input_ids": [float(i) + 0.5 for i in ids]},
        "int_pixels": {**good, "pixel_values": np.zeros((1, 3, 32, 32), np.uint8).tolist()},
        "extra_image_token": {
            **good,
            "input_ids": [*ids[:image_at], 4, *ids[image_at:]],
            "attention_mask": [1] * (len(ids) + 1),
            "labels": None,
        },
        "two_images_one_block": {**good, "pixel_values": good["pixel_values"] * 2},
        "short_mask": {**good, "attention_mask": good["attention_mask"][:-1]},
        "ragged": {**good, "pixel_values": [[[[0.0] * 32] * 31 + [[0.0] * 31]] * 3]},
        "image_tokens_without_pixels": {**good, "pixel_values": None},
    }
    table = [good, *bad.values(), text_only]
    path = tmp_path / "mixed.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in table))
    samples, counts, details = encoded(model, path)
    assert [s.row_id for s in samples] == ["mixed.jsonl:0", f"mixed.jsonl:{len(table) - 1}"]
    assert samples[1].tensors["input_ids"].tolist() == [[1, 20, 21, 22]]
    assert counts == {
        "token_out_of_vocab": 2,
        "bad_dtype": 2,
        "image_token_mismatch": 3,
        "token_length_mismatch": 1,
        "bad_shape": 1,
    }
    text = " | ".join(details)
    assert "input_ids range 1..445 but llava has 445 token embeddings (0..444)" in text
    assert "pixel_values holds int64 values (raw pixels? process the images)" in text
    assert "input_ids holds float64 values" in text
    assert "attention_mask has shape (1, 41)" in text.replace(str(len(ids) - 1), "41")


def test_pixel_values_that_do_not_fit_the_vision_tower_stop_naming_the_row(
    llava_rows: Any, tmp_path: Path
) -> None:
    model, _, rows = llava_rows
    wrong = {**rows[1], "pixel_values": np.zeros((1, 3, 48, 48), np.float32).tolist()}
    data = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist([rows[0], wrong, rows[2]]), data)
    run = train_flags(model, data, tmp_path, "wrong")
    with pytest.raises(TrainingError) as err:
        train(run, _vlm(model), progress=False)
    msg = str(err.value)
    assert "row d.parquet:1: pixel_values has shape (1, 3, 48, 48)" in msg
    assert "[N, 3, 32, 32]" in msg and "\n" not in msg


def test_a_dataset_made_for_another_model_stops_before_the_first_batch(
    llava_rows: Any, tmp_path: Path, zoo_path: Any
) -> None:
    from vlmscope.models.toy import toy_path

    model, folder, rows = llava_rows
    toy = HookedVLM.from_pretrained(toy_path(), device="cpu", dtype=torch.float32)

    def refused(data: Path, vlm: HookedVLM, name: str) -> str:
        with pytest.raises(TrainingError) as err:
            train(train_flags(Path(toy_path()), data, tmp_path, name), vlm, progress=False)
        return str(err.value)

    # Its manifest names the model it was made for.
    msg = refused(folder, toy, "manifest")
    assert "was processed for" in msg and "(llava)" in msg and "vlmscope data process" in msg
    # Without a manifest: the toy's vision tower takes 64 px, these rows hold 32 px.
    bare = tmp_path / "bare.parquet"
    pq.write_table(pa.Table.from_pylist(rows), bare)
    assert "pixel_values has shape (1, 3, 32, 32)" in refused(bare, toy, "shape")
    # Columns of another family (Qwen's image_grid_thw) for a LLaVA.
    qwen = tmp_path / "qwen.parquet"
    pq.write_table(pa.Table.from_pylist([{**r, "image_grid_thw": [[1, 4, 4]]} for r in rows]), qwen)
    with pytest.raises(TrainingError, match=r"columns \['image_grid_thw'\], which .* does not"):
        train(train_flags(model, qwen, tmp_path, "qwen"), _vlm(model), progress=False)
    # No row fits: all beyond the vocabulary.
    big = tmp_path / "big.parquet"
    pq.write_table(pa.Table.from_pylist([{**r, "input_ids": [*r["input_ids"][:-1], 900]}
                                         for r in rows]), big)  # fmt: skip
    with pytest.raises(TrainingError, match=r"none of the first 4 rows .* token_out_of_vocab"):
        train(train_flags(model, big, tmp_path, "big"), _vlm(model), progress=False)


def test_processed_text_without_pixel_values_trains_as_text_with_a_warning(
    llava_rows: Any, tmp_path: Path
) -> None:
    model, _, _ = llava_rows
    tok = _vlm(model).tokenizer
    rows = []
    for i in range(4):  # a tokenizer's token_type_ids, which a LLaVA does not take
        ids = tok(f"a red circle number {i}")["input_ids"]
        rows.append({"input_ids": ids, "token_type_ids": [0] * len(ids)})
    data = tmp_path / "text.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.warns(UserWarning) as caught:
        res = train(train_flags(model, data, tmp_path, "text"), _vlm(model), progress=False)
    said = " | ".join(str(w.message) for w in caught)
    assert "text.jsonl' has no pixel_values column: " in said and "is a vision-language" in said
    assert "has columns ['token_type_ids'], which " in said and "not passed to the model" in said
    assert res.step == 1 and res.tokens > 0


def test_qwen_data_processed_before_videos_counted_as_image_tokens_is_accepted(
    tmp_path: Path, zoo_path: Any
) -> None:
    """Qwen-VL adapters count `<|video_pad|>` as an image token since 2026-12-02, which moved
    the fingerprint of every Qwen-VL model; data processed before holds no video tokens and is
    as valid as it was. Its manifest carries the fingerprint of the image placeholder alone;
    a fingerprint of anything else is still refused."""
    from vlmscope.data.processed import ProcessedDataError, ProcessedSpec, _fingerprint

    model = zoo_path("qwen2_vl")
    out = tmp_path / "proc"
    assert cli_process(model, SHAPES, out) == 0
    vlm = _vlm(model)
    spec = ProcessedSpec(vlm, str(model))
    manifest_path = out / "processed.json"
    manifest = json.loads(manifest_path.read_text())
    assert manifest["fingerprint"] == spec.fingerprint
    config = vlm.model.config
    assert config.video_token_id in spec.image_token_ids
    for ids, accepted in (
        ((config.image_token_id,), True),
        ((config.vision_start_token_id,), False),
    ):
        manifest["fingerprint"] = _fingerprint(vlm.tokenizer, spec.keys, ids)
        manifest_path.write_text(json.dumps(manifest))
        data = open_training_data(train_flags(model, out, tmp_path, "check"))
        if accepted:
            spec.check_dataset(data)
        else:
            with pytest.raises(ProcessedDataError, match="was processed for"):
                spec.check_dataset(data)


@pytest.mark.parametrize("name", ["mllama", "mistral3", "llava"])
def test_rows_with_two_images_or_a_portrait_image_are_the_raw_samples_processed(
    tmp_path: Path, zoo_path: Any, name: str
) -> None:
    """Fixed pixel dimensions were those equal in two one-image probes, both landscape or
    square: Mllama's images per sample and Pixtral's (Mistral 3's) width passed for fixed, and
    a processed row with two images or a portrait image stopped the run as data made for
    another model. Such rows are the raw rows' samples now; data processed with the old
    probes (its manifest's fingerprint) is still accepted."""
    from PIL import Image

    from vlmscope.data import open_dataset
    from vlmscope.data.processed import _fingerprint, _probe
    from vlmscope.data.processing import SampleEncoder

    model = zoo_path(name)
    Image.new("RGB", (24, 100), (200, 30, 30)).save(tmp_path / "tall.png")
    Image.new("RGB", (90, 40), (30, 200, 30)).save(tmp_path / "wide.png")
    rows = []
    for i, images in enumerate([["tall.png"], ["wide.png", "tall.png"], ["wide.png"]]):
        content = [{"type": "image"} for _ in images] + [{"type": "text", "text": f"What {i}?"}]
        rows.append({"messages": [{"role": "user", "content": content},
                                  {"role": "assistant", "content": f"It is {i}."}],
                     "images": images})  # fmt: skip
    data = tmp_path / "raw.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert cli_process(model, str(data), tmp_path / "proc") == 0
    samples, counts, details = encoded(model, tmp_path / "proc")
    assert counts == {} and len(samples) == 3, details
    vlm = _vlm(model)
    enc = SampleEncoder(vlm.processor, 2048, vlm.adapter.image_token_ids())
    for sample, record in zip(samples, open_dataset(data), strict=True):
        direct = enc.encode(record)
        assert sample.tensors.keys() == direct.tensors.keys()
        for k, t in direct.tensors.items():
            assert torch.equal(sample.tensors[k], t), k
    text, now, before = _probe(vlm, _spec(model).image_token_ids, True)
    assert (now != before) == (name != "llava")  # the old probes were wrong for these two
    manifest_path = tmp_path / "proc" / "processed.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["fingerprint"] = _fingerprint(vlm.tokenizer, {**text, **before},
                                           _spec(model).image_token_ids)  # fmt: skip
    manifest_path.write_text(json.dumps(manifest))
    _spec(model).check_dataset(open_training_data(train_flags(model, tmp_path / "proc",
                                                              tmp_path, "check")))  # fmt: skip
