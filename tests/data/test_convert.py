"""`vlmscope data process`: what it writes, and the output folders and inputs it refuses."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from vlmscope.cli import main
from vlmscope.files import lock_folder


def run(*argv: str) -> int:
    return main(["data", "process", *argv, "--no-progress"])


def test_process_writes_rows_and_a_manifest_and_refuses_to_clobber(
    tmp_path: Path, zoo_path: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    model, out = str(zoo_path("llava")), tmp_path / "out"
    assert run(model, "shapes:3", "--out", str(out), "--rows-per-file", "2") == 0
    printed = capsys.readouterr().out
    assert "rows written                          3" in printed
    files = sorted(p.name for p in out.iterdir())
    assert files == ["processed.json", "train-00000.parquet", "train-00001.parquet"]
    manifest = json.loads((out / "processed.json").read_text())
    assert manifest["rows"] == manifest["rows_read"] == 3 and manifest["family"] == "llava"
    assert manifest["source"] == {"dataset": "shapes:3", "split": "train", "schema": "chat",
                                  "seed": 0}  # fmt: skip
    table = pq.read_table(out / "train-00000.parquet")
    assert table.column_names == ["id", "input_ids", "attention_mask", "pixel_values", "labels"]
    assert table.column("id").to_pylist() == ["train-000000", "train-000001"]  # the source ids
    # An existing folder is kept unless --overwrite, which swaps the new one in whole.
    (out / "mine.txt").write_text("keep")
    assert run(model, "shapes:2", "--out", str(out)) == 1
    assert "already exists" in capsys.readouterr().err and (out / "mine.txt").exists()
    assert run(model, "shapes:2", "--out", str(out), "--overwrite") == 0
    assert not (out / "mine.txt").exists()
    assert json.loads((out / "processed.json").read_text())["rows"] == 2
    assert not list(tmp_path.glob(".out*"))  # no temporary folder or lock left behind


def test_process_refuses_processed_input_a_held_folder_and_bad_flags(
    tmp_path: Path, zoo_path: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    model, out = str(zoo_path("llava")), tmp_path / "out"
    assert run(model, "shapes:2", "--out", str(out)) == 0
    capsys.readouterr()
    assert run(model, str(out), "--out", str(tmp_path / "again")) == 1
    assert "already in the processed schema" in capsys.readouterr().err
    with lock_folder(tmp_path / ".held.lock", "output folder"):
        assert run(model, "shapes:2", "--out", str(tmp_path / "held")) == 1
    err = capsys.readouterr().err
    assert "is in use by pid" in err and str(tmp_path / "held") in err
    assert run(model, "shapes:2", "--out", str(tmp_path / "x"), "--rows-per-file", "0") == 2
    assert "--rows-per-file must be >= 1" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": ""}\n')
    assert run(model, str(bad), "--out", str(tmp_path / "strict"), "--strict") == 1
    err = capsys.readouterr().err
    assert "bad.jsonl:1" in err and "empty_text" in err and "\n" not in err.strip()
    assert not (tmp_path / "strict").exists()


def test_max_rows_reports_the_rows_it_consumed_with_workers_reading_ahead(
    tmp_path: Path, zoo_path: Any
) -> None:
    """--workers 2 read rows past the --max-rows-th sample; rows read and skipped are those
    up to it, as without workers."""
    texts = ["" if i % 3 == 0 else f"row {i}" for i in range(24)]
    data = tmp_path / "docs.jsonl"
    data.write_text(
        "".join(json.dumps({"id": str(i), "text": t}) + "\n" for i, t in enumerate(texts))
    )
    end = [i for i, t in enumerate(texts) if t][1] + 1  # the rows up to the 2nd good one
    for workers in ("0", "1"):
        out = tmp_path / f"out{workers}"
        assert run(str(zoo_path("llava")), str(data), "--out", str(out), "--max-rows", "2",
                   "--workers", workers) == 0  # fmt: skip
        manifest = json.loads((out / "processed.json").read_text())
        assert manifest["rows"] == 2 and manifest["rows_read"] == end
        assert manifest["skipped"] == {"empty_text": sum(not t for t in texts[:end])}


def test_process_help_explains_every_flag(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["data", "process", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    for flag in ("--out", "--overwrite", "--ctx-len", "--image-root", "--allow-outside-image-root",
                 "--workers", "--rows-per-file", "--max-rows", "--strict", "--seed"):  # fmt: skip
        assert flag in out
    assert "weights are not loaded" in out
