"""The dictionaries' optimisers: Adam, or sign-SGD under schedule-free averaging ("signum").

`--optimizer adam` is torch's Adam under the trainer's learning-rate schedule (linear warm-up,
constant, linear decay to 0).

`--optimizer signum` steps along the sign of the gradient and averages the iterates the
schedule-free way (Defazio et al. 2024, "The Road Less Scheduled"; `SignumScheduleFree`).
With momentum beta, base step sizes gamma_t and three sequences of the same shape as the
parameters:

    y_t     = (1 - beta) z_t + beta x_t              the point the gradient is taken at
    z_{t+1} = z_t - gamma_t sign(grad f(y_t))        sign-SGD on z
    x_{t+1} = (1 - c_{t+1}) x_t + c_{t+1} z_{t+1}    the running average that is evaluated
    c_{t+1} = w_t / (w_0 + ... + w_t),  w_t = (max_{i <= t} gamma_i)^2

All three start at the initial weights. While training, the parameters hold y (the loss,
metrics and checkpoints see y) and the optimiser state holds z; x is recovered exactly from
the two, which is what `averaged` swaps in before the final dictionaries are written. A
sign step moves every weight by the same amount whatever the gradient's scale, so it makes
fast progress over a short budget where Adam's early steps are small; the averaging plays
the part of the learning-rate decay, which this optimiser does not need (the trainer's
warm-up still applies; its decay is off by default for signum, see `lr_multiplier`).

The default learning rates scale as 1/sqrt(num_latents / 2**14) from 2e-4 (Adam) and 5e-3
(signum), EleutherAI sparsify's rules for its two optimisers, except Adam on transcoders and
CLTs trained on normalised activations (the trainer's default), which starts from 2e-3. Their
decoders start at zero and must grow to the target's scale, one Adam step of about the rate at
a time. Over 80-120 steps on the toy VLM's rows and the width-512 synthetic rows of
benchmarks/vs_sparsify.py, 10x the rule gave the lowest held-out FVU on four rows of six and
was within 11% of the best on the other two; on raw activations no one multiple did
(benchmarks/README.md, "Normalised activations and the transcoders' rate"). On a random
Llama's rows, whose MLP outputs have no sparse structure, the old raw rate was 15-18% better.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

OPTIMIZERS = ("adam", "signum")
_BASE_LR = {"adam": 2e-4, "signum": 5e-3}
#: Adam's base rate for transcoders and CLTs on normalised activations (see above)
TRANSCODER_ADAM_LR = 2e-3
#: schedule-free momentum (beta above); sparsify's value
SIGNUM_MOMENTUM = 0.95


def default_lr(
    num_latents: int, optimizer: str = "adam", kind: str = "sae", normalization: str = "none"
) -> float:
    """The learning rate when --lr is 0: the optimiser's base rate / sqrt(num_latents / 2**14),
    Adam's from 2e-3 for transcoders and CLTs on normalised activations (see above)."""
    zero_decoder_adam = optimizer == "adam" and kind != "sae" and normalization != "none"
    base = TRANSCODER_ADAM_LR if zero_decoder_adam else _BASE_LR[optimizer]
    return base / math.sqrt(num_latents / 2**14)


class SignumScheduleFree(torch.optim.Optimizer):
    """Sign-SGD under schedule-free averaging: the update of the module docstring, in place.

    The parameters hold y and `state[p]["z"]` holds z; each step recovers x from the two, moves
    z along the gradient's sign and forms the next x and y, five passes over each parameter
    (x, sign, z, x, y); the gradients are overwritten by their signs. The arithmetic, its order
    and the state are those of the `schedulefree` package's `ScheduleFreeWrapper` around a
    sign-SGD base (z per parameter; step count `k`, `lr_max` and `weight_sum` per group), so
    results agree bit for bit and checkpoints of either load in the other. The wrapper wraps
    any optimiser by swapping x and z through six more XOR passes: 26-29 ms a step against
    13-14 ms for an SAE of 8,192 latents of width 512 on 2 threads (benchmarks/README.md,
    "Wide dictionaries at 512 tokens a step")."""

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        momentum: float = SIGNUM_MOMENTUM,
        weight_lr_power: float = 2.0,
    ) -> None:
        if not lr > 0:
            raise ValueError(f"signum needs a learning rate > 0, got {lr}")
        if not 0 < momentum < 1:
            raise ValueError(f"signum needs a momentum in (0, 1), got {momentum}")
        super().__init__(params, {"lr": lr})
        self.momentum = momentum
        self.weight_lr_power = weight_lr_power
        self.train_mode = False

    @torch.no_grad()
    def train(self) -> None:
        """Parameters to y (the point gradients are taken at), from x."""
        if not self.train_mode:
            self._lerp_to_z(1 - self.momentum)
        self.train_mode = True

    @torch.no_grad()
    def eval(self) -> None:
        """Parameters to x (the average, what is evaluated and saved), from y."""
        if self.train_mode:
            self._lerp_to_z(1 - 1 / self.momentum)
        self.train_mode = False

    def _lerp_to_z(self, weight: float) -> None:
        for group in self.param_groups:
            ps = [p for p in group["params"] if "z" in self.state[p]]
            if ps:
                torch._foreach_lerp_(ps, [self.state[p]["z"] for p in ps], weight)

    @torch.no_grad()
    def step(self, closure: None = None) -> None:  # type: ignore[override]
        if not self.train_mode:
            raise RuntimeError("signum: step() outside train mode; call train() first")
        beta = self.momentum
        for group in self.param_groups:
            ps = [p for p in group["params"] if p.grad is not None]
            for p in ps:
                if "z" not in self.state[p]:
                    self.state[p]["z"] = torch.clone(p, memory_format=torch.preserve_format)
            zs = [self.state[p]["z"] for p in ps]
            lr = group["lr"]
            lr_max = group["lr_max"] = max(lr, group.get("lr_max", 0))
            weight = lr_max**self.weight_lr_power
            weight_sum = group["weight_sum"] = group.get("weight_sum", 0.0) + weight
            if ps:
                torch._foreach_lerp_(ps, zs, 1 - 1 / beta)  # y -> x
                # the gradients become their signs in place: no parameter-sized temporary
                # (a step is followed by zero_grad; nothing reads a gradient after it)
                grads = [p.grad for p in ps]
                torch._foreach_sign_(grads)
                torch._foreach_add_(zs, grads, alpha=-lr)
                torch._foreach_lerp_(ps, zs, weight / weight_sum)  # the next x
                torch._foreach_lerp_(ps, zs, 1 - beta)  # the next y
            group["k"] = group.get("k", 0) + 1


