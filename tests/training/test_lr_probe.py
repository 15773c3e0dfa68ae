"""--lr-probe against runs the trainer makes without it.

The truth for each candidate rate is an ordinary `Trainer` run of the probe's N steps at that
rate with --lr, and the probe's schedule (warm-up over a quarter of the steps, no decay): its
logged per-step FVU (measured before each update) and its final dictionaries evaluated on the
next batch give the score the probe must report. The probed run must then train exactly as
the run given the chosen rate.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from vlmscope.training.config import TrainConfig
from vlmscope.training.distributed import Layout
from vlmscope.training.errors import TrainingError
from vlmscope.training.lr_probe import PROBE_WARMUP, SCALES
from vlmscope.training.optim import averaged
from vlmscope.training.sources import ActivationBatch, TrainState
from vlmscope.training.trainer import Trainer

from .test_distributed import ArraySource, assert_close, config, run_ranks, train_here, weights_of

BASE_LR = 2e-3
PROBE = 8  # steps (the first at half the rate: warm-up)
BATCH = 4  # rows per batch
TOTAL = 64  # rows of the in-memory data set


def cfg_for(tmp: Path, name: str, kind: str, **extra: Any) -> TrainConfig:
    values: dict[str, Any] = {"lr": BASE_LR, "lr_warmup_fraction": 0.0, "lr_decay_fraction": 0.0,
                              "log_every": 1, "max_steps": 12}  # fmt: skip
    values.update(extra)
    return config(tmp, name, BATCH, kind, **values)


def state_of(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.bundle.state_dict().items()}


def reference_score(tmp: Path, kind: str, scale: float, optimizer: str) -> float:
    """What the probe should score `scale`: a plain run of PROBE steps at that rate."""
    cfg = cfg_for(tmp, f"ref{scale:g}", kind, lr=BASE_LR * scale, max_steps=PROBE,
                  lr_warmup_fraction=PROBE_WARMUP, optimizer=optimizer)  # fmt: skip
    trainer = train_here(cfg, TOTAL, sgd=False, layout=Layout())
    lines = (Path(cfg.output_dir) / cfg.run_name / "metrics.jsonl").read_text().splitlines()
    logged = {m["step"]: m["fvu"] for m in map(json.loads, lines)}
    seen = [logged[s + 1] for s in range(PROBE // 2, PROBE)]  # logged after step s's update
    xs, ys = ArraySource(TOTAL, BATCH, Layout()).rows(range(PROBE * BATCH, (PROBE + 1) * BATCH))
    trainer.bundle.eval()
    with torch.no_grad(), averaged(trainer.optimizer):  # signum: the weights it saves
        seen.append(float(trainer.bundle(xs, ys).fvu_per_unit.mean()))
    return sum(seen) / len(seen)


@pytest.mark.parametrize(
    ("kind", "optimizer"), [("transcoder", "adam"), ("clt", "adam"), ("sae", "signum")]
)
def test_probe_scores_what_runs_at_each_rate_measure_and_then_trains_as_the_chosen_rate(
    tmp_path: Path, kind: str, optimizer: str
) -> None:
    """signum: the candidates are scored at their averaged weights, as the run's
    dictionaries are saved; the run's own optimiser starts after them untouched."""
    probed = train_here(cfg_for(tmp_path, "probed", kind, lr_probe=PROBE, optimizer=optimizer),
                        TOTAL, sgd=False, layout=Layout())  # fmt: skip
    report = json.loads((tmp_path / "probed" / "lr_probe.json").read_text())
    assert report["base_lr"] == BASE_LR and report["steps"] == PROBE
    truth = {s: reference_score(tmp_path, kind, s, optimizer) for s in SCALES[optimizer]}
    for s in SCALES[optimizer]:
        assert report["score"][f"{s:g}"] == pytest.approx(truth[s], abs=2e-6), s
    chosen = min(truth, key=lambda s: (truth[s], s))
    assert report["scale"] == chosen and probed.state.lr_scale == chosen
    # The run itself: as if --lr had been the chosen rate from the start.
    plain = train_here(cfg_for(tmp_path, "plain", kind, lr=BASE_LR * chosen, optimizer=optimizer),
                       TOTAL, sgd=False, layout=Layout())  # fmt: skip
    ours, theirs = state_of(probed), state_of(plain)
    assert ours.keys() == theirs.keys()
    for k in ours:
        torch.testing.assert_close(ours[k], theirs[k], atol=0, rtol=0, msg=k)


