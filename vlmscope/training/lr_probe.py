"""`--lr-probe N`: choose the learning rate on the run's own first batches.

Why: the default rate (`optim.default_lr`) is a rule fitted to long runs. Over a budget of a
few hundred steps the best multiple of it depends on the data: on the toy VLM's rows with
images the rule's rate was best and x10 doubled the held-out FVU, on the width-512 synthetic
rows x10 halved it (benchmarks/README.md, "Choosing the learning rate"; measured on raw
activations, before the trainer normalised them by default). Which of the two a
model's activations resemble is not known before training, so the probe measures it.

How: the freshly initialised dictionaries train at each multiple in `SCALES` (per optimiser)
of the rate on the run's first N batches, with the run's top-k annealing but a schedule of
its own: a linear warm-up over the first quarter of the N steps, then the peak rate. (The run's own
first steps sit, in a long run, deep in its warm-up, at rates that say nothing about the
peak; `PROBE_WARMUP` is as a run of N steps with --lr-warmup-fraction 0.25 has it.) Each
candidate is scored by its mean FVU on the batches of the probe's second half, each measured
before it trained on that batch, and on the batch after the probe: data it had not seen when
scored, over several batches (one batch alone picked x3 over x1 on the toy's image rows,
where x1 ends better: x3's FVU there jumps from batch to batch). The run then starts from the
same initial weights at the best multiple (ties go to the smaller).

Cost: 3 x N extra steps; on the device no more memory than the run's own (the
candidates train the dictionaries in place; the initial state and the batches read ahead
wait in host memory, each batch brought to the device when used). The
run's data, order and random state are untouched, so a probed run trains exactly as a run
given the chosen rate with --lr. With data parallel ranks each candidate trains as DDP trains
the run: every rank on its share of each batch, the gradients and the FVUs summed over the
ranks (batchstats), so all ranks choose alike.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from vlmscope.dictionaries import batchstats
from vlmscope.training.optim import (
    averaged,
    build_optimizer,
    is_schedule_free,
    lr_multiplier,
    take_step,
)

#: multiples of the base rate tried, per optimiser.
#: - adam: either side of the rule. Until the rule's Adam rate for transcoders and CLTs went up
#:   10x, the probe tried x1, x3 and x10 of it; on normalised activations x30 of the old rate
#:   lost on every row measured, and x3 of it (x1/3 of the new) was the best on the toy's
#:   transcoder rows with images.
#: - signum: not below the rule. Under schedule-free averaging x1/3 scored best over the 8
#:   steps on the toy's and the synthetic SAE rows, and then ended worse on two of the three
#:   (held-out FVU 0.028 and 0.523 against x1's 0.025 and 0.451).
SCALES: dict[str, tuple[float, ...]] = {"adam": (1.0 / 3.0, 1.0, 3.0), "signum": (1.0, 3.0, 10.0)}
#: the probe's warm-up, a fraction of its steps
PROBE_WARMUP = 0.25

#: xs, ys of one batch (one list entry per unit)
Batch = tuple[Sequence[Tensor], Sequence[Tensor]]


@dataclass
class ProbeResult:
    """The chosen multiple of the base rate and every candidate's score (mean FVU on batches
    it had not trained on; NaN: its loss stopped being finite)."""

    scale: float
    score: dict[float, float]
    steps: int

    def summary(self, base_lr: float) -> str:
        scores = ", ".join(f"x{s:.3g}: {v:.4f}" for s, v in self.score.items())
        return (
            f"--lr-probe: FVU on unseen batches over {self.steps} steps at {scores}; training at "
            f"lr {base_lr * self.scale:.3g} (x{self.scale:.3g} of {base_lr:.3g})"
        )


def probe_lr(
    bundle: nn.Module,
    optimizer: str,
    base_lr: float,
    steps: Sequence[Sequence[Batch]],
    heldout: Batch,
    k_at: Callable[[int], int | None],
    normalize_decoder: bool,
) -> ProbeResult:
    """Train `bundle` (a DictionaryBundle after init_from_data) per scale on `steps` (each
    step's micro-batches, gradients averaged over them as with --grad-acc-steps) and score
    it (see `_train_and_score`). k_at(tokens) is the run's annealed k after `tokens` tokens
    (None: fixed).

    The candidates train the bundle itself, from its initial state kept in host memory and
    loaded back after each (parameters, buffers, gradients, mode, k), so the probe needs no
    second copy on the device: its peak there is the run's own (parameters, gradients,
    optimiser moments). The caller's random state is restored too."""
    rng = torch.random.get_rng_state()
    start = {k: v.detach().to("cpu", copy=True) for k, v in bundle.state_dict().items()}
    mode, ks = bundle.training, [getattr(a, "k", None) for a in bundle.activations()]  # type: ignore[operator]
    scores: dict[float, float] = {}
    try:
        for scale in SCALES[optimizer]:
            scores[scale] = _train_and_score(
                bundle, optimizer, base_lr * scale, steps, heldout, k_at, normalize_decoder,
            )  # fmt: skip
            _restore(bundle, start)
    finally:
        _restore(bundle, start)
        bundle.train(mode)
        for act, k in zip(bundle.activations(), ks, strict=True):  # type: ignore[operator]
            if k is not None:
                act.k = k
        torch.random.set_rng_state(rng)
    finite = {s: v for s, v in scores.items() if math.isfinite(v)}
    best = min(finite, key=lambda s: (finite[s], s)) if finite else min(SCALES[optimizer])
    return ProbeResult(best, scores, len(steps))


