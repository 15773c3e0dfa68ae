"""The shipped toy VLM: loads like a hub model, answers held-out questions, and is trainable."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import vlmscope.models.toy as toy
from vlmscope.data import shapes
from vlmscope.data.processing import SampleEncoder
from vlmscope.data.shapes import QUESTION_TYPES, V1_QUESTION_TYPES, generate
from vlmscope.models.hooked import HookedVLM
from vlmscope.models.toy import ToyModelMissingError, toy_path
from vlmscope.models.toy.train import (
    CTX_LEN,
    TrainBatches,
    answer_loss,
    build_toy,
    generate_answers,
    heldout_samples,
    sample_stream,
    train_toy,
    world_version,
)


@pytest.fixture(scope="module")
def vlm() -> HookedVLM:
    return HookedVLM.from_pretrained(toy_path(), device="cpu")


@pytest.mark.parametrize("qtype", QUESTION_TYPES)
def test_shipped_toy_answers_heldout_questions_in_heldout_phrasings(
    vlm: HookedVLM, qtype: str
) -> None:
    """Scenes of another split and seed, worded in phrasings training never used, up to five
    objects: the shipped toy answers every question type (README: 98.7-100% over 1,000 each;
    the bound here leaves room for 40 questions)."""
    samples = heldout_samples(40, question_types=(qtype,), phrasings="heldout")
    assert {s.heldout_phrasing for s in samples} == {True}
    preds = generate_answers(vlm, samples)
    wrong = [
        (s.question, s.answer, p) for s, p in zip(samples, preds, strict=True) if p != s.answer
    ]
    assert len(wrong) <= 2, f"{len(wrong)}/40 wrong, e.g. {wrong[:5]}"


def test_prepare_builds_the_training_prompt(vlm: HookedVLM) -> None:
    """What a user types (`prepare(question, images=[img])`) is token for token the prompt the
    model was trained on, minus the answer."""
    s = generate(1, seed=5, split="check")[0]
    enc = SampleEncoder(vlm.processor, CTX_LEN, vlm.adapter.image_token_ids())
    from vlmscope.data.sources import Record

    sample = enc.encode(Record(row_id=s.id, messages=s.messages(), images=[s.image]))
    ids = sample.tensors["input_ids"][0]
    prompt = vlm.prepare(s.question, images=[s.image])
    assert sample.n_answer == len(s.answer.split()) + 1  # answer words + </s>
    torch.testing.assert_close(prompt["input_ids"][0], ids[: -sample.n_answer])
    torch.testing.assert_close(prompt["pixel_values"], sample.tensors["pixel_values"])


def test_batched_generation_matches_one_at_a_time(vlm: HookedVLM) -> None:
    samples = heldout_samples(2)[:6]  # mixed question types -> prompts of different lengths
    assert generate_answers(vlm, samples) == [generate_answers(vlm, [s])[0] for s in samples]


def test_toy_path_says_how_to_train(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(toy, "TOY_DIR", tmp_path / "nothing")
    with pytest.raises(ToyModelMissingError, match="vlmscope zoo train-toy"):
        toy.toy_path()


def test_shipped_toy_names_its_world(tmp_path: Path) -> None:
    """The shipped toy is trained on v2, the default world, and is evaluated on it; a folder
    without the field (the first toy's) is v1."""
    assert world_version(toy_path()) == 2 == shapes.DEFAULT_VERSION
    assert {s.question_type for s in heldout_samples(1)} == set(QUESTION_TYPES)
    (tmp_path / "training.json").write_text("{}")
    assert world_version(tmp_path) == 1
    assert {s.question_type for s in heldout_samples(1, version=1)} == set(V1_QUESTION_TYPES)


def test_training_conversations_mark_every_answer() -> None:
    """A training picture can carry several questions (``--questions 4``); the loss mask covers
    exactly each turn's answer words and its </s>, and the first turn is token for token the
    single-question sample (the prompt users type, see test_prepare_builds_the_training_prompt)."""
    from vlmscope.data.sources import Record

    _, processor = build_toy(seed=0)
    tok = processor.tokenizer
    encoder = SampleEncoder(processor, CTX_LEN, [tok.convert_tokens_to_ids("<image>")])
    for sample, questions, enc, turn in list(sample_stream(processor, 0, 1, 6, questions=4)):
        ids = enc.tensors["input_ids"][0]
        assert len(questions) == 4 and sample.question == questions[0].text
        for i, q in enumerate(questions):
            assert tok.decode(ids[turn == i]) == f" {q.answer}</s>"
        assert int((turn >= 0).sum()) == sum(len(q.answer.split()) + 1 for q in questions)
        single = encoder.encode(Record(sample.id, sample.messages(), [sample.image]))
        one = single.tensors["input_ids"][0]
        torch.testing.assert_close(ids[: len(one)], one)


def test_default_recipe_asks_one_question_first_per_picture() -> None:
    """The default recipe trains on one question per picture, written before the image (so the
    match loss, which supervises the first turn, covers every question): each row of a batch
    is the world's own question, then the image, then only its answer under the loss."""
    from vlmscope.models.toy.train import ToyTrainConfig

    cfg = ToyTrainConfig()
    assert (cfg.questions, cfg.batch_size, cfg.question_first) == (1, 13, True)
    assert cfg.match_weight > 0
    # relation run 3's options (benchmarks/README.md "Toy VLM training")
    relation = (cfg.relation_weight, cfg.relation_centres, cfg.relation_word, cfg.type_repeats)
    assert cfg.steps == 5400 and relation == (1.0, True, True, {"relation": 2})
    _, processor = build_toy(seed=0, question_first=cfg.question_first)
    tok = processor.tokenizer
    image_id = tok.convert_tokens_to_ids("<image>")
    items = list(sample_stream(processor, 0, 1, cfg.batch_size, questions=cfg.questions))
    assert len(items) == cfg.batch_size
    for sample, questions, enc, turn in items:
        assert [q.text for q in questions] == [sample.question]
        ids = enc.tensors["input_ids"][0]
        first_image = int((ids == image_id).nonzero()[0])
        assert sample.question in tok.decode(ids[:first_image])
        assert set(turn.tolist()) == {-1, 0}
        assert tok.decode(ids[turn == 0]) == f" {sample.answer}</s>"
    data = TrainBatches(processor, 0, 1, cfg.batch_size, questions=cfg.questions, match_labels=True)
    batch = next(iter(data))
    assert batch.types == [[s.question_type] for s, _, _, _ in items]
    assert batch.match is not None and batch.match.shape == (cfg.batch_size, 64)


def test_a_few_steps_lower_the_loss() -> None:
    model, processor = build_toy(seed=0)
    batch = next(iter(TrainBatches(processor, seed=0, steps=1, batch_size=8)))
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(6):
        loss, _, _ = answer_loss(model, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5, losses


def test_build_is_deterministic() -> None:
    a, _ = build_toy(seed=3)
    b, _ = build_toy(seed=3)
    for (n, p), q in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(p, q), n


def test_train_toy_saves_a_loadable_model(tmp_path: Path) -> None:
    out = tmp_path / "toy"
    metrics = train_toy(out, steps=2, batch_size=4, eval_n=1, progress=False)
    assert metrics["steps_done"] == 2 and world_version(out) == 2
    # evaluated on v2 questions, in the training and the held-out phrasings, every type
    acc = metrics["heldout_accuracy"]
    assert set(acc) == {"train", "heldout"}
    assert all(set(a) == set(QUESTION_TYPES) for a in acc.values())
    assert (out / "model.safetensors").is_file() and (out / "training.json").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folders
    loaded = HookedVLM.from_pretrained(out, device="cpu")
    assert loaded.adapter.family == "llava"


def test_question_first_template_puts_the_question_before_the_image(tmp_path: Path) -> None:
    """A question-first toy sees ``USER: question\\n<image x 64> ASSISTANT:``: for a user's
    prompt (`prepare`) and for the training conversation alike, and the LLaVA processor expands
    the one placeholder into the model's image tokens, which the model's forward accepts."""
    from vlmscope.data.shapes import ShapesConfig
    from vlmscope.data.sources import Record

    model, processor = build_toy(seed=0, question_first=True)
    model.eval().save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    vlm = HookedVLM.from_pretrained(tmp_path, device="cpu")
    tok = vlm.tokenizer
    image_id = tok.convert_tokens_to_ids("<image>")
    s = generate(1, seed=5, split="check", config=ShapesConfig(version=2))[0]
    prompt = vlm.prepare(s.question, images=[s.image])["input_ids"][0]
    where = (prompt == image_id).nonzero().squeeze(1)
    n_image = model.config.image_seq_length
    assert len(where) == n_image == 64
    assert torch.equal(where, torch.arange(int(where[0]), int(where[0]) + n_image))  # one block
    before = tok.decode(prompt[: int(where[0])], skip_special_tokens=True)
    assert before.strip() == f"USER: {s.question}"
    assert tok.decode(prompt[int(where[-1]) + 1 :]).strip() == "ASSISTANT:"
    # the training conversation's first turn is the same prompt, then its answer
    enc = SampleEncoder(vlm.processor, CTX_LEN, [image_id])
    ids = enc.encode(Record(s.id, s.messages(), [s.image])).tensors["input_ids"][0]
    torch.testing.assert_close(ids[: len(prompt)], prompt)
    assert tok.decode(ids[len(prompt) :]) == f" {s.answer}</s>"
    with torch.no_grad():  # the model places 64 image features on exactly these tokens
        out = vlm.model(**vlm.prepare(s.question, images=[s.image]))
    assert out.logits.shape[1] == len(prompt)


def tensor_names(folder: Path) -> set[str]:
    """The tensor names of a saved model's weights."""
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        return set(f.keys())


def test_training_heads_are_not_saved(tmp_path: Path) -> None:
    """With every training-only loss on (per-patch, question-word and match heads), the saved
    folder holds exactly a plain toy LLaVA's tensors, and the word and match losses did run."""
    from vlmscope.models.toy.train import ToyTrainConfig

    cfg = ToyTrainConfig(
        steps=2,
        batch_size=2,
        questions=4,  # the word loss reads the later turns, whose words follow the image
        eval_n=0,
        word_weight=1.0,
        match_weight=1.0,
        question_first=True,
    )
    metrics = train_toy(tmp_path / "toy", config=cfg, progress=False)
    assert any(k.startswith("word_") for k in metrics["history"][-1])
    assert "match" in metrics["history"][-1]
    plain = tmp_path / "plain"
    build_toy(seed=0, question_first=True)[0].save_pretrained(plain)
    assert tensor_names(tmp_path / "toy") == tensor_names(plain)


def test_match_loss_needs_the_question_first(tmp_path: Path) -> None:
    from vlmscope.models.toy.train import ToyTrainConfig

    cfg = ToyTrainConfig(steps=1, batch_size=1, eval_n=0, match_weight=1.0, question_first=False)
    with pytest.raises(ValueError, match="question_first"):
        train_toy(tmp_path / "toy", config=cfg, progress=False)


def test_word_loss_needs_a_question_after_the_image(tmp_path: Path) -> None:
    """Question first with one question per picture leaves no question word after the image,
    so the word loss would silently train nothing: refused before building."""
    from vlmscope.models.toy.train import ToyTrainConfig

    cfg = ToyTrainConfig(steps=1, batch_size=1, eval_n=0, questions=1, word_weight=1.0)
    with pytest.raises(ValueError, match="word_weight needs question words after the image"):
        train_toy(tmp_path / "toy", config=cfg, progress=False)


def test_relation_head_runs_and_is_not_saved(tmp_path: Path) -> None:
    """With the answer-position relation loss on (relation questions only, so every batch has
    labels), its centres and its relation-word target, the loss runs and the saved folder
    holds exactly a plain toy LLaVA's tensors (and no relation-head file or key)."""
    from vlmscope.models.toy.train import Stage, ToyTrainConfig

    cfg = ToyTrainConfig(
        steps=2,
        batch_size=3,
        eval_n=0,
        relation_weight=1.0,
        relation_centres=True,
        relation_word=True,
        curriculum=(Stage(0.0, 3, ("relation",)),),
    )
    metrics = train_toy(tmp_path / "toy", config=cfg, progress=False)
    assert 0.0 <= metrics["history"][-1]["relation_aux"] <= 1.0
    assert 0.0 <= metrics["history"][-1]["relation_word"] <= 1.0
    plain, processor = build_toy(seed=0, question_first=True)
    plain.save_pretrained(tmp_path / "plain")
    processor.save_pretrained(tmp_path / "plain")
    files = {p.name for p in (tmp_path / "toy").iterdir()}
    assert files == {p.name for p in (tmp_path / "plain").iterdir()} | {"training.json"}
    assert tensor_names(tmp_path / "toy") == tensor_names(tmp_path / "plain")


def test_a_training_head_on_a_missing_layer_is_refused(tmp_path: Path) -> None:
    from vlmscope.models.toy.train import ToyTrainConfig

    cfg = ToyTrainConfig(steps=1, batch_size=1, eval_n=0, relation_weight=1.0, relation_layer=5)
    with pytest.raises(ValueError, match=r"relation_layer must be in 1\.\.4"):
        train_toy(tmp_path / "toy", config=cfg, progress=False)


def test_type_repeats_draw_a_type_that_many_times_as_often() -> None:
    """Over whole balanced blocks of the training stream, relation (weighted 3) is asked
    exactly three times as often as each other type, in every stage; bad weights are refused
    with the culprit named, and the flag parses."""
    from collections import Counter

    from vlmscope.models.toy.train import (
        CURRICULUM,
        Stage,
        parse_type_repeats,
        sample_stream,
        weighted_curriculum,
    )

    _, processor = build_toy(seed=0, question_first=True)
    stages = weighted_curriculum((Stage(0.0, 2, ("colour", "relation", "shape")),), {"relation": 3})
    counts = Counter(s.question_type for s, _, _, _ in sample_stream(processor, 0, 4, 10, stages))
    assert counts == {"relation": 24, "colour": 8, "shape": 8}  # 40 samples = 8 blocks of 5
    weighted = weighted_curriculum(CURRICULUM, {"relation": 2})
    for old, new in zip(CURRICULUM, weighted, strict=True):
        assert Counter(new.question_types) == Counter(old.question_types) + Counter(
            t for t in old.question_types if t == "relation"
        )
        assert (new.start, new.max_objects) == (old.start, old.max_objects)
    assert weighted_curriculum(CURRICULUM, {}) == CURRICULUM
    with pytest.raises(ValueError, match="'relations'"):
        weighted_curriculum(CURRICULUM, {"relations": 2})
    with pytest.raises(ValueError, match="relation: a type's repeat count"):
        weighted_curriculum(CURRICULUM, {"relation": 0})
    assert parse_type_repeats(["relation=2", "exists=3"]) == {"relation": 2, "exists": 3}
    with pytest.raises(ValueError, match="relation:2"):
        parse_type_repeats(["relation:2"])
