"""Readers on datasets that mix every kind of bad record with good ones, in every format."""

from __future__ import annotations

import io
import json
import logging
import os
import struct
import sys
import types
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageFile

from vlmscope.data import (
    REASONS,
    BadRecord,
    BadRecordError,
    ColumnMap,
    Dataset,
    Reason,
    Record,
    open_dataset,
)
from vlmscope.data.sources import _Malformed, iter_json_list

MAX_PIXELS = 1000  # good test images are 12x10; "big" ones 40x40


def noise(seed: int, h: int = 12, w: int = 10) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def bomb_png(side: int = 20000) -> bytes:
    """A PNG header claiming side x side pixels (beyond PIL's hard limit), with no real data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


BAD_BYTES = {
    "garbage": b"this is not an image" * 3,
    "truncated": png(noise(99, 24, 24))[:600],
    "empty": b"",
    "big": png(noise(98, 40, 40)),
    "bomb": bomb_png(),
}


def pixels(im: Image.Image) -> np.ndarray:
    return np.asarray(im.convert("RGB"))


def user(*parts: dict[str, Any]) -> dict[str, Any]:
    return {"role": "user", "content": list(parts)}


def assistant(text: str) -> dict[str, Any]:
    return {"role": "assistant", "content": [{"type": "text", "text": text}]}


IMG = {"type": "image"}


def txt(text: str) -> dict[str, Any]:
    return {"type": "text", "text": text}


def read_all(ds: Dataset) -> list[Record]:
    return list(ds)


Expected = dict[str, tuple[list[Any], list[np.ndarray]]]
LlavaCase = tuple[Path, Path, Expected, dict[str, int]]
ChatCase = tuple[Path, Expected, dict[str, int]]


def check_good(records: list[Record], expected: Expected) -> None:
    """Good records arrive in order, with the same messages and the same pixels."""
    assert [r.row_id for r in records] == list(expected)
    for rec in records:
        messages, arrays = expected[rec.row_id]
        assert rec.messages == messages, rec.row_id
        assert len(rec.images) == len(arrays)
        for im, arr in zip(rec.images, arrays, strict=True):
            np.testing.assert_array_equal(pixels(im), arr)
    positions = [r.position for r in records]
    assert positions == sorted(positions)


# --------------------------------------------------------------------------------------------
# LLaVA JSONL with image files


@pytest.fixture
def llava_jsonl(tmp_path: Path) -> LlavaCase:
    root = tmp_path / "imgs"
    root.mkdir()
    good = {i: noise(i) for i in range(3)}
    for i, arr in good.items():
        (root / f"good{i}.png").write_bytes(png(arr))
    for name, data in BAD_BYTES.items():
        (root / f"{name}.png").write_bytes(data)

    def conv(q: str, a: str = "ok") -> list[dict[str, str]]:
        return [{"from": "human", "value": q}, {"from": "gpt", "value": a}]

    lines: list[str] = [
        json.dumps(
            {"id": "g0", "image": "good0.png", "conversations": conv("<image>\nWhat?", "A")}
        ),
        json.dumps({"id": "g1", "conversations": conv("Hi", "Hello")}),
        json.dumps({"id": "b", "image": "nope.png", "conversations": conv("<image>\nQ")}),
        json.dumps({"id": "b", "image": "garbage.png", "conversations": conv("<image>\nQ")}),
        json.dumps({"id": "b", "image": "truncated.png", "conversations": conv("<image>\nQ")}),
        json.dumps({"id": "b", "image": "empty.png", "conversations": conv("<image>\nQ")}),
        json.dumps({"id": "b", "image": "big.png", "conversations": conv("<image>\nQ")}),
        json.dumps({"id": "b", "image": "bomb.png", "conversations": conv("<image>\nQ")}),
        '{"id": "b", "conversations": [',
        json.dumps({"id": "b", "image": "good0.png"}),
        json.dumps({"id": "b", "conversations": "hello"}),
        json.dumps({"id": "b", "conversations": [{"from": "robot", "value": "beep"}]}),
        json.dumps({"id": "b", "image": "good0.png", "conversations": conv("no token")}),
        json.dumps({"id": "b", "conversations": conv("<image>\nno image")}),
        json.dumps({"id": "b", "image": "good0.png", "conversations": []}),
        json.dumps(
            {
                "id": "g2",
                "image": "good1.png",
                "conversations": conv("Describe\n<image>", "Noise") + conv("More?", "No."),
            }
        ),
        "",  # blank lines are not rows
        json.dumps([1, 2]),
        json.dumps({"id": "g3", "image": "good2.png", "conversations": conv("<image>\nX", "Y")}),
    ]
    path = tmp_path / "data" / "train.jsonl"
    path.parent.mkdir()
    path.write_text("\n".join(lines) + "\n")
    expected = {
        "train.jsonl:0": ([user(IMG, txt("What?")), assistant("A")], [good[0]]),
        "train.jsonl:1": (
            [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}],
            [],
        ),
        "train.jsonl:15": (
            [user(txt("Describe"), IMG), assistant("Noise"), user(txt("More?")), assistant("No.")],
            [good[1]],
        ),
        "train.jsonl:17": ([user(IMG, txt("X")), assistant("Y")], [good[2]]),
    }
    counts = {
        Reason.MISSING_IMAGE: 1,
        Reason.CORRUPT_IMAGE: 2,
        Reason.EMPTY_IMAGE: 1,
        Reason.IMAGE_TOO_LARGE: 2,
        Reason.MALFORMED_JSON: 1,
        Reason.MISSING_COLUMN: 1,
        Reason.BAD_VALUE: 3,
        Reason.IMAGE_COUNT_MISMATCH: 2,
        Reason.EMPTY_CONVERSATION: 1,
    }
    return path, root, expected, counts


def test_llava_jsonl_counts_and_good_records(
    llava_jsonl: LlavaCase, caplog: pytest.LogCaptureFixture
) -> None:
    path, root, expected, counts = llava_jsonl
    seen: list[BadRecord] = []
    ds = open_dataset(
        path, image_root=root, max_image_pixels=MAX_PIXELS, on_bad_record=seen.append, log_first=3
    )
    assert ds.schema == "llava"
    with caplog.at_level(logging.WARNING, logger="vlmscope.data"):
        records = read_all(ds)
    check_good(records, expected)
    assert records[0].source_id == "g0" and records[0].position == 0
    assert ds.stats.counts == counts
    assert set(ds.stats.counts) <= set(REASONS)
    assert ds.stats.rows == 18 and ds.stats.good == 4
    assert ds.stats.examples[Reason.CORRUPT_IMAGE] == ["train.jsonl:3", "train.jsonl:4"]
    assert [b.row_id for b in seen][:3] == ["train.jsonl:2", "train.jsonl:3", "train.jsonl:4"]
    assert len(seen) == 14 and seen[0].reason == Reason.MISSING_IMAGE and seen[0].position == 2
    # the first few are logged with their row id, then the summary at the end of the pass
    skips = [r.getMessage() for r in caplog.records if r.getMessage().startswith("skipping")]
    assert len(skips) == 3 and "train.jsonl:2" in skips[0]
    assert "corrupt_image: 2" in caplog.records[-1].getMessage()
    assert "18 rows read: 4 good, 14 bad" in ds.stats.summary()
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    # a second pass gives the same counts (stats describe the latest pass)
    assert len(read_all(ds)) == 4 and ds.stats.counts == counts


def test_llava_jsonl_strict_and_skip(llava_jsonl: LlavaCase) -> None:
    path, root, expected, _ = llava_jsonl
    ds = open_dataset(path, image_root=root, max_image_pixels=MAX_PIXELS, strict=True)
    got: list[str] = []
    with pytest.raises(BadRecordError) as err:
        for rec in ds:
            got.append(rec.row_id)
    assert got == ["train.jsonl:0", "train.jsonl:1"]
    assert err.value.row_id == "train.jsonl:2" and err.value.reason == Reason.MISSING_IMAGE
    assert "train.jsonl:2" in str(err.value)

    lenient = open_dataset(path, image_root=root, max_image_pixels=MAX_PIXELS)
    with pytest.raises(TypeError):
        len(lenient)  # JSONL length is not cheap
    assert lenient.count_rows() == 18 and lenient.skip(5).count_rows() == 13
    for n in (1, 2, 15, 16, 17, 18, 30):
        rows = [r.row_id for r in lenient.skip(n)]
        assert rows == [k for k in expected if int(k.split(":")[1]) >= n], n
    view = lenient.skip(2).skip(13)
    assert [r.position for r in view] == [15, 17]
    assert view.stats.rows == 3  # skipped rows are not read


def test_image_root_defaults_to_dataset_folder(tmp_path: Path) -> None:
    (tmp_path / "a.png").write_bytes(png(noise(5)))
    row = {"image": "a.png", "conversations": [{"from": "human", "value": "<image>"}]}
    row["conversations"].append({"from": "gpt", "value": "noise"})
    (tmp_path / "d.jsonl").write_text(json.dumps(row) + "\n")
    (rec,) = list(open_dataset(tmp_path / "d.jsonl"))
    np.testing.assert_array_equal(pixels(rec.images[0]), noise(5))
    assert rec.messages[0] == user(IMG)


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P"])
def test_transparent_images_are_composited_on_white_as_the_processors_do(
    tmp_path: Path, mode: str
) -> None:
    """A transparent picture read from a dataset (or by `attribute --image`) gives the pixels
    transformers' image processors make of the same picture passed in memory (their
    convert_to_rgb composites onto white); a plain convert("RGB") kept the colour under the
    alpha, black here: two different inputs for one picture."""
    import argparse

    from transformers.image_transforms import convert_to_rgb

    from vlmscope.attribution.cli import _check_args, add_attribute_arguments

    rgba = np.zeros((6, 8, 4), dtype=np.uint8)
    rgba[..., 0] = 200  # red under the alpha: opaque on the left half, clear on the right
    rgba[:, :4, 3] = 255
    picture = Image.fromarray(rgba, "RGBA")
    if mode == "LA":
        picture = picture.convert("LA")
    elif mode == "P":  # a palette with one transparent entry
        picture = picture.convert("RGB").quantize(2)
        picture.info["transparency"] = int(np.asarray(picture)[0, -1])
    picture.save(tmp_path / "a.png")
    with Image.open(tmp_path / "a.png") as saved:
        want = np.asarray(convert_to_rgb(saved, return_numpy=True))
    assert (want[:, 4:] == 255).all()  # the clear half is white
    row = {"image": "a.png", "conversations": [{"from": "human", "value": "<image>"}]}
    row["conversations"].append({"from": "gpt", "value": "a picture"})
    (tmp_path / "d.jsonl").write_text(json.dumps(row) + "\n")
    (rec,) = list(open_dataset(tmp_path / "d.jsonl"))
    np.testing.assert_array_equal(pixels(rec.images[0]), want)
    parser = argparse.ArgumentParser()
    add_attribute_arguments(parser)
    flags = f"--model m --dictionaries {tmp_path} --prompt p --image {tmp_path / 'a.png'}"
    args = parser.parse_args([*flags.split(), "--out", str(tmp_path / "g.json")])
    (read,) = _check_args(args)
    np.testing.assert_array_equal(np.asarray(read), want)


def test_video_parts_take_frames_and_bad_ones_are_counted_by_reason(tmp_path: Path) -> None:
    """A video is a list of frames, inline in its part or in the `videos` column, each frame
    read as an image is; a video file (not decoded here), a count that disagrees with the
    parts, or a missing frame are bad records with a reason that says so."""
    (tmp_path / "a.png").write_bytes(png(noise(5)))
    (tmp_path / "b.png").write_bytes(png(noise(6)))

    def row(part: dict[str, Any], **extra: Any) -> dict[str, Any]:
        content = [part, {"type": "text", "text": "what moves?"}]
        return {"messages": [{"role": "user", "content": content},
                             {"role": "assistant", "content": "a dot"}], **extra}  # fmt: skip

    rows = [
        row({"type": "video", "video": ["a.png", "b.png"]}),
        row({"type": "video"}, videos=[["b.png"]]),
        row({"type": "video", "video": "clip.mp4"}),
        row({"type": "video"}),
        row({"type": "video", "video": ["a.png", "gone.png"]}),
    ]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    ds = open_dataset(tmp_path / "d.jsonl")
    good = list(ds)
    assert [[pixels(f).tolist() for f in r.videos[0]] for r in good] == [
        [noise(5).tolist(), noise(6).tolist()],
        [noise(6).tolist()],
    ]
    assert ds.stats.counts == {
        Reason.BAD_VALUE: 1,
        Reason.IMAGE_COUNT_MISMATCH: 1,
        Reason.MISSING_IMAGE: 1,
    }


# --------------------------------------------------------------------------------------------
# Parquet, chat schema


PART = pa.struct([("type", pa.string()), ("text", pa.string())])
MESSAGES = pa.list_(pa.struct([("role", pa.string()), ("content", pa.list_(PART))]))


@pytest.fixture
def chat_parquet(tmp_path: Path) -> ChatCase:
    g = {i: noise(10 + i) for i in range(5)}
    one = [user(IMG, txt("Q?")), assistant("A.")]
    rows: list[dict[str, Any]] = [
        {"id": "0", "messages": one, "images": [png(g[0])]},
        {
            "id": "1",
            "messages": [user(txt("Compare"), IMG, txt("and"), IMG), assistant("Same.")],
            "images": [png(g[1]), png(g[2])],
        },
        {"id": "2", "messages": None, "images": [png(g[0])]},
        {"id": "3", "messages": [], "images": []},
        {"id": "4", "messages": [{"role": "robot", "content": [txt("x")]}], "images": []},
        {"id": "5", "messages": [user({"type": "audio", "text": None})], "images": []},
        {"id": "6", "messages": one, "images": None},
        {"id": "7", "messages": one, "images": [png(g[0]), png(g[1])]},
        {"id": "8", "messages": one, "images": [BAD_BYTES["garbage"]]},
        {"id": "9", "messages": one, "images": [BAD_BYTES["truncated"]]},
        {"id": "10", "messages": one, "images": [BAD_BYTES["empty"]]},
        {"id": "11", "messages": one, "images": [BAD_BYTES["big"]]},
        {"id": "12", "messages": one, "images": [BAD_BYTES["bomb"]]},
        {"id": "13", "messages": [user(txt("  ")), assistant("")], "images": []},
        {"id": "14", "messages": [user(txt("Just text")), assistant("Yes.")], "images": []},
        {"id": "15", "messages": one, "images": [png(g[3])]},
        {"id": "16", "messages": one, "images": [None]},
        {"id": "17", "messages": one, "images": [png(g[4])]},
    ]
    schema = pa.schema(
        [("id", pa.string()), ("messages", MESSAGES), ("images", pa.list_(pa.binary()))]
    )
    path = tmp_path / "chat.parquet"
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path, row_group_size=4)
    expected = {
        "chat.parquet:0": (one, [g[0]]),
        "chat.parquet:1": (rows[1]["messages"], [g[1], g[2]]),
        "chat.parquet:14": (rows[14]["messages"], []),
        "chat.parquet:15": (one, [g[3]]),
        "chat.parquet:17": (one, [g[4]]),
    }
    counts = {
        Reason.MISSING_COLUMN: 1,
        Reason.EMPTY_CONVERSATION: 2,
        Reason.BAD_VALUE: 2,
        Reason.IMAGE_COUNT_MISMATCH: 2,
        Reason.CORRUPT_IMAGE: 2,
        Reason.EMPTY_IMAGE: 1,
        Reason.IMAGE_TOO_LARGE: 2,
        Reason.MISSING_IMAGE: 1,
    }
    return path, expected, counts


def test_chat_parquet_counts_strict_and_skip(chat_parquet: ChatCase) -> None:
    path, expected, counts = chat_parquet
    ds = open_dataset(path, max_image_pixels=MAX_PIXELS)
    assert ds.schema == "chat" and len(ds) == 18
    records = read_all(ds)
    check_good(records, expected)
    assert ds.stats.counts == counts
    assert [r.source_id for r in records] == ["0", "1", "14", "15", "17"]

    strict = open_dataset(path, "chat", max_image_pixels=MAX_PIXELS, strict=True)
    with pytest.raises(BadRecordError, match=r"chat\.parquet:2: missing_column"):
        read_all(strict)
    with pytest.raises(BadRecordError, match=r"chat\.parquet:16: missing_image"):
        read_all(strict.skip(14))
    # row groups hold 4 rows: skips inside a group, at its edge, and past the end
    for n in (3, 4, 5, 14, 15, 16, 17, 18, 40):
        view = ds.skip(n)
        assert len(view) == max(18 - n, 0)
        assert [r.row_id for r in view] == [k for k in expected if int(k.split(":")[1]) >= n]


def test_chat_parquet_streams_row_groups(tmp_path: Path) -> None:
    """Only about one row group is ever materialised, by rows and by Arrow memory."""
    rng = np.random.default_rng(0)
    n, group, width = 1600, 20, 5000
    letters = rng.integers(97, 123, (n, width), dtype=np.uint8)
    texts = [row.tobytes().decode() for row in letters]
    table = pa.table({"id": [str(i) for i in range(n)], "text": texts})
    full_bytes = table.nbytes
    path = tmp_path / "big.parquet"
    pq.write_table(table, path, row_group_size=group)
    del table, texts
    ds = open_dataset(path, batch_rows=8)
    assert ds.schema == "text" and pq.ParquetFile(path).num_row_groups == n // group
    batches: list[int] = []
    peak = [0]
    base = pa.total_allocated_bytes()

    def hook(rows: int) -> None:
        batches.append(rows)
        peak[0] = max(peak[0], pa.total_allocated_bytes() - base)

    ds.on_batch = hook
    count = 0
    for rec in ds:
        assert rec.text == letters[count].tobytes().decode()
        count += 1
    assert count == n and sum(batches) == n and max(batches) <= 8
    assert peak[0] < full_bytes / 10, (peak[0], full_bytes)


# --------------------------------------------------------------------------------------------
# `datasets` save_to_disk folder (Arrow IPC stream files + state.json + dataset_info.json)


def save_to_disk_like(
    folder: Path, rows: list[dict[str, Any]], schema: pa.Schema, shards: int
) -> None:
    """Write what `datasets.Dataset.save_to_disk` writes: data-0000i-of-0000n.arrow in Arrow IPC
    stream format with the features in the schema's "huggingface" metadata, a state.json that
    lists the files in order, and dataset_info.json."""
    folder.mkdir(parents=True, exist_ok=True)
    features = {
        "id": {"dtype": "string", "_type": "Value"},
        "messages": [
            {
                "role": {"dtype": "string", "_type": "Value"},
                "content": [{"type": {"dtype": "string", "_type": "Value"}}],
            }
        ],
        "images": {"feature": {"_type": "Image"}, "_type": "List"},
    }
    info = {"citation": "", "description": "", "features": features, "homepage": "", "license": ""}
    schema = schema.with_metadata({"huggingface": json.dumps({"info": {"features": features}})})
    per = -(-len(rows) // shards)
    names = []
    for i in range(shards):
        name = f"data-{i:05d}-of-{shards:05d}.arrow"
        names.append(name)
        part = rows[i * per : (i + 1) * per]
        with pa.OSFile(str(folder / name), "wb") as sink, pa.ipc.new_stream(sink, schema) as w:
            for j in range(0, len(part), 3):  # several record batches per file
                w.write_batch(pa.RecordBatch.from_pylist(part[j : j + 3], schema=schema))
    state = {
        "_data_files": [{"filename": n} for n in names],
        "_fingerprint": "0123456789abcdef",
        "_format_columns": None,
        "_format_kwargs": {},
        "_format_type": None,
        "_output_all_columns": False,
        "_split": None,
    }
    (folder / "state.json").write_text(json.dumps(state, indent=2, sort_keys=True))
    (folder / "dataset_info.json").write_text(json.dumps(info, indent=2))


IMAGE_STRUCT = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
HF_SCHEMA = pa.schema(
    [("id", pa.string()), ("messages", MESSAGES), ("images", pa.list_(IMAGE_STRUCT))]
)


def hf_rows(
    folder: Path,
) -> tuple[list[dict[str, Any]], dict[int, list[np.ndarray]], dict[str, int]]:
    (folder / "imgs").mkdir(parents=True)
    g = {i: noise(20 + i) for i in range(4)}
    (folder / "imgs" / "a.png").write_bytes(png(g[1]))
    one = [user(IMG, txt("Q?")), assistant("A.")]

    def im(data: bytes | None = None, path: str | None = None) -> dict[str, Any]:
        return {"bytes": data, "path": path}

    rows = [
        {"id": "0", "messages": one, "images": [im(png(g[0]), "orig/0.png")]},
        {"id": "1", "messages": one, "images": [im(None, "imgs/a.png")]},
        {"id": "2", "messages": one, "images": [im(None, "imgs/missing.png")]},
        {"id": "3", "messages": one, "images": [im()]},
        {"id": "4", "messages": one, "images": [im(BAD_BYTES["garbage"])]},
        {"id": "5", "messages": one, "images": [im(b"")]},
        {
            "id": "6",
            "messages": [user(IMG, IMG, txt("two?")), assistant("A")],
            "images": [im(png(g[0]))],
        },
        {"id": "7", "messages": one, "images": [im(png(g[2]))]},
        {"id": "8", "messages": None, "images": []},
        {"id": "9", "messages": one, "images": [im(BAD_BYTES["bomb"])]},
        {"id": "10", "messages": [assistant("text only")], "images": []},
        {"id": "11", "messages": one, "images": [im(png(g[3]))]},
    ]
    good = {0: [g[0]], 1: [g[1]], 7: [g[2]], 10: [], 11: [g[3]]}
    counts = {
        Reason.MISSING_IMAGE: 2,
        Reason.CORRUPT_IMAGE: 1,
        Reason.EMPTY_IMAGE: 1,
        Reason.IMAGE_COUNT_MISMATCH: 1,
        Reason.MISSING_COLUMN: 1,
        Reason.IMAGE_TOO_LARGE: 1,
    }
    return rows, good, counts


def test_save_to_disk_folder(tmp_path: Path) -> None:
    folder = tmp_path / "saved"
    rows, good, counts = hf_rows(folder)
    save_to_disk_like(folder, rows, HF_SCHEMA, shards=2)
    ds = open_dataset(folder)
    assert ds.schema == "chat" and len(ds) == 12
    records = read_all(ds)
    shard = {i: f"data-{i // 6:05d}-of-00002.arrow:{i % 6}" for i in range(12)}
    expected = {shard[i]: (rows[i]["messages"], arrays) for i, arrays in good.items()}
    check_good(records, expected)
    assert [r.position for r in records] == list(good)
    assert ds.stats.counts == counts
    for n in (0, 4, 6, 7, 11, 12):
        assert [r.position for r in ds.skip(n)] == [i for i in good if i >= n]
    with pytest.raises(BadRecordError) as err:
        read_all(open_dataset(folder, strict=True).skip(3))
    assert (err.value.row_id, err.value.reason) == (shard[3], Reason.MISSING_IMAGE)


def test_dataset_dict_folder_and_split_files(tmp_path: Path) -> None:
    root = tmp_path / "dd"
    rows, good, _ = hf_rows(root / "test")
    save_to_disk_like(root / "train", rows[:1], HF_SCHEMA, shards=1)
    save_to_disk_like(root / "test", rows, HF_SCHEMA, shards=1)
    (root / "dataset_dict.json").write_text(json.dumps({"splits": ["train", "test"]}))
    recs = list(open_dataset(root, split="test"))
    assert [r.row_id for r in recs] == [f"test/data-00000-of-00001.arrow:{i}" for i in good]
    assert len(open_dataset(root, split="train")) == 1
    with pytest.raises(ValueError, match="validation"):
        open_dataset(root, split="validation")

    hub = tmp_path / "hub" / "data"
    hub.mkdir(parents=True)
    for split, k in (("train", 3), ("test", 2)):
        t = pa.table({"text": [f"{split} {i}" for i in range(k)]})
        pq.write_table(t, hub / f"{split}-00000-of-00001.parquet")
    assert [r.text for r in open_dataset(tmp_path / "hub", split="test")] == ["test 0", "test 1"]
    assert len(open_dataset(tmp_path / "hub")) == 3
    with pytest.raises(ValueError, match="splits found"):
        open_dataset(tmp_path / "hub", split="validation")
    # ultrachat_200k's layout: two train splits, neither of them "train"
    uc = tmp_path / "uc" / "data"
    uc.mkdir(parents=True)
    for split in ("train_sft", "train_gen", "test_sft"):
        pq.write_table(pa.table({"text": [split]}), uc / f"{split}-00000-of-00001.parquet")
    assert [r.text for r in open_dataset(tmp_path / "uc", split="train_sft")] == ["train_sft"]
    with pytest.raises(ValueError, match=r"splits found: \['test_sft', 'train_gen', 'train_sft'\]"):
        open_dataset(tmp_path / "uc", split="train")


# --------------------------------------------------------------------------------------------
# JSON lists, text schema, column maps, detection errors


def test_iter_json_list_streams_in_small_chunks() -> None:
    items = [{"a": 1, "s": 'x "quoted" ] , {', "n": [1.5, -2e3, None]}, 123456, "tail", {}, []]
    text = json.dumps(items, indent=1)
    for chunk in (1, 3, 7, 1000):
        assert list(iter_json_list(io.StringIO(text), chunk_chars=chunk)) == items
    assert list(iter_json_list(io.StringIO(" [ ] "))) == []
    cut = list(iter_json_list(io.StringIO(text[:40]), chunk_chars=5))
    assert isinstance(cut[-1], _Malformed) and cut[:-1] == []
    broken = list(iter_json_list(io.StringIO('[{"a": 1}, {"a": 2} {"a": 3}]'), chunk_chars=4))
    assert broken[:2] == [{"a": 1}, {"a": 2}] and isinstance(broken[2], _Malformed)
    # A read that ends just after a number's "." or "e" (the decoder stops before them): the
    # number goes on in the next read, and the rest of the file is still read
    numbers = '[12.5,-2e+3,1.0E-2,7,{"a": 1}]'
    for chunk in range(1, len(numbers) + 1):
        got = list(iter_json_list(io.StringIO(numbers), chunk_chars=chunk))
        assert got == [12.5, -2000.0, 0.01, 7, {"a": 1}], chunk


def test_text_json_list_and_column_map(tmp_path: Path) -> None:
    rows = [
        {"body": "first", "key": 1},
        {"body": "", "key": 2},
        {"key": 3},
        {"body": 7, "key": 4},
        {"body": "last", "key": 5},
    ]
    path = tmp_path / "t.json"
    path.write_text(json.dumps(rows))
    with pytest.raises(ValueError, match="cannot detect"):
        open_dataset(path)
    ds = open_dataset(path, columns=ColumnMap(text="body", id="key"))
    recs = list(ds)
    assert [(r.text, r.source_id, r.messages, r.is_text) for r in recs] == [
        ("first", "1", [], True),
        ("last", "5", [], True),
    ]
    assert ds.stats.counts == {"empty_text": 1, "missing_column": 1, "bad_value": 1}
    assert [r.text for r in ds.skip(4)] == ["last"]
    lines = tmp_path / "lines.json"  # JSON lines in a .json file, as `datasets` to_json writes
    lines.write_text("".join(json.dumps(r) + "\n" for r in rows))
    as_lines = open_dataset(lines, columns=ColumnMap(text="body"))
    assert [r.text for r in as_lines] == ["first", "last"]
    with pytest.raises(ValueError, match="needs column 'messages'"):
        open_dataset(path, "chat")
    (tmp_path / "obj.json").write_text(json.dumps({"data": rows}, indent=2))
    with pytest.raises(ValueError, match="one JSON object"):
        open_dataset(tmp_path / "obj.json")


def test_inline_image_parts_and_json_encoded_messages(tmp_path: Path) -> None:
    (tmp_path / "i.png").write_bytes(png(noise(7)))
    messages = [user({"type": "image", "image": "i.png"}, txt("What?")), assistant("Noise.")]
    rows = [{"messages": messages}, {"messages": json.dumps([user(txt("hi")), assistant("yo")])}]
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    a, b = list(open_dataset(tmp_path / "c.jsonl"))
    assert a.messages == [user(IMG, txt("What?")), assistant("Noise.")]
    np.testing.assert_array_equal(pixels(a.images[0]), noise(7))
    assert b.messages == [user(txt("hi")), assistant("yo")] and b.images == []


# --------------------------------------------------------------------------------------------
# Hub names


class FakeStream:
    """Stands in for a `datasets.IterableDataset`: iterable rows with PIL images, and skip."""

    def __init__(self, rows: list[dict[str, Any]]) -> None:
        self.rows = rows

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self.rows)

    def skip(self, n: int) -> FakeStream:
        return FakeStream(self.rows[n:])


def test_hub_names(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)  # not installed
    with pytest.raises(ImportError, match="pip install datasets"):
        open_dataset("someone/some-dataset")
    with pytest.raises(FileNotFoundError):
        open_dataset("./missing.parquet")

    calls: list[dict[str, Any]] = []
    one = [user(IMG, txt("Q?")), assistant("A.")]
    rows = [
        {"messages": one, "images": [Image.fromarray(noise(1))]},
        {"messages": one, "images": [Image.new("RGB", (0, 0))]},
        {"messages": one, "images": [Image.fromarray(noise(2))]},
    ]

    def load_dataset(name: str, split: str, streaming: bool = False) -> Any:
        calls.append({"name": name, "split": split, "streaming": streaming})
        if not streaming:
            raise ConnectionError("no network")
        return FakeStream(rows)

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(RuntimeError, match="offline"):
        open_dataset("someone/some-dataset")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    ds = open_dataset("someone/some-dataset", split="test")
    assert calls[-1] == {"name": "someone/some-dataset", "split": "test", "streaming": True}
    recs = list(ds)
    assert [r.row_id for r in recs] == [
        "someone/some-dataset:test:0",
        "someone/some-dataset:test:2",
    ]
    assert ds.stats.counts == {"empty_image": 1}
    np.testing.assert_array_equal(pixels(recs[1].images[0]), noise(2))
    assert [r.position for r in ds.skip(2)] == [2]


# --------------------------------------------------------------------------------------------
# Image paths stay inside the image root (issue 16)


def test_image_paths_outside_the_root_are_refused_without_opening_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "sub").mkdir(parents=True)
    outside.mkdir()
    (root / "sub" / "in.png").write_bytes(png(noise(1)))
    (outside / "secret.png").write_bytes(png(noise(2)))
    (root / "link.png").symlink_to(outside / "secret.png")
    (root / "dirlink").symlink_to(outside)
    (root / "inner.png").symlink_to(root / "sub" / "in.png")  # a link that stays inside
    conv = [{"from": "human", "value": "<image>\nQ"}, {"from": "gpt", "value": "A"}]
    escapes = [
        "../outside/secret.png",  # exists
        "../outside/nothing.png",  # does not exist: the same reason and message shape
        str(outside / "secret.png"),
        str(outside / "nothing.png"),
        "link.png",
        "dirlink/secret.png",
        "sub/../../outside/secret.png",
        "~/../../etc/passwd",
    ]
    inside = ["sub/in.png", "inner.png", str(root / "sub" / "in.png"), "sub/../sub/in.png"]
    rows = [{"id": p, "image": p, "conversations": conv} for p in escapes + inside]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    opened: list[str] = []
    real_open = Image.open

    def spy(fp: Any, *a: Any, **kw: Any) -> Any:
        opened.append(str(fp))
        return real_open(fp, *a, **kw)

    monkeypatch.setattr(Image, "open", spy)
    seen: list[BadRecord] = []
    ds = open_dataset(data, image_root=root, on_bad_record=seen.append)
    records = list(ds)
    assert [r.source_id for r in records] == inside
    for rec in records:
        np.testing.assert_array_equal(pixels(rec.images[0]), noise(1))
    assert ds.stats.counts == {Reason.IMAGE_OUTSIDE_ROOT: len(escapes)}
    assert {os.path.realpath(p) for p in opened} == {os.path.realpath(root / "sub" / "in.png")}
    # The message names the path as given and the root, never whether the target exists.
    details = {b.row_id: b.detail for b in seen}
    assert details["d.jsonl:0"].replace("secret", "X") == details["d.jsonl:1"].replace(
        "nothing", "X"
    )
    assert all("allow-outside-image-root" in d and str(root) in d for d in details.values())
    # Explicitly allowed: every existing file is read, the missing ones are missing.
    free = open_dataset(data, image_root=root, allow_outside_image_root=True)
    got = {r.source_id for r in free}
    assert got == {*inside, escapes[0], escapes[2], "link.png", "dirlink/secret.png", escapes[6]}
    assert free.stats.counts[Reason.MISSING_IMAGE] == 2  # the passwd line: missing or corrupt
    assert free.stats.bad == 3 and set(free.stats.counts) <= {"missing_image", "corrupt_image"}
    # Without --image-root the dataset's own folder is the root.
    (tmp_path / "top.png").write_bytes(png(noise(3)))
    alone = tmp_path / "root" / "alone.jsonl"
    alone.write_text(json.dumps({"image": "../top.png", "conversations": conv}) + "\n")
    ds = open_dataset(alone)
    assert list(ds) == [] and ds.stats.counts == {Reason.IMAGE_OUTSIDE_ROOT: 1}


# --------------------------------------------------------------------------------------------
# Files without a single valid row say so (issue 16)


def test_empty_and_all_bad_json_files_say_why(tmp_path: Path) -> None:
    cases = {
        "empty.jsonl": (b"", r"empty\.jsonl is empty"),
        "blank.jsonl": (b"\n  \n\n", r"blank\.jsonl is empty"),
        "empty.json": (b"[]", r"empty\.json is empty"),
        "bad.jsonl": (
            b'{"text": \n[1, 2]\nnot json\n',
            r"bad\.jsonl has no valid rows: 3 rows, none a JSON object \(line 1: .*line 2: "
            r"a JSON list, not an object.*line 3: ",
        ),
        "latin1.jsonl": (
            '{"text": "caf\u00e9"}\n'.encode("latin-1") * 2,
            r"latin1\.jsonl has no valid rows: 2 rows, none a JSON object \(line 1: not UTF-8",
        ),
        "bad.json": (b'[{"text": "a"', r"bad\.json has no valid rows"),
    }
    for name, (data, message) in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ValueError, match=message) as err:
            open_dataset(tmp_path / name)
        assert "cannot detect the schema" not in str(err.value), name
    # One good row among non-UTF-8 lines is enough: the bad ones are skipped and counted.
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_bytes(cases["latin1.jsonl"][0] + b'{"text": "ok"}\n')
    ds = open_dataset(mixed)
    assert [r.text for r in ds] == ["ok"] and ds.stats.counts == {Reason.MALFORMED_JSON: 2}
    # A folder whose first file is empty reads the schema from the next one.
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "a.jsonl").write_bytes(b"")
    (folder / "b.jsonl").write_text('{"text": "hello"}\n')
    assert [r.text for r in open_dataset(folder)] == ["hello"]


def test_images_under_another_column_name_are_named_with_the_fix(tmp_path: Path) -> None:
    Image.new("RGB", (8, 8), "red").save(tmp_path / "a.png")
    turns = [{"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": "red"}]
    llava = tmp_path / "llava.jsonl"
    llava.write_text(json.dumps({"id": "0", "picture": "a.png", "conversations": turns}) + "\n")
    hint = r"no '{}' column \(it has \[{}\]\): name yours with --columns {}=NAME"
    with pytest.raises(BadRecordError, match=hint.format("image", ".*'picture'.*", "image")):
        list(open_dataset(llava, strict=True))
    good = open_dataset(llava, columns=ColumnMap(image="picture"), strict=True)
    assert [len(r.images) for r in good] == [1]
    parts = [{"type": "image"}, {"type": "text", "text": "What colour?"}]
    chat = tmp_path / "chat.jsonl"
    row = {"messages": [{"role": "user", "content": parts}], "pics": ["a.png"]}
    chat.write_text(json.dumps(row) + "\n")
    with pytest.raises(BadRecordError, match=hint.format("images", ".*'pics'.*", "images")):
        list(open_dataset(chat, strict=True))


def test_exif_rotated_photos_load_upright_as_transformers_loads_them(tmp_path: Path) -> None:
    from transformers.image_utils import load_image

    im = Image.new("RGB", (80, 40), (255, 0, 0))
    im.paste((0, 0, 255), (0, 0, 20, 40))  # a blue band on the left, to see the rotation
    exif = im.getexif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to view": how phone cameras save
    im.save(tmp_path / "photo.jpg", exif=exif)
    turns = [{"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": "red"}]
    row = {"id": "0", "image": "photo.jpg", "conversations": turns}
    (tmp_path / "d.jsonl").write_text(json.dumps(row) + "\n")
    (got,) = [r.images[0] for r in open_dataset(tmp_path / "d.jsonl")]
    want = load_image(str(tmp_path / "photo.jpg"))
    assert got.size == want.size == (40, 80)
    assert np.array_equal(np.asarray(got), np.asarray(want.convert("RGB")))
