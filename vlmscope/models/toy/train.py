"""Build, train, evaluate and save the toy shapes-world LLaVA (see `vlmscope.models.toy`).

Training data. A training sequence is one shapes-world picture (`vlmscope.data.shapes`, v2:
64 px, an 8x8 grid of 8 px patches, 1 to 5 objects of three sizes) with `questions` questions
about it, encoded by `SampleEncoder` (the processor's chat template and image processor). The
first question is the sample's own (question types balanced, answers balanced within a type).
The default is that one question per picture, as users ask, with 13 pictures per step: the
question-first template and the match loss (below) apply to the first turn only, so with one
turn they reach every question, and since the 64 image tokens are most of a sequence, 13
one-question pictures cost about the CPU of 8 four-question ones while the vision tower sees
1.6 times the pictures (held-out mean 93.6% against 84.6% for 4 questions x 8 pictures;
benchmarks/README.md "Toy VLM training"). With ``questions > 1`` a picture becomes a
multi-turn chat ``USER: <image>\\nQ1 ASSISTANT: A1</s>USER: Q2 ASSISTANT: A2</s>...`` whose
later questions come from `shapes.ask` on the same scene (more answer tokens per picture, but
only the first turn sees the question before the image and carries the match loss). The loss
covers the answer tokens of every turn (answer words and the closing ``</s>``). Questions use
the training phrasings of the world's grammar only.

The first turn is token for token what a user's single question looks like
(`HookedVLM.prepare`), and that is how accuracy is measured: greedy generation through
``model.generate`` on held-out scenes (another split and seed), once with the training
phrasings and once with the held-out phrasings, exact match of the answer words.

Choices that make a 2M-parameter LLaVA learn relations and counting in minutes:

- the vision tower's position embeddings start as a 2-D sine/cosine code of (row, column), so
  where a patch is can be read from its features from the first step (CLIP's learned
  embeddings start as noise, and relations then wait for them to organise);
- a curriculum from small scenes to the full world (`CURRICULUM`), and a learning-rate warm-up
  then cosine decay over a fixed number of steps;
- a wide init of the decoder (`TEXT["initializer_range"]`): at width 128 the usual 0.02 leaves
  attention logits near 0 and binding forms late;
- an auxiliary per-patch loss on the projector's outputs (`vlmscope.models.toy.aux`: each
  patch's object shape, colour, counts, quadrant and centre, through a throwaway linear head),
  so the vision pathway is trained by 64 labels per picture instead of a few answer tokens;
  the saved model is a plain LLaVA.

Options for the decoder's side, where the v2 toy fails (finding the named object among
several; see benchmarks/README.md "Toy VLM training"): ``question_first`` swaps the chat
template for `QUESTION_FIRST_TEMPLATE` (``USER: Q1\\n<image> ASSISTANT: A1</s>USER: Q2 ...``;
still a plain LLaVA, and `HookedVLM.prepare` follows the saved template), so each image token
can compare itself with the question; only the first turn is asked that way, the later ones
follow the image as before. ``word_weight`` adds a training-only loss at the question words
that name an object (`aux.question_word_labels`), read by a throwaway head after decoder layer
``word_layer``. ``match_weight`` (question first only) adds a training-only loss at the
image tokens of the first turn: which patches belong to the objects its question names
(`aux.match_labels`), read by a throwaway linear head after decoder layer ``match_layer``, so
the lookup every answer needs gets 64 labels per question instead of one answer token.
`benchmarks/toy_decoder_oracle.py` trains the decoder alone on oracle image tokens to measure
these options without the vision tower.

Options for relation questions, which stay at the yes/no prior without them (on by default since
run 3 in benchmarks/README.md "Toy VLM training"): ``relation_weight`` adds a training-only loss
at the answer position (the last prompt token) of relation questions, read by a throwaway linear
head after decoder layer ``relation_layer``: the sign of the row and column differences of the
two named objects (`aux.relation_labels`), and with ``relation_centres`` both objects' centres
(`aux.relation_centres`), and with ``relation_word`` which relation word was asked
(`aux.relation_word_label`). ``type_repeats`` (``--type-repeat relation=2``) draws a question
type more often (`weighted_curriculum`).

Time. Training runs one compute thread, with one data worker process building the next
batches; ``training.json`` records the CPU seconds of both. On an idle 2-core machine each has
a core, so the wall time is about the larger of the two (the compute thread's): that is the
estimate the README quotes, and it stays valid when other jobs slow the wall clock down.

Run ``python -m vlmscope.models.toy.train --help`` (or ``vlmscope zoo train-toy``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import resource
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from vlmscope.data import shapes
from vlmscope.data.processing import Sample, SampleEncoder, collate
from vlmscope.data.sources import Record
from vlmscope.models.toy import TOY_DIR, aux

WORLD_VERSION = 2
"""The shapes-world version this module trains on (recorded in ``training.json``)."""
WORLD = shapes.ShapesConfig(version=WORLD_VERSION)
IMAGE_SIZE = 64
PATCH = 8
CTX_LEN = 256
TRAIN_SPLIT = "train"
EVAL_SPLIT = "heldout"
EVAL_SEED = 1_000_003
"""Held-out questions come from another split name *and* another seed than any training run."""

# Small enough to train in minutes on one CPU core. The vision tower's last layer feeds the
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
    num_key_value_heads=4,
    max_position_embeddings=CTX_LEN,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
    # ~1/sqrt(hidden): the usual 0.02 is tuned for wide models; at width 128 it leaves the
    # attention logits ~0 and the bilinear q.k gradients tiny, and binding never forms in time.
    initializer_range=0.08,
)
VOCAB_SIZE = 640
POSITION_SCALE = 0.5
QUESTION_FIRST_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: {% else %}ASSISTANT: {% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}"
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}\n<image>{% endif %}{% endfor %}{% endif %}"
    "{% if message['role'] == 'user' %} {% else %}</s>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
"""The v2 toy's chat template when trained question-first: a user turn's text, then its
images (``USER: What colour is the circle?\\n<image> ASSISTANT:``), whatever order the
message lists them in. With a causal decoder and the image first, an image token cannot see
the question; after it, each image token can match its own features against the named
object, and the answer position only has to pool the matching patches."""
"""Amplitude of the initial sine/cosine position code of the vision tower."""


@dataclass(frozen=True)
class Stage:
    """One curriculum stage: from `start` (a fraction of the steps) on, train on scenes of at
    most `max_objects` objects with these question types."""

    start: float
    max_objects: int
    question_types: tuple[str, ...]


QA = WORLD.types
CURRICULUM: tuple[Stage, ...] = (
    # Two objects from step 0: the per-patch auxiliary loss forms the image pathway without a
    # one-object stage (which was there for it, and teaches the decoder to pool every image
    # token, a habit two objects then have to break); binding and relations first.
    Stage(0.0, 2, ("colour", "shape", "exists", "position", "relation")),
    # Then every type on three objects, then the world.
    Stage(0.2, 3, QA),
    Stage(0.4, 5, QA),
)
"""Trained on the final mix from step 0, a small model settles on the text-only answer prior
first and the gradient into the vision tower fades; small scenes first let the lookups form.
The previous recipe's curriculum (one object until 12%, two until 25%, three until 40%) is
`CURRICULUM_ONE_OBJECT_FIRST`."""
CURRICULUM_ONE_OBJECT_FIRST: tuple[Stage, ...] = (
    Stage(0.0, 1, ("colour", "shape", "position")),
    Stage(0.12, 2, ("colour", "shape", "exists", "position", "relation")),
    Stage(0.25, 3, QA),
    Stage(0.4, 5, QA),
)


def weighted_curriculum(
    curriculum: Sequence[Stage], repeats: dict[str, int] | None
) -> tuple[Stage, ...]:
    """The curriculum with each type of `repeats` listed that many times in every stage that
    asks it, so it is drawn that many times as often as an unlisted type (the world's balanced
    blocks then hold it that many times); stages without it are left as they are."""
    repeats = repeats or {}
    known = set(shapes.ALL_QUESTION_TYPES)
    for qtype, n in repeats.items():
        if qtype not in known:
            raise ValueError(f"unknown question type {qtype!r} to weight; known: {sorted(known)}")
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"{qtype}: a type's repeat count must be an int >= 1, got {n!r}")
    return tuple(
        replace(
            st, question_types=tuple(t for t in st.question_types for _ in range(repeats.get(t, 1)))
        )
        for st in curriculum
    )


@dataclass
class ToyTrainConfig:
    """How `train_toy` trains. The defaults are the best v2 recipe measured (benchmarks/README.md
    "Toy VLM training", relation run 3: every type at 99-100% on held-out scenes and phrasings,
    one seed); the shipped toy is this recipe's model (seed 0)."""

    steps: int = 5400
    """Optimizer steps; the learning-rate schedule and the curriculum are laid out over them."""
    minutes: float = 20.0
    """Cap on the training's CPU time (the compute thread's, in minutes): training stops early
    (and says so) when it is reached."""
    batch_size: int = 13
    """Pictures per step (each with `questions` questions). The cost is about linear in it on
    one CPU thread, so small batches buy more updates for the same CPU time; 13 one-question
    pictures cost about what 8 four-question ones did."""
    questions: int = 1
    """Questions per picture (turns of the training conversation). Only the first is asked
    question first and supervised by the match loss, so one question per picture gives every
    question both; more turns add answer tokens per picture at a fraction of a picture's
    cost."""
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup: int = 60
    min_lr_ratio: float = 0.05
    """Cosine decay ends at lr * min_lr_ratio."""
    grad_clip: float = 1.0
    seed: int = 0
    """Seeds both the initial weights and the training stream of the shapes world."""
    curriculum: tuple[Stage, ...] = CURRICULUM
    workers: int = 1
    """Data worker processes (0 or 1): one builds the next batches while the model trains."""
    threads: int = 1
    """Compute threads of the training process."""
    eval_n: int = 100
    """Held-out questions per type and phrasing set evaluated after training (0: skip)."""
    aux_weight: float = 1.0
    """Weight of the per-patch auxiliary loss on the projector's outputs (`toy.aux`; 0: off).
    Its linear head is thrown away: the saved model is a plain LLaVA."""
    question_first: bool = True
    """Chat template with the question before the image in a user turn
    (`QUESTION_FIRST_TEMPLATE`), so image tokens can attend to the question."""
    word_weight: float = 0.0
    """Weight of the auxiliary loss at the question words that name an object (`toy.aux.
    question_word_labels`: that object's shape, colour, counts, quadrant and centre, read by a
    throwaway linear head from the decoder's hidden state after layer `word_layer`; 0: off).
    Only words after the image get a target, so with `question_first` it needs `questions`
    >= 2."""
    word_layer: int = 2
    """Decoder layer (1-based) whose output the question-word head reads."""
    match_weight: float = 1.0
    """Weight of the question-conditioned per-patch loss (`toy.aux.match_labels`: which
    patches belong to the objects the first question names), read by a throwaway linear head
    from the decoder's hidden state at the image tokens after layer `match_layer`; needs
    `question_first` (0: off)."""
    match_layer: int = 2
    """Decoder layer (1-based) whose output at the image tokens the match head reads."""
    relation_weight: float = 1.0
    """Weight of the training-only loss at the answer position of relation questions
    (`toy.aux.relation_labels`: whether the first named object's block lies before or after
    the second's, along rows and along columns), read by a throwaway linear head from the
    decoder's hidden state at the last prompt token of the first turn after layer
    `relation_layer` (0: off). The probe (benchmarks/toy_relation_probe.py) finds both objects
    and their places at the image tokens, but the comparison never at the answer position."""
    relation_centres: bool = True
    """With `relation_weight`: the relation head also regresses both named objects' centres
    (`toy.aux.relation_centres`, mean squared error), so fetching each place is rewarded on
    its own before the comparison is."""
    relation_word: bool = True
    """With `relation_weight` (ignored without it): the relation head also classifies which
    relation word was asked (`toy.aux.relation_word_label`: left / right / above / below,
    cross-entropy added to the relation loss). The probe on run 2 read the places' sign at the
    answer position after layer 3 but the word only after layer 4, leaving the last layer to
    fetch the word and combine the two in one step; this brings the word there earlier."""
    relation_layer: int = 3
    """Decoder layer (1-based) whose output at the last prompt token the relation head reads:
    after the match layer, so its attention can read image tokens that already know which
    object they belong to."""
    type_repeats: dict[str, int] = field(default_factory=lambda: {"relation": 2})
    """Question type -> how many times as often as the others it is drawn, in every stage that
    asks it (`weighted_curriculum`); empty: balanced. Relation, the slowest type, twice."""
    decoder: dict[str, Any] = field(default_factory=dict)
    """Overrides of the decoder's config (`TEXT`), e.g. ``{"num_hidden_layers": 6}``."""


