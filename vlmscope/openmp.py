"""OpenMP's idle spin, shortened before torch loads (the CLI does this first).

Why: torch's CPU kernels run on a GNU OpenMP (libgomp) team whose workers, after each parallel
region, busy-wait for the next one (300,000 spins by default). vlmscope's top-k selection
(`dictionaries.topk`) runs numpy on threads of its own between torch's kernels, so on a
2-core machine it shared a core with a spinning worker: inside a training step at 2 threads
it took 1.9-3.1 ms per [512, 1,024] selection against 1.1-1.7 ms with the workers asleep.
With `GOMP_SPINCOUNT=10000` the median step of the toy's SAE and transcoder was about a
quarter shorter (benchmarks/README.md, "OpenMP's idle spin").

libgomp reads its environment once, when torch loads it, so this only works in a process that
has not imported torch yet; a variable the user set, or any `OMP_WAIT_POLICY`, is kept.
(Intel's and LLVM's OpenMP read `KMP_BLOCKTIME` instead; it is left alone: not measured.)
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping

#: what the CLI adds to the environment (libgomp's default is 300,000, or 1,000 when the team
#: has more threads than the machine has cores)
SPIN_ENV: dict[str, str] = {"GOMP_SPINCOUNT": "10000"}


def spin_env(environ: Mapping[str, str]) -> dict[str, str]:
    """The variables of `SPIN_ENV` that `environ` does not set (none when it sets
    OMP_WAIT_POLICY: the user chose how OpenMP waits)."""
    if "OMP_WAIT_POLICY" in environ:
        return {}
    return {k: v for k, v in SPIN_ENV.items() if k not in environ}


def shorten_openmp_spin() -> bool:
    """Add `spin_env` to this process's environment (and so its children's); False, changing
    nothing, once torch is imported (its OpenMP has read the environment already)."""
    if "torch" in sys.modules:
        return False
    os.environ.update(spin_env(os.environ))
    return True
