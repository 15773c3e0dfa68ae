"""The training planner: per-GPU memory and tokens per step of a `vlmscope train` configuration
on N GPUs, whether it fits, and what to change when it does not.

Per GPU, with G GPUs, B = --batch-size samples of T tokens (--tokens-per-sample, default
--ctx-len), N = B * T tokens per micro-step, L trained layers, F latents, d the model width:

    model       weights P * bytes(dtype)            (/ G with --shard-model fsdp, plus two
                                                      decoder layers gathered at once and
                                                      the root unit: all but the layers)
                forward transients N * (4 d + 3 d_ffn) * 2 B, logits N * vocab * 2 B
                hook cache N * L * (d_in + d_out) * (bytes(dtype) + 4)  (model dtype + fp32)
    dictionary  parameters, gradients (4 B each), Adam moments (8 B): 16 B per parameter of
                the dictionaries this rank holds (all of them with DDP, which adds a 4 B
                gradient bucket; 1/G of them with --distribute-modules)
                encoder pre-activations N_d * F * 4 B per held unit, reconstructions
                N_d * d * 8 B  (N_d = N with DDP; G * N tokens of 1/G of the units otherwise)
    buffers     dead-latent counters F * 8 B per unit; all-to-all send + receive buffers
                2 * N * L * (d_in + d_out) * 4 B with --distribute-modules; 1 GiB framework

Parameters of a CLT layer l: F * d (encoder) + F (bias) + F * n_out(l) * d (decoder) + d, with
n_out(l) = min(n_targets or L, L - l). The dictionary lines are exact (checked against the
tensors of a real run in tests/plan); the activation lines are estimates. `--lr-probe` adds
nothing on the device: its candidates train the dictionaries in place, and its saved state
and read-ahead batches wait in host memory.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from vlmscope.plan.memory import DTYPE_BYTES, Budget, GiB, ModelShape
from vlmscope.training.config import TrainConfig

FRAMEWORK_BYTES = 1 * GiB


@dataclass
class TrainingPlan:
    model: ModelShape
    gpus: int
    gpu_mem_gib: float
    budget: Budget
    tokens_per_step: int
    dictionary_params: int
    fits: bool
    advice: list[str]

    def report(self) -> str:
        verdict = "fits" if self.fits else "does NOT fit"
        lines = [
            f"{self.model.name}: {self.model.n_params / 1e9:.2f}B parameters, "
            f"{self.model.n_layers} layers, d_model {self.model.d_model}",
            f"dictionaries: {self.dictionary_params / 1e9:.3f}B parameters in total",
            "",
            self.budget.table(),
            "",
            f"per GPU: {self.budget.total() / GiB:.1f} GiB of {self.gpu_mem_gib:.1f} GiB: "
            f"{verdict}",
            f"tokens per optimiser step: {self.tokens_per_step:,}",
        ]
        if self.advice:
            lines += ["", "to change:"] + [f"  - {a}" for a in self.advice]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": dataclasses.asdict(self.model),
            "gpus": self.gpus,
            "gpu_mem_gib": self.gpu_mem_gib,
            "per_gpu": self.budget.to_dict(),
            "tokens_per_step": self.tokens_per_step,
            "dictionary_params": self.dictionary_params,
            "fits": self.fits,
            "advice": self.advice,
        }


def unit_params(cfg: TrainConfig, shape: ModelShape, n_units: int) -> list[int]:
    """Parameters of each trained unit (an SAE / transcoder, or one CLT layer with its decoder
    to every target), in layer order."""
    sae, d = cfg.sae, shape.d_model
    f = sae.num_latents or sae.expansion_factor * d
    kind = sae.resolved_kind()
    extra = f if sae.activation == "jumprelu" else 0
    skip = d * d if sae.skip_connection else 0
    if kind != "clt":
        return [f * d + f + f * d + d + skip + extra] * n_units
    window = sae.n_targets or n_units
    return [
        f * d + f + f * min(window, n_units - layer) * d + d + skip + extra
        for layer in range(n_units)
    ]


def _largest_share(cfg: TrainConfig, shape: ModelShape, n_units: int, g: int) -> tuple[int, int]:
    """(parameters, units) of the rank holding the most under --distribute-modules, with the
    trainer's own split: per-layer units in blocks of ceil-ish n/G (`training/modules.py`); a
    CLT sharded by target layer, each layer's encoder plus the decoder slices writing into it,
    in blocks balanced by that count (`training/clt_shards.py`)."""
    from vlmscope.training.clt_shards import balanced_blocks

    if cfg.sae.resolved_kind() != "clt":
        per = unit_params(cfg, shape, n_units)[0]
        counts = [0] * g
        for i in range(n_units):
            counts[i * g // n_units] += 1
        return max(counts) * per, max(counts)
    sae, d = cfg.sae, shape.d_model
    f = sae.num_latents or sae.expansion_factor * d
    window = sae.n_targets or n_units
    extra = f if sae.activation == "jumprelu" else 0
    skip = d * d if sae.skip_connection else 0
    sources = [min(window, t + 1) for t in range(n_units)]
    owner = balanced_blocks([d + d * s for s in sources], g)
    params, units = [0] * g, [0] * g
    for t, s in enumerate(sources):
        params[owner[t]] += f * d + f + extra + f * d * s + d + skip
        units[owner[t]] += 1
    return max(params), max(units)


def plan_training(
    model: ModelShape | str,
    cfg: TrainConfig,
    gpus: int,
    gpu_mem_gib: float,
    tokens_per_sample: int = 0,
    advise: bool = True,
) -> TrainingPlan:
    shape = model if isinstance(model, ModelShape) else ModelShape.from_config(model)
    g = max(1, gpus)
    n_units = len(cfg.layers) if cfg.layers else shape.n_layers
    d, sae = shape.d_model, cfg.sae
    f = sae.num_latents or sae.expansion_factor * d
    t = tokens_per_sample or cfg.ctx_len
    n = cfg.batch_size * t
    # autocast changes what matmuls compute in, not what the weights are stored in
    dtype = cfg.dtype or shape.dtype
    wb = DTYPE_BYTES.get(dtype, 2)
    b = Budget()

    # model
    fsdp = cfg.shard_model == "fsdp" and g > 1  # one process holds its model whole
    b.add(
        "model",
        "weights" + (" (FSDP shard)" if fsdp else ""),
        shape.n_params * wb / (g if fsdp else 1),
        f"{shape.n_params / 1e9:.2f}B x {wb} B",
    )
    if fsdp:
        b.add("model", "FSDP gathered layers (2 in flight)", 2 * shape.largest_layer * wb)
        b.add("model", "FSDP root unit, gathered whole", shape.root_unit * wb,
              "all but the sharded layers")  # fmt: skip
    b.add("model", "forward transients", n * (4 * d + 3 * shape.d_ffn) * 2, f"{n} tokens")
    b.add("model", "logits", n * shape.vocab * 2)
    b.add("model", "hook cache (model dtype + fp32)", n * n_units * 2 * d * (wb + 4))

    # dictionaries
    per_unit = unit_params(cfg, shape, n_units)
    total_params = sum(per_unit)
    held, units_held = total_params, n_units
    if cfg.distribute_modules and g > 1:
        held, units_held = _largest_share(cfg, shape, n_units, g)
    n_d = n * g if cfg.distribute_modules else n
    b.add("dictionary", "parameters (fp32)", held * 4, f"{held / 1e9:.3f}B held")
    b.add("dictionary", "gradients (fp32)", held * 4)
    b.add("dictionary", "Adam moments (fp32)", held * 8)
    if g > 1 and not cfg.distribute_modules:
        b.add("dictionary", "DDP gradient buckets", held * 4)
    b.add("dictionary", "encoder pre-activations", n_d * f * 4 * units_held, f"F = {f}")
    b.add("dictionary", "reconstructions + targets", n_d * d * 8 * units_held)

    # buffers
    b.add("buffers", "dead-latent counters", f * 8 * units_held)
    if cfg.distribute_modules and g > 1:
        b.add("buffers", "all-to-all send + receive", 2 * n * n_units * 2 * d * 4)
    b.add("buffers", "framework (CUDA context, allocator)", FRAMEWORK_BYTES)

    tokens = g * cfg.batch_size * cfg.grad_acc_steps * t
    fits = b.total() <= gpu_mem_gib * GiB
    advice = _advice(shape, cfg, g, gpu_mem_gib, t, b) if advise and not fits else []
    return TrainingPlan(shape, g, gpu_mem_gib, b, tokens, total_params, fits, advice)


def _advice(
    shape: ModelShape, cfg: TrainConfig, g: int, mem: float, t: int, b: Budget
) -> list[str]:
    """Changes that make the configuration fit, each checked by planning it again."""
    out: list[str] = []

    def fits(**changes: Any) -> TrainingPlan:
        sae = dataclasses.replace(cfg.sae, **changes.pop("sae", {}))
        new = dataclasses.replace(cfg, sae=sae, **changes)
        return plan_training(shape, new, g, mem, t, advise=False)

    # Each change is kept only if it lowers the plan (--distribute-modules trades the
    # dictionaries' share for all-to-all buffers and G times the tokens per held unit, which
    # can cost more than it saves), and none is added once the plan fits.
    now = b.total()
    model_only = b.total("model") + FRAMEWORK_BYTES
    if cfg.shard_model != "fsdp" and model_only > 0.6 * mem * GiB and g > 1:
        p = fits(shard_model="fsdp")
        if p.budget.total() < now:
            out.append(
                f"--shard-model fsdp: the weights take {b.total('model') / GiB:.0f} GiB per "
                f"GPU unsharded ({p.budget.total() / GiB:.0f} GiB total with it)"
            )
            cfg = dataclasses.replace(cfg, shard_model="fsdp")
            now = p.budget.total()
            if p.fits:
                return out
    p = fits(distribute_modules=True) if not cfg.distribute_modules and g > 1 else None
    if p is not None and p.budget.total() < now:
        drop = (
            " and no --lr-probe, which needs whole dictionaries on every GPU (probe in a "
            "smaller run and pass its rate with --lr)"
            if cfg.lr_probe
            else ""
        )
        out.append(
            f"--distribute-modules: each GPU holds 1/{g} of the dictionaries "
            f"({p.budget.total() / GiB:.0f} GiB per GPU){drop}"
        )
        cfg = dataclasses.replace(cfg, distribute_modules=True)
    if fits().fits:
        return out
    # The largest dictionaries that fit: latents first (as many as possible), then the CLT
    # window (as wide as possible).
    d = shape.d_model
    now_f = cfg.sae.num_latents or cfg.sae.expansion_factor * d
    latents = [f for f in (32 * d, 16 * d, 8 * d, 4 * d, 2 * d, d, d // 2, d // 4, d // 8, d // 16)
               if f <= now_f]  # fmt: skip
    clt = cfg.sae.resolved_kind() == "clt"
    now_w = cfg.sae.n_targets or shape.n_layers
    windows = [w for w in (now_w, 32, 16, 8, 4, 2, 1) if w <= now_w] if clt else [0]
    for f in latents:
        found = None
        for w in dict.fromkeys(windows):
            change: dict[str, Any] = {"num_latents": f}
            if clt:
                change["n_targets"] = w
            p = fits(sae=change)
            if p.fits:
                found = (w, p)
                break
        if found is not None:
            w, p = found
            flag = f"--sae.num-latents {f}" + (f" --sae.n_targets {w}" if clt else "")
            out.append(
                f"{flag}: the largest dictionaries that fit "
                f"({p.dictionary_params / 1e9:.1f}B parameters, "
                f"{p.budget.total() / GiB:.0f} GiB per GPU)"
            )
            break
    if cfg.batch_size > 1:
        p = fits(batch_size=1, grad_acc_steps=cfg.grad_acc_steps * cfg.batch_size)
        out.append(
            f"--batch-size 1 --grad-acc-steps {cfg.grad_acc_steps * cfg.batch_size}: "
            f"the same tokens per step ({p.budget.total() / GiB:.0f} GiB per GPU)"
        )
    if not out:
        out.append("nothing tried fits: train fewer --layers per run, or use more GPUs")
    return out
