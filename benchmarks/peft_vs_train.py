"""A PEFT SAE trained with Hugging Face's Trainer vs `vlmscope train`, same model, hook and budget.

    python benchmarks/peft_vs_train.py                 # toy VLM, layer-2 MLP output, 300 steps
    python benchmarks/peft_vs_train.py --steps 50 --seeds 1 --eval-tokens 4000   # quick look

Both train a TopK SAE on the toy VLM's layer-2 MLP output (`lm.blocks.2.mlp.hook_out`, the PEFT
target `model.language_model.layers.2.mlp`) on the shapes world's train split, with the same
batches in the same order, steps, dictionary size, k and learning-rate schedule; seeds change
the dictionaries' initialisation. Both results are then scored by the same code: `vlmscope
eval`'s reconstruction metrics on held-out shapes (the test split), the PEFT adapter converted
to a dictionary run first (`vlmscope.peft.convert.to_bundle`). Prints one row per run and the
mean and spread of held-out FVU per method.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from vlmscope.models.hooked import HookedVLM
from vlmscope.models.toy import toy_path
from vlmscope.replacement.evaluate import evaluate
from vlmscope.training.bundle import DictionaryBundle
from vlmscope.training.config import SaeArgs, TrainConfig
from vlmscope.training.trainer import open_training_data, train

HOOK = "lm.blocks.2.mlp.hook_out"
TARGET = r"model\.language_model\.layers\.2\.mlp"


def held_out_fvu(bundle: DictionaryBundle | Path, args: argparse.Namespace) -> dict[str, float]:
    vlm = HookedVLM.from_pretrained(toy_path(), device="cpu")
    cfg = TrainConfig(model="toy", dataset="shapes", split="test", output_dir="unused")
    report = evaluate(
        vlm,
        bundle,
        open_training_data(cfg),
        max_tokens=args.eval_tokens,
        tokens="all",
        per_layer=False,
        batch_size=args.batch_size,
        progress=False,
    )
    m = report.reconstruction["all"]["per_unit"][HOOK]
    return {"fvu": m["fvu"], "l0": m["l0"], "dead": m["dead_fraction"]}


def run_vlmscope(seed: int, args: argparse.Namespace, out: Path) -> dict[str, Any]:
    # The adapters' settings (vlmscope.peft.training): Adam, raw activations. The trainer's own
    # defaults (signum for SAEs, normalised activations) came after this comparison.
    cfg = TrainConfig(
        model="toy",
        dataset="shapes",
        optimizer="adam",
        sae=SaeArgs(k=args.k, expansion_factor=args.expansion, normalize_activations="none"),
        hookpoints=[HOOK],
        batch_size=args.batch_size,
        max_steps=args.steps,
        max_tokens=0,
        seed=seed,
        output_dir=str(out),
        run_name=f"vlmscope-{seed}",
        log_every=args.steps,
        save_every=10 * args.steps,
    )
    vlm = HookedVLM.from_pretrained(toy_path(), device="cpu")
    t = time.perf_counter()
    result = train(cfg, vlm, progress=False)
    seconds = time.perf_counter() - t
    return {"seconds": seconds, **held_out_fvu(result.dictionaries, args)}


def run_peft(seed: int, args: argparse.Namespace, out: Path) -> dict[str, Any]:
    from transformers import Trainer
    from transformers.utils import logging as hf_logging

    from vlmscope.peft import TopKSaeConfig, get_peft_sae_model
    from vlmscope.peft.convert import to_bundle
    from vlmscope.peft.training import SaeCallback, SaeTrainingData, sae_training_arguments

    hf_logging.set_verbosity_error()
    vlm = HookedVLM.from_pretrained(toy_path(), device="cpu")
    torch.manual_seed(seed)
    config = TopKSaeConfig(k=args.k, expansion_factor=args.expansion, target_modules=TARGET)
    model = get_peft_sae_model(vlm.model, config)
    records = open_training_data(TrainConfig(model="toy", dataset="shapes", output_dir="unused"))
    data = SaeTrainingData(vlm, records, tokens="all")
    num_latents = args.expansion * vlm.adapter.d_model
    trainer = Trainer(
        model=model,
        args=sae_training_arguments(
            str(out / f"peft-{seed}"),
            max_steps=args.steps,
            num_latents=num_latents,
            batch_size=args.batch_size,
            seed=seed,
            logging_steps=args.steps,
            log_level="error",
        ),
        train_dataset=data,
        data_collator=data.collator,
        callbacks=[SaeCallback()],
    )
    t = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - t
    return {"seconds": seconds, **held_out_fvu(to_bundle(model, tokens="all"), args)}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--steps", type=int, default=300, help="optimizer steps per run (300)")
    p.add_argument("--seeds", type=int, default=3, help="runs per method, seeds 0.. (3)")
    p.add_argument("--batch-size", type=int, default=8, help="samples per step (8)")
    p.add_argument("--k", type=int, default=16, help="TopK k (16)")
    p.add_argument("--expansion", type=int, default=8, help="latents per input dim (8)")
    p.add_argument("--eval-tokens", type=int, default=20_000, help="held-out tokens (20000)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: tiny model)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    rows = []
    with tempfile.TemporaryDirectory(prefix="peft-vs-train-") as tmp:
        for seed in range(args.seeds):
            for name, fn in (("vlmscope train", run_vlmscope), ("PEFT + HF Trainer", run_peft)):
                res = fn(seed, args, Path(tmp))
                rows.append({"method": name, "seed": seed, **res})
                print(
                    f"{name:<18} seed {seed}: held-out FVU {res['fvu']:.4f}, L0 {res['l0']:.1f}, "
                    f"dead {100 * res['dead']:.1f}%, {res['seconds']:.0f} s",
                    flush=True,
                )
    print(
        f"\nTopK SAE on {HOOK} of the toy VLM: {args.steps} steps x {args.batch_size} samples, "
        f"k = {args.k}, {args.expansion}x expansion; held-out FVU on {args.eval_tokens} tokens\n"
    )
    print("| method | runs | held-out FVU, mean | spread (sd) | L0 | seconds per run |")
    print("|---|---|---|---|---|---|")
    for name in ("vlmscope train", "PEFT + HF Trainer"):
        mine = [r for r in rows if r["method"] == name]
        fvus = [r["fvu"] for r in mine]
        sd = statistics.stdev(fvus) if len(fvus) > 1 else float("nan")
        print(
            f"| {name} | {len(mine)} | {statistics.mean(fvus):.4f} | {sd:.4f} | "
            f"{statistics.mean(r['l0'] for r in mine):.1f} | "
            f"{statistics.mean(r['seconds'] for r in mine):.0f} |"
        )
    a = [r["fvu"] for r in rows if r["method"] == "vlmscope train"]
    b = [r["fvu"] for r in rows if r["method"] == "PEFT + HF Trainer"]
    diffs = [y - x for x, y in zip(a, b, strict=True)]
    print(f"\nPEFT minus vlmscope, paired by seed: {', '.join(f'{d:+.4f}' for d in diffs)}")


if __name__ == "__main__":
    main()
