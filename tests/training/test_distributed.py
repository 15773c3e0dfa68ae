"""Data-parallel training on CPU with gloo: 2 and 4 processes against one process.

The ranks run the real Trainer (DDP, global batch statistics, per-rank data windows, rank-0
checkpoints) on an in-memory source whose activations are a fixed function of the dataset row,
so one process given the whole global batch sees exactly the rows the ranks see together.
Weights are compared after plain SGD: Adam's first steps divide each gradient by its own
magnitude, which turns float rounding of a gradient that is ~0 (b_dec starts at the data mean)
into a +-lr difference, whatever the parallelism; SGD leaves float tolerance meaningful.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import time
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from vlmscope.data.processing import SkipCounter
from vlmscope.training import lr_probe
from vlmscope.training.bundle import DictionaryBundle
from vlmscope.training.config import SaeArgs, TrainConfig
from vlmscope.training.distributed import AgreedError, Layout, share, window_rows
from vlmscope.training.errors import CheckpointError, TrainingError
from vlmscope.training.sharded import read_checkpoint_state
from vlmscope.training.sources import ActivationBatch, TrainState
from vlmscope.training.trainer import Trainer

D = 16


class ArraySource:
    """Activations of dataset row i are a fixed function of i (seeded), for 3 layers; rank r
    reads its share of each window of the one global cursor, like LiveSource."""

    def __init__(self, total: int, batch_size: int, layout: Layout, nan_at: int = -1,
                 die_at: int = -1) -> None:  # fmt: skip
        self.reads = [f"lm.blocks.{i}.hook_resid_mid" for i in range(3)]
        self.writes = [f"lm.blocks.{i}.mlp.hook_out" for i in range(3)]
        self.layers = [0, 1, 2]
        self.d_in = self.d_out = D
        self.device = torch.device("cpu")
        self.skips = SkipCounter()
        self.total, self.batch_size, self.layout = total, batch_size, layout
        self.nan_at, self.die_at = nan_at, die_at
        g = torch.Generator().manual_seed(1234)
        self.mix = torch.randn(3, D, D, generator=g) / D**0.5

    def model_info(self) -> dict[str, Any]:
        return {"name": "array", "family": "test", "dims": {"d_model": D, "n_layers": 3}}

    def rows(self, rows: range) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        xs, ys = [], []
        for layer in range(3):
            seeds = [1000 * i + layer for i in rows]
            x = torch.zeros(0, D)
            if seeds:
                x = torch.stack([torch.randn(D, generator=torch.Generator().manual_seed(s))
                                 for s in seeds])  # fmt: skip
            xs.append(x * (1 + layer) + 0.5)
            # row by row: a matmul's rounding may depend on how many rows it is given (MKL's
            # kernels for 3 and 6 rows differ on AMD EPYC), and a row must be the same
            # whichever rank, or one process, draws it
            mixed = [row @ self.mix[layer] for row in x]
            y = torch.stack(mixed) if mixed else x.new_zeros(0, self.mix[layer].shape[1])
            ys.append(torch.tanh(y) * 2 - 0.3)
        return xs, ys

    def batches(self, state: TrainState) -> Iterator[ActivationBatch]:
        lay, step = self.layout, 0
        while True:
            for window in window_rows(state.rows, self.total, self.batch_size, lay.world):
                mine = share(window, lay.rank, self.batch_size)
                xs, ys = self.rows(mine)
                step += 1
                culprit = lay.rank == lay.world - 1  # faults strike the last rank only
                if step == self.die_at and culprit:
                    os.kill(os.getpid(), signal.SIGKILL)
                if step == self.nan_at and culprit:
                    xs[1] = xs[1] * float("nan")
                    raise TrainingError("step 2: lm.blocks.1.hook_resid_mid has NaN values")
                yield ActivationBatch(xs, ys, {"rows": window.stop}, [str(i) for i in mine])
            state.epoch += 1
            state.rows = 0


def config(out: Path, name: str, batch: int, kind: str, **extra: Any) -> TrainConfig:
    sae = {"clt": SaeArgs(transcode=True, n_targets=2, num_latents=48, k=4,
                          activation="batchtopk", aux_k=8, dead_tokens_threshold=6),
           "transcoder": SaeArgs(transcode=True, num_latents=40, k=3, activation="jumprelu",
                                 sparsity_coeff=0.01, normalize_activations="mean_norm"),
           "sae": SaeArgs(num_latents=40, k=5, aux_k=4, dead_tokens_threshold=4)}[kind]  # fmt: skip
    values: dict[str, Any] = {"max_steps": 6, "save_every": 2, "lr": 0.05, "optimizer": "adam"}
    values.update(extra)
    return TrainConfig(model="array", dataset="array", sae=sae, batch_size=batch,
                       output_dir=str(out), run_name=name, device="cpu", dist_timeout=60,
                       **values)  # fmt: skip


def train_here(cfg: TrainConfig, total: int, sgd: bool, layout: Layout, **src: Any) -> Trainer:
    """A run on ArraySource; sgd: plain SGD for the run and for --lr-probe's copies."""
    source = ArraySource(total, cfg.batch_size, layout, **src)
    trainer = Trainer(cfg, progress=False, source=source, layout=layout)  # type: ignore[arg-type]
    if not sgd:
        trainer.fit()
        return trainer
    params = [p for g in trainer.optimizer.param_groups for p in g["params"]]
    trainer.optimizer = torch.optim.SGD(params, lr=cfg.lr)

    def sgd_for(name: str, params: Any, lr: float) -> torch.optim.Optimizer:
        return torch.optim.SGD(list(params), lr=lr)

    with mock.patch.object(lr_probe, "build_optimizer", sgd_for):
        trainer.fit()
    return trainer


