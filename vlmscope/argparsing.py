"""argparse with flag suggestions: its own module so the command line can build its top-level
parser without importing torch (the subcommands' modules need it; `--help` does not)."""

from __future__ import annotations

import argparse
import difflib
import re
import sys
import typing
from typing import Any


class SuggestingParser(argparse.ArgumentParser):
    """argparse that suggests the closest flag for an unknown one, and reads any negative
    number as a value (`--lr -1e-3`): no vlmscope flag looks like a number."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # argparse's own pattern misses exponents (-1e-3) and would call it an unknown flag.
        self._negative_number_matcher = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> Any:  # type: ignore[override]
        self._argv = [str(a) for a in (sys.argv[1:] if args is None else args)]
        return super().parse_known_args(args, namespace)

    def _invoked(self) -> tuple[list[str], list[str]]:
        """(subcommand words, option strings) of the deepest subcommand the arguments name
        (`plan attribute`), so a hint never offers another command's flag."""
        parser: argparse.ArgumentParser = self
        argv, words = getattr(self, "_argv", []), []
        while True:
            sub = next(
                (a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None
            )
            name = next((w for w in argv if sub is not None and w in sub.choices), None)
            if sub is None or name is None:
                break
            words.append(name)
            parser = sub.choices[name]
            argv = argv[argv.index(name) + 1 :]
        options = {s for a in parser._actions for s in a.option_strings}
        # Every flag also has an underscore spelling: offer the dashed one.
        return words, sorted(o for o in options if o.replace("_", "-") == o or
                             o.replace("_", "-") not in options)  # fmt: skip

    def error(self, message: str) -> typing.NoReturn:
        if "unrecognized arguments" in message:
            words, known = self._invoked()
            command = " ".join([self.prog, *words])
            hints = []
            for w in message.split(":", 1)[1].split():
                if w.startswith("--"):
                    close = difflib.get_close_matches(w.split("=")[0], known, n=2)
                    hint = f"did you mean {' or '.join(close)}?" if close else "see --help"
                    hints.append(f"{w}: not a flag of `{command}`; {hint}")
            if hints:
                message += "\n  " + "\n  ".join(hints)
        super().error(message)
