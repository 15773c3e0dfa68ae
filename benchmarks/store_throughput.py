"""The activation store: capture speed and disk per token, offline vs on-the-fly training
speed for the same CLT, and the memory of offline training as the store grows.

    python benchmarks/store_throughput.py               # toy VLM: capture per dtype, training
    flock /tmp/vlmscope-heavy.lock python benchmarks/store_throughput.py --llava7b
                                                        # random LLaVA-7B shape, 2 LM layers
    python benchmarks/store_throughput.py --memory      # peak RSS vs store size (synthetic)

Training speed is read off the trainer's own metrics after warm-up steps, exactly as
`train_throughput.py` times on-the-fly training, so both sides pay the same trainer code; the
offline side pays the store reads (checksums included) instead of data processing and the
model forward.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from train_throughput import llava7b_random

from vlmscope.capture import DTYPES, StoreWriter, build_manifest, write_manifest
from vlmscope.cli import build_parser
from vlmscope.models.hooked import HookedVLM
from vlmscope.training.capture import capture, config_from_capture_args
from vlmscope.training.config import parse_train_args
from vlmscope.training.trainer import train


def run_capture(vlm: HookedVLM, model: str, data: str, out: Path, flags: str) -> dict[str, Any]:
    argv = f"capture {model} {data} --out {out} {flags}".split()
    res = capture(config_from_capture_args(build_parser().parse_args(argv)), vlm, progress=False)
    m = res.manifest
    return {
        "tokens": m["tokens"],
        "seconds": res.seconds,
        "tokens_per_s": m["tokens"] / res.seconds,
        "bytes_per_token": m["bytes"] / m["tokens"],
        "recipe_bytes_per_token": m["sizes"].get("recipe_bytes_per_token_window16", 0),
    }


def trainer_speed(flags: str, vlm: HookedVLM | None, warmup: int) -> dict[str, float]:
    """tokens/s and ms per step of the trainer after `warmup` steps, from its metrics."""
    with tempfile.TemporaryDirectory() as out:
        cfg = parse_train_args(
            f"{flags} --log-every 1 --save-every 1000000 --output-dir {out} --run-name run".split()
        )
        res = train(cfg, vlm, progress=False)
        logs = [json.loads(x) for x in (res.run_dir / "metrics.jsonl").read_text().splitlines()]
    first, last = logs[warmup - 1], logs[-1]
    secs = last["tokens"] / last["tokens_per_s"] - first["tokens"] / first["tokens_per_s"]
    steps = last["step"] - first["step"]
    return {
        "tokens_per_s": (last["tokens"] - first["tokens"]) / secs,
        "ms_per_step": 1000 * secs / steps,
        "tokens_per_step": (last["tokens"] - first["tokens"]) / steps,
    }


def print_rows(title: str, rows: list[dict[str, Any]], keys: list[str]) -> None:
    print(f"\n{title}")
    print(f"{'':<34}" + "".join(f"{k:>17}" for k in keys))
    for r in rows:
        cells = "".join(
            f"{r[k]:>17,.1f}" if isinstance(r[k], float) else f"{r[k]:>17}" for k in keys
        )
        print(f"{r['name']:<34}{cells}")


def bench_model(args: argparse.Namespace, label: str, vlm: HookedVLM, model: str) -> None:
    """Capture per dtype, then the same CLT trained on the fly and from the store."""
    work = Path(tempfile.mkdtemp(prefix="vlmscope-store-bench-"))
    try:
        rows = []
        dtypes = args.dtypes if label == "toy" else ["float32"]
        for dtype in dtypes:
            r = run_capture(
                vlm,
                model,
                args.data if label == "toy" else args.big_data,
                work / dtype,
                f"--batch-size {args.batch_size} --max-tokens "
                f"{args.capture_tokens} --dtype {dtype}",
            )
            rows.append(
                {
                    "name": f"capture {dtype}",
                    **r,
                    "MB_per_1k_tokens": r["bytes_per_token"] * 1000 / 2**20,
                    "recipe_MB_per_1k": r["recipe_bytes_per_token"] * 1000 / 2**20,
                }
            )
        print_rows(
            f"capture on {label} (resid_mid + mlp.hook_out of every layer)",
            rows,
            ["tokens", "tokens_per_s", "MB_per_1k_tokens", "recipe_MB_per_1k"],
        )
        store = work / "float32"
        clt = (
            f"--sae.kind clt --sae.expansion-factor {args.expansion} --sae.k {args.k} "
            f"--max-tokens 0 --max-steps {args.warmup + args.steps}"
        )
        data = args.data if label == "toy" else args.big_data
        live = trainer_speed(
            f"{model} {data} {clt} --batch-size {args.batch_size} --device {vlm.device}",
            vlm,
            args.warmup,
        )
        train_rows = [{"name": "on the fly (model forward)", **live, "ratio": 1.0}]
        for name, extra in (
            ("store, capture order", f"--batch-size {args.batch_size} --shuffle-buffer-mb 0"),
            (
                "store, shuffled (256 MB buffer)",
                f"--batch-size {args.batch_size} --shuffle-buffer-mb 256 --epochs 100",
            ),
            (
                f"store, shuffled, batch x{args.big_batch}",
                f"--batch-size {args.batch_size * args.big_batch} --shuffle-buffer-mb 256 "
                "--epochs 100",
            ),
        ):
            r = trainer_speed(
                f"--activations {store} {clt} {extra} --device {vlm.device}", None, args.warmup
            )
            train_rows.append(
                {"name": name, **r, "ratio": r["tokens_per_s"] / live["tokens_per_s"]}
            )
        print_rows(
            f"the same CLT on {label}: trainer tokens/s (expansion {args.expansion}, "
            f"k {args.k}, batch {args.batch_size} samples)",
            train_rows,
            ["tokens_per_step", "tokens_per_s", "ms_per_step", "ratio"],
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)


# --- memory --------------------------------------------------------------------------------------
def synthetic_store(folder: Path, tokens: int, d: int, shard_mb: float) -> None:
    """A store of random activations of a 2-layer model of width d (resid_mid + mlp.hook_out)."""
    hooks = {f"lm.blocks.{i}.{h}": d for i in range(2) for h in ("hook_resid_mid", "mlp.hook_out")}
    per_token = 4 * d * 4 + 41
    shard_tokens = int(shard_mb * 2**20) // per_token
    header = {
        "model": {
            "name": "synthetic",
            "revision": None,
            "config_sha256": "0" * 64,
            "family": "llava",
            "dims": {"n_layers": 2, "d_model": d},
            "dtype": "float32",
        },
        "data": {
            "dataset": "synthetic",
            "split": "train",
            "seed": 0,
            "tokens": "all",
            "include_special_tokens": False,
        },
        "hooks": {h: {"width": d, "layer": int(h.split(".")[2])} for h in hooks},
        "layers": [0, 1],
        "dtype": "float32",
        "shard_tokens": shard_tokens,
        "sizes": {"bytes_per_token": per_token},
    }
    writer = StoreWriter(folder, hooks, torch.float32, shard_tokens)
    g = torch.Generator().manual_seed(0)
    chunk, done, sample = 4096, 0, 0
    while done < tokens:
        n = min(chunk, tokens - done)
        t: dict[str, torch.Tensor] = {h: torch.randn(n, d, generator=g) for h in hooks}
        t["meta.sample"] = sample + torch.arange(n) // 32
        t["meta.row"] = t["meta.sample"].clone()
        t["meta.position"] = (torch.arange(n) % 32).to(torch.int32)
        t["meta.token_id"] = torch.zeros(n, dtype=torch.int32)
        t["meta.modality"] = torch.zeros(n, dtype=torch.uint8)
        t["meta.patch"] = torch.full((n, 4), -1, dtype=torch.int32)
        ids = t["meta.sample"].unique().tolist()
        writer.add(t, [(s, s, str(s)) for s in ids], {})
        done += n
        sample = ids[-1] + 1
    writer.finish()
    write_manifest(
        folder, build_manifest(header, {0: {"shards": writer.shards, "samples": sample}}, True)
    )


_CHILD = """
import sys
from vlmscope.cli import main
rc = main(sys.argv[1:])
status = open('/proc/self/status').read()
hwm = int(status.split('VmHWM:')[1].split()[0]) / 1024
print(f'PEAK_RSS_MB {hwm:.1f}', file=sys.stderr)
sys.exit(rc)
"""


def bench_memory(args: argparse.Namespace) -> None:
    """Peak RSS of one epoch of offline training as the store grows 1x .. 10x a unit size."""
    unit_mb, d = args.unit_mb, 256
    per_token = 4 * d * 4 + 41
    work = Path(tempfile.mkdtemp(prefix="vlmscope-store-mem-"))
    rows = []
    try:
        for mult in (1, 2, 5, 10):
            store = work / f"x{mult}"
            tokens = int(mult * unit_mb * 2**20 / per_token)
            t0 = time.perf_counter()
            synthetic_store(store, tokens, d, args.shard_mb)
            made = time.perf_counter() - t0
            shards = len(list(store.glob("shard-*")))
            for order, buffer in (("shuffled", args.buffer_mb), ("capture order", 0)):
                out = work / "runs"
                argv = (
                    f"train --activations {store} --sae.kind clt --sae.expansion-factor 2 "
                    f"--sae.k 16 --batch-size 64 --epochs 1 --max-tokens 0 --output-dir {out} "
                    f"--run-name x{mult}-{buffer} --shuffle-buffer-mb {buffer} "
                    "--save-every 100000 --device cpu"
                ).split()
                t0 = time.perf_counter()
                done = subprocess.run(
                    [sys.executable, "-c", _CHILD, *argv],
                    capture_output=True,
                    text=True,
                    env={**os.environ, "TQDM_DISABLE": "1"},
                )
                if done.returncode:
                    raise SystemExit(done.stderr[-3000:])
                peak = float(done.stderr.split("PEAK_RSS_MB")[1].split()[0])
                rows.append(
                    {
                        "name": f"{mult}x ({order})",
                        "store_MB": tokens * per_token / 2**20,
                        "shards": shards,
                        "tokens": tokens,
                        "peak_rss_MB": peak,
                        "seconds": time.perf_counter() - t0,
                    }
                )
                shutil.rmtree(out, ignore_errors=True)
            shutil.rmtree(store, ignore_errors=True)
            print(f"  ({mult}x: store written in {made:.0f} s)", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print_rows(
        f"peak RSS of one epoch of offline CLT training (d={d}, 2 layers, shards of "
        f"{args.shard_mb} MB, shuffle buffer {args.buffer_mb} MB)",
        rows,
        ["store_MB", "shards", "tokens", "peak_rss_MB", "seconds"],
    )


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--data", default="shapes:512", help="toy dataset (default: shapes:512)")
    p.add_argument("--dtypes", nargs="+", default=list(DTYPES), help="store dtypes to capture")
    p.add_argument("--capture-tokens", type=int, default=0, help="capture budget (0: all data)")
    p.add_argument("--batch-size", type=int, default=8, help="samples per batch")
    p.add_argument("--big-batch", type=int, default=8, help="offline batch multiple (last row)")
    p.add_argument("--expansion", type=int, default=4, help="CLT latents per dimension")
    p.add_argument("--k", type=int, default=8, help="CLT active latents per token")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--llava7b", action="store_true", help="the random LLaVA-7B shape instead")
    p.add_argument("--lm-layers", type=int, default=2, help="--llava7b: decoder layers")
    p.add_argument("--vision-layers", type=int, default=2, help="--llava7b: CLIP layers")
    p.add_argument("--big-data", default="shapes:16", help="--llava7b: dataset")
    p.add_argument("--memory", action="store_true", help="only the peak-RSS-vs-size table")
    p.add_argument("--unit-mb", type=float, default=256, help="--memory: the 1x store size")
    p.add_argument("--shard-mb", type=float, default=16, help="--memory: shard size")
    p.add_argument("--buffer-mb", type=float, default=64, help="--memory: shuffle buffer")
    args = p.parse_args()
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    print(f"CPU, threads: {torch.get_num_threads()}, torch {torch.__version__}")
    if args.memory:
        bench_memory(args)
        return
    from vlmscope.training.trainer import resolve_model_path

    if not args.llava7b:
        vlm = HookedVLM.from_pretrained(resolve_model_path("toy"), device="cpu")
        bench_model(args, "toy", vlm, "toy")
    else:
        big = llava7b_random(args.lm_layers, args.vision_layers, torch.device("cpu"), torch.float32)
        small = argparse.Namespace(
            **{
                **vars(args),
                "batch_size": 1,
                "expansion": 1,
                "k": 8,
                "steps": min(args.steps, 4),
                "warmup": 1,
            }
        )
        bench_model(
            small,
            f"random LLaVA-7B shape ({args.lm_layers} LM layers, "
            f"{args.vision_layers} vision layers)",
            big,
            "llava-7b-random",
        )


if __name__ == "__main__":
    main()
