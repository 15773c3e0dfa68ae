"""End-to-end training speed against eai-sparsify 1.3.3: model forward and dictionary step.

    python benchmarks/vs_sparsify_e2e.py                      # SAE, transcoder; layers 1, 6
    python benchmarks/vs_sparsify_e2e.py --layers 3 --steps 40 --threads 2

`vs_sparsify.py` times the dictionary step alone, on activations captured once. This script
times what a user waits for. Both tools train one layer's SAE (on the residual stream after
the layer) or transcoder (from the layer's MLP input to its output) on the same random Llama
(d 512, 8 layers by default), reading the same documents packed into --ctx-len sequences,
--batch-size sequences per step, each tool in a process of its own with --threads torch
threads. sparsify runs its own `Trainer.fit` (its defaults: signum, schedule-free, no AuxK;
the whole model forward on every batch, as its FVU loss runs it); vlmscope runs `vlmscope
train` (its defaults; with the FVU loss the forward stops at the last hook it reads).
tokens/s is measured after --warmup steps: vlmscope's from its metrics, sparsify's from the
wall time of a second `fit` over --steps batches (the first, over --warmup batches, warms the
same process up). Token contents differ slightly (each tool packs the documents its own way);
the number of tokens per step, which the speed depends on, is the same. The sparsify venv is
the one `vs_sparsify.py` creates (torch pinned by constraints.txt).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
WORDS = [
    "red", "blue", "green", "small", "large", "circle", "square", "triangle", "left", "right",
    "above", "below", "the", "a", "of", "and", "is", "there", "one", "two", "three", "four",
    "picture", "object", "shape", "colour", "next", "to", "near", "far",
]  # fmt: skip


def build(args: argparse.Namespace, work: Path) -> None:
    """The random Llama with its tokenizer, and the documents (jsonl, a `text` column)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from vs_circuit_tracer import save_random_llama

    save_random_llama(work / "model", args.d_model, args.n_layers)
    rng = random.Random(0)
    need = 2 * (args.warmup + args.steps + 2) * args.batch_size * args.ctx_len  # words >= tokens
    with (work / "docs.jsonl").open("w") as f:
        written = 0
        while written < need:
            n = rng.randint(20, 400)
            f.write(json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(n))}) + "\n")
            written += n


