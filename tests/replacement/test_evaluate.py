"""Evaluation: exact dictionaries score perfectly, metrics match hand computations, token groups
match the masks, the forward budget holds, bad input fails before any forward pass, CLI output."""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import random_image
from tests.replacement.test_model import random_clt, vlm_for
from vlmscope.data.processing import Batch
from vlmscope.dictionaries import SparseCoderConfig, fvu
from vlmscope.models.hooked import HookedVLM
from vlmscope.replacement import EvalReport, ReplacementModel, evaluate
from vlmscope.replacement.evaluate import (
    add_eval_arguments,
    ce_loss_score,
    explained_variance,
    iter_batches,
    kl_divergence,
    next_token_ce,
    normalized_mse,
    run_eval_command,
    top1_agreement,
)
from vlmscope.training.bundle import DictionaryBundle, ModelMismatchError, mlp_out, resid_mid
from vlmscope.training.config import TrainConfig
from vlmscope.training.trainer import open_training_data

DATA = "shapes:8"


# --- fixtures ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def llava(zoo_path: Any) -> HookedVLM:
    return vlm_for("llava", zoo_path)


def exact_sae(vlm: HookedVLM, hooks: list[str]) -> DictionaryBundle:
    """SAEs that reconstruct exactly: codes [relu(x); relu(-x)], decoder [I; -I], TopK keeping
    all 2d latents, zero biases: relu(x) - relu(-x) = x, bit for bit."""
    a = vlm.adapter
    d = a.d_model
    cfg = SparseCoderConfig(kind="sae", num_latents=2 * d, k=2 * d)
    info = {"name": "exact", "family": a.family, "dims": a.dims(), "tokens": "all"}
    b = DictionaryBundle.create(cfg, hooks, hooks, d, d, info)
    eye = torch.eye(d)
    with torch.no_grad():
        for c in b.coders:
            c.W_enc.copy_(torch.cat([eye, -eye]))  # type: ignore[operator]
            c.W_dec.copy_(torch.cat([eye, -eye]))  # type: ignore[operator]
            c.b_enc.zero_()  # type: ignore[operator]
            c.b_dec.zero_()  # type: ignore[operator]
    return b


@pytest.fixture(scope="module")
def generated(llava: HookedVLM) -> list[Batch]:
    """Two batches (2 samples, then 1) of prompts plus the model's own greedy continuation,
    marked as the answer: the original's CE is low there, so any damage shows in the score."""
    inputs = llava.prepare(
        ["what colour is the circle", "how many squares are there in the picture"],
        images=[[random_image(32, 40, 1)], [random_image(32, 32, 2)]],
        padding_side="left",
    )
    n = inputs["input_ids"].shape[1]
    a = llava.adapter
    never = [*a.image_token_ids(), *a.special_token_ids()]  # keep the masks consistent
    out = llava.model.generate(**inputs, max_new_tokens=12, do_sample=False, suppress_tokens=never)
    mask = inputs["attention_mask"]
    full = {
        **inputs,
        "input_ids": out,
        "attention_mask": torch.cat([mask, mask.new_ones(out.shape[0], out.shape[1] - n)], 1),
    }
    answer = torch.zeros(out.shape, dtype=torch.bool)
    answer[:, n:] = True
    first = {k: v[:1] for k, v in full.items()}  # one image per sample: rows line up
    return [Batch(full, ["a", "b"], answer), Batch(first, ["a"], answer[:1])]


@pytest.fixture(scope="module")
def exact_report(llava: HookedVLM) -> EvalReport:
    n = llava.adapter.n_layers
    hooks = [mlp_out(i) for i in range(n)] + ["lm.blocks.1.attn.hook_z"]  # a head-view hook too
    data = open_training_data(TrainConfig(model="llava", dataset=DATA))
    return evaluate(llava, exact_sae(llava, hooks), data, batch_size=4, progress=False)