# --------------------------------------------------------------------------------------------
# Building


def _tokenizer_texts(config: shapes.ShapesConfig) -> list[str]:
    """Every phrasing of every question type (training and held-out: the tokenizer must know
    every word) with slots filled from the world's words, answers and captions, in chat form,
    so BPE learns each word (with its leading space) as one token."""
    rng = np.random.default_rng(0)
    answers = shapes.answer_vocabulary(config)
    texts = []
    for qtype in config.question_types:
        if qtype == "caption":
            continue
        for phrasing in shapes.phrasings(qtype)[0]:
            for _ in range(3):
                shape, other = (str(x) for x in rng.choice(config.shapes, 2, replace=False))
                colour = str(rng.choice(config.colours))
                rel = shapes.RELATION_WORDS[str(rng.choice(shapes.RELATIONS))]
                q = shapes.fill(
                    phrasing, shape=shape, shapes=shapes.plural(shape), colour=colour,
                    a=shapes.article(colour), A=f"the {shape}", B=f"the {colour} {other}",
                    rel0=rel[0], rel1=rel[1], rel2=rel[2],
                )  # fmt: skip
                texts.append(f"USER: \n{q} ASSISTANT: {answers[len(texts) % len(answers)]}")
    texts += [f"ASSISTANT: {a}" for a in answers] * 100  # answers first: one token each
    caption_config = replace(config, question_types=("caption",))
    texts += [
        s.answer for s in shapes.iter_samples(300, seed=0, split="tok", config=caption_config)
    ]
    return texts


