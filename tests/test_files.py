"""Atomic writes: a writer that fails leaves the previous file and no temporary behind."""

from __future__ import annotations

from pathlib import Path

import pytest

from vlmscope.files import write_atomically, write_text_atomically


def test_a_failed_write_keeps_the_previous_file(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "out.json"
    assert write_text_atomically(target, "v1") == target
    assert target.read_text() == "v1"

    def half_then_fail(tmp: Path) -> None:
        tmp.write_text("v2 torn")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomically(target, half_then_fail)
    assert target.read_text() == "v1"
    assert sorted(p.name for p in target.parent.iterdir()) == ["out.json"]