def _rank_main(rank: int, world: int, port: int, job: dict[str, Any]) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))  # fmt: skip
    torch.set_num_threads(1)
    cfg = TrainConfig.from_dict(job["cfg"])
    layout = Layout.from_environment(cfg.dist_timeout)
    out = Path(job["out"])
    t0 = time.monotonic()
    try:
        tr = train_here(cfg, job["total"], job["sgd"], layout, **job.get("src", {}))
        weights = {k: v.contiguous() for k, v in tr.bundle.state_dict().items()
                   if v.device.type != "meta"}  # fmt: skip
        save_file(weights, str(out / f"rank{rank}.safetensors"))
        (out / f"rank{rank}.json").write_text(json.dumps({"ok": True, "held": held_bytes(tr)}))
    except Exception as e:  # any failure is reported to the test, with its kind
        (out / f"rank{rank}.json").write_text(json.dumps(
            {"ok": False, "error": f"{e}" if isinstance(e, TrainingError) else repr(e),
             "agreed": isinstance(e, AgreedError),
             "seconds": time.monotonic() - t0}))  # fmt: skip


def held_bytes(tr: Trainer) -> int:
    """Bytes of dictionary parameters and optimiser state this rank holds."""
    params = [p for g in tr.optimizer.param_groups for p in g["params"]]
    state = [t for st in tr.optimizer.state.values() for t in st.values()
             if isinstance(t, torch.Tensor) and t.dim() > 0]  # fmt: skip
    return sum(t.numel() * t.element_size() for t in params + state)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def join_or_kill(procs: list[Any], timeout: float = 150.0) -> None:
    """Wait for every rank (not ctx.join: it kills the others when one rank dies); a rank
    still running after `timeout` is killed and fails the test, which would otherwise pass
    and leave pytest waiting for it at exit forever."""
    end = time.monotonic() + timeout
    for proc in procs:
        proc.join(timeout=max(0.0, end - time.monotonic()))
    stuck = [r for r, p in enumerate(procs) if p.is_alive()]
    for r in stuck:
        procs[r].kill()
        procs[r].join()
    if stuck:
        pytest.fail(f"rank(s) {stuck} still running {timeout:g} s after the start: killed")


def fork_ranks(fn: Any, world: int, job: dict[str, Any], report: Path) -> list[dict[str, Any]]:
    """Run fn(rank, world, port, job) in `world` forked processes (torch already imported)
    and return what each wrote to report/rank{r}.json ({"ok": None} for a rank that died)."""
    ctx = mp.start_processes(fn, args=(world, free_port(), job), nprocs=world, join=False,
                             start_method="fork")  # fmt: skip
    join_or_kill(ctx.processes)
    return [
        json.loads(p.read_text()) if (p := report / f"rank{r}.json").exists() else {"ok": None}
        for r in range(world)
    ]


