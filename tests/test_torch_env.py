"""The CLI sets OpenMP's idle spin and torch's huge pages before torch loads, and keeps what
the user set."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from vlmscope import torch_env

VARS = ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY", "THP_MEM_ALLOC_ENABLE")

# Records the variables at the moment torch's package starts to import (libgomp and torch's
# allocator read them then), runs the CLI command given in argv, then allocates and touches a
# 64 MB tensor and reads how much of the process's memory the kernel holds in huge pages.
_PROBE = textwrap.dedent(
    """
    import importlib.abc, json, os, sys

    seen = {}
    NAMES = ("GOMP_SPINCOUNT", "THP_MEM_ALLOC_ENABLE")

    class Watch(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "torch" and not seen:
                seen.update({k: os.environ.get(k, "<unset>") for k in NAMES})
            return None

    sys.meta_path.insert(0, Watch())
    from vlmscope.cli import main

    main(sys.argv[1:])
    import torch

    t = torch.ones(16 << 20)  # 64 MB, every page touched
    kb = 0
    with open("/proc/self/smaps_rollup") as f:
        for line in f:
            if line.startswith("AnonHugePages:"):
                kb = int(line.split()[1])
    print(json.dumps({**seen, "huge_mb": kb / 1024}))
    """
)


def _run_cli(env_extra: dict[str, str], *argv: str) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if k not in VARS}
    env.update(env_extra)
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, *argv], capture_output=True, text=True, env=env, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def _thp_mode() -> str:
    """The kernel's transparent-huge-page mode (the bracketed word), or '' where unknown."""
    path = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    text = path.read_text() if path.exists() else ""
    return text.split("[", 1)[1].split("]", 1)[0] if "[" in text else ""


def test_the_cli_sets_both_before_torch_loads() -> None:
    seen = _run_cli({}, "models")  # `vlmscope models` imports torch (the adapters)
    assert seen["GOMP_SPINCOUNT"] == torch_env.SPIN_ENV["GOMP_SPINCOUNT"]
    assert seen["THP_MEM_ALLOC_ENABLE"] == torch_env.ALLOC_ENV["THP_MEM_ALLOC_ENABLE"]


@pytest.mark.skipif(
    _thp_mode() != "madvise", reason="huge pages on request need the kernel's madvise mode"
)
def test_torch_gets_huge_pages_under_the_cli_and_not_without() -> None:
    """What the variable is for, read from the kernel: a large tensor lands in huge pages
    under the CLI's environment, and (with the kernel in madvise mode) not when the user
    turns it off."""
    assert _run_cli({}, "models")["huge_mb"] >= 32
    assert _run_cli({"THP_MEM_ALLOC_ENABLE": "0"}, "models")["huge_mb"] < 8


def test_the_cli_keeps_the_users_values() -> None:
    seen = _run_cli({"GOMP_SPINCOUNT": "123", "THP_MEM_ALLOC_ENABLE": "0"}, "models")
    assert seen["GOMP_SPINCOUNT"] == "123" and seen["THP_MEM_ALLOC_ENABLE"] == "0"


def test_a_wait_policy_of_the_users_leaves_the_spin_count_unset() -> None:
    seen = _run_cli({"OMP_WAIT_POLICY": "ACTIVE"}, "models")
    assert seen["GOMP_SPINCOUNT"] == "<unset>"
    assert seen["THP_MEM_ALLOC_ENABLE"] == "1"  # the allocator's setting is not OpenMP's
    assert torch_env.spin_env({"OMP_WAIT_POLICY": "PASSIVE"}) == {}


def test_nothing_changes_once_torch_is_loaded(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch  # noqa: F401  (this process has it; the variables would come too late)

    for name in VARS:
        monkeypatch.delenv(name, raising=False)
    assert torch_env.prepare_torch_env() is False
    assert not any(name in os.environ for name in VARS)