def moved(batch: Batch, device: torch.device | str) -> Batch:
    """xs, ys on `device` (a tensor that is both an x and a y stays one tensor)."""
    done: dict[int, Tensor] = {}

    def to(t: Tensor) -> Tensor:
        if id(t) not in done:
            done[id(t)] = t.to(device)
        return done[id(t)]

    return [to(x) for x in batch[0]], [to(y) for y in batch[1]]


def _restore(bundle: nn.Module, start: dict[str, Tensor]) -> None:
    """The bundle's initial state back, gradients dropped."""
    bundle.load_state_dict(start)
    for p in bundle.parameters():
        p.grad = None


def _train_and_score(
    bundle: nn.Module,
    optimizer: str,
    lr: float,
    steps: Sequence[Sequence[Batch]],
    heldout: Batch,
    k_at: Callable[[int], int | None],
    normalize_decoder: bool,
) -> float:
    """The score of `bundle` trained on `steps` at peak rate `lr` (in place): its FVU (the
    units' mean, as the trainer logs it) on the second half's batches before each update and
    on `heldout` after all, averaged."""
    bundle.train()
    opt = build_optimizer(optimizer, bundle.parameters(), lr)
    norm_before = normalize_decoder and is_schedule_free(opt)
    device = next(bundle.parameters()).device
    tokens = 0
    seen: list[float] = []  # FVU of each scored step's batches before the update
    for step, micro in enumerate(steps):
        fvu = 0.0
        for i, batch in enumerate(micro):
            xs, ys = moved(batch, device)  # batches may wait in host memory
            k = k_at(tokens)
            if k is not None:
                for act in bundle.activations():  # type: ignore[operator]
                    act.k = k
            if norm_before and i == 0:
                bundle.set_decoder_norm_to_unit_norm()  # type: ignore[operator]
            out = bundle(xs, ys)
            loss = out.loss / len(micro)
            # the same verdict on every rank, so none waits in a collective the others left
            if batchstats.all_sum((~torch.isfinite(loss.detach())).float().reshape(1)) > 0:
                return math.nan
            loss.backward()
            fvu += _global_fvu(out.fvu_per_unit) / len(micro)
            tokens += int(batchstats.all_sum(torch.tensor([xs[0].shape[0]], device=xs[0].device)))
        if batchstats.active():  # data parallel: each rank's loss is its share, as in DDP
            for p in bundle.parameters():
                if p.grad is not None:
                    p.grad.copy_(batchstats.all_sum(p.grad))
        if step >= len(steps) // 2:
            seen.append(fvu)
        warm = lr_multiplier((step + 1) / len(steps), PROBE_WARMUP, 0.0)
        take_step(bundle, opt, lr * warm, normalize_decoder)
    bundle.eval()
    with torch.no_grad(), averaged(opt):
        seen.append(_global_fvu(bundle(*moved(heldout, device)).fvu_per_unit))
    return sum(seen) / len(seen)


def _global_fvu(per_unit: Tensor) -> float:
    """The units' mean FVU of the global batch (with data parallel ranks each holds its
    share of every unit's FVU, batchstats' convention)."""
    return float(batchstats.all_sum(per_unit.detach()).mean())
