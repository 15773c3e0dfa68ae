"""Progress bars that suit where they are shown: a live bar in a terminal, and one plain line
every few seconds in a redirected log (where a bar's redraws would flood the file).

`VLMSCOPE_PROGRESS_SECONDS` sets the interval between log lines (default 30).
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

from tqdm.auto import tqdm

__all__ = ["LOG_INTERVAL_S", "LogProgress", "progress_bar"]

LOG_INTERVAL_S = 30.0


class LogProgress:
    """The part of tqdm's interface vlmscope uses, written as one line per interval (and one
    at the end), formatted by tqdm's own meter so a log reads like the bar would."""

    def __init__(
        self,
        total: float | None = None,
        *,
        file: Any,
        interval: float,
        initial: float = 0,
        desc: str | None = None,
        unit: str = "it",
        unit_scale: bool = False,
        **_: Any,
    ) -> None:
        self.total, self.n, self.desc = total, initial, desc
        self.unit, self.unit_scale = unit, unit_scale
        self.file, self.interval = file, interval
        self.postfix = ""
        self._start = self._last = time.monotonic()
        self._initial = initial
        self._closed = False

    def update(self, n: float = 1) -> None:
        self.n += n
        if time.monotonic() - self._last >= self.interval:
            self._write()

    def set_postfix(self, ordered_dict: dict[str, Any] | None = None, **kwargs: Any) -> None:
        items = {**(ordered_dict or {}), **kwargs}
        self.postfix = ", ".join(f"{k}={v}" for k, v in items.items())

    def set_description(self, desc: str | None = None, refresh: bool = True) -> None:
        self.desc = desc

    def refresh(self) -> None:
        self._write()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._write()

    def _write(self) -> None:
        now = time.monotonic()
        elapsed = now - self._start
        rate = (self.n - self._initial) / elapsed if elapsed > 0 else None
        line = tqdm.format_meter(
            self.n, self.total, elapsed, ncols=100, prefix=self.desc or "", unit=self.unit,
            unit_scale=self.unit_scale, rate=rate, postfix=self.postfix or None, ascii=True,
        )  # fmt: skip
        self.file.write(line.strip() + "\n")
        self.file.flush()
        self._last = now

    def __enter__(self) -> LogProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def progress_bar(
    total: float | None = None, *, file: Any = None, disable: bool = False, **kwargs: Any
) -> Any:
    """A tqdm bar on a terminal; on a pipe or file, a line per `VLMSCOPE_PROGRESS_SECONDS`."""
    stream = file if file is not None else sys.stderr
    isatty = getattr(stream, "isatty", lambda: False)
    if disable or isatty():
        return tqdm(total=total, file=stream, disable=disable, **kwargs)
    interval = float(os.environ.get("VLMSCOPE_PROGRESS_SECONDS", LOG_INTERVAL_S))
    return LogProgress(total, file=stream, interval=interval, **kwargs)
