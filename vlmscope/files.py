"""Atomic file writes: every file vlmscope hands a user goes through a temporary sibling and a
rename, so a reader never sees a torn file and a crash leaves the previous version intact."""

from __future__ import annotations

import os
import secrets
import time
from collections.abc import Callable
from pathlib import Path


def write_atomically(path: str | os.PathLike[str], write: Callable[[Path], object]) -> Path:
    """Call `write(tmp)` on a temporary path next to `path`, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # unique per call: threads of one process (the viewer's server) may write one file at once
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        write(tmp)
        apply_umask(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def unwritable_reason(folder: str | os.PathLike[str]) -> str | None:
    """Why files cannot be written in `folder` (made if missing), or None if they can: its
    nearest existing ancestor must be a folder this process may write in. Checked before long
    work, so a typo in an output path fails in a second, not after the work."""
    path = Path(folder).absolute()
    for at in (path, *path.parents):
        if at.exists():
            if not at.is_dir():
                return f"{at} is a file, not a folder"
            if not os.access(at, os.W_OK | os.X_OK):
                return f"{at} is not writable"
            return None
    return f"{path} has no existing folder above it"


def umask() -> int:
    """The process's file-creation mask (read without changing it where /proc allows)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # elsewhere: read it by setting it, then put it back at once
    os.umask(mask)
    return mask


def apply_umask(path: str | os.PathLike[str]) -> None:
    """Give a written file the mode a plain `open()` would: 0666 minus the umask. Some
    writers (safetensors) create their files 0600, which would make a shared run folder
    readable by its author alone while its JSON files are readable by all."""
    path = Path(path)
    targets = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    mode = 0o666 & ~umask()
    for p in targets:
        os.chmod(p, mode)


def write_text_atomically(path: str | os.PathLike[str], text: str) -> Path:
    """`write_atomically` for UTF-8 text."""
    return write_atomically(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


# --- one writer per output folder ------------------------------------------------------------
LOCK_NAME = ".vlmscope.lock"


class FolderLockedError(RuntimeError):
    """Another live process writes this folder; the message names its pid, host and command."""


class FolderLock:
    """An exclusive advisory lock on an output folder, held while one process writes it.

    The kernel releases a `flock` when its holder dies (kill -9 included), so a lock left by a
    dead process is taken over, never obeyed; the lock file keeps the holder's pid, host and
    command so that a refused writer can say who holds the folder. On a host without `fcntl`
    (Windows) the lock is advisory only through the file's contents.
    """

    def __init__(
        self, folder: str | os.PathLike[str], what: str = "folder", wait_s: float = 0.0
    ) -> None:
        self.folder = Path(folder)
        self.what = what
        #: how long to wait for a live holder before refusing (0: refuse at once)
        self.wait_s = wait_s
        self.path = self.folder / LOCK_NAME
        self._fd: int | None = None
        #: the holder recorded in a lock file that was stale (its process gone), if any.
        self.stale_holder: dict[str, object] | None = None

    def acquire(self) -> FolderLock:
        import json
        import socket
        import sys

        self.folder.mkdir(parents=True, exist_ok=True)
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not POSIX
            fcntl = None  # type: ignore[assignment]
        deadline = time.monotonic() + self.wait_s
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            if fcntl is None:
                break
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                holder = _read_holder(fd)
                os.close(fd)
                if time.monotonic() < deadline:
                    time.sleep(0.05)
                    continue
                who = (
                    f"pid {holder.get('pid')} on host {holder.get('host')}"
                    + (f" ({holder.get('command')})" if holder.get("command") else "")
                    if holder
                    else "another process"
                )
                raise FolderLockedError(
                    f"{self.what} {self.folder} is in use by {who}: wait for it to finish, "
                    "or write elsewhere"
                ) from None
            # The holder before us unlinks the file as it releases: a file we opened before
            # that is no longer the lock, and a writer that opens the path now locks a new
            # one. Hold the flock only if it is on the file the path names.
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        previous = _read_holder(fd)
        if previous and previous.get("pid") != os.getpid():
            self.stale_holder = previous  # we hold the flock, so its writer is gone
        me = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "command": " ".join(sys.argv[:6])[:200],
            "since": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.ftruncate(fd, 0)
            self.path.unlink(missing_ok=True)
        except OSError:
            pass
        finally:
            os.close(fd)  # closing drops the flock

    def __enter__(self) -> FolderLock:
        return self if self._fd is not None else self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def lock_folder(
    folder: str | os.PathLike[str], what: str = "folder", wait_s: float = 0.0
) -> FolderLock:
    """Acquire the folder's writer lock (use as a context manager, or call `release()`),
    waiting up to `wait_s` seconds for a live holder (for short sections such as an index
    update; a long job refuses at once and names the holder)."""
    return FolderLock(folder, what, wait_s).acquire()


def _read_holder(fd: int) -> dict[str, object]:
    import json

    try:
        raw = os.pread(fd, 4096, 0)
        holder = json.loads(raw.decode()) if raw.strip() else {}
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}