def build_processor(config: shapes.ShapesConfig | None = None, question_first: bool = False) -> Any:
    """LlavaProcessor: BPE tokenizer trained on shapes-world text (answer words are single
    tokens), the LLaVA USER/ASSISTANT chat template (or `QUESTION_FIRST_TEMPLATE`), and a PIL
    CLIP image processor at 64 px with 8 px patches."""
    from vlmscope.models.zoo.common import LLAVA_USER_ASSISTANT, train_tokenizer
    from vlmscope.models.zoo.llava import llava_processor

    config = config or WORLD
    tokenizer = train_tokenizer(
        ["<image>"],
        named_tokens={"image_token": "<image>"},
        chat_template=QUESTION_FIRST_TEMPLATE if question_first else LLAVA_USER_ASSISTANT,
        texts=_tokenizer_texts(config),
        vocab_size=VOCAB_SIZE,
    )
    for word in " ".join(shapes.answer_vocabulary(config)).split():
        if len(tokenizer.tokenize(" " + word)) != 1:
            raise RuntimeError(f"answer word {word!r} is not a single token")
    processor = llava_processor(tokenizer, IMAGE_SIZE, PATCH)
    processor.chat_template = tokenizer.chat_template  # the zoo's default is image first
    return processor


def sincos_2d(grid: int, dim: int) -> torch.Tensor:
    """[grid * grid, dim] sine/cosine code of each cell's (row, column), row-major: the first
    half of the dimensions encodes the row, the second the column, at dim / 4 frequencies."""
    n_freq = dim // 4
    freqs = math.pi / grid * 2.0 ** (-torch.arange(n_freq, dtype=torch.float64) / 2)
    pos = torch.arange(grid, dtype=torch.float64)[:, None] * freqs * grid / 2
    code = torch.cat([pos.sin(), pos.cos()], 1)  # [grid, dim / 2]
    rows = code[:, None, :].expand(grid, grid, -1)
    cols = code[None, :, :].expand(grid, grid, -1)
    out = torch.cat([rows, cols], -1).reshape(grid * grid, -1)
    return (out / out.std()).float()


def build_toy(
    seed: int = 0, question_first: bool = False, decoder: dict[str, Any] | None = None
) -> tuple[nn.Module, Any]:
    """A freshly initialised toy LLaVA (fp32, train mode) and its processor (question before
    the image if `question_first`; `decoder` overrides `TEXT`); seeded."""
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
    )

    processor = build_processor(question_first=question_first)
    tok = processor.tokenizer
    grid = IMAGE_SIZE // PATCH
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(patch_size=PATCH, **VISION),
        text_config=LlamaConfig(
            vocab_size=len(tok),
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
            **(TEXT | (decoder or {})),
        ),
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        image_seq_length=grid**2,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    with torch.no_grad():
        pos = model.model.vision_tower.embeddings.position_embedding.weight
        pos[1:] = POSITION_SCALE * sincos_2d(grid, pos.shape[1])  # row 0 is the CLS token's
    gc = model.generation_config
    gc.bos_token_id, gc.eos_token_id, gc.pad_token_id = (
        tok.bos_token_id,
        tok.eos_token_id,
        tok.pad_token_id,
    )
    gc.do_sample, gc.max_new_tokens = False, 8
    return model.train(), processor


# --------------------------------------------------------------------------------------------
# Training data


def stage_config(stage: Stage) -> shapes.ShapesConfig:
    """The shapes-world generator config of a curriculum stage (training phrasings)."""
    m = stage.max_objects
    return replace(WORLD, max_objects=m, max_count=m, question_types=stage.question_types)


def conversation(
    sample: shapes.ShapesSample, config: shapes.ShapesConfig, n: int, seed: int
) -> list[shapes.Question]:
    """The sample's own question, then up to n - 1 other questions about its scene (distinct
    texts, types drawn uniformly from the config's); deterministic in (seed, sample index)."""
    first = shapes.Question(
        sample.question_type,
        sample.question,
        sample.answer,
        sample.query,
        sample.target,
        sample.phrasing,
        sample.heldout_phrasing,
    )
    rng = np.random.default_rng([seed, 7, sample.index])
    out, types = [first], config.types
    for _ in range(4 * n):
        if len(out) >= n:
            break
        q = shapes.ask(sample.objects, types[int(rng.integers(len(types)))], rng, config)
        if q is not None and q.text not in {x.text for x in out}:
            out.append(q)
    return out


@dataclass
class ToyBatch:
    """Collated conversations: model inputs, and per token the turn whose answer it belongs to
    (-1 elsewhere) with each row's question types in turn order."""

    inputs: dict[str, torch.Tensor]
    turn: torch.Tensor
    types: list[list[str]]
    patches: dict[str, torch.Tensor] | None = None
    """Per-patch auxiliary labels of each picture (`aux.patch_labels`), when asked for."""
    word_at: torch.Tensor | None = None
    """[n, 2] (row, position) of the question words that name something
    (`aux.question_word_labels`), when asked for."""
    words: dict[str, torch.Tensor] | None = None
    """The labels at `word_at`, shaped like `patches`' but per word."""
    match: torch.Tensor | None = None
    """[batch, patches] `aux.match_labels` of each row's first question, when asked for."""
    relation: torch.Tensor | None = None
    """[batch, 2] `aux.relation_labels` of each row's first question, when asked for."""
    centres: torch.Tensor | None = None
    """[batch, 4] `aux.relation_centres` of each row's first question, with `relation`."""
    relation_word: torch.Tensor | None = None
    """[batch] `aux.relation_word_label` of each row's first question, with `relation`."""