class Forwards:
    """Counts calls of the HF model (every forward pass, hooked or not)."""

    def __init__(self, vlm: HookedVLM) -> None:
        self.n = 0
        self.vlm = vlm

    def __enter__(self) -> Forwards:
        self.h = self.vlm.model.register_forward_pre_hook(lambda *a: self._inc())
        return self

    def _inc(self) -> None:
        self.n += 1

    def __exit__(self, *exc: Any) -> None:
        self.h.remove()


# --- pure functions by hand -----------------------------------------------------------------------
def test_metric_functions_by_hand() -> None:
    assert ce_loss_score(3.0, 2.0, 1.0) == 0.5
    assert ce_loss_score(3.0, 1.0, 1.0) == 1.0
    assert ce_loss_score(3.0, 3.0, 1.0) == 0.0
    assert ce_loss_score(3.0, 5.0, 1.0) == -1.0
    assert math.isnan(ce_loss_score(2.0, 1.0, 2.0))  # ablation changes nothing: undefined

    p = torch.tensor([[0.5, 0.5], [0.9, 0.1], [1.0, 0.0]]).log()
    q = torch.tensor([[0.25, 0.75], [0.9, 0.1], [0.5, 0.5]]).log()
    kl0 = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    kl2 = math.log(1.0 / 0.5)  # 0 * log(0 / 0.5) counts as 0
    assert kl_divergence(p, q).item() == pytest.approx((kl0 + 0 + kl2) / 3, abs=1e-6)
    mask = torch.tensor([True, True, False])
    assert kl_divergence(p, q, mask).item() == pytest.approx(kl0 / 2, abs=1e-6)
    assert kl_divergence(p + 7.0, p).item() == pytest.approx(0.0, abs=1e-7)  # logits, not probs
    a = torch.tensor([[2.0, 1.0, 0.0], [0.0, 1.0, 2.0], [0.0, 3.0, 1.0]])
    b = torch.tensor([[5.0, 1.0, 0.0], [0.0, 2.0, 1.0], [0.0, 0.5, 0.1]])
    assert top1_agreement(a, b).item() == pytest.approx(2 / 3)
    assert top1_agreement(a, b, torch.tensor([False, True, True])).item() == 0.5

    y = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    y_hat = torch.tensor([[1.0, 1.0], [3.0, 3.0]])
    assert normalized_mse(y, y_hat).item() == pytest.approx(2 / 30)
    # mean (2, 3); squared deviations 4 * 1 = 4; SSE 2
    assert explained_variance(y, y_hat).item() == pytest.approx(1 - 2 / 4)

    logits = torch.tensor([[[0.0, 0.0], [2.0, 0.0], [0.0, 0.0]]])
    ids = torch.tensor([[0, 0, 1]])
    valid = torch.tensor([[True, True, False]])  # position 1 predicts padding: not counted
    assert next_token_ce(logits, ids, valid).item() == pytest.approx(math.log(2))


# --- exact dictionaries ---------------------------------------------------------------------------
def test_exact_dictionaries_score_perfectly(exact_report: EvalReport, llava: HookedVLM) -> None:
    r = exact_report.to_dict()
    d = llava.adapter.d_model
    assert r["kind"] == "sae" and r["n_batches"] == 2
    for group in ("all", "image", "text"):
        rec = r["reconstruction"][group]
        assert rec["n_tokens"] > 0
        for m in [rec["overall"], *rec["per_unit"].values()]:
            assert m["fvu"] == 0.0 and m["normalized_mse"] == 0.0
            assert m["explained_variance"] == 1.0
            assert m["l0"] == pytest.approx(d, abs=0.01)  # one of x_j, -x_j is positive
    for group in ("all", "text", "answer"):
        nt = r["next_token"][group]
        assert nt["n_positions"] > 0
        assert len(nt["per_layer"]) == len(r["units"]) == 4
        for m in [nt["all_layers"], *nt["per_layer"].values()]:
            assert m["ce_replaced"] == pytest.approx(nt["ce_original"], abs=1e-6)
            assert m["ce_loss_score"] == pytest.approx(1.0, abs=1e-6)
            assert m["kl"] == pytest.approx(0.0, abs=1e-7)
            assert m["top1_agreement"] == 1.0
    assert exact_report.forward_passes == 2 * (3 + 2 * 4)


