"""Packed against unpacked text: training tokens/s, padding share and text lost to truncation.

    python benchmarks/data_packing.py                    # zoo Llama, 600 documents, ctx 256
    python benchmarks/data_packing.py --model PATH --ctx-len 1024 --batch-size 8 --steps 40

Writes a JSONL of plain-text documents of mixed lengths (log-normal, from a few words to
several times the context), then trains the same SAE on it twice through `vlmscope train`'s
code path: `--no-pack` (each document truncated to ctx_len and padded to the longest in its
batch) and `--pack` (documents joined with EOS and cut into full ctx_len chunks). For each it
prints the trained tokens per second (the positions the dictionaries learn from: no padding,
no BOS/EOS), the share of batch positions that are padding, and the share of the documents'
tokens that never reach the model because truncation cut them off.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from vlmscope.models.hooked import HookedVLM
from vlmscope.models.zoo.common import corpus
from vlmscope.training.config import parse_train_args
from vlmscope.training.sources import LiveSource, TrainState, resolve_model_path
from vlmscope.training.trainer import train


def write_documents(path: Path, n: int, median_words: int, seed: int) -> None:
    """n documents of log-normal length (sigma 1.2) made of the zoo's shape-world sentences."""
    rng = random.Random(seed)
    sentences = corpus(2000, seed)[:2000]
    with open(path, "w") as f:
        for i in range(n):
            words = max(1, round(rng.lognormvariate(math.log(median_words), 1.2)))
            text: list[str] = []
            while len(text) < words:
                text += rng.choice(sentences).split()
            f.write(json.dumps({"id": str(i), "text": " ".join(text[:words])}) + "\n")


def data_shares(vlm: HookedVLM, flags: list[str], steps: int) -> dict[str, float]:
    """Padding share of the first `steps` batches, and the documents' tokens truncation drops
    (over the whole file), measured on the batches training would see."""
    cfg = parse_train_args(flags)
    source = LiveSource(cfg)
    source.open_data()
    source.bind_model(vlm)
    make = source._packed_batches if source.packer is not None else source._model_batches
    pad = total = 0
    for i, (batch, _) in enumerate(make(TrainState())):
        mask = batch.inputs["attention_mask"]
        pad += int((mask == 0).sum())
        total += mask.numel()
        if i + 1 == steps:
            break
    lost = whole = 0
    tok = vlm.tokenizer
    for record in source.dataset:
        n = len(tok(record.text)["input_ids"])
        whole += n
        lost += max(0, n - cfg.ctx_len) if source.packer is None else 0
    return {"padding": pad / max(total, 1), "lost": lost / max(whole, 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="llama", help="text model: zoo name or path (default llama)")
    p.add_argument("--docs", type=int, default=600, help="documents in the file (default 600)")
    p.add_argument("--median-words", type=int, default=120, help="median document length")
    p.add_argument("--ctx-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=30, help="optimizer steps per mode")
    p.add_argument("--repeats", type=int, default=2, help="alternating runs per mode")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.manual_seed(args.seed)
    path = resolve_model_path(args.model)
    vlm = HookedVLM.from_pretrained(path, device="cpu", dtype=torch.float32)
    rows: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "docs.jsonl"
        write_documents(data, args.docs, args.median_words, args.seed)
        # The modes alternate, so that a slower stretch of a shared machine hits both.
        for rep in range(args.repeats):
            for mode in ("--no-pack", "--pack"):
                flags = (
                    f"{path} {data} --sae.expansion-factor 4 --sae.k 16 --ctx-len {args.ctx_len} "
                    f"--batch-size {args.batch_size} --max-steps {args.steps} --log-every 1 "
                    f"--output-dir {tmp} --run-name {mode[2:]}{rep} {mode} --seed {args.seed}"
                ).split()
                row = rows.setdefault(mode[2:], {"tok_s": []})
                if rep == 0:
                    row.update(data_shares(vlm, flags, args.steps))
                t = time.perf_counter()
                res = train(parse_train_args(flags), vlm, progress=False)
                row["tok_s"].append(res.tokens / (time.perf_counter() - t))
                row["tokens"] = res.tokens
    print(f"\n{args.model}, {args.docs} documents (median {args.median_words} words), ctx_len "
          f"{args.ctx_len}, batch {args.batch_size}, {args.steps} steps, "
          f"{args.repeats} alternating runs per mode\n")  # fmt: skip
    print(f"{'mode':<8} {'trained tokens':>15} {'tokens/s (mean, min-max)':>26} {'padding %':>10} "
          f"{'text lost %':>12}")  # fmt: skip
    for mode, r in rows.items():
        rates = r["tok_s"]
        spread = f"{sum(rates) / len(rates):,.0f} ({min(rates):,.0f}-{max(rates):,.0f})"
        print(f"{mode:<8} {r['tokens']:>15,} {spread:>26} {100 * r['padding']:>10.1f} "
              f"{100 * r['lost']:>12.1f}")  # fmt: skip


if __name__ == "__main__":
    main()