def encode_conversation(
    encoder: SampleEncoder, sample: shapes.ShapesSample, questions: Sequence[shapes.Question]
) -> tuple[Sample, torch.Tensor]:
    """(encoded sample, [seq] turn index of each answer token, -1 elsewhere)."""
    messages: list[dict[str, Any]] = []
    for i, q in enumerate(questions):
        parts = [{"type": "text", "text": q.text}]
        if i == 0:
            parts.insert(0, {"type": "image"})
        messages += [
            {"role": "user", "content": parts},
            {"role": "assistant", "content": [{"type": "text", "text": q.answer}]},
        ]
    enc = encoder.encode(Record(row_id=sample.id, messages=messages, images=[sample.image]))
    ids = enc.tensors["input_ids"][0]
    tok = encoder.tokenizer
    ends = (ids == tok.eos_token_id).nonzero().squeeze(1).tolist()
    if len(ends) != len(questions) or enc.truncated:
        raise RuntimeError(f"{sample.id}: {len(ends)} answer ends for {len(questions)} questions")
    turn = torch.full_like(ids, -1)
    for i, (q, end) in enumerate(zip(questions, ends, strict=True)):
        n = len(tok(" " + q.answer, add_special_tokens=False)["input_ids"]) + 1  # + </s>
        turn[end - n + 1 : end + 1] = i
    return enc, turn


def sample_stream(
    processor: Any,
    seed: int,
    steps: int,
    batch_size: int,
    curriculum: Sequence[Stage] = CURRICULUM,
    questions: int = 1,
    split: str = TRAIN_SPLIT,
) -> Iterator[tuple[shapes.ShapesSample, list[shapes.Question], Sample, torch.Tensor]]:
    """Encoded training conversations for `steps` batches, stage by stage. Picture i of the
    run is always sample i of the split (under its stage's config): deterministic in the
    seed."""
    encoder = SampleEncoder(processor, CTX_LEN, [_image_token_id(processor)])
    bounds = [round(st.start * steps) for st in curriculum[1:]] + [steps]
    first = 0
    for stage, end in zip(curriculum, bounds, strict=True):
        n = (end - first) * batch_size
        config = stage_config(stage)
        for s in shapes.iter_samples(n, seed, split, config, start=first * batch_size):
            qs = conversation(s, config, questions, seed)
            enc, turn = encode_conversation(encoder, s, qs)
            yield s, qs, enc, turn
        first = end


def collate_conversations(
    items: Sequence[tuple[shapes.ShapesSample, list[shapes.Question], Sample, torch.Tensor]],
    pad_id: int,
    patch_labels: bool = False,
    tokenizer: Any = None,
    match_labels: bool = False,
    relation_labels: bool = False,
) -> ToyBatch:
    """Right-padded batch of encoded conversations (with the pictures' per-patch auxiliary
    labels if `patch_labels`, and the question words' labels if a `tokenizer` is given)."""
    batch = collate([enc for _, _, enc, _ in items], pad_id)
    longest = batch.inputs["input_ids"].shape[1]
    turn = torch.full((len(items), longest), -1, dtype=torch.long)
    for b, (_, _, _, t) in enumerate(items):
        turn[b, : len(t)] = t
    patches = None
    if patch_labels:
        patches = aux.collate_labels([aux.patch_labels(s.objects, WORLD) for s, _, _, _ in items])
    word_at, words = None, None
    if tokenizer is not None:
        at, labels = [], []
        for b, (s, qs, enc, t) in enumerate(items):
            pos, lab = aux.question_word_labels(
                enc.tensors["input_ids"][0], t, qs, s.objects, tokenizer, WORLD
            )
            # A word before the image (question-first turns) cannot see it: no target there.
            ids = enc.tensors["input_ids"][0]
            image = int((ids == tokenizer.convert_tokens_to_ids("<image>")).nonzero()[-1])
            keep = np.array([p > image for p in pos], bool)
            at += [(b, p) for p, k in zip(pos, keep, strict=True) if k]
            labels.append({k: v[keep] for k, v in lab.items()})
        word_at = torch.tensor(at, dtype=torch.long).reshape(-1, 2)
        words = {k: torch.from_numpy(np.concatenate([x[k] for x in labels])) for k in labels[0]}
    match = None
    if match_labels:
        match = torch.from_numpy(
            np.stack([aux.match_labels(qs[0], s.objects, WORLD) for s, qs, _, _ in items])
        )
    relation, centres, relation_word = None, None, None
    if relation_labels:
        relation_word = torch.tensor(
            [aux.relation_word_label(qs[0]) for _, qs, _, _ in items], dtype=torch.long
        )
        relation = torch.from_numpy(
            np.stack([aux.relation_labels(qs[0], s.objects) for s, qs, _, _ in items])
        )
        centres = torch.from_numpy(
            np.stack([aux.relation_centres(qs[0], s.objects, WORLD) for s, qs, _, _ in items])
        )
    types = [[q.type for q in qs] for _, qs, _, _ in items]
    return ToyBatch(
        batch.inputs, turn, types, patches, word_at, words, match, relation, centres, relation_word
    )


def _image_token_id(processor: Any) -> int:
    return int(processor.tokenizer.convert_tokens_to_ids("<image>"))


class TrainBatches(torch.utils.data.IterableDataset):  # type: ignore[type-arg]
    """The run's `steps` collated batches; an iterable dataset so a DataLoader worker can
    build the next batches while the model trains."""

    def __init__(
        self,
        processor: Any,
        seed: int,
        steps: int,
        batch_size: int,
        curriculum: Sequence[Stage] = CURRICULUM,
        questions: int = 1,
        patch_labels: bool = False,
        word_labels: bool = False,
        match_labels: bool = False,
        relation_labels: bool = False,
    ) -> None:
        self.processor, self.seed, self.steps = processor, seed, steps
        self.batch_size, self.curriculum = batch_size, tuple(curriculum)
        self.questions, self.patch_labels = questions, patch_labels
        self.word_labels, self.match_labels = word_labels, match_labels
        self.relation_labels = relation_labels

    def __iter__(self) -> Iterator[ToyBatch]:
        stream = sample_stream(
            self.processor,
            self.seed,
            self.steps,
            self.batch_size,
            self.curriculum,
            self.questions,
        )
        pad_id = self.processor.tokenizer.pad_token_id
        for _ in range(self.steps):
            items = [next(stream) for _ in range(self.batch_size)]
            tok = self.processor.tokenizer if self.word_labels else None
            yield collate_conversations(
                items, pad_id, self.patch_labels, tok, self.match_labels, self.relation_labels
            )


def _one_thread(_worker_id: int) -> None:
    torch.set_num_threads(1)


def train_batches(data: TrainBatches, workers: int) -> Iterator[ToyBatch]:
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


# --------------------------------------------------------------------------------------------
# Training