def test_token_groups_match_the_masks(llava: HookedVLM, exact_report: EvalReport) -> None:
    data = open_training_data(TrainConfig(model="llava", dataset=DATA))
    counts = dict.fromkeys(["all", "image", "text", "p_all", "p_text", "p_answer", "valid"], 0)
    for batch in iter_batches(llava, data, batch_size=4):
        m = llava.masks(batch.inputs)
        for g in ("all", "image", "text"):
            counts[g] += int(m.select(g).sum())
        pos = m.valid[:, :-1] & m.valid[:, 1:]
        counts["p_all"] += int(pos.sum())
        counts["p_text"] += int((pos & m.text[:, 1:]).sum())
        counts["p_answer"] += int((pos & batch.answer[:, 1:]).sum())
        counts["valid"] += int(m.valid.sum())
    rec = exact_report.reconstruction
    for g in ("all", "image", "text"):
        assert rec[g]["n_tokens"] == counts[g]
    assert counts["image"] > 0 and counts["text"] > 0
    assert rec["all"]["n_tokens"] == rec["image"]["n_tokens"] + rec["text"]["n_tokens"]
    nt = exact_report.next_token
    assert nt["all"]["n_positions"] == counts["p_all"]
    assert nt["text"]["n_positions"] == counts["p_text"]
    assert 0 < nt["answer"]["n_positions"] == counts["p_answer"] < counts["p_text"]
    assert exact_report.n_tokens == counts["valid"] and exact_report.n_samples == 8


# --- hand computations on a random CLT ------------------------------------------------------------
def _by_hand(vlm: HookedVLM, bundle: DictionaryBundle, batches: list[Batch]) -> dict[str, Any]:
    """Every number the test compares, computed the plain way over both batches pooled."""
    clt = bundle.clt
    assert clt is not None
    n = vlm.adapter.n_layers
    rm = ReplacementModel(vlm, bundle)
    names = [resid_mid(i) for i in range(n)] + [mlp_out(i) for i in range(n)]
    ys: dict[int, list[torch.Tensor]] = {i: [] for i in range(n)}
    y_hats: dict[int, list[torch.Tensor]] = {i: [] for i in range(n)}
    ce: dict[str, list[torch.Tensor]] = {"orig": [], "repl": [], "zero": [], "last": []}
    kls: list[torch.Tensor] = []
    last = n - 1
    for batch in batches:
        m = vlm.masks(batch.inputs)
        image = m.select("image")
        out, cache = vlm.run_with_cache(batch.inputs, names=names)
        logits = out.logits
        codes = {i: clt.encode_layer(i, cache[resid_mid(i)].flatten(0, 1)) for i in range(n)}
        for i in range(n):
            y_hat = clt.decode_layer(i, codes).reshape(cache[mlp_out(i)].shape)
            ys[i].append(cache[mlp_out(i)][image])
            y_hats[i].append(y_hat[image])
        replace = rm._replace_mask(batch.inputs["input_ids"], batch.inputs["attention_mask"])
        y_last = clt.decode_layer(last, codes).reshape(cache[mlp_out(last)].shape)
        ids, valid = batch.inputs["input_ids"], m.valid
        pos = valid[:, :-1] & valid[:, 1:] & batch.answer[:, 1:]

        def ce_at(lg: torch.Tensor, pos: torch.Tensor = pos, ids: torch.Tensor = ids) -> Any:
            return F.cross_entropy(lg[:, :-1][pos], ids[:, 1:][pos], reduction="none")

        repl = rm.forward(batch.inputs).logits
        zero = vlm.run_with_hooks(
            batch.inputs, [(mlp_out(i), HookedVLM.zero_ablate(replace)) for i in range(n)]
        ).logits
        one = vlm.run_with_hooks(
            batch.inputs, [(mlp_out(last), HookedVLM.patch(y_last, replace))]
        ).logits
        ce["orig"].append(ce_at(logits))
        ce["repl"].append(ce_at(repl))
        ce["zero"].append(ce_at(zero))
        ce["last"].append(ce_at(one))
        p = F.log_softmax(logits[:, :-1][pos], -1)
        q = F.log_softmax(repl[:, :-1][pos], -1)
        kls.append((p.exp() * (p - q)).sum(-1))
    out = {k: torch.cat(v).mean().item() for k, v in ce.items()}
    out["kl"] = torch.cat(kls).mean().item()
    out["fvu"] = [fvu(torch.cat(ys[i]), torch.cat(y_hats[i])).item() for i in range(n)]
    return out


