"""Tokens per second of `vlmscope features`, and of its collector alone at 100k features.

    python benchmarks/features_throughput.py

1. End to end on the toy VLM (model forward + encode + collect + saving images), a random CLT
   on its 4 layers with 512 features each, shapes-world data, batch 8; cards not timed.
2. The collector alone (what grows with the number of features): synthetic TopK codes
   (k = 32) for 2048 tokens per batch, 100,000 features, 10 examples with 16 tokens of context
   each; after warm-up batches, when few new candidates beat the kept examples.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.replacement.test_model import random_clt
from vlmscope.features.collect import Batch, FeatureCollector
from vlmscope.features.run import FeaturesOptions, collect_features
from vlmscope.models.hooked import HookedVLM
from vlmscope.models.toy import toy_path


def end_to_end() -> tuple[int, float]:
    vlm = HookedVLM.from_pretrained(str(toy_path()), device="cpu", dtype=torch.float32)
    with tempfile.TemporaryDirectory() as tmp:
        random_clt(vlm, seed=0).save(Path(tmp) / "d")
        opts = FeaturesOptions(max_tokens=30_000)
        out = Path(tmp) / "o"
        res = collect_features("toy", str(Path(tmp) / "d"), "shapes:2000", out, opts, vlm=vlm,
                               progress=False)  # fmt: skip
    return res.tokens, res.seconds


def collector_only(n_features: int = 100_000, batches: int = 12) -> tuple[int, float, float]:
    g = torch.Generator().manual_seed(0)
    c = FeatureCollector(n_features, k=10, before=12, after=3)
    n, t, k = 2048, 256, 32
    times = []
    for i in range(batches):
        idx = torch.randint(0, n_features, (n, k), generator=g)
        vals = torch.rand(n, k, generator=g) * 5
        b = Batch(vals, idx, torch.ones(n, dtype=torch.bool), torch.randint(0, 30000, (n,)),
                  torch.full((n, 4), -1), (i * 8 + torch.arange(8)).repeat_interleave(t),
                  torch.arange(t).repeat(8), t)  # fmt: skip
        t0 = time.perf_counter()
        c.update(b)
        times.append(time.perf_counter() - t0)
    steady = times[batches // 2 :]
    mb = sum(v.numel() * v.element_size() for v in c.state().values()) / 2**20
    return n, sum(steady) / len(steady), mb


def main() -> int:
    tokens, secs = end_to_end()
    n, per_batch, mb = collector_only()
    print(f"{'what':<58} {'tokens/s':>10}")
    print(f"{'end to end, toy VLM, 4 x 512 features':<58} {tokens / secs:>10,.0f}")
    what = "collector alone, 100,000 features, k=32, 2048 tokens/batch"
    print(f"{what:<58} {n / per_batch:>10,.0f}")
    print(f"collector state at 100,000 features x 10 examples x 16 tokens: {mb:.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
