"""Attribution time and peak memory against the number of positions (0 to 40 images).

    python benchmarks/attribution.py                                  # toy VLM, random CLT
    python benchmarks/attribution.py --model llava --dictionaries DIR
    python benchmarks/attribution.py --prune-memory                   # prune / scores only

Each prompt is attributed with the same settings; the table gives positions, active features,
explored features, wall time and peak memory (process RSS on CPU, allocated memory on GPU).
The edge block held on the device is [batch, positions x d] per backward pass; rows move to
the CPU as they are computed, so device memory does not grow with the square of the number of
active features.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def peak_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def random_clt(vlm, expansion: int, k: int):  # type: ignore[no-untyped-def]
    """An untrained CLT: attribution cost depends on shapes and sparsity, not on training."""
    from vlmscope.dictionaries import SparseCoderConfig
    from vlmscope.training.bundle import DictionaryBundle, mlp_out, resid_mid

    a = vlm.adapter
    torch.manual_seed(0)
    cfg = SparseCoderConfig(kind="clt", expansion_factor=expansion, k=k)
    info = {"name": "bench", "family": a.family, "dims": a.dims(), "tokens": "all"}
    layers = range(a.n_layers)
    b = DictionaryBundle.create(cfg, [resid_mid(i) for i in layers], [mlp_out(i) for i in layers],
                                a.d_model, a.d_model, info, device=vlm.device)  # fmt: skip
    with torch.no_grad():
        for layer in b.clt.layers:  # type: ignore[union-attr]
            layer.W_dec.normal_(0, 0.1)
    return b


def synthetic_graph(
    n_features: int, n_layers: int, n_pos: int, n_logits: int, density: float
) -> Any:
    """A random DAG-shaped graph: feature rows read earlier features and every other column."""
    from vlmscope.attribution.graph import Graph, LogitTarget

    gen = torch.Generator().manual_seed(0)
    n = n_features + (n_layers + 1) * n_pos + n_logits
    a = torch.zeros(n, n)
    for r in [*range(n_features), *range(n - n_logits, n)]:  # row by row: no big temporaries
        a[r] = torch.randn(n, generator=gen) * (torch.rand(n, generator=gen) < density)
    a[:n_features, :n_features].tril_(-1)
    logits = [LogitTarget(i, str(i), 1 / n_logits) for i in range(n_logits)]
    return Graph(a, torch.zeros(n_features, 3, dtype=torch.long), torch.ones(n_features),
                 n_layers, torch.zeros(n_pos, dtype=torch.long), ["text"] * n_pos,
                 torch.full((n_pos, 4), -1), logits)  # fmt: skip


def prune_child(which: str, density: float) -> None:
    """One measurement in a fresh process (peak RSS is per process): prints a table row."""
    from vlmscope.attribution.graph import graph_scores, prune

    g = synthetic_graph(1000, 8, 600, 3, density)
    mb = g.adjacency.numel() * 4 / 2**20
    before = peak_mb(torch.device("cpu"))
    t = time.perf_counter()
    prune(g) if which == "prune" else graph_scores(g)
    dt = time.perf_counter() - t
    extra = peak_mb(torch.device("cpu")) - before
    print(f"{which:>13} {density:>8} {g.adjacency.shape[0]:>6} {mb:>9.0f} {extra:>10.0f} "
          f"{extra / mb:>8.1f}x {dt:>8.2f}")  # fmt: skip


def prune_memory() -> None:
    """Peak host memory of prune() and graph_scores() against the dense adjacency's size."""
    import subprocess

    print(f"CPU, threads {torch.get_num_threads()}; 1000 features, 8 layers, 600 positions, "
          "3 logits (random rows of the given density)")  # fmt: skip
    cols = ("function", "density", "nodes", "adj MB", "+peak MB", "ratio", "seconds")
    print(" ".join(f"{c:>{13 if i == 0 else 8}}" for i, c in enumerate(cols)))
    for which in ("prune", "graph_scores"):
        for density in (0.05, 1.0):
            cmd = [sys.executable, __file__, "--prune-child", which, str(density)]
            subprocess.run(cmd, check=True)


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--prune-child":
        torch.set_num_threads(min(2, torch.get_num_threads()))
        prune_child(sys.argv[2], float(sys.argv[3]))
        return
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", default="toy")
    p.add_argument(
        "--dictionaries", default=None, help="trained dictionaries (default: random CLT)"
    )
    p.add_argument("--images", type=int, nargs="+", default=[0, 1, 4, 16, 40])
    p.add_argument("--max-feature-nodes", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--prune-memory",
        action="store_true",
        help="measure prune() / graph_scores() peak host memory on synthetic graphs instead",
    )
    args = p.parse_args()
    if args.prune_memory:
        prune_memory()
        return
    from transformers.utils import logging as hf_logging

    from vlmscope.attribution.attribute import attribute
    from vlmscope.demo import demo_image
    from vlmscope.models.hooked import HookedVLM
    from vlmscope.training.bundle import DictionaryBundle
    from vlmscope.training.trainer import resolve_model_path

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    device = torch.device(args.device)
    vlm = HookedVLM.from_pretrained(
        resolve_model_path(args.model), device=str(device), dtype=torch.float32
    )
    bundle = (
        DictionaryBundle.load(args.dictionaries, device=device)
        if args.dictionaries
        else random_clt(vlm, 4, args.k)
    )
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"device: {name}, threads {torch.get_num_threads()}; model {args.model}; "
          f"max_feature_nodes {args.max_feature_nodes}, batch {args.batch_size}")  # fmt: skip
    cols = ("images", "positions", "active", "explored", "seconds", "peak MB")
    print(" ".join(f"{c:>9}" for c in cols))
    for n_images in args.images:
        images = [demo_image()] * n_images if n_images else None
        content = "What colour is the circle? " + "And this one? " * max(0, n_images - 1)
        inputs = vlm.prepare(content, images=images)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        t = time.perf_counter()
        g = attribute(vlm, bundle, inputs, max_feature_nodes=args.max_feature_nodes,
                      batch_size=args.batch_size)  # fmt: skip
        dt = time.perf_counter() - t
        row = (n_images, g.n_pos, g.metadata["n_active_features"], g.n_features)
        print(" ".join(f"{v:>9}" for v in row) + f" {dt:>9.2f} {peak_mb(device):>9.0f}")


if __name__ == "__main__":
    main()
