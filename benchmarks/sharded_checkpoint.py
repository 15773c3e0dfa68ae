"""Each rank's memory and wall time while saving a checkpoint and the final dictionaries of a
--distribute-modules CLT on 2 gloo ranks.

    python benchmarks/sharded_checkpoint.py                  # this checkout's code path
    PYTHONPATH=/path/to/other/checkout python benchmarks/sharded_checkpoint.py   # another's

A CLT on 4 layers (every source writes every later layer), d 512, 18,432 latents: 528 MB of
parameters, 1.6 GB with Adam's two moments. Each rank trains one step (so the moments exist),
then every rank calls the trainer's `_checkpoint()` three times, and the write of the final
dictionaries three times; the figures are each rank's peak RSS growth over the call (VmHWM,
reset through /proc/self/clear_refs before each call) and its wall time, the median of three.
The code path is whichever `vlmscope` is imported: run it once on a checkout before sharded
checkpoints (rank 0 gathers and writes the whole bundle) and once after (each rank writes its
own shard). Wrap in `flock /tmp/vlmscope-heavy.lock`.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp

D, LAYERS, LATENTS, ROWS = 512, 4, 18_432, 8


def rss_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(field)


def reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


class Source:
    """Fixed random activations of ROWS rows per rank for LAYERS layers."""

    def __init__(self, rank: int) -> None:
        from vlmscope.data.processing import SkipCounter

        self.reads = [f"lm.blocks.{i}.hook_resid_mid" for i in range(LAYERS)]
        self.writes = [f"lm.blocks.{i}.mlp.hook_out" for i in range(LAYERS)]
        self.layers = list(range(LAYERS))
        self.d_in = self.d_out = D
        self.device = torch.device("cpu")
        self.skips = SkipCounter()
        self.rank = rank

    def model_info(self) -> dict[str, Any]:
        return {"name": "bench", "family": "test", "dims": {"d_model": D, "n_layers": LAYERS}}

    def batches(self, state: Any) -> Iterator[Any]:
        from vlmscope.training.sources import ActivationBatch

        g = torch.Generator().manual_seed(self.rank)
        while True:
            xs = [torch.randn(ROWS, D, generator=g) for _ in range(LAYERS)]
            ys = [torch.randn(ROWS, D, generator=g) for _ in range(LAYERS)]
            state.rows += ROWS
            yield ActivationBatch(xs, ys, {"rows": state.rows}, [])


def rank_main(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))  # fmt: skip
    torch.set_num_threads(1)
    from vlmscope.training.config import SaeArgs, TrainConfig
    from vlmscope.training.distributed import Layout
    from vlmscope.training.trainer import Trainer

    sae = SaeArgs(transcode=True, n_targets=0, kind="clt", num_latents=LATENTS, k=16)
    cfg = TrainConfig(model="bench", dataset="bench", sae=sae, batch_size=ROWS, output_dir=out,
                      run_name="bench", device="cpu", dist_timeout=600, max_steps=1,
                      save_every=1000, optimizer="adam", distribute_modules=True)  # fmt: skip
    layout = Layout.from_environment(cfg.dist_timeout)
    trainer = Trainer(cfg, progress=False, source=Source(rank), layout=layout)  # type: ignore[arg-type]
    trainer.fit()  # one step: Adam's moments exist
    report: dict[str, Any] = {"rank": rank}
    for what, call in (("checkpoint", trainer._checkpoint), ("dictionaries", final(trainer))):
        figures = []
        for _ in range(3):
            layout.barrier("benchmark")
            exact = reset_peak()
            before = rss_mib("VmRSS")
            t0 = time.perf_counter()
            call()
            seconds = time.perf_counter() - t0
            figures.append({"seconds": seconds, "peak_growth_mib": rss_mib("VmHWM") - before,
                            "exact_peak": exact})  # fmt: skip
        report[what] = figures
    ckpt = Path(out) / "bench" / "checkpoint"
    report["checkpoint_mib"] = sum(p.stat().st_size for p in ckpt.rglob("*") if p.is_file()) / 2**20
    (Path(out) / f"rank{rank}.json").write_text(json.dumps(report))


def final(trainer: Any) -> Any:
    """The trainer's write of the final dictionaries, as this checkout does it."""
    try:
        from vlmscope.training.sharded import save_final_dictionaries
    except ImportError:  # before sharded checkpoints: rank 0 gathers the bundle and writes it
        from vlmscope.training.checkpoint import save_final_dictionaries as gathered

        def write() -> None:
            full = trainer._assembled()
            trainer.layout.phase(lambda: gathered(trainer.run_dir, full), main_only=True)

        return write
    return lambda: save_final_dictionaries(
        trainer.run_dir, trainer.layout, trainer.bundle, trainer.shards
    )


def main() -> None:
    import socket

    import vlmscope

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    with tempfile.TemporaryDirectory(prefix="sharded-ckpt-") as out:
        ctx = mp.start_processes(rank_main, args=(2, port, out), nprocs=2, join=False,
                                 start_method="fork")  # fmt: skip
        for p in ctx.processes:
            p.join()
        if any(p.exitcode for p in ctx.processes):
            raise SystemExit(f"a rank failed: {[p.exitcode for p in ctx.processes]}")
        reports = [json.loads((Path(out) / f"rank{r}.json").read_text()) for r in range(2)]
    params = LAYERS * LATENTS * D * 4 + LATENTS * D * 4 * sum(range(1, LAYERS + 1))
    print(f"vlmscope from {Path(vlmscope.__file__).parent}; CLT {params / 1e6:.0f} MB of "
          f"parameters; checkpoint on disk {reports[0]['checkpoint_mib']:.0f} MiB")  # fmt: skip
    for what in ("checkpoint", "dictionaries"):
        for rep in reports:
            runs = rep[what]
            grow = statistics.median(r["peak_growth_mib"] for r in runs)
            secs = statistics.median(r["seconds"] for r in runs)
            print(f"{what:>12} rank {rep['rank']}: peak RSS growth {grow:,.0f} MiB, {secs:.1f} s "
                  f"(median of {len(runs)}; each {[round(r['seconds'], 1) for r in runs]} s, "
                  f"{[round(r['peak_growth_mib']) for r in runs]} MiB; exact peak "
                  f"{runs[0]['exact_peak']})")  # fmt: skip
    sys.stdout.flush()


if __name__ == "__main__":
    main()