def test_random_clt_against_hand_computation(llava: HookedVLM, generated: list[Batch]) -> None:
    bundle = random_clt(llava, n_targets=2, seed=1)
    n = llava.adapter.n_layers
    with Forwards(llava) as calls:
        report = evaluate(llava, bundle, generated, tokens="image", progress=False)
    assert calls.n == report.forward_passes == 2 * (3 + 2 * n)  # the documented budget
    assert list(report.reconstruction) == ["image"]
    with torch.no_grad():
        hand = _by_hand(llava, bundle, generated)
    ans = report.next_token["answer"]
    assert ans["ce_original"] == pytest.approx(hand["orig"], rel=1e-5)
    assert ans["all_layers"]["ce_replaced"] == pytest.approx(hand["repl"], rel=1e-5)
    assert ans["all_layers"]["ce_zero_ablation"] == pytest.approx(hand["zero"], rel=1e-5)
    assert ans["all_layers"]["kl"] == pytest.approx(hand["kl"], rel=1e-4)
    unit_last = bundle.units[-1]
    assert ans["per_layer"][unit_last]["ce_replaced"] == pytest.approx(hand["last"], rel=1e-5)
    want = ce_loss_score(hand["zero"], hand["repl"], hand["orig"])
    assert ans["all_layers"]["ce_loss_score"] == pytest.approx(want, rel=1e-4)
    per_unit = report.reconstruction["image"]["per_unit"]
    for u, f in zip(bundle.units, hand["fvu"], strict=True):
        assert per_unit[u]["fvu"] == pytest.approx(f, rel=1e-4)  # pooled, not mean of batches
    # A dictionary far from the truth: worse than the original, the distributions differ.
    for group in ("all", "text", "answer"):
        nt = report.next_token[group]
        assert nt["all_layers"]["ce_loss_score"] < 1.0
        assert nt["all_layers"]["kl"] > 1e-3
        assert nt["all_layers"]["top1_agreement"] < 1.0
        assert all(m["kl"] > 1e-3 for m in nt["per_layer"].values())
    table = report.table()
    assert "all layers" in table
    # The random zoo model's loss is near chance: whether ablation raises it decides the note.
    raised = [g for g, r in report.next_token.items() if
              r["all_layers"]["ce_zero_ablation"] > r["ce_original"]]  # fmt: skip
    assert table.count("does not raise the loss") == len(report.next_token) - len(raised)
    report.next_token["answer"]["all_layers"]["ce_zero_ablation"] = ans["ce_original"] - 1.0
    assert report.table().count("does not raise the loss") == len(report.next_token) - len(
        [g for g in raised if g != "answer"]
    )


def test_no_per_layer_passes_and_budgets(llava: HookedVLM, generated: list[Batch]) -> None:
    bundle = random_clt(llava, seed=2)
    with Forwards(llava) as calls:
        r = evaluate(llava, bundle, generated, per_layer=False, max_batches=1, progress=False)
    assert calls.n == r.forward_passes == 3 and r.n_batches == 1
    assert all(not v["per_layer"] for v in r.next_token.values())
    assert bundle.training  # the caller's mode is restored
    dead_before = [layer.num_tokens_since_fired.clone() for layer in bundle.clt.layers]  # type: ignore[union-attr]
    r = evaluate(llava, bundle, generated[1].inputs, per_layer=False, progress=False)  # a dict
    for layer, before in zip(bundle.clt.layers, dead_before, strict=True):  # type: ignore[union-attr]
        assert torch.equal(layer.num_tokens_since_fired, before)
    d = r.to_dict()
    assert d["next_token"]["answer"]["n_positions"] == 0  # no answer mask given
    assert d["next_token"]["answer"]["ce_original"] is None  # NaN is written as null
    json.dumps(d, allow_nan=False)