def run_ranks(world: int, out: Path, cfg: TrainConfig, total: int, sgd: bool = True,
              src: dict[str, Any] | None = None) -> list[dict[str, Any]]:  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    job = {"cfg": cfg.to_dict(), "out": str(out), "total": total, "sgd": sgd, "src": src or {}}
    # fork: the ranks start with torch already imported (spawn re-imports it, ~10 s each)
    method = os.environ.get("VLMSCOPE_TEST_START", "fork")
    ctx = mp.start_processes(_rank_main, args=(world, free_port(), job), nprocs=world,
                             join=False, start_method=method)  # fmt: skip
    join_or_kill(ctx.processes)
    codes = [p.exitcode for p in ctx.processes]
    results = []
    for r in range(world):
        path = out / f"rank{r}.json"
        results.append(
            json.loads(path.read_text()) if path.exists() else {"ok": None, "exit": codes[r]}
        )
    return results


def weights_of(out: Path, rank: int) -> dict[str, torch.Tensor]:
    return load_file(str(out / f"rank{rank}.safetensors"))


def assert_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k].double(), b[k].double(), atol=atol, rtol=0, msg=k)


@pytest.mark.parametrize(
    ("world", "kind", "batch", "total", "acc"),
    [(2, "clt", 6, 60, 2), (4, "transcoder", 3, 40, 1)],
)
def test_data_parallel_equals_one_process_on_the_global_batch(
    tmp_path: Path, world: int, kind: str, batch: int, total: int, acc: int
) -> None:
    """CLT with BatchTopK + AuxK over dead latents and grad accumulation on 2 ranks; JumpReLU
    transcoders with mean-norm scaling on 4 ranks, where the last window is short (40 rows in
    windows of 12: ranks 1-3 get 1, 0 and 0 rows of it)."""
    cfg = config(tmp_path, "dp", batch, kind, grad_acc_steps=acc, max_steps=4)
    results = run_ranks(world, tmp_path / "dp", cfg, total)
    assert all(r["ok"] for r in results), results
    one = config(tmp_path, "one", batch * world, kind, grad_acc_steps=acc, max_steps=4)
    ref = train_here(one, total, sgd=True, layout=Layout())
    ref_w = {k: v for k, v in ref.bundle.state_dict().items()}
    ranks = [weights_of(tmp_path / "dp", r) for r in range(world)]
    for r in range(1, world):  # every rank holds the same dictionaries, bit for bit
        assert_close(ranks[r], ranks[0], atol=0)
    assert_close(ranks[0], ref_w, atol=2e-6)
    if kind == "clt":  # the statistics: dead counters moved, BatchTopK threshold estimated
        assert ref_w["clt.layers.0.activation.num_updates"].item() == 4 * acc
        assert (ref_w["clt.layers.2.num_tokens_since_fired"] > 0).any()
    # rank 0 wrote the run: metrics of the global batch, the same as one process's
    a = [json.loads(x) for x in (tmp_path / "dp" / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(x) for x in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    assert [m["tokens"] for m in a] == [m["tokens"] for m in b]
    for ma, mb in zip(a, b, strict=True):
        assert ma["fvu_per_unit"] == pytest.approx(mb["fvu_per_unit"], abs=1e-5)
        assert ma["l0_per_unit"] == pytest.approx(mb["l0_per_unit"], abs=1e-3)


@pytest.mark.parametrize("optimizer", ["adam", "signum"])
def test_a_killed_rank_stops_the_others_and_resume_is_bit_exact(
    tmp_path: Path, optimizer: str
) -> None:
    """signum: the schedule-free state (z, the step count and weight sums in the parameter
    groups) and the decoder rows normalised before each forward resume bit for bit too."""
    cfg = config(tmp_path, "full", 4, "sae", max_steps=8, save_every=2, optimizer=optimizer)
    assert all(r["ok"] for r in run_ranks(2, tmp_path / "full", cfg, 64, sgd=False))
    killed = config(tmp_path, "killed", 4, "sae", max_steps=8, save_every=2, optimizer=optimizer)
    t0 = time.monotonic()
    results = run_ranks(2, tmp_path / "k1", killed, 64, sgd=False, src={"die_at": 6})
    assert results[1]["ok"] is None  # SIGKILLed at its 6th batch, after the step-4 checkpoint
    assert results[0]["ok"] is False and "another rank died" in results[0]["error"]
    assert time.monotonic() - t0 < 100  # an error, well before any hang would end
    state = json.loads((tmp_path / "killed" / "checkpoint" / "state.json").read_text())
    assert state["train_state"]["step"] == 4 and state["world_size"] == 2
    resumed = config(tmp_path, "killed", 4, "sae", max_steps=8, save_every=2, resume=True,
                     optimizer=optimizer)  # fmt: skip
    assert all(r["ok"] for r in run_ranks(2, tmp_path / "k2", resumed, 64, sgd=False))
    assert_close(weights_of(tmp_path / "k2", 0), weights_of(tmp_path / "full", 0), atol=0)
    assert_close(weights_of(tmp_path / "k2", 1), weights_of(tmp_path / "full", 1), atol=0)


def test_nan_on_one_rank_stops_every_rank_naming_it(tmp_path: Path) -> None:
    cfg = config(tmp_path, "nan", 4, "sae", max_steps=8, save_every=2)
    results = run_ranks(2, tmp_path / "nan", cfg, 64, sgd=False, src={"nan_at": 4})
    for r in results:  # rank 1's source fails; both ranks stop with the same message
        assert r["ok"] is False and r["agreed"], r
        assert r["error"].startswith("rank 1 on ") and "NaN" in r["error"]
        assert "rank 0" not in r["error"] and "all 2 ranks stopped" in r["error"]
    state = json.loads((tmp_path / "nan" / "checkpoint" / "state.json").read_text())
    assert state["train_state"]["step"] == 2  # the last checkpoint, whole


def _rank_group_lifetime(rank: int, world: int, port: int, job: dict[str, Any]) -> None:
    """One rank of a run whose Trainer joins the process group itself (no layout given)."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    env = dict(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), **env)
    seen: dict[str, Any] = {}
    try:
        cfg = TrainConfig.from_dict(job["cfg"])
        source = ArraySource(32, cfg.batch_size, Layout(rank, world))  # its windows only
        trainer = Trainer(cfg, progress=False, source=source)  # type: ignore[arg-type]
        seen["joined"] = dist.is_initialized() and trainer.layout.world == world
        wrapper = weakref.ref(trainer.model)
        seen["ddp"] = type(trainer.model).__name__ == "DistributedDataParallel"
        trainer.fit()
        seen["left"] = not dist.is_initialized()
        # freed with the group still alive, not later by the trainer's end under the GIL
        seen["wrapper_freed"] = wrapper() is None
    except Exception as e:  # reported to the test, which then shows what broke
        seen["error"] = repr(e)
    (Path(job["out"]) / f"rank{rank}.json").write_text(json.dumps(seen))


def test_a_trainer_leaves_the_group_it_joined(tmp_path: Path) -> None:
    """A process group nobody destroys can abort a finished torchrun job at interpreter exit
    (gloo: "terminate called without an active exception"): a Trainer that joined the group
    destroys it when the run ends. (A group the caller made is left to the caller: the other
    tests here pass their layout and keep using it after fit.) Its DDP wrapper is freed before:
    the wrapper's reducer, freed last, ran gloo's destructor under the GIL, which waited for a
    worker thread that waited for the GIL (the rank hung after the test had passed)."""
    cfg = config(tmp_path, "own", 4, "sae", max_steps=3, save_every=8).to_dict()
    job = {"cfg": cfg, "out": str(tmp_path)}
    for seen in fork_ranks(_rank_group_lifetime, 2, job, tmp_path):
        assert seen == {"joined": True, "ddp": True, "left": True, "wrapper_freed": True}


def _gloo_threads() -> int:
    """Threads of this process running gloo's work loop (named by torch)."""
    tasks = Path("/proc/self/task")
    return sum((t / "comm").read_text().strip() == "pt_gloo_runloop" for t in tasks.iterdir())


def _rank_late_import(rank: int, world: int, port: int, job: dict[str, Any]) -> None:
    """Join, import torch.distributed.nn.functional afterwards (transformers does while loading
    a model), leave: the group must really be gone."""
    import sys

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))  # fmt: skip
    seen: dict[str, Any] = {}
    try:
        for name in ("torch.distributed.nn.functional", "torch.distributed.nn"):
            sys.modules.pop(name, None)  # as if this process had never imported them
        layout = Layout.from_environment(60.0, "cpu")
        import torch.distributed.nn.functional as functional

        seen["bound"] = [type(d).__name__ for d in functional.broadcast.__defaults__ or ()]
        layout.sum([1.0])
        seen["threads_in"] = _gloo_threads()
        layout.leave()
        seen["left"] = not dist.is_initialized()
        seen["threads_out"] = _gloo_threads()
    except Exception as e:
        seen["error"] = repr(e)
    (Path(job["out"]) / f"rank{rank}.json").write_text(json.dumps(seen))


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux /proc")
def test_leaving_stops_the_groups_threads_even_after_a_late_import(tmp_path: Path) -> None:
    """torch.distributed.nn.functional takes `group=group.WORLD` as a default argument; first
    imported after joining, it held the group past destroy_process_group, so gloo's worker
    threads lived on into interpreter shutdown and aborted a finished torchrun capture now and
    then (5 of 54 runs with the CPU loaded). Layout imports it before joining."""
    for seen in fork_ranks(_rank_late_import, 2, {"out": str(tmp_path)}, tmp_path):
        assert "ProcessGroup" not in seen.get("bound", ["?"]), seen
        assert seen.get("threads_in", 0) > 0, seen  # the check below can see gloo's threads
        assert seen["left"] and seen["threads_out"] == 0, seen