def test_a_rate_far_too_small_is_found(tmp_path: Path) -> None:
    """A base rate far below what 8 steps need: the probe moves to its largest multiple (else
    the test above could pass with a probe that always keeps x1)."""
    probed = train_here(cfg_for(tmp_path, "slow", "transcoder", lr=BASE_LR / 20, lr_probe=PROBE),
                        TOTAL, sgd=False, layout=Layout())  # fmt: skip
    assert probed.state.lr_scale == max(SCALES["adam"]) > 1


def test_a_rate_far_too_large_is_found(tmp_path: Path) -> None:
    """A base rate far above what 8 steps stand: the probe moves to its smallest multiple."""
    probed = train_here(cfg_for(tmp_path, "fast", "transcoder", lr=BASE_LR * 50, lr_probe=PROBE),
                        TOTAL, sgd=False, layout=Layout())  # fmt: skip
    assert probed.state.lr_scale == min(SCALES["adam"]) < 1


def test_a_probed_run_resumes_at_the_chosen_rate_bit_for_bit(tmp_path: Path) -> None:
    full = train_here(cfg_for(tmp_path, "full", "transcoder", lr=BASE_LR / 20, lr_probe=PROBE,
                              save_every=2), TOTAL, sgd=False, layout=Layout())  # fmt: skip
    assert full.state.lr_scale == max(SCALES["adam"])
    cut = cfg_for(tmp_path, "cut", "transcoder", lr=BASE_LR / 20, lr_probe=PROBE, save_every=2)
    # The source's 12th batch fails: the probe read batches 1-9, the run trained 1-11.
    with pytest.raises(TrainingError, match="NaN"):
        train_here(cut, TOTAL, sgd=False, layout=Layout(), nan_at=12)
    state = json.loads((tmp_path / "cut" / "checkpoint" / "state.json").read_text())
    assert state["train_state"]["step"] == 10
    assert state["train_state"]["lr_scale"] == max(SCALES["adam"])
    with pytest.raises(TrainingError, match=r"--lr-probe: 8 -> 0"):  # the run's own flags only
        train_here(cfg_for(tmp_path, "cut", "transcoder", lr=BASE_LR / 20, save_every=2,
                           resume=True), TOTAL, sgd=False, layout=Layout())  # fmt: skip
    (tmp_path / "cut" / "lr_probe.json").unlink()  # a resume does not probe again
    resumed = train_here(cfg_for(tmp_path, "cut", "transcoder", lr=BASE_LR / 20, lr_probe=PROBE,
                                 save_every=2, resume=True), TOTAL, sgd=False,
                         layout=Layout())  # fmt: skip
    assert not (tmp_path / "cut" / "lr_probe.json").exists()
    ours, theirs = state_of(resumed), state_of(full)
    for k in ours:
        torch.testing.assert_close(ours[k], theirs[k], atol=0, rtol=0, msg=k)


class OneBatch(ArraySource):
    """Data that ends after its first batch."""

    def batches(self, state: TrainState) -> Iterator[ActivationBatch]:
        yield next(iter(super().batches(state)))


def test_data_too_short_to_probe_trains_at_the_given_rate_and_says_so(tmp_path: Path) -> None:
    cfg = cfg_for(tmp_path, "short", "transcoder", lr_probe=PROBE)
    trainer = Trainer(cfg, progress=False, source=OneBatch(TOTAL, BATCH, Layout()),  # type: ignore[arg-type]
                      layout=Layout())  # fmt: skip
    with pytest.warns(UserWarning, match="too few to probe"):
        trainer.fit()
    assert trainer.state.step == 1 and trainer.state.lr_scale == 1.0


def test_probe_refuses_what_it_cannot_do(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"--lr-probe must be >= 0"):
        cfg_for(tmp_path, "neg", "transcoder", lr_probe=-1)
    with pytest.raises(ValueError, match=r"--lr-probe scores rates by held-out FVU"):
        cfg_for(tmp_path, "ce", "transcoder", lr_probe=2, loss_fn="ce")
    cfg = cfg_for(tmp_path, "ranks", "transcoder", lr_probe=2, distribute_modules=True)
    with pytest.raises(TrainingError, match=r"every rank, which --distribute-modules splits"):
        Trainer(cfg, progress=False, source=ArraySource(TOTAL, BATCH, Layout(0, 2)),  # type: ignore[arg-type]
                layout=Layout(0, 2))  # fmt: skip


