"""What the CLI sets in the environment before torch loads (`main` does this first).

torch reads these once, when it loads, so they only work in a process that has not imported
torch yet; a variable the user set is kept.

1. OpenMP's idle spin, `GOMP_SPINCOUNT=10000`. torch's CPU kernels run on a GNU OpenMP
   (libgomp) team whose workers, after each parallel region, busy-wait for the next one
   (300,000 spins by default). vlmscope's top-k selection (`dictionaries.topk`) runs numpy on
   threads of its own between torch's kernels, so on a 2-core machine it shared a core with a
   spinning worker: inside a training step at 2 threads it took 1.9-3.1 ms per [512, 1,024]
   selection against 1.1-1.7 ms with the workers asleep. With the shorter spin the median step
   of the toy's SAE and transcoder was about a quarter shorter (benchmarks/README.md,
   "OpenMP's idle spin"). Left unset when the user sets `OMP_WAIT_POLICY` (they chose how
   OpenMP waits). Intel's and LLVM's OpenMP read `KMP_BLOCKTIME` instead: left alone, not
   measured.
2. Huge pages for torch's large CPU tensors, `THP_MEM_ALLOC_ENABLE=1`. torch's allocator then
   aligns allocations of 2 MB and more to 2 MB and asks the kernel for transparent huge pages
   (madvise). Attribution's backward allocates and frees tensors of tens of MB all the time,
   and the kernel faults in every fresh 4 KB page: at 480 tokens on the circuit-tracer
   benchmark's CLT that was 6.5 million faults and 11 s of system time in a 36 s run; with huge
   pages 0.26 million and 26 s, at the same peak memory (benchmarks/README.md, "Blocks of
   similar feature counts, and huge pages"; training: "Huge pages in training").
   It takes effect where the kernel's THP mode is `madvise` or `always`
   (/sys/kernel/mm/transparent_hugepage/enabled) and changes nothing elsewhere.

In your own Python, set them before `import torch` (e.g. `THP_MEM_ALLOC_ENABLE=1 python ...`).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping

#: OpenMP's spin (libgomp's default is 300,000, or 1,000 when the team has more threads than
#: the machine has cores)
SPIN_ENV: dict[str, str] = {"GOMP_SPINCOUNT": "10000"}

#: torch's CPU allocator: transparent huge pages for allocations of 2 MB and more
ALLOC_ENV: dict[str, str] = {"THP_MEM_ALLOC_ENABLE": "1"}


def spin_env(environ: Mapping[str, str]) -> dict[str, str]:
    """The variables of `SPIN_ENV` that `environ` does not set (none when it sets
    OMP_WAIT_POLICY: the user chose how OpenMP waits)."""
    if "OMP_WAIT_POLICY" in environ:
        return {}
    return {k: v for k, v in SPIN_ENV.items() if k not in environ}


def cli_env(environ: Mapping[str, str]) -> dict[str, str]:
    """Everything the CLI adds to `environ`: `spin_env` and the `ALLOC_ENV` it lacks."""
    return {**spin_env(environ), **{k: v for k, v in ALLOC_ENV.items() if k not in environ}}


def prepare_torch_env() -> bool:
    """Add `cli_env` to this process's environment (and so its children's); False, changing
    nothing, once torch is imported (it has read the environment already)."""
    if "torch" in sys.modules:
        return False
    os.environ.update(cli_env(os.environ))
    return True