# --- checkpoint corruption (#16) -------------------------------------------------------------
def _one_run(tmp_path: Path) -> Path:
    train_here(config(tmp_path, "c", 4, "sae", max_steps=3), 40, sgd=False, layout=Layout())
    return tmp_path / "c" / "checkpoint"


def _resume(tmp_path: Path, steps: int = 6) -> Trainer:
    cfg = config(tmp_path, "c", 4, "sae", max_steps=steps, resume=True)
    return Trainer(cfg, progress=False, source=ArraySource(40, 4, Layout()), layout=Layout())  # type: ignore[arg-type]


def test_a_truncated_shard_file_is_a_one_line_error_naming_it(tmp_path: Path) -> None:
    opt = _one_run(tmp_path) / "shard-0-of-1.safetensors"
    opt.write_bytes(opt.read_bytes()[: opt.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"shard-0-of-1\.safetensors is unreadable") as e:
        _resume(tmp_path)
    assert "\n" not in str(e.value)


def test_a_flipped_rng_header_is_a_one_line_error_naming_it(tmp_path: Path) -> None:
    rng = _one_run(tmp_path) / "rng.safetensors"
    raw = bytearray(rng.read_bytes())
    raw[8:20] = bytes(b ^ 0xFF for b in raw[8:20])  # inside the JSON header
    rng.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match=r"rng\.safetensors is unreadable"):
        _resume(tmp_path)


