"""Tokens per second of `vlmscope features`: its collector alone at 1k / 10k / 100k features
(side by side with an earlier collector from git), and end to end on the toy VLM.

    python benchmarks/features_throughput.py [--features 1000 10000 100000] [--batches 12]
        [--baseline d5ccf66] [--e2e-features 512 10000] [--e2e-tokens 30000] [--threads 1]

1. The collector alone (`FeatureCollector.update`, what grows with the number of features):
   synthetic TopK codes (k = 32, uniform random features and values: the worst case, as no
   feature's examples settle) for 2048 tokens per batch (8 samples of 256), 10 examples with
   16 tokens of context each. tokens/s is over the second half of the batches; `cand` is the
   share of the batch's nonzero codes that passed the threshold test then. The same batches go
   through the collector of git revision `--baseline` (the dense [K, F'] merge of the first
   version; `none` skips it) in the same process, for a ratio that other jobs on the CPU do
   not change much.
2. End to end on the toy VLM (model forward + encode + collect + saving images), random
   per-layer transcoders on its 4 layers with k = 32, shapes-world data, batch 8, up to
   `--e2e-tokens` tokens; the cards are written after the timed part (their time is printed).

`--threads` sets torch's intra-op threads (default 1: the toy model's matrices are small, and
with other jobs on the CPU two OpenMP threads spinning against each other made its forward
about 50x slower than one).
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vlmscope.features import collect  # noqa: E402


def old_collector(rev: str) -> ModuleType | None:
    """`vlmscope/features/collect.py` as it was at git revision `rev` (None if unavailable)."""
    try:
        text = subprocess.run(
            ["git", "show", f"{rev}:vlmscope/features/collect.py"], cwd=ROOT, check=True,
            capture_output=True, text=True,
        ).stdout  # fmt: skip
    except (OSError, subprocess.CalledProcessError) as e:
        print(f"baseline {rev}: not available ({e}); skipped", file=sys.stderr)
        return None
    path = Path(tempfile.mkdtemp()) / "collect_baseline.py"
    path.write_text(text)
    spec = importlib.util.spec_from_file_location("collect_baseline", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def synthetic_batches(n_features: int, batches: int, seed: int = 0) -> list[collect.Batch]:
    g = torch.Generator().manual_seed(seed)
    n, t, k = 2048, 256, 32
    out = []
    for i in range(batches):
        idx = torch.randint(0, n_features, (n, k), generator=g)
        vals = torch.rand(n, k, generator=g) * 5
        out.append(collect.Batch(vals, idx, torch.ones(n, dtype=torch.bool),
                                 torch.randint(0, 30000, (n,), generator=g), torch.full((n, 4), -1),
                                 (i * 8 + torch.arange(8)).repeat_interleave(t),
                                 torch.arange(t).repeat(8), t))  # fmt: skip
    return out


def time_collector(mod: ModuleType, n_features: int, batches: list[Any]) -> dict[str, float]:
    c = mod.FeatureCollector(n_features, k=10, before=12, after=3)
    times, cand = [], []
    for b in batches:
        thr = getattr(c, "threshold", None)
        if thr is not None:  # share of nonzero codes past the threshold test
            cand.append(float((b.values > thr[b.indices]).float().mean()))
        t0 = time.perf_counter()
        c.update(b)
        times.append(time.perf_counter() - t0)
    half = len(batches) // 2
    steady = times[half:]
    mb = sum(v.numel() * v.element_size() for v in c.state().values()) / 2**20
    return {
        "tok_s": len(batches[0].valid) * len(steady) / sum(steady),
        "cand": sum(cand[half:]) / len(cand[half:]) if cand else float("nan"),
        "mib": mb,
    }


def end_to_end(n_features: int, max_tokens: int) -> dict[str, float]:
    from vlmscope.dictionaries.config import SparseCoderConfig
    from vlmscope.features.run import FeaturesOptions, collect_features
    from vlmscope.models.hooked import HookedVLM
    from vlmscope.models.toy import toy_path
    from vlmscope.training.bundle import DictionaryBundle, mlp_out, resid_mid

    vlm = HookedVLM.from_pretrained(str(toy_path()), device="cpu", dtype=torch.float32)
    a = vlm.adapter
    torch.manual_seed(0)
    cfg = SparseCoderConfig(kind="clt", num_latents=n_features, k=32, n_targets=1)
    layers = list(range(a.n_layers))
    info = {"name": "bench", "family": a.family, "dims": a.dims(), "tokens": "all",
            "layers": layers}  # fmt: skip
    reads, writes = [resid_mid(i) for i in layers], [mlp_out(i) for i in layers]
    bundle = DictionaryBundle.create(cfg, reads, writes, a.d_model, a.d_model, info)
    with tempfile.TemporaryDirectory() as tmp:
        bundle.save(Path(tmp) / "d")
        opts = FeaturesOptions(max_tokens=max_tokens)
        t0 = time.perf_counter()
        res = collect_features("toy", str(Path(tmp) / "d"), "shapes:2000", Path(tmp) / "o",
                               opts, vlm=vlm, progress=False)  # fmt: skip
        total = time.perf_counter() - t0
    return {"tokens": res.tokens, "tok_s": res.tokens_per_s, "cards_s": total - res.seconds}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--features",
        type=int,
        nargs="+",
        default=[1000, 10_000, 100_000],
        help="feature counts for the collector alone",
    )
    ap.add_argument("--batches", type=int, default=12, help="batches of 2048 tokens per size")
    ap.add_argument(
        "--baseline",
        default="d5ccf66",
        help="git revision whose collector runs side by side ('none': skip)",
    )
    ap.add_argument(
        "--e2e-features",
        type=int,
        nargs="*",
        default=[512, 10_000],
        help="features per layer for the end-to-end runs (none: skip them)",
    )
    ap.add_argument("--e2e-tokens", type=int, default=30_000)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    base = None if args.baseline == "none" else old_collector(args.baseline)
    print(f"collector alone: k = 32 random codes, 2048 tokens/batch, {args.batches} batches, "
          f"10 examples x 16 tokens; baseline {args.baseline}")  # fmt: skip
    print(f"{'features':>9} {'tokens/s':>10} {'cand':>6} {'state MiB':>9} "
          f"{'baseline tok/s':>14} {'ratio':>6}")  # fmt: skip
    for f in args.features:
        batches = synthetic_batches(f, args.batches)
        ours = time_collector(collect, f, batches)
        old = time_collector(base, f, batches) if base is not None else None
        ratio = f"{ours['tok_s'] / old['tok_s']:>6.1f}" if old else f"{'-':>6}"
        old_s = f"{old['tok_s']:>14,.0f}" if old else f"{'-':>14}"
        print(f"{f:>9,} {ours['tok_s']:>10,.0f} {ours['cand']:>6.3f} {ours['mib']:>9.0f} "
              f"{old_s} {ratio}", flush=True)  # fmt: skip
    if args.e2e_features:
        print(f"\nend to end, toy VLM, 4 layers, k = 32, up to {args.e2e_tokens} tokens, "
              f"{args.threads} thread(s)")  # fmt: skip
        print(f"{'features/layer':>14} {'tokens':>7} {'tokens/s':>9} {'cards s':>8}")
        for f in args.e2e_features:
            r = end_to_end(f, args.e2e_tokens)
            print(f"{f:>14,} {r['tokens']:>7,} {r['tok_s']:>9,.0f} {r['cards_s']:>8.1f}",
                  flush=True)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