def child_sparsify(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    import torch
    from datasets import Dataset
    from sparsify import SaeConfig, TrainConfig, Trainer
    from sparsify.data import chunk_and_tokenize
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(args.threads)
    model = AutoModelForCausalLM.from_pretrained(work / "model", dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(work / "model")
    texts = [json.loads(x)["text"] for x in (work / "docs.jsonl").read_text().splitlines()]
    data = chunk_and_tokenize(Dataset.from_dict({"text": texts}), tok, max_seq_len=args.ctx_len,
                              num_proc=1)  # fmt: skip

    def fit(n_steps: int, name: str) -> float:
        rows = data.select(range(n_steps * args.batch_size))
        sae = SaeConfig(expansion_factor=args.expansion, k=args.k,
                        transcode=args.kind == "transcoder")  # fmt: skip
        where: dict[str, Any] = {"layers": [args.layer]}  # the layer's output: resid_post
        if args.kind == "transcoder":  # the MLP's input (normed) to its output
            where = {"hookpoints": [f"layers.{args.layer}.mlp"]}  # under base_model
        cfg = TrainConfig(sae, batch_size=args.batch_size, save_every=10**9,
                          save_dir=str(work / "sparsify"), run_name=name,
                          log_to_wandb=False, **where)  # fmt: skip
        trainer = Trainer(cfg, rows, model)
        t0 = time.perf_counter()
        trainer.fit()
        return time.perf_counter() - t0

    fit(args.warmup, "warmup")
    seconds = fit(args.steps, "timed")
    tokens = args.steps * args.batch_size * args.ctx_len
    return {"tokens_per_s": tokens / seconds, "tokens_per_step": args.batch_size * args.ctx_len}


def child_vlmscope(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    import torch

    sys.path.insert(0, str(ROOT))
    from vlmscope.training.config import parse_train_args
    from vlmscope.training.trainer import train

    torch.set_num_threads(args.threads)
    # SAE: the layer's output; transcoder: resid_mid (the MLP's input before its norm) to the
    # MLP's output, the trainer's default pair.
    hooks = f"--hookpoints lm.blocks.{args.layer}.hook_resid_post " if args.kind == "sae" else ""
    with tempfile.TemporaryDirectory() as out:
        flags = (f"{work / 'model'} {work / 'docs.jsonl'} --pack --ctx-len {args.ctx_len} "
                 f"--sae.kind {args.kind} --layers {args.layer} "
                 f"{hooks}"
                 f"--sae.expansion-factor {args.expansion} --sae.k {args.k} "
                 f"--batch-size {args.batch_size} --max-steps {args.warmup + args.steps} "
                 f"--max-tokens 0 --log-every 1 --save-every 1000000 --device cpu "
                 f"--output-dir {out} --run-name e2e")  # fmt: skip
        res = train(parse_train_args(flags.split()), progress=False)
        logs = [json.loads(x) for x in (res.run_dir / "metrics.jsonl").read_text().splitlines()]
    first, last = logs[args.warmup - 1], logs[-1]
    secs = last["tokens"] / last["tokens_per_s"] - first["tokens"] / first["tokens_per_s"]
    return {"tokens_per_s": (last["tokens"] - first["tokens"]) / secs,
            "tokens_per_step": (last["tokens"] - first["tokens"]) / args.steps}  # fmt: skip


def run_child(python: str, role: str, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    cmd = [python, __file__, "--role", role, "--work", str(work), *args.passthrough]
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "TOKENIZERS_PARALLELISM": "false"}
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if res.returncode:
        raise SystemExit(f"{role} failed:\n{res.stderr[-3000:]}")
    return dict(json.loads(res.stdout.strip().splitlines()[-1]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--layers", type=int, nargs="+", default=[1, 6],
                   help="the layer each run trains on, one pair of runs per value")  # fmt: skip
    p.add_argument("--kinds", nargs="+", default=["sae", "transcoder"],
                   choices=["sae", "transcoder"])  # fmt: skip
    p.add_argument("--d-model", type=int, default=512)
    p.add_argument("--n-layers", type=int, default=8, help="decoder layers of the random Llama")
    p.add_argument("--ctx-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=4, help="sequences per step, both tools")
    p.add_argument("--expansion", type=int, default=8)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--steps", type=int, default=20, help="timed steps")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch threads in each tool")
    p.add_argument("--sparsify-venv", default=str(ROOT.parent / f"{ROOT.name}-peers" / "sparsify"))
    p.add_argument("--role", default="driver", help=argparse.SUPPRESS)
    p.add_argument("--work", default="", help=argparse.SUPPRESS)
    p.add_argument("--layer", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--kind", default="sae", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.role != "driver":
        fn = child_sparsify if args.role == "sparsify" else child_vlmscope
        print(json.dumps(fn(args, Path(args.work))))
        return
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from vs_sparsify import sparsify_python

    python = str(sparsify_python(args))
    common = ["--d-model", str(args.d_model), "--n-layers", str(args.n_layers),
              "--ctx-len", str(args.ctx_len), "--batch-size", str(args.batch_size),
              "--expansion", str(args.expansion), "--k", str(args.k), "--steps", str(args.steps),
              "--warmup", str(args.warmup), "--threads", str(args.threads)]  # fmt: skip
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        build(args, work)
        for kind in args.kinds:
            for layer in args.layers:
                args.passthrough = [*common, "--layer", str(layer), "--kind", kind]
                ours = run_child(sys.executable, "vlmscope", args, work)
                theirs = run_child(python, "sparsify", args, work)
                rows.append((kind, layer, ours, theirs))
    print(f"\nrandom Llama d={args.d_model}, {args.n_layers} layers; one layer's SAE (residual "
          f"stream) or transcoder (MLP), {args.expansion * args.d_model} latents, k={args.k}; "
          f"{args.batch_size} x {args.ctx_len} tokens per step, {args.threads} thread(s), "
          f"{args.steps} timed steps")  # fmt: skip
    print(f"{'kind':<11} {'layer':>5} {'vlmscope tok/s':>15} {'sparsify tok/s':>15} "
          f"{'ratio':>7} {'tok/step':>9}")  # fmt: skip
    for kind, layer, ours, theirs in rows:
        ratio = ours["tokens_per_s"] / theirs["tokens_per_s"]
        print(f"{kind:<11} {layer:>5} {ours['tokens_per_s']:>15,.0f} "
              f"{theirs['tokens_per_s']:>15,.0f} {ratio:>7.2f} "
              f"{ours['tokens_per_step']:>9,.0f}")  # fmt: skip


if __name__ == "__main__":
    main()