def test_zero_decoder_scores_like_zero_ablation(llava: HookedVLM, generated: list[Batch]) -> None:
    """A fresh transcoder outputs 0 (zero decoder and biases): replacing is zero-ablating, so the
    score is exactly 0 and the normalised MSE exactly 1 (the other end of the scale)."""
    a = llava.adapter
    n = a.n_layers
    cfg = SparseCoderConfig(kind="transcoder", expansion_factor=2, k=4)
    info = {"name": "fresh", "family": a.family, "dims": a.dims(), "tokens": "all"}
    reads, writes = [resid_mid(i) for i in range(n)], [mlp_out(i) for i in range(n)]
    bundle = DictionaryBundle.create(cfg, reads, writes, a.d_model, a.d_model, info)
    r = evaluate(llava, bundle, generated[1], progress=False)
    for m in r.reconstruction["all"]["per_unit"].values():
        assert m["normalized_mse"] == pytest.approx(1.0)
    for nt in r.next_token.values():
        for m in [nt["all_layers"], *nt["per_layer"].values()]:
            assert m["ce_loss_score"] == pytest.approx(0.0, abs=1e-9)


# --- bad input -----------------------------------------------------------------------------------
def test_dictionaries_for_another_model_fail_before_any_forward(
    llava: HookedVLM, generated: list[Batch]
) -> None:
    a = llava.adapter
    wider = random_clt(llava)
    wider.model_info["dims"] = {**a.dims(), "d_model": 2 * a.d_model}
    deeper = random_clt(llava)
    deeper.reads[-1], deeper.writes[-1] = resid_mid(7), mlp_out(7)
    deeper.model_info["dims"] = {**a.dims(), "n_layers": 8}

    def batches() -> Iterator[Batch]:
        raise AssertionError("data was read")
        yield

    with Forwards(llava) as calls:
        with pytest.raises(ModelMismatchError, match="d_model: dictionaries 128, model 64"):
            evaluate(llava, wider, generated, progress=False)
        with pytest.raises(ModelMismatchError, match=r"n_layers.*hook points.*blocks\.7"):
            evaluate(llava, deeper, batches(), progress=False)
    assert calls.n == 0


# --- command line --------------------------------------------------------------------------------
def _parse(argv: list[str]) -> argparse.Namespace:
    return add_eval_arguments(argparse.ArgumentParser()).parse_args(argv)


