"""Build, train, evaluate and save the toy shapes-world LLaVA (see `vlmscope.models.toy`).

The model is trained on exactly what the rest of the toolkit feeds it: shapes-world records go
through `SampleEncoder` (the processor's chat template and image processor) and `collate`, and
the loss covers only the assistant turn (answer words and the closing ``</s>``). Accuracy is
measured by greedy generation through `HookedVLM.prepare` + ``model.generate`` on a held-out
split, with exact match of the answer words.

Run ``python -m vlmscope.models.toy.train --help`` (or ``vlmscope zoo train-toy``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vlmscope.data import shapes
from vlmscope.data.processing import Sample, SampleEncoder, collate
from vlmscope.data.sources import Record
from vlmscope.models.toy import TOY_DIR

IMAGE_SIZE = 64
PATCH = 16
CTX_LEN = 128
TRAIN_SPLIT = "train"
EVAL_SPLIT = "heldout"
EVAL_SEED = 1_000_003
"""Held-out questions come from another split name *and* another seed than any training run."""

# Small enough to train in minutes on two CPU cores. The vision tower's last layer feeds the
# projector (no layer computed for nothing).
VISION: dict[str, Any] = dict(
    hidden_size=128,
    intermediate_size=512,
    num_hidden_layers=3,
    num_attention_heads=4,
    image_size=IMAGE_SIZE,
)
TEXT: dict[str, Any] = dict(
    hidden_size=128,
    intermediate_size=384,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
    # ~1/sqrt(hidden): the usual 0.02 is tuned for wide models; at width 128 it leaves the
    # attention logits ~0 and the bilinear q.k gradients tiny, and binding never forms in time.
    initializer_range=0.08,
)
VOCAB_SIZE = 384


@dataclass(frozen=True)
class Stage:
    """One curriculum stage: from `start` (a fraction of the steps) on, train on scenes of at
    most `max_objects` objects with these question types."""

    start: float
    max_objects: int
    question_types: tuple[str, ...]


QA = shapes.QUESTION_TYPES
CURRICULUM: tuple[Stage, ...] = (
    # One object: colour, shape and place are read off the only object, so the image pathway
    # and the vision features form before any binding is needed.
    Stage(0.0, 1, ("colour", "shape", "position")),
    # Distractors: the answer now depends on which object the question names (binding).
    Stage(0.08, 2, ("colour", "shape", "position")),
    Stage(0.2, 4, ("colour", "shape", "position")),
    # The distribution evaluated on: up to 4 objects, the five question types.
    Stage(0.35, 4, QA),
)
"""Trained on the final mix from step 0, the model settles on the text-only answer prior and
the gradient into the vision tower dies away; this order forms the image pathway first."""


@dataclass
class ToyTrainConfig:
    """How `train_toy` trains; the defaults made the shipped model."""

    steps: int = 3000
    """Optimizer steps; the learning-rate schedule and the curriculum are laid out over them."""
    minutes: float = 15.0
    """Wall-clock cap: training stops early (and says so) when it is reached."""
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup: int = 100
    min_lr_ratio: float = 0.05
    """Cosine decay ends at lr * min_lr_ratio."""
    grad_clip: float = 1.0
    seed: int = 0
    """Seeds both the initial weights and the training stream of the shapes world."""
    patch_size: int = PATCH
    curriculum: tuple[Stage, ...] = CURRICULUM
    workers: int = 1
    """Data worker processes (0 or 1): one builds the next batch while the model trains."""
    eval_n: int = 100
    """Held-out questions per type evaluated after training (0: skip)."""


# --------------------------------------------------------------------------------------------
# Building


def _tokenizer_texts(config: shapes.ShapesConfig) -> list[str]:
    """Every question form, answer and caption phrase of the shapes world, in chat form, so BPE
    learns each word (with its leading space) as one token."""
    questions = ["Describe the image."]
    for s in config.shapes:
        questions += [f"What colour is the {s}?", f"How many {shapes.plural(s)} are there?"]
        for c in config.colours:
            questions += [f"Is there {shapes.article(c)} {c} {s}?", f"Where is the {c} {s}?"]
    questions += [f"What shape is the {c} object?" for c in config.colours]
    answers = shapes.answer_vocabulary(config)
    texts = [f"USER: \n{q} ASSISTANT: {a}" for q in questions for a in answers]
    texts += [f"ASSISTANT: {a}" for a in answers] * 100  # answers first: one token each
    caption_config = shapes.ShapesConfig(question_types=("caption",))
    texts += [
        s.answer for s in shapes.iter_samples(300, seed=0, split="tok", config=caption_config)
    ]
    return texts


def build_processor(config: shapes.ShapesConfig | None = None, patch_size: int = PATCH) -> Any:
    """LlavaProcessor: BPE tokenizer trained on shapes-world text (answer words are single
    tokens), the LLaVA USER/ASSISTANT chat template, and a PIL CLIP image processor at 64 px."""
    from vlmscope.models.zoo.common import LLAVA_USER_ASSISTANT, train_tokenizer
    from vlmscope.models.zoo.llava import llava_processor

    config = config or shapes.ShapesConfig()
    tokenizer = train_tokenizer(
        ["<image>"],
        named_tokens={"image_token": "<image>"},
        chat_template=LLAVA_USER_ASSISTANT,
        texts=_tokenizer_texts(config),
        vocab_size=VOCAB_SIZE,
    )
    for word in " ".join(shapes.answer_vocabulary(config)).split():
        if len(tokenizer.tokenize(" " + word)) != 1:
            raise RuntimeError(f"answer word {word!r} is not a single token")
    return llava_processor(tokenizer, IMAGE_SIZE, patch_size)


def build_toy(seed: int = 0, patch_size: int = PATCH) -> tuple[nn.Module, Any]:
    """A freshly initialised toy LLaVA (fp32, train mode) and its processor; seeded."""
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
    )

    processor = build_processor(patch_size=patch_size)
    tok = processor.tokenizer
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(patch_size=patch_size, **VISION),
        text_config=LlamaConfig(
            vocab_size=len(tok),
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
            **TEXT,
        ),
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        image_seq_length=(IMAGE_SIZE // patch_size) ** 2,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    gc = model.generation_config
    gc.bos_token_id, gc.eos_token_id, gc.pad_token_id = (
        tok.bos_token_id,
        tok.eos_token_id,
        tok.pad_token_id,
    )
    gc.do_sample, gc.max_new_tokens = False, 8
    return model.train(), processor


# --------------------------------------------------------------------------------------------
# Training


def _record(s: shapes.ShapesSample) -> Record:
    return Record(row_id=s.id, messages=s.messages(), images=[s.image])


def stage_config(stage: Stage) -> shapes.ShapesConfig:
    """The shapes-world generator config of a curriculum stage."""
    m = stage.max_objects
    return shapes.ShapesConfig(
        max_objects=m, max_count=min(m, 3), question_types=stage.question_types
    )


def sample_stream(
    processor: Any,
    seed: int,
    steps: int,
    batch_size: int,
    curriculum: Sequence[Stage] = CURRICULUM,
    split: str = TRAIN_SPLIT,
) -> Iterator[tuple[shapes.ShapesSample, Sample]]:
    """Encoded shapes-world samples for `steps` batches, stage by stage. Sample i of the run is
    always sample i of the split (under its stage's config): deterministic in the seed."""
    encoder = SampleEncoder(processor, CTX_LEN, [_image_token_id(processor)])
    bounds = [round(st.start * steps) for st in curriculum[1:]] + [steps]
    first = 0
    for stage, end in zip(curriculum, bounds, strict=True):
        n = (end - first) * batch_size
        config = stage_config(stage)
        for s in shapes.iter_samples(n, seed, split, config, start=first * batch_size):
            yield s, encoder.encode(_record(s))
        first = end


def _image_token_id(processor: Any) -> int:
    return int(processor.tokenizer.convert_tokens_to_ids("<image>"))


class TrainBatches(torch.utils.data.IterableDataset):  # type: ignore[type-arg]
    """The run's `steps` collated batches, with each sample's question type; an iterable
    dataset so a DataLoader worker can build batch k+1 while the model trains on batch k."""

    def __init__(
        self,
        processor: Any,
        seed: int,
        steps: int,
        batch_size: int,
        curriculum: Sequence[Stage] = CURRICULUM,
    ) -> None:
        self.processor, self.seed, self.steps = processor, seed, steps
        self.batch_size, self.curriculum = batch_size, tuple(curriculum)

    def __iter__(self) -> Iterator[tuple[list[str], Any]]:
        stream = sample_stream(
            self.processor, self.seed, self.steps, self.batch_size, self.curriculum
        )
        pad_id = self.processor.tokenizer.pad_token_id
        for _ in range(self.steps):
            items = [next(stream) for _ in range(self.batch_size)]
            yield [s.question_type for s, _ in items], collate([x for _, x in items], pad_id)


def _one_thread(_worker_id: int) -> None:
    torch.set_num_threads(1)


def train_batches(data: TrainBatches, workers: int) -> Iterator[tuple[list[str], Any]]:
    """Iterate `data` in this process (workers=0) or in one worker process, in order."""
    if workers <= 0:
        return iter(data)
    loader = torch.utils.data.DataLoader(
        data,
        batch_size=None,
        num_workers=1,  # one worker keeps the order, hence determinism
        prefetch_factor=4,
        worker_init_fn=_one_thread,
    )
    return iter(loader)


def answer_loss(model: nn.Module, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy on the answer tokens, averaged per sample and then over samples (so a long
    caption weighs as much as a one-word answer), and per-sample exact match of all answer
    tokens (teacher-forced argmax)."""
    logits = model(**batch.inputs, use_cache=False).logits[:, :-1]
    target = batch.inputs["input_ids"][:, 1:]
    mask = batch.answer[:, 1:].float()
    nll = nn.functional.cross_entropy(logits.float().transpose(1, 2), target, reduction="none")
    loss = ((nll * mask).sum(-1) / mask.sum(-1).clamp(min=1)).mean()
    wrong = (logits.argmax(-1) != target) & batch.answer[:, 1:]
    return loss, ~wrong.any(-1)


def _lr_at(step: int, cfg: ToyTrainConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


def train_toy(
    out_dir: str | os.PathLike[str],
    *,
    steps: int | None = None,
    minutes: float | None = None,
    batch_size: int | None = None,
    lr: float | None = None,
    seed: int | None = None,
    eval_n: int | None = None,
    progress: bool = True,
    config: ToyTrainConfig | None = None,
    log_file: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """Train the toy from scratch and save it to `out_dir` (atomically); returns the metrics
    (also written to ``training.json`` next to the weights). Keyword arguments override
    `config`. Deterministic given the seed (on one machine, CPU), unless the `minutes` cap cuts
    the run short; `log_file` receives a JSON line of running metrics every 50 steps."""
    cfg = replace(config or ToyTrainConfig())
    for k, v in dict(steps=steps, minutes=minutes, batch_size=batch_size, lr=lr, seed=seed,
                     eval_n=eval_n).items():  # fmt: skip
        if v is not None:
            setattr(cfg, k, v)
    start = time.perf_counter()
    model, processor = build_toy(cfg.seed, cfg.patch_size)
    threads = torch.get_num_threads()
    if cfg.workers > 0:
        # The data worker takes a core; more compute threads than free cores only spin.
        torch.set_num_threads(max(1, threads - cfg.workers))
    try:
        metrics = _train(model, processor, cfg, start, progress, log_file)
    finally:
        torch.set_num_threads(threads)
    model.eval()
    out = save_toy(model, processor, out_dir, metrics)
    if cfg.eval_n > 0:
        acc_by_type = evaluate_toy(out, n_per_type=cfg.eval_n, progress=progress)
        metrics["heldout_accuracy"] = acc_by_type
        metrics["heldout"] = {"split": EVAL_SPLIT, "seed": EVAL_SEED, "n_per_type": cfg.eval_n}
        (out / "training.json").write_text(json.dumps(metrics, indent=2) + "\n")
    metrics["total_seconds"] = round(time.perf_counter() - start, 1)
    return metrics


def _train(
    model: nn.Module,
    processor: Any,
    cfg: ToyTrainConfig,
    start: float,
    progress: bool,
    log_file: str | os.PathLike[str] | None,
) -> dict[str, Any]:
    """The optimisation loop of `train_toy`; returns its metrics."""
    from tqdm.auto import tqdm

    model.train()
    named = list(model.named_parameters())
    decay = [p for n, p in named if p.dim() >= 2 and "embed" not in n]
    no_decay = [p for n, p in named if not (p.dim() >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay}],
        lr=cfg.lr,
        betas=(0.9, 0.98),
        weight_decay=0.0,
    )
    stream = train_batches(
        TrainBatches(processor, cfg.seed, cfg.steps, cfg.batch_size, cfg.curriculum),
        cfg.workers,
    )
    deadline = start + cfg.minutes * 60
    ema_loss, ema_acc = float("nan"), 0.0
    history: list[dict[str, float]] = []
    by_type: dict[str, float] = {}
    done = 0
    with (
        tqdm(total=cfg.steps, desc="train-toy", disable=not progress, dynamic_ncols=True) as bar,
        open(log_file or os.devnull, "a") as log,
    ):
        for step in range(cfg.steps):
            if time.perf_counter() > deadline:
                break
            for group in opt.param_groups:
                group["lr"] = _lr_at(step, cfg)
            qtypes, batch = next(stream)
            loss, correct = answer_loss(model, batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            done = step + 1
            acc, lv = float(correct.float().mean()), loss.item()
            ema_loss = lv if step == 0 else 0.95 * ema_loss + 0.05 * lv
            ema_acc = acc if step == 0 else 0.95 * ema_acc + 0.05 * acc
            for t, c in zip(qtypes, correct.tolist(), strict=True):
                by_type[t] = 0.98 * by_type.get(t, c) + 0.02 * c
            if step % 50 == 0 or done == cfg.steps:
                history.append(
                    {"step": step, "loss": round(ema_loss, 4), "acc": round(ema_acc, 4),
                     "s": round(time.perf_counter() - start, 1),
                     **{t: round(a, 3) for t, a in sorted(by_type.items())}}
                )  # fmt: skip
                log.write(json.dumps(history[-1]) + "\n")
                log.flush()
            bar.set_postfix(loss=f"{ema_loss:.3f}", acc=f"{ema_acc:.3f}", refresh=False)
            bar.update(1)
    if done < cfg.steps:
        print(
            f"train-toy: time cap of {cfg.minutes} min reached after {done}/{cfg.steps} steps; "
            "the model is saved but under-trained (the schedule assumed all steps)",
            file=sys.stderr,
        )
    return {
        "config": asdict(cfg),
        "parameters": sum(p.numel() for p in model.parameters()),
        "steps_done": done,
        "stopped_by_time_cap": done < cfg.steps,
        "samples_seen": done * cfg.batch_size,
        "train_seconds": round(time.perf_counter() - start, 1),
        "train_loss_ema": round(ema_loss, 4),
        "train_acc_ema": round(ema_acc, 4),
        "torch_threads": torch.get_num_threads(),
        "history": history,
    }


def save_toy(
    model: nn.Module, processor: Any, out_dir: str | os.PathLike[str], metrics: dict[str, Any]
) -> Path:
    """save_pretrained model (safetensors) + processor + ``training.json`` into a temporary
    folder next to `out_dir`, then swap it in, so a crash never leaves a torn model."""
    out = Path(out_dir).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    old = out.with_name(f".{out.name}-old-{os.getpid()}")
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        processor.save_pretrained(tmp)
        (tmp / "training.json").write_text(json.dumps(metrics, indent=2) + "\n")
        # mkdtemp (and some writers) make files private; a shipped folder must be readable.
        tmp.chmod(0o755)
        for f in tmp.iterdir():
            f.chmod(0o644)
        if out.exists():
            out.rename(old)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    return out


# --------------------------------------------------------------------------------------------
# Evaluation


def heldout_samples(
    n_per_type: int, seed: int = EVAL_SEED, question_types: Sequence[str] = shapes.QUESTION_TYPES
) -> list[shapes.ShapesSample]:
    """The first `n_per_type` held-out samples of each question type (disjoint from training:
    another split name and seed)."""
    out: list[shapes.ShapesSample] = []
    counts = dict.fromkeys(question_types, 0)
    for s in shapes.iter_samples(2**62, seed=seed, split=EVAL_SPLIT):
        if counts.get(s.question_type, n_per_type) < n_per_type:
            counts[s.question_type] += 1
            out.append(s)
        if all(c >= n_per_type for c in counts.values()):
            return out
    raise AssertionError("unreachable")


def generate_answers(
    vlm: Any, samples: Sequence[shapes.ShapesSample], batch_size: int = 64
) -> list[str]:
    """Greedy answers to the samples' questions, prompted the way users prompt
    (`HookedVLM.prepare`: chat template, image then question, generation prompt)."""
    tok = vlm.tokenizer
    answers: list[str] = []
    for i in range(0, len(samples), batch_size):
        chunk = samples[i : i + batch_size]
        inputs = vlm.prepare(
            [s.question for s in chunk], images=[[s.image] for s in chunk], padding_side="left"
        )
        with torch.inference_mode():
            out = vlm.model.generate(
                **inputs,
                max_new_tokens=6,
                do_sample=False,
                pad_token_id=tok.pad_token_id,
                eos_token_id=tok.eos_token_id,
            )
        new = out[:, inputs["input_ids"].shape[1] :]
        answers += [t.strip() for t in tok.batch_decode(new, skip_special_tokens=True)]
    return answers


def evaluate_toy(
    path: str | os.PathLike[str] | None = None,
    n_per_type: int = 200,
    seed: int = EVAL_SEED,
    *,
    batch_size: int = 64,
    progress: bool = False,
    details: dict[str, Any] | None = None,
) -> dict[str, float]:
    """Held-out answer accuracy per question type: greedy generation, exact match of the answer
    words. `path` defaults to the shipped toy; pass a dict as `details` to receive per-sample
    results (question, answer, prediction, number of objects)."""
    from tqdm.auto import tqdm

    from vlmscope.models.hooked import HookedVLM
    from vlmscope.models.toy import toy_path

    vlm = HookedVLM.from_pretrained(path if path is not None else toy_path(), device="cpu")
    samples = heldout_samples(n_per_type, seed)
    preds: list[str] = []
    with tqdm(total=len(samples), desc="eval-toy", disable=not progress) as bar:
        for i in range(0, len(samples), batch_size):
            chunk = samples[i : i + batch_size]
            preds += generate_answers(vlm, chunk, batch_size)
            bar.update(len(chunk))
    hits: dict[str, list[bool]] = {t: [] for t in shapes.QUESTION_TYPES}
    for s, p in zip(samples, preds, strict=True):
        hits[s.question_type].append(p == s.answer)
    if details is not None:
        details["samples"] = [
            {"id": s.id, "type": s.question_type, "question": s.question, "answer": s.answer,
             "prediction": p, "n_objects": len(s.objects)}
            for s, p in zip(samples, preds, strict=True)
        ]  # fmt: skip
    return {t: round(sum(h) / len(h), 4) for t, h in hits.items() if h}


def format_accuracy(acc: dict[str, float], n_per_type: int) -> str:
    """A short table: question type, accuracy, number of questions."""
    lines = [f"{'question type':<14} {'accuracy':>8} {'n':>5}", "-" * 29]
    lines += [f"{t:<14} {a:>8.1%} {n_per_type:>5}" for t, a in acc.items()]
    mean = sum(acc.values()) / len(acc)
    lines += ["-" * 29, f"{'mean':<14} {mean:>8.1%} {n_per_type * len(acc):>5}"]
    return "\n".join(lines)


def multi_object_accuracy(details: dict[str, Any]) -> dict[str, tuple[float, int]]:
    """Accuracy and count per type on held-out scenes with 2+ objects: the world is small, so a
    one-object scene may also occur in training, while a 2+-object scene almost never does."""
    out: dict[str, tuple[float, int]] = {}
    for t in shapes.QUESTION_TYPES:
        rows = [r for r in details["samples"] if r["type"] == t and r["n_objects"] >= 2]
        if rows:
            hits = sum(r["prediction"] == r["answer"] for r in rows)
            out[t] = (round(hits / len(rows), 4), len(rows))
    return out


# --------------------------------------------------------------------------------------------
# Command line (wired into `vlmscope zoo train-toy | eval-toy`)


def add_train_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Flags of `vlmscope zoo train-toy`."""
    d = ToyTrainConfig()
    p.add_argument(
        "--out",
        default="shapes_llava",
        help="output folder (default: ./shapes_llava); the shipped toy is in "
        f"{TOY_DIR} and is replaced only if you name that folder",
    )
    p.add_argument("--minutes", type=float, default=d.minutes, help="wall-clock cap in minutes")
    p.add_argument("--steps", type=int, default=d.steps, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr, help="peak learning rate")
    p.add_argument("--seed", type=int, default=d.seed, help="init and training-data seed")
    p.add_argument(
        "--eval-n", type=int, default=d.eval_n, help="held-out questions per type after training"
    )
    p.add_argument(
        "--patch-size", type=int, default=d.patch_size, help="vision patch size in px (8 or 16)"
    )
    p.add_argument("--workers", type=int, default=d.workers, help="data worker processes (0 or 1)")
    p.add_argument("--log", default=None, help="append JSON lines of training metrics here")
    return p


def add_eval_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Flags of `vlmscope zoo eval-toy`."""
    p.add_argument("--model", default=None, help="model folder (default: the shipped toy)")
    p.add_argument("--n", type=int, default=200, help="held-out questions per type")
    p.add_argument("--seed", type=int, default=EVAL_SEED, help="held-out split seed")
    p.add_argument("--json", default=None, help="also write the accuracies to this JSON file")
    return p


def run_train(args: argparse.Namespace) -> int:
    """`vlmscope zoo train-toy`: train, save, print the held-out accuracy table."""
    cfg = ToyTrainConfig(
        steps=args.steps,
        minutes=args.minutes,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        patch_size=args.patch_size,
        workers=args.workers,
        eval_n=args.eval_n,
    )
    m = train_toy(args.out, config=cfg, log_file=args.log)
    print(
        f"saved toy model ({m['parameters']:,} parameters) to {args.out}: {m['steps_done']} "
        f"steps in {m['train_seconds']:.0f} s, {m['total_seconds']:.0f} s with evaluation"
    )
    if "heldout_accuracy" in m:
        print(format_accuracy(m["heldout_accuracy"], args.eval_n))
    return 0


def run_eval(args: argparse.Namespace) -> int:
    """`vlmscope zoo eval-toy`: per-question-type held-out accuracy table (and JSON)."""
    details: dict[str, Any] = {}
    acc = evaluate_toy(
        args.model, n_per_type=args.n, seed=args.seed, progress=True, details=details
    )
    print(format_accuracy(acc, args.n))
    multi = multi_object_accuracy(details)
    print(
        "\nscenes with 2+ objects: "
        + ", ".join(f"{t} {a:.1%} (n={n})" for t, (a, n) in multi.items())
    )
    if args.json:
        result = {"accuracy": acc, "multi_object_accuracy": {t: a for t, (a, _) in multi.items()},
                  "n_per_type": args.n, "seed": args.seed, "split": EVAL_SPLIT}  # fmt: skip
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m vlmscope.models.toy.train [train] [flags]` or `... eval [flags]`."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    parser = argparse.ArgumentParser(
        prog="python -m vlmscope.models.toy.train",
        description="Train the toy shapes-world LLaVA (or evaluate it with `eval`).",
    )
    sub = parser.add_subparsers(dest="what")
    add_train_args(sub.add_parser("train", help="train and save (the default)"))
    add_eval_args(sub.add_parser("eval", help="held-out accuracy per question type"))
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in ("train", "eval", "-h", "--help"):
        argv = ["train", *argv]
    args = parser.parse_args(argv)
    return run_eval(args) if args.what == "eval" else run_train(args)


if __name__ == "__main__":
    sys.exit(main())