@pytest.mark.parametrize("name", ["shard-0-of-1.safetensors", "rng.safetensors"])
def test_flipped_tensor_bytes_fail_the_recorded_checksum(tmp_path: Path, name: str) -> None:
    """Bytes flipped in tensor data (past the header) still parse: only the CRC-32 recorded
    in state.json catches them."""
    path = _one_run(tmp_path) / name
    raw = bytearray(path.read_bytes())
    raw[-4:] = bytes(b ^ 0x5A for b in raw[-4:])  # the last tensor's last bytes
    path.write_bytes(bytes(raw))
    load_file(str(path))  # still a readable safetensors file
    with pytest.raises(
        CheckpointError, match=rf"{name.replace('.', chr(92) + '.')} fails its checksum"
    ):
        _resume(tmp_path)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ({"step": -7}, r"train_state\.step must be an integer >= 0, got -7"),
        ({"step": 9}, r"state\.json says step 9 but the optimiser state has taken \[3\.0\]"),
        ({"rows": "x"}, r"train_state\.rows must be an integer"),
        ({"lr_scale": 0}, r"train_state\.lr_scale must be > 0"),
        ({"lr_scale": "x3"}, r"train_state\.lr_scale must be > 0"),
    ],
)
def test_checkpoint_state_is_validated(tmp_path: Path, edit: dict[str, Any], message: str) -> None:
    path = _one_run(tmp_path) / "state.json"
    state = json.loads(path.read_text())
    state["train_state"].update(edit)
    path.write_text(json.dumps(state))
    with pytest.raises(CheckpointError, match=message):
        _resume(tmp_path)


