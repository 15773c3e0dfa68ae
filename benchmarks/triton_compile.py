"""The fused TopK encoder's candidate tiles compiled for a GPU, without one: shared memory,
registers and spills per tile, from Triton's compiler and `ptxas -v` (the wheel's own).

A tile that spills registers to local memory is slow whatever the GPU; the ones that do not
are what `gpu_session.py` times (its ENCODER_TILES). Reproduce:

    .venv/bin/python benchmarks/triton_compile.py --arch 90 --k 32
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vlmscope.dictionaries import triton_kernels as tk

CANDIDATES = [(32, 64, 32, 4), (64, 64, 32, 4), (64, 64, 64, 4), (64, 64, 64, 8),
              (64, 128, 32, 4), (64, 128, 32, 8), (64, 128, 64, 4), (128, 64, 32, 8),
              (128, 64, 64, 4), (128, 128, 32, 8), (128, 128, 64, 8), (128, 128, 32, 16),
              (256, 64, 32, 8), (64, 256, 32, 8)]  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--arch", type=int, default=90, help="CUDA compute capability x 10")
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    args = p.parse_args()
    if not tk.AVAILABLE:
        sys.exit("triton is not installed (pip install -c constraints.txt -e '.[triton]')")
    dtype = getattr(torch, args.dtype)
    print(f"sm_{args.arch}, {args.dtype}, k {args.k}\n")
    print("| block_m x block_f x block_k | warps | shared KB | registers | spill bytes |")
    print("|---|---|---|---|---|")
    for bm, bf, bk, warps in CANDIDATES:
        try:
            compiled = tk.compile_encoder(args.arch, dtype, args.k, bm, bf, bk, warps)
            use = tk.register_use(compiled, args.arch)
        except Exception as e:  # report and go on: one tile's failure is a finding
            print(f"| {bm} x {bf} x {bk} | {warps} | failed: {type(e).__name__} | | |")
            continue
        print(f"| {bm} x {bf} x {bk} | {warps} | {compiled.metadata.shared / 1024:.0f} | "
              f"{use['registers']} | {use['spill_bytes']} |")  # fmt: skip


if __name__ == "__main__":
    main()