def test_cli_writes_metrics_json(
    tmp_path: Path, zoo_path: Any, llava: HookedVLM, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = random_clt(llava, n_targets=2).save(tmp_path / "dictionaries")
    argv = [str(zoo_path("llava")), str(folder), DATA, "--max-tokens", "100", "--batch-size",
            "2", "--device", "cpu", "--no-per-layer", "--no-progress"]  # fmt: skip
    assert run_eval_command(_parse(argv)) == 0
    out = capsys.readouterr().out
    assert "Reconstruction" in out and "Next token" in out and "all layers" in out
    metrics = json.loads((folder / "metrics.json").read_text())
    assert set(metrics) == {
        "model", "dictionaries", "kind", "units", "writes", "replace_tokens", "per_layer",
        "n_batches", "n_samples", "n_tokens", "forward_passes", "reconstruction", "next_token",
        "dataset", "split", "max_tokens", "same_data_as_training",
    }  # fmt: skip
    # What was measured: the held-out split of the shapes world by default, and the budget.
    assert (metrics["dataset"], metrics["split"], metrics["max_tokens"]) == (DATA, "test", 100)
    assert metrics["same_data_as_training"] is None  # no training run next to these
    assert f"data: {DATA}, split test; token budget 100" in out
    assert metrics["kind"] == "clt" and metrics["per_layer"] is False
    assert metrics["n_batches"] >= 1 and metrics["n_tokens"] >= 100  # whole batches
    assert metrics["forward_passes"] == 3 * metrics["n_batches"]
    assert set(metrics["reconstruction"]) == {"all", "image", "text"}
    assert set(metrics["reconstruction"]["image"]["overall"]) == {
        "fvu", "explained_variance", "normalized_mse", "l0", "dead_fraction",
    }  # fmt: skip
    assert set(metrics["next_token"]) == {"all", "text", "answer"}
    assert set(metrics["next_token"]["answer"]["all_layers"]) == {
        "ce_replaced", "ce_zero_ablation", "ce_loss_score", "kl", "top1_agreement",
    }  # fmt: skip
    assert [p.name for p in folder.iterdir() if p.name.startswith(".")] == []  # no temp files
    DictionaryBundle.load(folder)  # metrics.json next to the dictionaries does not disturb them


def test_cli_warns_when_evaluating_on_the_training_data(
    tmp_path: Path, zoo_path: Any, llava: HookedVLM, capsys: pytest.CaptureFixture[str]
) -> None:
    """Dictionaries of a run trained on `shapes` (split train, seed 0): evaluating shapes:8 on
    split train scores a prefix of the training stream, so it warns and says so in the JSON;
    the default split (test) does not."""
    run = tmp_path / "run"
    folder = random_clt(llava).save(run / "dictionaries")
    train_cfg = TrainConfig(model="llava", dataset="shapes", split="train", seed=0)
    (run / "train_config.json").write_text(json.dumps(train_cfg.to_dict()))
    base = [str(zoo_path("llava")), str(folder), DATA, "--max-tokens", "50", "--batch-size",
            "2", "--device", "cpu", "--no-per-layer", "--no-progress"]  # fmt: skip
    assert run_eval_command(_parse([*base, "--split", "train"])) == 0
    got = capsys.readouterr()
    assert "WARNING" in got.err and "trained on" in got.err and "WARNING" in got.out
    metrics = json.loads((folder / "metrics.json").read_text())
    assert (metrics["split"], metrics["same_data_as_training"]) == ("train", True)
    assert run_eval_command(_parse(base)) == 0
    got = capsys.readouterr()
    assert "WARNING" not in got.err + got.out
    metrics = json.loads((folder / "metrics.json").read_text())
    assert (metrics["split"], metrics["same_data_as_training"]) == ("test", False)


def test_cli_mismatch_fails_before_any_forward(
    tmp_path: Path,
    zoo_path: Any,
    llava: HookedVLM,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    bundle = random_clt(llava)
    bundle.model_info["family"] = "qwen2_vl"
    folder = bundle.save(tmp_path / "d")

    def boom(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a forward pass ran")

    monkeypatch.setattr(HookedVLM, "forward", boom)
    argv = [str(zoo_path("llava")), str(folder), DATA, "--device", "cpu", "--no-progress"]
    assert run_eval_command(_parse(argv)) == 1
    err = capsys.readouterr().err
    assert "family: dictionaries 'qwen2_vl', model 'llava'" in err
    assert not (folder / "metrics.json").exists()
    assert run_eval_command(_parse([*argv[:1], str(tmp_path / "missing"), DATA])) == 1
    assert "cannot load dictionaries" in capsys.readouterr().err


def test_provenance_in_the_dictionaries_is_used_away_from_the_run(
    tmp_path: Path, llava: HookedVLM
) -> None:
    from vlmscope.replacement.evaluate import same_data_as_training

    bundle = random_clt(llava)
    bundle.model_info["data"] = {"dataset": "shapes", "split": "train", "seed": 0}
    folder = bundle.save(tmp_path / "moved")  # no train_config.json above it
    on_train = TrainConfig(model="llava", dataset="shapes:8", split="train", seed=0)
    assert same_data_as_training(folder, on_train) is True
    on_test = TrainConfig(model="llava", dataset="shapes:8", split="test", seed=0)
    assert same_data_as_training(folder, on_test) is False
    assert same_data_as_training(random_clt(llava).save(tmp_path / "bare"), on_train) is None


def test_cli_on_data_without_one_good_record_counts_what_the_reader_refused(
    tmp_path: Path, zoo_path: Any, llava: HookedVLM, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    turns = [{"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": "red"}]
    images = ["missing.png", "corrupt.png", "corrupt.png"]
    rows = [{"id": str(i), "image": im, "conversations": turns} for i, im in enumerate(images)]
    data = tmp_path / "bad.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    folder = random_clt(llava).save(tmp_path / "dictionaries")
    argv = [str(zoo_path("llava")), str(folder), str(data), "--split", "train", "--device",
            "cpu", "--no-per-layer", "--no-progress"]  # fmt: skip
    assert run_eval_command(_parse(argv)) == 1
    err = capsys.readouterr().err
    assert "no batches to evaluate (3 records skipped - missing_image: 1 (e.g. bad.jsonl:0)" in err
    assert "corrupt_image: 2 (e.g. bad.jsonl:1, bad.jsonl:2))" in err


def test_pooled_figures_count_each_units_own_rows(llava: HookedVLM) -> None:
    """A projector unit reads image patches and a language-model unit reads tokens: the pooled
    L0 is per row of both, and a token group no patch is in still counts the tokens."""
    hooks = ["projector.hook_out", "lm.blocks.0.hook_resid_post"]
    inputs = llava.prepare(
        ["what colour is the circle", "and the square"],
        images=[[random_image(32, 40, seed=1)], [random_image(32, 32, seed=2)]],
    )
    report = evaluate(llava, exact_sae(llava, hooks), inputs, per_layer=False, progress=False)
    for group, res in report.reconstruction.items():
        units = [res["per_unit"][h] for h in hooks]
        assert all(u["fvu"] == 0.0 for u in units if u["l0"] == u["l0"])  # exact, where rows
        rows = {h: report_rows(llava, inputs, h, group) for h in hooks}
        assert res["n_tokens"] == max(rows.values()) > 0
        if all(rows.values()):
            l0 = sum(u["l0"] * rows[h] for h, u in zip(hooks, units, strict=True))
            assert res["overall"]["l0"] == pytest.approx(l0 / sum(rows.values()), rel=1e-9)
        assert res["overall"]["fvu"] == 0.0


def report_rows(vlm: HookedVLM, inputs: Any, hook: str, group: str) -> int:
    """Rows a unit on `hook` reads in token group `group`: the projector's image patches
    (in every group that holds image tokens), or the language model's tokens of the group."""
    masks = vlm.masks(inputs)
    if hook.startswith("projector"):
        return int(masks.select("image").sum()) if group in ("all", "image") else 0
    return int(masks.select(group).sum())


def test_mllama_batches_without_images_are_left_out_where_dictionaries_read_skipped_layers(
    tmp_path: Path, zoo_path: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """Transformers runs no cross-attention layer for a batch without images: a CLT over
    every layer failed there (its codes of layer 1 were missing). Such a batch is left out
    and said to be; the report is that of the image rows alone."""
    from tests.training.test_sources import mllama_rows

    vlm = vlm_for("mllama", zoo_path)
    clt = random_clt(vlm)
    mixed = mllama_rows(tmp_path, [False, False, True, True])
    only = mixed.with_name("image_rows.jsonl")
    only.write_text("".join(mixed.read_text().splitlines(keepends=True)[2:]))
    reports = []
    for data in (mixed, only):
        cfg = TrainConfig(model=str(zoo_path("mllama")), dataset=str(data))
        reports.append(evaluate(vlm, clt, open_training_data(cfg), batch_size=2, progress=False))
    assert "1 batch(es) left out" in capsys.readouterr().err
    got, want = reports
    assert (got.n_batches, got.n_samples, got.n_tokens) == (1, 2, want.n_tokens)
    assert want.n_tokens > 0 and want.n_batches == 1
    assert (got.reconstruction, got.next_token) == (want.reconstruction, want.next_token)
    texts = mixed.with_name("text_rows.jsonl")
    texts.write_text("".join(mixed.read_text().splitlines(keepends=True)[:2]))
    cfg = TrainConfig(model=str(zoo_path("mllama")), dataset=str(texts))
    with pytest.raises(ValueError, match=r"no batches to evaluate.*1 batch\(es\) left out"):
        evaluate(vlm, clt, open_training_data(cfg), batch_size=2, progress=False)