def test_optimizer_state_is_keyed_by_parameter_name(tmp_path: Path) -> None:
    opt = load_file(str(_one_run(tmp_path) / "shard-0-of-1.safetensors"))
    assert "state.coders.0.W_enc.exp_avg" in opt and "state.coders.2.b_dec.exp_avg_sq" in opt
    tr = _resume(tmp_path)
    assert tr.state.step == 3
    w = tr.bundle.coders[0].W_enc  # type: ignore[union-attr]
    torch.testing.assert_close(
        tr.optimizer.state[w]["exp_avg"], opt["state.coders.0.W_enc.exp_avg"]
    )


@pytest.mark.parametrize(("world", "kind"), [(2, "sae"), (4, "transcoder")])
def test_distributed_modules_equal_the_unsharded_run(tmp_path: Path, world: int, kind: str) -> None:
    """Each rank trains its units on the global batch it receives by all-to-all (with 4 ranks
    and 3 units, rank 3 owns none); the checkpoint and final dictionaries are whole."""
    cfg = config(tmp_path, "dm", 3, kind, max_steps=4, distribute_modules=True)
    results = run_ranks(world, tmp_path / "dm", cfg, 40)
    assert all(r["ok"] for r in results), results
    one = config(tmp_path, "one", 3 * world, kind, max_steps=4)
    ref = train_here(one, 40, sgd=True, layout=Layout())
    ref_w = dict(ref.bundle.state_dict())
    owner = [i * world // 3 for i in range(3)]
    for r in range(world):  # each rank's own units, against the same units of one process
        mine = {k: v for k, v in weights_of(tmp_path / "dm", r).items()
                if owner[int(k.split(".")[1])] == r}  # fmt: skip
        assert_close(mine, {k: ref_w[k] for k in mine}, atol=2e-6)
    # memory: the ranks hold the units (parameters + optimiser state) between them, once
    per_unit = held_bytes(ref) // 3
    assert [r["held"] for r in results] == [per_unit * owner.count(r) for r in range(world)]
    saved = DictionaryBundle.load(tmp_path / "dm" / "dictionaries").state_dict()
    assert_close(dict(saved), ref_w, atol=2e-6)
    a = [json.loads(x) for x in (tmp_path / "dm" / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(x) for x in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    for ma, mb in zip(a, b, strict=True):
        assert ma["fvu_per_unit"] == pytest.approx(mb["fvu_per_unit"], abs=1e-5)
        assert ma["dead_pct"] == pytest.approx(mb["dead_pct"])


# --- --distribute-modules with a CLT (decoder sharded by target) -----------------------------
def clt_config(out: Path, name: str, batch: int, variant: str, **extra: Any) -> TrainConfig:
    """BatchTopK + AuxK over dead latents + unit-norm decoders with a window of 2; JumpReLU
    with a skip connection, mean-norm scaling and every later layer as a target."""
    sae = {"batchtopk": SaeArgs(transcode=True, n_targets=2, num_latents=48, k=4,
                                activation="batchtopk", aux_k=8, dead_tokens_threshold=6,
                                normalize_decoder=True),
           "jumprelu": SaeArgs(kind="clt", transcode=True, n_targets=0, num_latents=40, k=3,
                               activation="jumprelu", sparsity_coeff=0.01, skip_connection=True,
                               normalize_activations="mean_norm")}[variant]  # fmt: skip
    values: dict[str, Any] = {"max_steps": 4, "save_every": 2, "lr": 0.05}
    values.update(extra)
    return TrainConfig(model="array", dataset="array", sae=sae, batch_size=batch,
                       output_dir=str(out), run_name=name, device="cpu", dist_timeout=60,
                       **values)  # fmt: skip


def metrics_of(run: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize(("world", "variant"), [(2, "batchtopk"), (4, "jumprelu")])
def test_distributed_clt_equals_the_unsharded_run(tmp_path: Path, world: int, variant: str) -> None:
    """Each rank holds the encoders of its layers and the decoder slices writing into them;
    codes travel by all-to-all and their gradients back. After 4 SGD steps the gathered CLT
    equals one process's on the same global batch (2e-6: float rounding of the same sums in
    another order, as for data parallel), and so do the metrics."""
    cfg = clt_config(tmp_path, "dm", 3, variant, distribute_modules=True)
    results = run_ranks(world, tmp_path / "dm", cfg, 40)
    assert all(r["ok"] for r in results), results
    ref = train_here(clt_config(tmp_path, "one", 3 * world, variant), 40, sgd=True,
                     layout=Layout())  # fmt: skip
    ref_w = dict(ref.bundle.state_dict())
    saved = DictionaryBundle.load(tmp_path / "dm" / "dictionaries")  # streamed W_dec columns
    assert saved.clt is not None
    assert_close(dict(saved.state_dict()), ref_w, atol=2e-6)
    assert_close(read_checkpoint_state(tmp_path / "dm" / "checkpoint"), ref_w, atol=2e-6)
    if variant == "batchtopk":  # the dead counters moved and AuxK ran in both
        assert (ref_w["clt.layers.2.num_tokens_since_fired"] > 0).any()
        assert ref_w["clt.layers.0.activation.num_updates"].item() == 4
    for ma, mb in zip(metrics_of(tmp_path / "dm"), metrics_of(tmp_path / "one"), strict=True):
        assert ma["loss"] == pytest.approx(mb["loss"], abs=1e-5)
        assert ma["fvu_per_unit"] == pytest.approx(mb["fvu_per_unit"], abs=1e-5)
        assert ma["l0_per_unit"] == pytest.approx(mb["l0_per_unit"], abs=1e-3)
        assert ma["dead_pct"] == pytest.approx(mb["dead_pct"])
    # memory: every parameter (and its optimiser state) on exactly one rank, none holds all
    held = [r["held"] for r in results]
    assert sum(held) == held_bytes(ref) and max(held) < held_bytes(ref)


def test_distributed_clt_checkpoints_resume_bit_exact_and_re_split(tmp_path: Path) -> None:
    """Adam, constant learning rate: 2 steps, then --resume to 4 on 2 ranks, is bit-exact
    against 4 steps at once; the step-2 checkpoint resumed on 4 ranks is re-split by name
    (3 layers: one rank owns none) and gathered again into the same files, bit for bit."""
    flat = {"lr_warmup_fraction": 0.0, "lr_decay_fraction": 0.0, "distribute_modules": True}

    def run(world: int, name: str, out: str, steps: int, resume: bool = False) -> None:
        cfg = clt_config(tmp_path, name, 3, "batchtopk", max_steps=steps, resume=resume, **flat)
        assert all(r["ok"] for r in run_ranks(world, tmp_path / out, cfg, 60, sgd=False))

    run(2, "full", "r1", 4)
    run(2, "half", "r2", 2)
    shutil.copytree(tmp_path / "half", tmp_path / "split")
    run(2, "half", "r3", 4, resume=True)
    a = DictionaryBundle.load(tmp_path / "half" / "dictionaries").state_dict()
    b = DictionaryBundle.load(tmp_path / "full" / "dictionaries").state_dict()
    assert_close(dict(a), dict(b), atol=0)
    half, full = (read_checkpoint_state(tmp_path / r / "checkpoint", optimizer=True)
                  for r in ("half", "full"))  # fmt: skip
    assert_close(half, full, atol=0)
    before = read_checkpoint_state(tmp_path / "split" / "checkpoint", optimizer=True)
    run(4, "split", "r4", 2, resume=True)  # step 2 of 2: restore, write each rank's shard
    after = read_checkpoint_state(tmp_path / "split" / "checkpoint", optimizer=True)
    assert_close(after, before, atol=0)