def answer_loss(model: nn.Module, batch: ToyBatch) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Cross-entropy on the answer tokens of every turn (mean over tokens), and per question
    whether every one of its answer tokens is the argmax (teacher-forced), with its type.

    The unembedding runs on the answer positions only: most positions are image and question
    tokens, whose logits the loss never reads."""
    out = model.model(**batch.inputs, use_cache=False)
    return answer_loss_at(out.last_hidden_state, model.lm_head, batch)


def answer_loss_at(
    hidden: torch.Tensor, lm_head: nn.Module, batch: ToyBatch
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """`answer_loss` from the decoder's last hidden states ``[batch, seq, dim]``."""
    turn = batch.turn[:, 1:]
    where = turn >= 0
    logits = lm_head(hidden[:, :-1][where]).float()
    target = batch.inputs["input_ids"][:, 1:][where]
    loss = nn.functional.cross_entropy(logits, target)
    # Question id of each answer token: row * max_turns + turn.
    n_turns = max(len(t) for t in batch.types)
    rows = torch.arange(turn.shape[0])[:, None].expand_as(turn)[where]
    qid = rows * n_turns + turn[where]
    wrong = torch.zeros(turn.shape[0] * n_turns, dtype=torch.long)
    wrong.index_add_(0, qid, (logits.argmax(-1) != target).long())
    asked = [b * n_turns + i for b, ts in enumerate(batch.types) for i in range(len(ts))]
    types = [t for ts in batch.types for t in ts]
    return loss, wrong[asked] == 0, types


def _match_loss(
    head: nn.Module, hidden: torch.Tensor, batch: ToyBatch, image_id: int
) -> tuple[torch.Tensor, float]:
    """Cross-entropy of `aux.match_labels` read by `head` from the decoder's hidden states at
    the image tokens, and the accuracy on the patches of asked-about objects."""
    assert batch.match is not None
    where = batch.inputs["input_ids"] == image_id
    h = hidden[where].reshape(*batch.match.shape, -1)
    logits = head(h.float()).flatten(0, 1)
    y = batch.match.flatten()
    on = y > 0
    acc = float((logits.detach().argmax(-1) == y)[on].float().mean()) if on.any() else 1.0
    return nn.functional.cross_entropy(logits, y), acc


def _running(averages: dict[str, float], key: str, value: float, keep: float = 0.9) -> None:
    """Update the running average `averages[key]` (it starts at the first value)."""
    averages[key] = keep * averages.get(key, value) + (1 - keep) * value


def answer_positions(turn: torch.Tensor) -> torch.Tensor:
    """[batch] the last prompt position of each row's first turn (the token whose output
    predicts the first answer token, where generation starts), from `ToyBatch.turn`."""
    first = (turn == 0).long().argmax(1)
    if bool((first == 0).any()):
        raise ValueError("a row has no answer token of its first turn")
    return first - 1


def _relation_loss(
    head: nn.Module, hidden: torch.Tensor, batch: ToyBatch, centres: bool, word: bool
) -> tuple[torch.Tensor, float, float | None] | None:
    """Cross-entropy of `aux.relation_labels` read by `head` from the decoder's hidden states
    at each row's answer position, its accuracy, and the relation word's accuracy (None
    unless `word`); the head's outputs are the signs' logits, then the centres' if `centres`,
    then the `aux.relation_word_label` logits if `word`. None when no row is labelled (no
    relation question in the batch)."""
    assert batch.relation is not None
    y = batch.relation
    if not bool((y != aux.IGNORE).any()):
        return None
    rows = torch.arange(hidden.shape[0])
    h = hidden[rows, answer_positions(batch.turn)]
    out = head(h.float())
    n_sign = 2 * y.shape[1]
    logits = out[:, :n_sign].reshape(-1, 2)
    y = y.reshape(-1)
    on = y != aux.IGNORE
    acc = float((logits.detach().argmax(-1) == y)[on].float().mean())
    loss = nn.functional.cross_entropy(logits, y, ignore_index=aux.IGNORE)
    n_centres = 0
    if centres:  # `ToyTrainConfig.relation_centres`
        assert batch.centres is not None
        n_centres = batch.centres.shape[1]
        known = batch.centres.isfinite()
        got = out[:, n_sign : n_sign + n_centres]
        loss = loss + nn.functional.mse_loss(got[known], batch.centres[known])
    word_acc = None
    if word:  # `ToyTrainConfig.relation_word`
        assert batch.relation_word is not None
        word_logits, w = out[:, n_sign + n_centres :], batch.relation_word
        asked = w != aux.IGNORE
        loss = loss + nn.functional.cross_entropy(word_logits, w, ignore_index=aux.IGNORE)
        word_acc = float((word_logits.detach().argmax(-1) == w)[asked].float().mean())
    return loss, acc, word_acc