def build_optimizer(name: str, params: Iterable[Any], lr: float) -> Any:
    """The optimiser `name` over `params`, ready to step (signum: in train mode, parameters
    at y). Both answer step / zero_grad / param_groups / state / state_dict /
    load_state_dict, which is all the trainer and its checkpoints use."""
    params = list(params)
    if name == "adam":
        # One fused kernel per step instead of ~10 elementwise passes per tensor: 0.37 ms
        # against 1.26 ms for a 1,024 x 128 transcoder, 20.8 against 96.7 ms at 16,384 x 512
        # (one CPU thread, benchmarks/step_kernels.py). Same update, same state_dict.
        return torch.optim.Adam(params, lr=lr, fused=_fusable(params))
    if name == "signum":
        opt = SignumScheduleFree(params, lr=lr)
        # No z yet: this only sets the mode, so a checkpoint (saved at y) loads unchanged.
        opt.train()
        return opt
    raise ValueError(f"--optimizer must be one of {OPTIMIZERS}, got {name!r}")


def _fusable(params: list[Any]) -> bool:
    """Whether torch's fused Adam takes these parameters: plain floating tensors on CPU or CUDA
    (parameter groups given as dicts keep the reference implementation)."""
    return bool(params) and all(
        isinstance(p, torch.Tensor) and p.is_floating_point() and p.device.type in ("cpu", "cuda")
        for p in params
    )


def is_schedule_free(opt: Any) -> bool:
    """Whether `opt` keeps y in the parameters and an average to evaluate (train/eval modes)."""
    return hasattr(opt, "eval") and hasattr(opt, "train")


@contextmanager
def averaged(opt: Any) -> Iterator[None]:
    """Inside: the parameters hold the averaged weights x (schedule-free optimisers; Adam's
    are left as they are). After: back to y, up to rounding, so use it once training is over
    or accept that the rest of the run differs in the last bits."""
    schedule_free = is_schedule_free(opt)
    if schedule_free:
        opt.eval()
    try:
        yield
    finally:
        if schedule_free:
            opt.train()


def take_step(dictionaries: Any, opt: Any, lr: float, normalize_decoder: bool) -> None:
    """One optimiser step at `lr` on gradients already accumulated. With normalize_decoder
    the step keeps decoder rows at unit norm: the gradient along each row is dropped first
    and, under Adam, the rows are rescaled after (a schedule-free optimiser rescales before
    its forward instead, so its averaged weights are its own)."""
    for group in opt.param_groups:
        group["lr"] = lr
    if normalize_decoder:
        dictionaries.remove_gradient_parallel_to_decoder_directions()
    opt.step()
    opt.zero_grad(set_to_none=True)
    if normalize_decoder and not is_schedule_free(opt):
        dictionaries.set_decoder_norm_to_unit_norm()


def lr_multiplier(frac: float, warmup: float, decay: float) -> float:
    """The schedule at `frac` of the budget: linear warm-up over the first `warmup`, constant,
    linear decay to 0 over the last `decay` (fractions of the budget)."""
    frac = min(1.0, frac)
    warm = min(1.0, frac / warmup) if warmup else 1.0
    start = 1.0 - decay
    down = 1.0 if frac <= start else max(0.0, (1.0 - frac) / max(1e-12, 1.0 - start))
    return warm * down