@pytest.mark.parametrize(("kind", "acc"), [("clt", 2), ("transcoder", 1)])
def test_data_parallel_ranks_probe_as_one_process_on_the_global_batch(
    tmp_path: Path, kind: str, acc: int
) -> None:
    """Two ranks, each reading its share of every batch: the same scores and choice as one
    process given the whole batches, and the same dictionaries after (SGD, so that float
    tolerance means something; see test_distributed)."""
    extra = {"lr_probe": PROBE, "grad_acc_steps": acc, "max_steps": 10, "lr": 0.05}
    cfg = config(tmp_path, "dp", BATCH, kind, **extra)
    results = run_ranks(2, tmp_path / "dp", cfg, TOTAL)
    assert all(r["ok"] for r in results), results
    one = train_here(config(tmp_path, "one", 2 * BATCH, kind, **extra), TOTAL, sgd=True,
                     layout=Layout())  # fmt: skip
    dp = json.loads((tmp_path / "dp" / "lr_probe.json").read_text())
    ref = json.loads((tmp_path / "one" / "lr_probe.json").read_text())
    assert dp["scale"] == ref["scale"] == one.state.lr_scale
    assert dp["score"] == pytest.approx(ref["score"], abs=1e-5)
    ranks = [weights_of(tmp_path / "dp", r) for r in range(2)]
    assert_close(ranks[1], ranks[0], atol=0)
    assert_close(ranks[0], state_of(one), atol=2e-6)


def test_a_probed_run_on_a_model_replays_every_batch_it_read_ahead(
    tmp_path: Path, zoo_path: Any
) -> None:
    """On the zoo llava, live (batches cut from records, with their data cursor): the run
    trains on every batch the probe read ahead, in order, as the run given the chosen --lr."""
    from vlmscope.models.hooked import HookedVLM
    from vlmscope.training.config import parse_train_args

    vlm = HookedVLM.from_pretrained(zoo_path("llava"), device="cpu", dtype=torch.float32)
    argv = [str(zoo_path("llava")), "shapes:24", "--sae.transcode", "--sae.expansion-factor",
            "2", "--sae.k", "4", "--max-steps", "6", "--batch-size", "2",
            "--lr-decay-fraction", "0", "--output-dir", str(tmp_path), "--device", "cpu",
            "--dtype", "float32"]  # fmt: skip
    probed = Trainer(parse_train_args([*argv, "--run-name", "p", "--lr-probe", "3"]), vlm,
                     progress=False)  # fmt: skip
    probed.fit()
    report = json.loads((tmp_path / "p" / "lr_probe.json").read_text())
    rate = report["base_lr"] * report["scale"]
    plain = Trainer(parse_train_args([*argv, "--run-name", "q", "--lr", repr(rate)]), vlm,
                    progress=False)  # fmt: skip
    plain.fit()
    assert probed.state.tokens == plain.state.tokens and probed.state.rows == plain.state.rows
    ours, theirs = state_of(probed), state_of(plain)
    for k in ours:
        torch.testing.assert_close(ours[k], theirs[k], atol=0, rtol=0, msg=k)


def test_bad_activations_in_a_batch_read_ahead_name_the_step_it_was_for(
    tmp_path: Path, zoo_path: Any
) -> None:
    """The source checks a batch when it is read, before the run's step counter moves: the
    error says the probe read it and for which step."""
    from vlmscope.models.hooked import HookedVLM
    from vlmscope.training.config import parse_train_args

    vlm = HookedVLM.from_pretrained(zoo_path("llava"), device="cpu", dtype=torch.float32)
    argv = [str(zoo_path("llava")), "shapes:24", "--sae.transcode", "--sae.k", "4",
            "--max-steps", "6", "--batch-size", "2", "--lr-probe", "4", "--output-dir",
            str(tmp_path), "--device", "cpu", "--dtype", "float32"]  # fmt: skip
    trainer = Trainer(parse_train_args(argv), vlm, progress=False)
    calls = {"n": 0}

    def poison(_m: Any, _i: Any, out: torch.Tensor) -> torch.Tensor | None:
        calls["n"] += 1
        return out * float("nan") if calls["n"] > 3 else None  # the 4th batch: for step 3

    h = vlm.adapter.part(1, "mlp").register_forward_hook(poison)
    try:
        with pytest.raises(
            TrainingError, match=r"NaN.*\[a batch --lr-probe read ahead, for step 3\]"
        ):
            trainer.fit()
    finally:
        h.remove()


def test_when_every_candidate_diverges_the_probe_keeps_the_smallest(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """No finite score: the smallest multiple of the optimiser's candidates, not an error."""
    from vlmscope.training import lr_probe

    class Bundle(torch.nn.Linear):
        def activations(self) -> list[Any]:
            return []

    monkeypatch.setattr(lr_probe, "_train_and_score", lambda *a, **k: float("nan"))
    for optimizer in ("adam", "signum"):
        result = lr_probe.probe_lr(Bundle(2, 2), optimizer, 1e-3, [], ([], []), lambda _: None,
                                   False)  # fmt: skip
        assert result.scale == min(SCALES[optimizer])
        assert set(result.score) == set(SCALES[optimizer])
