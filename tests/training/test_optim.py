"""The optimiser choice: signum's update against a hand computation, the defaults per kind,
and a trained run's final dictionaries being the schedule-free average of its checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.training.test_distributed import ArraySource, config, train_here
from vlmscope.training.bundle import DictionaryBundle
from vlmscope.training.config import SaeArgs, TrainConfig
from vlmscope.training.distributed import Layout
from vlmscope.training.optim import (
    SIGNUM_MOMENTUM,
    averaged,
    build_optimizer,
    default_lr,
    lr_multiplier,
)
from vlmscope.training.sharded import read_checkpoint_state
from vlmscope.training.trainer import Trainer


def test_signum_steps_as_the_hand_computation_says() -> None:
    """Two steps of schedule-free sign-SGD on three weights, the second at twice the rate
    (so the average weighs it 4:1), one gradient entry exactly 0 (no move)."""
    p0 = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    p = torch.nn.Parameter(p0.clone())
    opt = build_optimizer("signum", [p], lr=0.1)
    b = SIGNUM_MOMENTUM
    p.grad = torch.tensor([0.3, -7.0, 0.0], dtype=torch.float64)
    opt.step()
    z1 = p0 - 0.1 * torch.tensor([1.0, -1.0, 0.0], dtype=torch.float64)
    x1 = z1  # c_1 = w_0 / w_0 = 1
    torch.testing.assert_close(p.detach(), z1, atol=1e-12, rtol=0)  # y_1 = z_1 = x_1
    for g in opt.param_groups:
        g["lr"] = 0.2
    p.grad = torch.tensor([-1e-9, 2.0, 5.0], dtype=torch.float64)
    opt.step()
    z2 = z1 - 0.2 * torch.tensor([-1.0, 1.0, 1.0], dtype=torch.float64)
    c2 = 0.2**2 / (0.1**2 + 0.2**2)
    x2 = (1 - c2) * x1 + c2 * z2
    y2 = (1 - b) * z2 + b * x2
    torch.testing.assert_close(p.detach(), y2, atol=1e-12, rtol=0)
    with averaged(opt):
        torch.testing.assert_close(p.detach(), x2, atol=1e-12, rtol=0)
    torch.testing.assert_close(p.detach(), y2, atol=1e-12, rtol=0)


class _SignSGD(torch.optim.Optimizer):
    """The base the schedulefree package's wrapper is given in the reference below."""

    def __init__(self, params: list[torch.Tensor], lr: float) -> None:
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure: None = None) -> None:  # type: ignore[override]
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.add_(torch.sign(p.grad), alpha=-group["lr"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_signum_matches_the_schedulefree_wrapper_bit_for_bit(dtype: torch.dtype) -> None:
    """vlmscope's in-place signum against schedulefree's ScheduleFreeWrapper (XOR swaps around
    a sign-SGD base): the same weights to the bit over steps at changing rates, in eval and
    train mode, with a parameter that has no gradient on some steps; and the same state."""
    from schedulefree import ScheduleFreeWrapper

    gen = torch.Generator().manual_seed(0)
    start = [torch.randn(64, 16, generator=gen, dtype=dtype), torch.randn(16, generator=gen,
             dtype=dtype)]  # fmt: skip
    ours_p = [torch.nn.Parameter(t.clone()) for t in start]
    ref_p = [torch.nn.Parameter(t.clone()) for t in start]
    ours = build_optimizer("signum", ours_p, lr=0.01)
    ref = ScheduleFreeWrapper(_SignSGD(ref_p, lr=0.01), momentum=SIGNUM_MOMENTUM)
    ref.train()
    for step, lr in enumerate([0.01, 0.03, 0.02, 0.05, 0.01, 0.04]):
        grads = [torch.randn(t.shape, generator=gen, dtype=dtype) for t in start]
        for params in (ours_p, ref_p):
            for i, (p, g) in enumerate(zip(params, grads, strict=True)):
                p.grad = None if (i == 1 and step % 3 == 2) else g.clone()
        for opt in (ours, ref):
            for group in opt.param_groups:
                group["lr"] = lr
            opt.step()
        for a, b in zip(ours_p, ref_p, strict=True):
            assert torch.equal(a, b), step
    ours.eval()
    ref.eval()
    for a, b in zip(ours_p, ref_p, strict=True):
        assert torch.equal(a, b)  # x, the average
    ours.train()
    ref.train()
    for a, b in zip(ours_p, ref_p, strict=True):
        assert torch.equal(a, b)
    mine, theirs = ours.state_dict(), ref.state_dict()
    assert mine["param_groups"] == theirs["param_groups"]
    for i in theirs["state"]:
        assert torch.equal(mine["state"][i]["z"], theirs["state"][i]["z"])


def test_adam_and_the_learning_rate_rules() -> None:
    p = torch.nn.Parameter(torch.ones(2))
    assert type(build_optimizer("adam", [p], lr=1e-3)) is torch.optim.Adam
    with pytest.raises(ValueError, match="--optimizer must be one of"):
        build_optimizer("sgd", [p], lr=1e-3)
    assert default_lr(2**14, "adam") == pytest.approx(2e-4)
    assert default_lr(1024, "signum") == pytest.approx(5e-3 * 4)  # 1 / sqrt(1024 / 2**14)
    assert default_lr(2**14, "adam", "transcoder", "mean_norm") == pytest.approx(2e-3)
    assert default_lr(2**14, "adam", "clt", "none") == pytest.approx(2e-4)
    assert default_lr(2**14, "signum", "transcoder", "mean_norm") == pytest.approx(5e-3)


@pytest.mark.parametrize(
    ("flags", "rate"),
    [
        ("", 5e-3),  # an SAE: signum
        ("--optimizer adam", 2e-4),
        ("--sae.transcode", 2e-3),  # Adam on normalised activations
        ("--sae.kind clt", 2e-3),
        ("--sae.transcode --sae.normalize-activations none", 2e-4),  # raw: the SAE rule
        ("--sae.transcode --optimizer signum", 5e-3),
        ("--sae.transcode --lr 1e-5", 1e-5),
    ],
)
def test_the_trainer_picks_the_rule_for_the_kind_and_the_activations(
    flags: str, rate: float
) -> None:
    from vlmscope.training.config import parse_train_args

    cfg = parse_train_args(["toy", "shapes", *flags.split()])
    assert cfg.lr_for(2**14) == pytest.approx(rate)
    assert lr_multiplier(0.025, 0.05, 0.2) == pytest.approx(0.5)  # half-way up the warm-up
    assert lr_multiplier(0.5, 0.05, 0.2) == 1.0
    assert lr_multiplier(0.9, 0.05, 0.2) == pytest.approx(0.5)  # half-way down the decay
    assert lr_multiplier(0.9, 0.05, 0.0) == 1.0


@pytest.mark.parametrize(
    ("sae", "optimizer", "decay"),
    [
        (SaeArgs(), "signum", 0.0),
        (SaeArgs(transcode=True), "adam", 0.2),
        (SaeArgs(kind="clt"), "adam", 0.2),
    ],
)
def test_auto_picks_the_optimizer_by_kind(sae: SaeArgs, optimizer: str, decay: float) -> None:
    cfg = TrainConfig(model="m", dataset="d", sae=sae)
    assert (cfg.resolved_optimizer(), cfg.resolved_lr_decay()) == (optimizer, decay)
    forced = TrainConfig(model="m", dataset="d", sae=sae, optimizer="adam", lr_decay_fraction=0.1)
    assert (forced.resolved_optimizer(), forced.resolved_lr_decay()) == ("adam", 0.1)
    with pytest.raises(ValueError, match="--optimizer must be auto, adam or signum, got 'sgd'"):
        TrainConfig(model="m", dataset="d", sae=sae, optimizer="sgd")


def test_signum_run_saves_the_average_and_checkpoints_the_training_point(tmp_path: Path) -> None:
    """The final dictionaries are x (the average); the checkpoint holds y and z, from which
    a resumed trainer recovers exactly that x."""
    cfg = config(tmp_path, "sf", 4, "sae", max_steps=5, optimizer="signum")
    train_here(cfg, 40, sgd=False, layout=Layout())
    final = DictionaryBundle.load(tmp_path / "sf" / "dictionaries").state_dict()
    y = read_checkpoint_state(tmp_path / "sf" / "checkpoint")
    assert not torch.equal(final["coders.0.W_enc"], y["coders.0.W_enc"])
    again = config(tmp_path, "sf", 4, "sae", max_steps=5, optimizer="signum", resume=True)
    tr = Trainer(again, progress=False, source=ArraySource(40, 4, Layout()), layout=Layout())  # type: ignore[arg-type]
    try:
        with averaged(tr.optimizer):
            for k, v in tr.bundle.state_dict().items():
                assert torch.equal(v, final[k]), k
    finally:
        tr.close()
