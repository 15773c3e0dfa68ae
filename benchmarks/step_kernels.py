"""CPU kernels of the dictionary step against torch's defaults: top-k selection, the decoder's
backward and Adam.

    python benchmarks/step_kernels.py                 # 1 and 2 threads, ~2 min
    python benchmarks/step_kernels.py --threads 1 --sizes 512x1024x32

Prints, per [N, F] pre-activation size and k: torch.topk(sorted=False) against
`vlmscope.dictionaries.topk.row_topk_indices` (median ms, and whether the selected values are
the same); per decoder size N x F x d with k: embedding_bag's backward (values and W_dec
gradients) against `vlmscope.dictionaries.kernels`' (one radix sort, an embedding_bag forward
with a bag per latent and a sampled product), which `sparse_decode` uses at every size on CPU;
and per dictionary size [F, d]: torch's Adam step (for-each) against the fused one that
`vlmscope train` uses. Timings only; correctness is tested in tests/dictionaries.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from vlmscope.dictionaries import kernels
from vlmscope.dictionaries.topk import row_topk_indices


def median_ms(fn: Callable[[], object], repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2] * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--sizes", nargs="+",
                   default=["512x1024x32", "4096x1024x32", "2048x4096x32", "2048x4096x64",
                            "4096x16384x32", "4096x32768x64"],
                   help="NxFxk pre-activation sizes for the selection")  # fmt: skip
    p.add_argument("--decoders", nargs="+",
                   default=["512x1024x128x32", "512x1024x512x32", "2048x8192x512x32",
                            "2048x32768x1024x32"],
                   help="NxFxdxk decoder sizes for the backward")  # fmt: skip
    p.add_argument(
        "--adam",
        nargs="+",
        default=["1024x128", "16384x512"],
        help="Fxd dictionary sizes for the optimiser step (encoder + decoder)",
    )
    args = p.parse_args()
    for threads in args.threads:
        torch.set_num_threads(threads)
        print(f"\n{threads} thread(s): top-k selection, median ms")
        print(f"{'N x F, k':<22}{'torch.topk':>12}{'vlmscope':>10}{'speed-up':>10}{'same':>6}")
        for size in args.sizes:
            n, f, k = (int(v) for v in size.split("x"))
            x = torch.randn(n, f, generator=torch.Generator().manual_seed(0))
            repeats = 30 if n * f <= 1 << 23 else 5
            ref = median_ms(lambda x=x, k=k: x.topk(k, dim=1, sorted=False), repeats)
            ours = median_ms(lambda x=x, k=k: row_topk_indices(x, k), repeats)
            same = torch.equal(x.gather(1, row_topk_indices(x, k)).sort(1).values,
                               x.topk(k, dim=1).values.sort(1).values)  # fmt: skip
            print(f"{f'{n} x {f}, {k}':<22}{ref:>12.2f}{ours:>10.2f}{ref / ours:>9.2f}x{same!s:>6}")
        print(f"{threads} thread(s): decoder backward (values and W_dec), median ms")
        print(f"{'N x F x d, k':<26}{'embedding_bag':>14}{'vlmscope':>10}{'speed-up':>10}")
        for size in args.decoders:
            n, f, d, k = (int(v) for v in size.split("x"))
            ref, ours = decoder_backward_ms(n, f, d, k)
            print(f"{f'{n} x {f} x {d}, {k}':<26}{ref:>14.2f}{ours:>10.2f}{ref / ours:>9.2f}x")
        print(f"{threads} thread(s): Adam step over W_enc, W_dec [F, d], b_enc, b_dec, median ms")
        for size in args.adam:
            f, d = (int(v) for v in size.split("x"))
            row = []
            for fused in (False, True):
                params = [torch.randn(s, requires_grad=True) for s in ((f, d), (f,), (f, d), (d,))]
                for t in params:
                    t.grad = torch.randn_like(t)
                opt = torch.optim.Adam(
                    params, lr=1e-3, fused=fused, foreach=None if fused else True
                )
                row.append(median_ms(opt.step, 100 if f * d <= 1 << 20 else 10))
            print(
                f"  {f} x {d}: for-each {row[0]:.2f}, fused {row[1]:.2f} ({row[0] / row[1]:.1f}x)"
            )


def decoder_backward_ms(n: int, f: int, d: int, k: int) -> tuple[float, float]:
    """Forward and backward of one decode, embedding_bag's own against kernels.sparse_decode's
    (a fresh pattern each time, so its sort is counted)."""
    gen = torch.Generator().manual_seed(0)
    indices = torch.rand(n, f, generator=gen).topk(k, dim=1, sorted=False).indices
    values = torch.rand(n, k, generator=gen, requires_grad=True)
    w = torch.randn(f, d, generator=gen, requires_grad=True)
    upstream = torch.randn(n, d, generator=gen)
    repeats = 30 if n * f * d <= 1 << 28 else 5

    def run(decode: Callable[[], torch.Tensor]) -> Callable[[], None]:
        def once() -> None:
            values.grad = w.grad = None
            decode().backward(upstream)

        return once

    def reference() -> torch.Tensor:
        return torch.nn.functional.embedding_bag(indices, w, per_sample_weights=values, mode="sum")

    def ours() -> torch.Tensor:
        return kernels.sparse_decode(values, indices.clone(), w)  # a new tensor: a new pattern

    return median_ms(run(reference), repeats), median_ms(run(ours), repeats)


if __name__ == "__main__":
    main()
