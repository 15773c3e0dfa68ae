"""Atomic writes: a writer that fails leaves the previous file and no temporary behind."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

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


_HOLDER = """
import sys, time
from vlmscope.files import lock_folder
lock = lock_folder(sys.argv[1], "run folder")
print("ready", flush=True)
time.sleep(120)
"""


def _start_holder(folder: Path) -> subprocess.Popen[str]:
    """Another process (as a second `vlmscope` command would be) that holds the lock."""
    proc = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(folder)], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    return proc


def test_a_second_writer_is_refused_with_the_holders_pid_and_host(tmp_path: Path) -> None:
    from vlmscope.files import FolderLockedError, lock_folder

    holder = _start_holder(tmp_path)
    try:
        with pytest.raises(FolderLockedError) as err:
            lock_folder(tmp_path, "run folder")
        assert f"pid {holder.pid} on host {socket.gethostname()}" in str(err.value)
    finally:
        holder.terminate()
        holder.wait(30)


def test_a_lock_left_by_a_killed_process_is_taken_over(tmp_path: Path) -> None:
    from vlmscope.files import LOCK_NAME, lock_folder

    holder = _start_holder(tmp_path)
    os.kill(holder.pid, signal.SIGKILL)  # no cleanup: the lock file stays behind
    holder.wait(30)
    assert (tmp_path / LOCK_NAME).exists()
    with lock_folder(tmp_path) as lock:
        assert lock.stale_holder is not None and lock.stale_holder["pid"] == holder.pid
    assert not (tmp_path / LOCK_NAME).exists()
    with lock_folder(tmp_path) as lock:  # released cleanly: nothing stale the next time
        assert lock.stale_holder is None


def test_two_writes_of_one_file_at_once_do_not_share_a_temporary(tmp_path: Path) -> None:
    """A second write of the same file starts while the first is half done (as two threads
    of the viewer's server saving one graph's annotations can): each lands whole."""
    target = tmp_path / "a.json"

    def first(tmp: Path) -> None:
        tmp.write_text("first, long " * 100)
        write_text_atomically(target, "second")  # begins and ends inside the first
        assert tmp.read_text() == "first, long " * 100, "the second write took our temporary"

    write_atomically(target, first)
    assert target.read_text() == "first, long " * 100
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_a_lock_file_unlinked_while_being_taken_is_not_held(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """B opens the lock file, A releases (unlinking it), B's flock then succeeds on the
    unlinked file: B must not count that as holding the folder, or a third writer C, who
    creates a fresh lock file, would hold it at the same time."""
    import vlmscope.files as files

    a = files.lock_folder(tmp_path, "run folder")
    real_open = os.open
    opened: list[int] = []

    def open_then_a_releases(path: Any, flags: int, mode: int = 0o777) -> int:
        fd = real_open(path, flags, mode)
        opened.append(fd)
        if len(opened) == 1:
            a.release()
        return fd

    monkeypatch.setattr(files.os, "open", open_then_a_releases)
    b = files.lock_folder(tmp_path, "run folder")
    monkeypatch.setattr(files.os, "open", real_open)
    assert len(opened) == 2, "B took the lock on the file it opened after A's release"
    with pytest.raises(files.FolderLockedError, match="in use by pid"):
        files.lock_folder(tmp_path, "run folder")  # C
    b.release()
    files.lock_folder(tmp_path, "run folder").release()


def test_a_short_section_waits_for_the_holder(tmp_path: Path) -> None:
    import threading

    from vlmscope.files import FolderLockedError, lock_folder

    held = lock_folder(tmp_path, "graph folder")
    with pytest.raises(FolderLockedError):
        lock_folder(tmp_path, "graph folder", wait_s=0.2)
    threading.Timer(0.3, held.release).start()
    lock_folder(tmp_path, "graph folder", wait_s=30).release()  # taken once released
