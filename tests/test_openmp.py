"""The CLI shortens OpenMP's idle spin before torch loads, and keeps what the user set."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

from vlmscope import openmp

# Records the variable at the moment torch's package starts to import (libgomp loads with it
# and reads its environment then), then runs the CLI command given in argv.
_PROBE = textwrap.dedent(
    """
    import importlib.abc, os, sys

    seen = []

    class Watch(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "torch" and not seen:
                seen.append(os.environ.get("GOMP_SPINCOUNT", "<unset>"))
            return None

    sys.meta_path.insert(0, Watch())
    from vlmscope.cli import main

    main(sys.argv[1:])
    print("GOMP_SPINCOUNT when torch loaded:", seen[0] if seen else "<torch not imported>")
    """
)


def _run_cli(env_extra: dict[str, str], *argv: str) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    env.update(env_extra)
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, *argv], capture_output=True, text=True, env=env, check=True
    )
    return out.stdout.strip().splitlines()[-1]


def test_the_cli_sets_the_spin_count_before_torch_loads() -> None:
    line = _run_cli({}, "models")  # `vlmscope models` imports torch (the adapters)
    assert line == f"GOMP_SPINCOUNT when torch loaded: {openmp.SPIN_ENV['GOMP_SPINCOUNT']}"


def test_the_cli_keeps_the_users_spin_count() -> None:
    assert _run_cli({"GOMP_SPINCOUNT": "123"}, "models").endswith(": 123")


def test_a_wait_policy_of_the_users_leaves_the_spin_count_unset() -> None:
    assert _run_cli({"OMP_WAIT_POLICY": "ACTIVE"}, "models").endswith(": <unset>")
    assert openmp.spin_env({"OMP_WAIT_POLICY": "PASSIVE"}) == {}


def test_nothing_changes_once_torch_is_loaded(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import torch  # noqa: F401  (this process has it; the variable would come too late)

    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    assert openmp.shorten_openmp_spin() is False
    assert "GOMP_SPINCOUNT" not in os.environ