def _lr_at(step: int, cfg: ToyTrainConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


def cpu_seconds(who: int = resource.RUSAGE_SELF) -> float:
    """User + system CPU seconds of this process (or of its reaped children)."""
    use = resource.getrusage(who)
    return use.ru_utime + use.ru_stime


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
    the run short; `log_file` receives a JSON line of running metrics every 25 steps."""
    cfg = replace(config or ToyTrainConfig())
    for k, v in dict(steps=steps, minutes=minutes, batch_size=batch_size, lr=lr, seed=seed,
                     eval_n=eval_n).items():  # fmt: skip
        if v is not None:
            setattr(cfg, k, v)
    weighted_curriculum(cfg.curriculum, cfg.type_repeats)  # checks the weights before building
    if cfg.workers not in (0, 1):
        raise ValueError(f"workers must be 0 or 1, got {cfg.workers}")
    if cfg.match_weight > 0 and not cfg.question_first:
        raise ValueError(
            "match_weight needs question_first (the image tokens must see the question)"
        )
    if cfg.word_weight > 0 and cfg.question_first and cfg.questions < 2:
        raise ValueError(
            "word_weight needs question words after the image, and with question_first the "
            f"only question (questions={cfg.questions}) comes before it: ask questions >= 2 "
            "(the later turns follow the image) or set question_first=False"
        )
    n_layers = (TEXT | cfg.decoder)["num_hidden_layers"]
    for name in ("word", "match", "relation"):
        layer = getattr(cfg, f"{name}_layer")
        if getattr(cfg, f"{name}_weight") > 0 and not 1 <= layer <= n_layers:
            raise ValueError(f"{name}_layer must be in 1..{n_layers}, got {layer}")
    start, cpu0, child0 = time.perf_counter(), cpu_seconds(), cpu_seconds(resource.RUSAGE_CHILDREN)
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        model, processor = build_toy(cfg.seed, cfg.question_first, cfg.decoder)
        metrics = _train(model, processor, cfg, cpu0, progress, log_file)
    finally:
        torch.set_num_threads(threads)
    cpu = cpu_seconds() - cpu0
    worker = cpu_seconds(resource.RUSAGE_CHILDREN) - child0
    metrics |= {
        "world_version": WORLD_VERSION,
        "train_wall_seconds": round(time.perf_counter() - start, 1),
        "train_cpu_seconds": round(cpu, 1),
        "data_worker_cpu_seconds": round(worker, 1),
        # One compute thread and one worker, each on its own idle core: the larger of the two.
        "estimated_idle_2core_seconds": round(max(cpu, worker) if cfg.workers else cpu, 1),
    }
    model.eval()
    out = save_toy(model, processor, out_dir, metrics)
    if cfg.eval_n > 0:
        details: dict[str, Any] = {}
        metrics["heldout_accuracy"] = evaluate_toy(
            out, n_per_type=cfg.eval_n, progress=progress, details=details
        )
        metrics["heldout_by_objects"] = accuracy_by_objects(details)
        metrics["heldout"] = {"split": EVAL_SPLIT, "seed": EVAL_SEED, "n_per_type": cfg.eval_n}
        (out / "training.json").write_text(json.dumps(metrics, indent=2) + "\n")
    metrics["total_seconds"] = round(time.perf_counter() - start, 1)
    return metrics


def _train(
    model: nn.Module,
    processor: Any,
    cfg: ToyTrainConfig,
    cpu0: float,
    progress: bool,
    log_file: str | os.PathLike[str] | None,
) -> dict[str, Any]:
    """The optimisation loop of `train_toy`; returns its metrics."""
    from tqdm.auto import tqdm

    model.train()
    head = None
    named = list(model.named_parameters())
    if cfg.aux_weight > 0:
        head = aux.PatchHead(model.config.text_config.hidden_size, WORLD)
        named += [(f"aux.{n}", p) for n, p in head.named_parameters()]
    word_head = None
    if cfg.word_weight > 0:
        word_head = aux.PatchHead(model.config.text_config.hidden_size, WORLD)
        named += [(f"word.{n}", p) for n, p in word_head.named_parameters()]
    match_head = None
    if cfg.match_weight > 0:
        match_head = nn.Linear(model.config.text_config.hidden_size, aux.MATCH_CLASSES)
        named += [(f"match.{n}", p) for n, p in match_head.named_parameters()]
    relation_head = None
    if cfg.relation_weight > 0:
        n_axes = len(aux.RELATION_AXES)
        n_out = 2 * n_axes + (2 * n_axes if cfg.relation_centres else 0)
        n_out += len(shapes.RELATIONS) if cfg.relation_word else 0
        relation_head = nn.Linear(model.config.text_config.hidden_size, n_out)
        named += [(f"relation.{n}", p) for n, p in relation_head.named_parameters()]
    decay = [p for n, p in named if p.dim() >= 2 and "embed" not in n]
    no_decay = [p for n, p in named if not (p.dim() >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay}],
        lr=cfg.lr,
        betas=(0.9, 0.98),
        weight_decay=0.0,
    )
    params = [p for _, p in named]
    data = TrainBatches(
        processor,
        cfg.seed,
        cfg.steps,
        cfg.batch_size,
        weighted_curriculum(cfg.curriculum, cfg.type_repeats),
        cfg.questions,
        patch_labels=head is not None,
        word_labels=word_head is not None,
        match_labels=match_head is not None,
        relation_labels=relation_head is not None,
    )
    stream = train_batches(data, cfg.workers)
    ema_loss, ema_acc = float("nan"), 0.0
    history: list[dict[str, float]] = []
    by_type: dict[str, float] = {}
    done = 0
    with (
        tqdm(total=cfg.steps, desc="train-toy", disable=not progress, dynamic_ncols=True) as bar,
        open(log_file or os.devnull, "a") as log,
        # Removed however the loop ends, so a caller's model keeps no hook.
        aux.ProjectorTap(model) if head is not None else contextlib.nullcontext() as tap,
        aux.LayerTap(model.model.language_model.layers[cfg.word_layer - 1])
        if word_head is not None
        else contextlib.nullcontext() as word_tap,
        aux.LayerTap(model.model.language_model.layers[cfg.match_layer - 1])
        if match_head is not None
        else contextlib.nullcontext() as match_tap,
        aux.LayerTap(model.model.language_model.layers[cfg.relation_layer - 1])
        if relation_head is not None
        else contextlib.nullcontext() as relation_tap,
    ):
        for step in range(cfg.steps):
            if cpu_seconds() - cpu0 > cfg.minutes * 60:
                break
            for group in opt.param_groups:
                group["lr"] = _lr_at(step, cfg)
            batch = next(stream)
            if tap is not None:
                tap.output = None  # never the previous step's pictures
            if word_tap is not None:
                word_tap.output = None
            if match_tap is not None:
                match_tap.output = None
            if relation_tap is not None:
                relation_tap.output = None
            loss, correct, qtypes = answer_loss(model, batch)
            lv = loss.item()
            if head is not None and tap is not None and tap.output is not None:
                assert batch.patches is not None
                aux_loss, aux_scores = head.loss(tap.output, batch.patches)
                loss = loss + cfg.aux_weight * aux_loss
                for t, a in aux_scores.items():
                    _running(by_type, f"aux_{t}", a)
            if word_head is not None and word_tap is not None and word_tap.output is not None:
                assert batch.word_at is not None and batch.words is not None
                if len(batch.word_at):
                    h = word_tap.output[batch.word_at[:, 0], batch.word_at[:, 1]][None]
                    labels = {k: v[None] for k, v in batch.words.items()}
                    word_loss, word_scores = word_head.loss(h, labels)
                    loss = loss + cfg.word_weight * word_loss
                    for t, a in word_scores.items():
                        _running(by_type, f"word_{t}", a)
            if match_head is not None and match_tap is not None and match_tap.output is not None:
                assert batch.match is not None
                match_loss, match_acc = _match_loss(
                    match_head, match_tap.output, batch, _image_token_id(processor)
                )
                loss = loss + cfg.match_weight * match_loss
                _running(by_type, "match", match_acc)
            got = None
            if (
                relation_head is not None
                and relation_tap is not None
                and relation_tap.output is not None
            ):
                got = _relation_loss(
                    relation_head, relation_tap.output, batch, cfg.relation_centres,
                    cfg.relation_word,
                )  # fmt: skip
            if got is not None:  # None also when the batch asks no relation question
                rel_loss, rel_acc, word_acc = got
                loss = loss + cfg.relation_weight * rel_loss
                _running(by_type, "relation_aux", rel_acc)
                if word_acc is not None:
                    _running(by_type, "relation_word", word_acc)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()
            done = step + 1
            acc = float(correct.float().mean())
            ema_loss = lv if step == 0 else 0.95 * ema_loss + 0.05 * lv
            ema_acc = acc if step == 0 else 0.95 * ema_acc + 0.05 * acc
            for t, c in zip(qtypes, correct.tolist(), strict=True):
                _running(by_type, t, c, keep=0.99)
            if step % 25 == 0 or done == cfg.steps:
                history.append(
                    {"step": step, "loss": round(ema_loss, 4), "acc": round(ema_acc, 4),
                     "cpu_s": round(cpu_seconds() - cpu0, 1),
                     **{t: round(a, 3) for t, a in sorted(by_type.items())}}
                )  # fmt: skip
                log.write(json.dumps(history[-1]) + "\n")
                log.flush()
            bar.set_postfix(loss=f"{ema_loss:.3f}", acc=f"{ema_acc:.3f}", refresh=False)
            bar.update(1)
    del stream  # joins the data worker, so its CPU time is counted as a child's
    if done < cfg.steps:
        print(
            f"train-toy: CPU-time cap of {cfg.minutes} min reached after {done}/{cfg.steps} "
            "steps; the model is saved but under-trained (the schedule assumed all steps)",
            file=sys.stderr,
        )
    return {
        "config": asdict(cfg),
        "parameters": sum(p.numel() for p in model.parameters()),
        "steps_done": done,
        "stopped_by_time_cap": done < cfg.steps,
        "pictures_seen": done * cfg.batch_size,
        "train_loss_ema": round(ema_loss, 4),
        "train_acc_ema": round(ema_acc, 4),
        "torch_threads": cfg.threads,
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

PHRASING_SETS: tuple[str, ...] = ("train", "heldout")


def world_version(path: str | os.PathLike[str]) -> int:
    """The shapes-world version a toy folder was trained on (``training.json``); 1 when the
    file does not say (the first shipped toy predates the field)."""
    info = Path(path) / "training.json"
    if not info.is_file():
        return 1
    try:
        return int(json.loads(info.read_text()).get("world_version", 1))
    except (ValueError, TypeError, AttributeError) as e:
        raise ValueError(f"{info}: unreadable training metrics ({e})") from e


def heldout_samples(
    n_per_type: int,
    seed: int = EVAL_SEED,
    question_types: Sequence[str] | None = None,
    phrasings: str = "train",
    version: int = shapes.DEFAULT_VERSION,
) -> list[shapes.ShapesSample]:
    """`n_per_type` held-out samples of each question type (all the world's by default) of
    world `version` (scenes disjoint from training: another split name and seed), worded with
    the `phrasings` set."""
    config = shapes.ShapesConfig(
        version=version,
        question_types=tuple(question_types) if question_types else None,
        phrasings=phrasings,
    )
    return shapes.generate(n_per_type * len(config.types), seed, EVAL_SPLIT, config)


def generate_answers(
    vlm: Any, samples: Sequence[shapes.ShapesSample], batch_size: int = 64
) -> list[str]:
    """Greedy answers to the samples' questions, prompted the way users prompt
    (`HookedVLM.prepare`: the model's chat template, which places the question and the image as
    the toy was trained, then the generation prompt)."""
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
    phrasings: Sequence[str] | None = None,
    batch_size: int = 64,
    progress: bool = False,
    details: dict[str, Any] | None = None,
) -> dict[str, dict[str, float]]:
    """Held-out answer accuracy, phrasing set -> question type -> accuracy: greedy generation,
    exact match of the answer words, on held-out scenes of the world the model was trained on
    (`world_version`), asked in the training phrasings and (v2) in the held-out ones. `path`
    defaults to the shipped toy; pass a dict as `details` to receive per-sample results
    (question, answer, prediction, number of objects)."""
    from tqdm.auto import tqdm

    from vlmscope.models.hooked import HookedVLM
    from vlmscope.models.toy import toy_path

    path = path if path is not None else toy_path()
    version = world_version(path)
    if phrasings is None:
        phrasings = PHRASING_SETS if version >= 2 else ("train",)
    vlm = HookedVLM.from_pretrained(path, device="cpu")
    runs = [(p, heldout_samples(n_per_type, seed, phrasings=p, version=version)) for p in phrasings]
    result: dict[str, dict[str, float]] = {}
    rows: list[dict[str, Any]] = []
    with tqdm(total=sum(len(s) for _, s in runs), desc="eval-toy", disable=not progress) as bar:
        for which, samples in runs:
            preds: list[str] = []
            for i in range(0, len(samples), batch_size):
                chunk = samples[i : i + batch_size]
                preds += generate_answers(vlm, chunk, batch_size)
                bar.update(len(chunk))
            hits: dict[str, list[bool]] = {}
            for s, p in zip(samples, preds, strict=True):
                hits.setdefault(s.question_type, []).append(p == s.answer)
                rows.append(
                    {"id": s.id, "phrasings": which, "type": s.question_type,
                     "question": s.question, "answer": s.answer, "prediction": p,
                     "n_objects": len(s.objects)}
                )  # fmt: skip
            order = [t for t in (*shapes.V1_QUESTION_TYPES, *shapes.QUESTION_TYPES) if t in hits]
            result[which] = {t: round(sum(hits[t]) / len(hits[t]), 4) for t in order}
    if details is not None:
        details["samples"] = rows
    return result


def accuracy_by_objects(details: dict[str, Any]) -> dict[str, dict[str, list[float]]]:
    """Phrasing set -> question type -> [accuracy, count] per group of scenes: 1-3 objects
    and 4-5 objects (from `evaluate_toy`'s details)."""
    out: dict[str, dict[str, list[float]]] = {}
    for r in details["samples"]:
        group = "4-5" if r["n_objects"] >= 4 else "1-3"
        cell = out.setdefault(f"{r['phrasings']}:{group}", {}).setdefault(r["type"], [0.0, 0])
        cell[0] += r["prediction"] == r["answer"]
        cell[1] += 1
    return {k: {t: [round(h / n, 4), int(n)] for t, (h, n) in v.items()} for k, v in out.items()}


def format_accuracy(acc: dict[str, dict[str, float]], by_objects: dict[str, Any] | None) -> str:
    """A short table: question type, accuracy with training and held-out phrasings, and on
    4-5-object scenes with held-out phrasings."""
    sets = list(acc)
    head = f"{'question type':<14}" + "".join(f" {s + ' phr.':>14}" for s in sets)
    four = by_objects.get("heldout:4-5") if by_objects else None
    if four:
        head += f" {'heldout, 4-5 obj':>17}"
    lines = [head, "-" * len(head)]
    for t in acc[sets[0]]:
        if not all(t in acc[s] for s in sets):
            continue
        row = f"{t:<14}" + "".join(f" {acc[s][t]:>14.1%}" for s in sets)
        if four and t in four:
            row += f" {four[t][0]:>10.1%} (n={four[t][1]})"
        lines.append(row)
    means = "".join(f" {sum(acc[s].values()) / len(acc[s]):>14.1%}" for s in sets)
    lines += ["-" * len(head), f"{'mean':<14}" + means]
    return "\n".join(lines)


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
    p.add_argument(
        "--minutes",
        type=float,
        default=d.minutes,
        help=f"cap on the training's CPU time in minutes (default {d.minutes:g}); with one "
        "compute thread that is its wall time on an idle core",
    )
    p.add_argument("--steps", type=int, default=d.steps, help=f"optimizer steps ({d.steps})")
    p.add_argument(
        "--batch-size", type=int, default=d.batch_size, help=f"pictures per step ({d.batch_size})"
    )
    p.add_argument(
        "--questions",
        type=int,
        default=d.questions,
        help=f"questions per picture ({d.questions}); only the first is asked question first "
        "and gets the match loss, the others follow as later chat turns",
    )
    p.add_argument("--lr", type=float, default=d.lr, help=f"peak learning rate ({d.lr:g})")
    p.add_argument("--seed", type=int, default=d.seed, help="init and training-data seed")
    p.add_argument(
        "--aux-weight",
        type=float,
        default=d.aux_weight,
        help="weight of the per-patch auxiliary loss on the projector outputs (shape, colour, "
        f"counts, place of each patch's object; training only, 0: off; default {d.aux_weight:g})",
    )
    p.add_argument(
        "--question-first",
        action=argparse.BooleanOptionalAction,
        default=d.question_first,
        help="chat template with the question before the image in the user turn, so image "
        f"tokens can attend to it (default {d.question_first})",
    )
    p.add_argument(
        "--word-weight",
        type=float,
        default=d.word_weight,
        help="weight of the auxiliary loss at the question words that name an object (that "
        "object's shape, colour, counts, place, read from the decoder after --word-layer; "
        "only words after the image count, so with --question-first it needs --questions 2 or "
        f"more; training only, 0: off; default {d.word_weight:g})",
    )
    p.add_argument(
        "--word-layer",
        type=int,
        default=d.word_layer,
        help=f"decoder layer (1-based) the word loss reads (default {d.word_layer})",
    )
    p.add_argument(
        "--match-weight",
        type=float,
        default=d.match_weight,
        help="weight of the per-patch loss at the image tokens on which patches belong to the "
        "objects the first question names (read from the decoder after --match-layer; needs "
        f"--question-first; training only, 0: off; default {d.match_weight:g})",
    )
    p.add_argument(
        "--match-layer",
        type=int,
        default=d.match_layer,
        help=f"decoder layer (1-based) the match loss reads (default {d.match_layer})",
    )
    p.add_argument(
        "--relation-weight",
        type=float,
        default=d.relation_weight,
        help="weight of the loss at the answer position of relation questions: whether the "
        "first named object lies before or after the second along rows and along columns "
        "(read from the decoder after --relation-layer at the last prompt token; training "
        f"only, 0: off; default {d.relation_weight:g})",
    )
    p.add_argument(
        "--relation-centres",
        action=argparse.BooleanOptionalAction,
        default=d.relation_centres,
        help="with --relation-weight, the relation head also regresses both named objects' "
        f"centres (default {d.relation_centres})",
    )
    p.add_argument(
        "--relation-word",
        action=argparse.BooleanOptionalAction,
        default=d.relation_word,
        help="with --relation-weight, the relation head also classifies which relation word "
        "was asked (left of / right of / above / below), so the word reaches the answer "
        "position before the last layer has to combine it with the places' sign (training "
        f"only; default {d.relation_word})",
    )
    p.add_argument(
        "--relation-layer",
        type=int,
        default=d.relation_layer,
        help=f"decoder layer (1-based) the relation loss reads (default {d.relation_layer})",
    )
    p.add_argument(
        "--type-repeat",
        action="append",
        default=[],
        metavar="TYPE=N",
        help="draw question type TYPE N times as often as the others, in every curriculum "
        "stage that asks it (repeatable; given flags replace the default, TYPE=1 for balanced; "
        "default: " + (" ".join(f"{t}={n}" for t, n in d.type_repeats.items()) or "balanced") + ")",
    )
    p.add_argument(
        "--eval-n",
        type=int,
        default=d.eval_n,
        help="held-out questions per type and phrasing set after training (0: none)",
    )
    p.add_argument("--workers", type=int, default=d.workers, help="data worker processes (0 or 1)")
    p.add_argument("--threads", type=int, default=d.threads, help="compute threads (1)")
    p.add_argument("--log", default=None, help="append JSON lines of training metrics here")
    return p


def add_eval_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Flags of `vlmscope zoo eval-toy`."""
    p.add_argument("--model", default=None, help="model folder (default: the shipped toy)")
    p.add_argument(
        "--n",
        type=int,
        default=200,
        help="held-out questions per type and phrasing set (default: 200)",
    )
    p.add_argument(
        "--seed", type=int, default=EVAL_SEED, help=f"held-out split seed (default: {EVAL_SEED})"
    )
    p.add_argument("--json", default=None, help="also write the accuracies to this JSON file")
    return p


def parse_type_repeats(items: Sequence[str]) -> dict[str, int]:
    """``["relation=2", ...]`` (the ``--type-repeat`` flags) -> ``{"relation": 2, ...}``."""
    out: dict[str, int] = {}
    for item in items:
        qtype, sep, n = item.partition("=")
        if not sep or not n.strip().isdigit():
            raise ValueError(f"--type-repeat {item!r}: expected TYPE=N with N a whole number")
        out[qtype.strip()] = int(n)
    return out


def run_train(args: argparse.Namespace) -> int:
    """`vlmscope zoo train-toy`: train, save, print the held-out accuracy table."""
    cfg = ToyTrainConfig(
        steps=args.steps,
        minutes=args.minutes,
        batch_size=args.batch_size,
        questions=args.questions,
        lr=args.lr,
        seed=args.seed,
        aux_weight=args.aux_weight,
        question_first=args.question_first,
        word_weight=args.word_weight,
        word_layer=args.word_layer,
        match_weight=args.match_weight,
        match_layer=args.match_layer,
        relation_weight=args.relation_weight,
        relation_layer=args.relation_layer,
        relation_centres=args.relation_centres,
        relation_word=args.relation_word,
        type_repeats=(  # no flag: the recipe's default
            parse_type_repeats(args.type_repeat)
            if args.type_repeat
            else ToyTrainConfig().type_repeats
        ),
        workers=args.workers,
        threads=args.threads,
        eval_n=args.eval_n,
    )
    m = train_toy(args.out, config=cfg, log_file=args.log)
    print(
        f"saved toy model ({m['parameters']:,} parameters) to {args.out}: {m['steps_done']} "
        f"steps, {m['train_cpu_seconds']:.0f} s CPU (data worker {m['data_worker_cpu_seconds']:.0f}"
        f" s; estimated {m['estimated_idle_2core_seconds']:.0f} s on an idle 2-core machine), "
        f"{m['train_wall_seconds']:.0f} s wall here, {m['total_seconds']:.0f} s with evaluation"
    )
    if "heldout_accuracy" in m:
        print(format_accuracy(m["heldout_accuracy"], m.get("heldout_by_objects")))
    return 0


def run_eval(args: argparse.Namespace) -> int:
    """`vlmscope zoo eval-toy`: per-question-type held-out accuracy table (and JSON)."""
    details: dict[str, Any] = {}
    acc = evaluate_toy(args.model, n_per_type=args.n, seed=args.seed, progress=True,
                       details=details)  # fmt: skip
    by_objects = accuracy_by_objects(details)
    print(format_accuracy(acc, by_objects))
    if args.json:
        result = {"accuracy": acc, "by_objects": by_objects, "n_per_type": args.n,
                  "seed": args.seed, "split": EVAL_SPLIT}  # fmt: skip
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
