"""Time one CLT training step (forward and backward) on random rows, for CLTs wider in layers
than the toy's: the cost that grows with the window of targets each source writes.

    python benchmarks/clt_step.py --layers 8 --d 512 --rows 1024
    python benchmarks/clt_step.py --layers 16 --d 256 --rows 512

Prints the median step of `--steps` (after 3 untimed ones). Random rows, not a model's: the
step's cost does not depend on what the rows hold, only on the shapes.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vlmscope.dictionaries import CrossLayerTranscoder, SparseCoderConfig


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--d", type=int, default=512)
    p.add_argument("--rows", type=int, default=1024, help="tokens per step")
    p.add_argument("--expansion", type=int, default=8)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--n-targets", type=int, default=0, help="0: every later layer")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=15)
    args = p.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    cfg = SparseCoderConfig(kind="clt", n_layers=args.layers, d_in=args.d, k=args.k,
                            expansion_factor=args.expansion, n_targets=args.n_targets)  # fmt: skip
    clt = CrossLayerTranscoder(cfg)
    clt.train()
    xs = [torch.randn(args.rows, args.d) for _ in range(args.layers)]
    ys = [torch.randn(args.rows, args.d) for _ in range(args.layers)]
    clt.init_from_data(xs, ys)

    def step() -> None:
        clt(xs, ys).loss.backward()
        for param in clt.parameters():
            param.grad = None

    for _ in range(3):
        step()
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    median = sorted(times)[len(times) // 2]
    print(
        f"CLT over {args.layers} layers, d {args.d}, {cfg.num_latents} latents, {args.rows} "
        f"rows, {args.threads} threads: median step {median * 1e3:.1f} ms"
    )


if __name__ == "__main__":
    main()
