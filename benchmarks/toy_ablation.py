"""Short, equal-budget ablations of the v2 toy's training recipe (the two-object protocol).

Each variant trains a fresh toy for 500 steps of 8 pictures, on one-object scenes then (from
step 60) two-object scenes, asking colour, shape and position questions only: the smallest
setting where the language model must find the *named* object among several. It reports the
teacher-forced accuracy per type on the training stream at the end (a running mean over about
the last 100 questions of each type), greedy accuracy on held-out two-object scenes (100
questions per type, training phrasings), and the compute thread's CPU seconds.

    python benchmarks/toy_ablation.py --variant baseline --variant question_first
    python benchmarks/toy_ablation.py --list

Run one heavy job at a time (``flock /tmp/vlmscope-heavy.lock``); CPU seconds, not wall time,
are the budget.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from dataclasses import replace
from typing import Any

from vlmscope.data import shapes
from vlmscope.models.toy.train import (
    EVAL_SEED,
    EVAL_SPLIT,
    Stage,
    ToyTrainConfig,
    generate_answers,
    stage_config,
    train_toy,
)

TYPES = ("colour", "shape", "position")
CURRICULUM = (Stage(0.0, 1, TYPES), Stage(0.12, 2, TYPES))
BASE = ToyTrainConfig(
    steps=500,
    batch_size=8,
    questions=4,
    curriculum=CURRICULUM,
    eval_n=0,
    minutes=60,
    question_first=False,
    match_weight=0.0,
)
"""The protocol: image first, no match loss, four questions per picture (the recipe before
any of these changed the default), pinned so the tables in benchmarks/README.md still
reproduce."""
VARIANTS: dict[str, dict[str, Any]] = {
    "baseline": {},
    "question_first": {"question_first": True},
    "question_first_match": {"question_first": True, "match_weight": 1.0},
    "question_first_q1_b13": {"question_first": True, "questions": 1, "batch_size": 13},
    "question_first_q2_b11": {"question_first": True, "questions": 2, "batch_size": 11},
    "word_aux": {"word_weight": 1.0},
    "word_aux_layer3": {"word_weight": 1.0, "word_layer": 3},
    "question_first_word_aux": {"question_first": True, "word_weight": 1.0},
    "batch4_1000": {"batch_size": 4, "steps": 1000},
    # no one-object stage: the vision pathway is trained by the per-patch loss anyway, and one
    # object teaches the decoder to pool every image token, which two objects then break
    "two_objects_from_start": {"curriculum": (Stage(0.0, 2, TYPES),)},
    "question_first_two_objects_from_start": {
        "question_first": True,
        "curriculum": (Stage(0.0, 2, TYPES),),
    },
    "heads8": {"decoder": {"num_attention_heads": 8, "num_key_value_heads": 8}},
}
"""Name -> `ToyTrainConfig` overrides of the protocol's config."""


def heldout_accuracy(path: str, n: int) -> dict[str, float]:
    """Greedy accuracy per type on held-out two-object scenes."""
    from vlmscope.models.hooked import HookedVLM

    config = replace(stage_config(Stage(0.0, 2, TYPES)), phrasings="train")
    samples = shapes.generate(n * len(TYPES), EVAL_SEED, EVAL_SPLIT, config)
    vlm = HookedVLM.from_pretrained(path, device="cpu")
    preds = generate_answers(vlm, samples)
    hits: dict[str, list[bool]] = {}
    for s, p in zip(samples, preds, strict=True):
        hits.setdefault(s.question_type, []).append(p == s.answer)
    return {t: sum(hits[t]) / len(hits[t]) for t in TYPES}


def run(name: str, n_eval: int) -> dict[str, Any]:
    cfg = replace(BASE, **VARIANTS[name])
    with tempfile.TemporaryDirectory() as tmp:
        m = train_toy(f"{tmp}/toy", config=cfg, progress=False)
        held = heldout_accuracy(f"{tmp}/toy", n_eval)
    last = m["history"][-1]
    return {
        "variant": name,
        "overrides": {k: str(v) for k, v in VARIANTS[name].items()},
        "steps": m["steps_done"],
        "cpu_s": m["train_cpu_seconds"],
        "worker_cpu_s": m["data_worker_cpu_seconds"],
        "train_stream": {t: last.get(t) for t in TYPES},
        "heldout_2obj": held,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--variant", action="append", default=[], help="a variant (repeatable)")
    p.add_argument("--list", action="store_true", help="list the variants and exit")
    p.add_argument("--n", type=int, default=100, help="held-out questions per type (100)")
    p.add_argument("--json", default=None, help="append one JSON line per variant here")
    args = p.parse_args()
    if args.list or not args.variant:
        for k, v in VARIANTS.items():
            print(f"{k:<28} {v}")
        return
    unknown = [v for v in args.variant if v not in VARIANTS]
    if unknown:
        p.error(f"unknown variant(s) {unknown}; --list shows them")
    rows = []
    for name in args.variant:
        r = run(name, args.n)
        rows.append(r)
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps(r) + "\n")
        ts, ho = r["train_stream"], r["heldout_2obj"]
        print(
            f"{name:<28} cpu {r['cpu_s']:>6.0f} s  stream "
            + " / ".join(f"{ts[t]:.0%}" for t in TYPES)
            + "  held-out 2 obj "
            + " / ".join(f"{ho[t]:.0%}" for t in TYPES),
            flush=True,
        )


if __name__ == "__main__":
    main()
