"""Data-parallel scaling and per-rank memory of --distribute-modules on CPU (gloo).

    python benchmarks/distributed.py            # toy VLM, 1 and 2 processes
    python benchmarks/distributed.py --store    # only the activation-store part (3)
    python benchmarks/distributed.py --only clt # only the CLT memory table (4)

Prints (1) tokens/s of the same per-rank batch with 1 and 2 processes (the global batch
doubles), from the last metrics line of each run; (2) per rank, peak RSS and the bytes of
dictionary parameters + Adam moments it holds, for per-layer transcoders on all 4 layers of the
toy, plain DDP against --distribute-modules; (3) the activation store: `vlmscope capture` of
the same data with 1 and 2 processes (wall time of the whole command, model loading included),
then `train --activations` from it with 1 and 2 processes at the same per-rank batch; (4) as
(2) for a CLT on all 4 layers (every source writes to every later layer), where
--distribute-modules shards the decoder by target.
Wrap in `flock /tmp/vlmscope-heavy.lock`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).parent
TORCHRUN = str(Path(sys.executable).with_name("torchrun"))


def torchrun(n: int, args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    """`torchrun --standalone` (a free rendezvous port, so back-to-back runs never collide on
    29500) of n processes; a failure raises with the ranks' last lines of stderr."""
    cmd = [TORCHRUN, "--standalone", "--nproc_per_node", str(n), *args]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode:
        tail = "\n".join(done.stderr.splitlines()[-15:])
        raise SystemExit(f"{' '.join(cmd)}\nfailed with exit status {done.returncode}:\n{tail}")
    return done


def run(n: int, out: Path, name: str, extra: list[str]) -> list[dict]:
    args = ["toy", "shapes:512", "--batch-size", "4", "--max-steps", "30", "--log-every", "5",
            "--output-dir", str(out), "--run-name", name, "--device", "cpu", *extra]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // n))}
    done = torchrun(n, [str(HERE / "dist_worker.py"), *args], env)
    # The ranks print to one pipe: their lines may run into each other.
    decoder = json.JSONDecoder()
    rows = [decoder.raw_decode(part)[0] for part in done.stdout.split("BENCH ")[1:]]
    last = json.loads((out / name / "metrics.jsonl").read_text().splitlines()[-1])
    for r in rows:
        r["tokens_per_s"] = last["tokens_per_s"]
    return sorted(rows, key=lambda r: r["rank"])


def store_part(out: Path) -> None:
    """Capture with 1 and 2 processes, then train from the store with 1 and 2."""
    env_of = {n: {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // n))}
              for n in (1, 2)}  # fmt: skip
    print("\nvlmscope capture toy shapes:256 (all tokens, batch 8 per rank; CPU, gloo)")
    print(f"{'processes':>9} {'tokens':>8} {'wall s':>7} {'tokens/s':>10}")
    base = None
    for n in (1, 2):
        store = out / f"store{n}"
        cmd = ["-m", "vlmscope", "capture", "toy", "shapes:256", "--out", str(store),
               "--max-tokens", "0", "--batch-size", "8", "--device", "cpu"]  # fmt: skip
        t0 = time.perf_counter()
        torchrun(n, cmd, env_of[n])
        wall = time.perf_counter() - t0
        tokens = json.loads((store / "manifest.json").read_text())["tokens"]
        base = base or tokens / wall
        print(f"{n:>9} {tokens:>8} {wall:>7.1f} {tokens / wall:>10.0f}   "
              f"({tokens / wall / base:.2f}x)")  # fmt: skip
    print("\ntrain --activations (CLT on 4 layers, batch 16 samples per rank, 3 epochs)")
    print(f"{'processes':>9} {'global batch':>12} {'tokens/s':>10}")
    base = None
    for n in (1, 2):
        args = ["--activations", str(out / "store1"), "--sae.transcode", "--sae.n_targets", "4",
                "--sae.expansion-factor", "8", "--sae.k", "8", "--batch-size", "16",
                "--epochs", "3", "--max-tokens", "0", "--log-every", "5", "--output-dir",
                str(out), "--run-name", f"store-train{n}", "--device", "cpu"]  # fmt: skip
        torchrun(n, [str(HERE / "dist_worker.py"), *args], env_of[n])
        metrics = (out / f"store-train{n}" / "metrics.jsonl").read_text().splitlines()
        tps = json.loads(metrics[-1])["tokens_per_s"]
        base = base or tps
        print(f"{n:>9} {16 * n:>12} {tps:>10.0f}   ({tps / base:.2f}x)")


def memory_table(out: Path, title: str, flags: list[str]) -> None:
    """Per rank, dictionary + Adam bytes and peak RSS: DDP against --distribute-modules."""
    print(f"\nper rank, {title}, 2 processes")
    print(f"{'mode':<22} {'rank':>4} {'dict+Adam MiB':>14} {'peak RSS MiB':>13}")
    for mode, extra in (("DDP", []), ("--distribute-modules", ["--distribute-modules"])):
        for r in run(2, out, mode.strip("-") + title[:3], flags + extra):
            print(f"{mode:<22} {r['rank']:>4} {r['dict_bytes'] / 2**20:>14.2f} "
                  f"{r['rss'] / 2**20:>13.0f}")  # fmt: skip


CLT = ["--sae.transcode", "--sae.n_targets", "4", "--sae.expansion-factor", "8", "--sae.k", "8"]


def main() -> None:
    out = Path(tempfile.mkdtemp(prefix="vlmscope-dist-bench-"))
    if sys.argv[1:] == ["--only", "clt"]:
        try:
            memory_table(out, "CLT on all 4 layers", CLT)
        finally:
            shutil.rmtree(out, ignore_errors=True)
        return
    if "--store" in sys.argv[1:]:
        try:
            store_part(out)
        finally:
            shutil.rmtree(out, ignore_errors=True)
        return
    try:
        clt = ["--sae.transcode", "--sae.n_targets", "4", "--sae.expansion-factor", "8",
               "--sae.k", "8"]  # fmt: skip
        print("tokens/s, CLT on 4 layers, batch 4 per rank (CPU, gloo)")
        print(f"{'processes':>9} {'global batch':>12} {'tokens/s':>10}")
        base = None
        for n in (1, 2):
            rows = run(n, out, f"scale{n}", clt)
            tps = rows[0]["tokens_per_s"]
            base = base or tps
            print(f"{n:>9} {4 * n:>12} {tps:>10.0f}   ({tps / base:.2f}x)")
        tc = ["--sae.transcode", "--sae.expansion-factor", "16", "--sae.k", "8"]
        memory_table(out, "transcoders on all 4 layers", tc)
        store_part(out)
        memory_table(out, "CLT on all 4 layers", CLT)
    finally:
        shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
