"""Evaluation of dictionaries on a model: reconstruction and next-token metrics.

Two families of numbers, each per unit (layer) and overall:

* Reconstruction, from *clean* activations: in one clean forward per batch every unit encodes
  its clean read and decodes its write inside the hooks (only the sparse codes are kept); the
  dictionaries run in eval mode, so dead-latent counters do not move. Reported separately for
  the token groups "all" (non-pad, non-special), "image" and "text":

  - normalised MSE  = sum_tokens ||y - y_hat||^2 / sum_tokens ||y||^2
  - FVU             = SSE / sum of squared deviations of y from its mean over the group's tokens
  - explained var.  = 1 - FVU
  - L0              = mean number of active latents per token (for a CLT: of source unit t)
  - dead fraction   = fraction of latents never active on the group's evaluated tokens

  "overall" pools units: FVU = sum SSE / sum SST, nMSE = sum SSE / sum ||y||^2, L0 = the mean
  over units, dead = dead latents / all latents.

* Next-token prediction at every position whose next token is real (non-pad), reported on all
  such positions ("all"), where the predicted token is a text token ("text") and where it is an
  answer token (`Batch.answer`, "answer"):

  - CE-loss score   = (CE_zero - CE_replaced) / (CE_zero - CE_original)
  - KL              = mean KL(original || replaced) of the next-token distributions (nats)
  - top-1 agreement = fraction of positions where the argmax tokens agree

  "all layers" is the ReplacementModel forward (every written hook replaced, a CLT's encoders
  reading the replaced stream); "one layer at a time" replaces only unit t's written hook, with
  its reconstruction from the clean codes (for a CLT: of every source s <= t), every other layer
  clean. Zero ablation sets the same hook(s) to 0 (for transcoders / CLTs: the MLP outputs). Both
  act at the positions the replacement model replaces (`replace_tokens`), so the score measures
  the loss recovered at exactly the positions that were ablated.

Units are labelled by the hook they read (as in training); `writes` maps them to the hook each
one reconstructs and replaces.

Forward-pass budget per batch: clean (1), all replaced (1), all zero-ablated (1), and with
`per_layer=True` one replaced and one zero-ablated pass per unit (2 L): 3 + 2 L in all.
Everything accumulates as sums and counts over batches, so results do not depend on batching.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from vlmscope.data.processing import Batch, SampleEncoder, SkipCounter, batches, encode_stream
from vlmscope.dictionaries import SparseCodes
from vlmscope.dictionaries import fvu as fvu
from vlmscope.files import write_text_atomically
from vlmscope.models.hooked import HookContext, HookedVLM, HookFn
from vlmscope.models.masks import TokenKind, TokenMasks
from vlmscope.models.vision import is_vision_hook, vision_row_mask
from vlmscope.replacement.model import ReplacementModel, ReplaceTokens, flat_rows, unit_hooks
from vlmscope.training.bundle import DictionaryBundle
from vlmscope.training.config import is_shapes_dataset

RECON_GROUPS: tuple[TokenKind, ...] = ("all", "image", "text")
NEXT_TOKEN_GROUPS: tuple[str, ...] = ("all", "text", "answer")
METRICS_FILE = "metrics.json"


# --- pure metric functions -----------------------------------------------------------------------
def ce_loss_score(ce_zero: float, ce_replaced: float, ce_orig: float) -> float:
    """(CE_zero - CE_replaced) / (CE_zero - CE_original): 1 = the replacement loses nothing,
    0 = as bad as zero-ablating; NaN when ablation does not change the loss (undefined)."""
    denom = ce_zero - ce_orig
    if denom == 0 or not math.isfinite(denom):
        return math.nan
    return (ce_zero - ce_replaced) / denom


def _kl_rows(logp: Tensor, logq: Tensor) -> Tensor:
    """KL(p || q) per row from log-probabilities [..., V]; 0 * log 0 counts as 0."""
    p = logp.exp()
    return torch.where(p > 0, p * (logp - logq), torch.zeros_like(p)).sum(-1)


def kl_divergence(logits_p: Tensor, logits_q: Tensor, mask: Tensor | None = None) -> Tensor:
    """Mean KL(softmax(p) || softmax(q)) in nats over the positions where `mask` ([...] bool).

    p is the reference (the original model), q the approximation (the replacement)."""
    logp = F.log_softmax(logits_p.float(), -1)
    logq = F.log_softmax(logits_q.float(), -1)
    kl = _kl_rows(logp, logq)
    return kl[mask].mean() if mask is not None else kl.mean()


def normalized_mse(y: Tensor, y_hat: Tensor) -> Tensor:
    """sum ||y - y_hat||^2 / sum ||y||^2 over all rows of y [N, D]."""
    y = y.float()
    return (y - y_hat.float()).pow(2).sum() / y.pow(2).sum().clamp_min(torch.finfo().tiny)


def explained_variance(y: Tensor, y_hat: Tensor) -> Tensor:
    """1 - FVU: the fraction of y's variance (around its mean over rows) that y_hat explains."""
    return 1 - fvu(y, y_hat)


def next_token_targets(input_ids: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
    """([B, S-1] bool positions that predict a real next token, [B, S-1] their targets).

    Position p predicts token p + 1; both must be real tokens (not padding)."""
    v = valid.bool()
    return v[:, :-1] & v[:, 1:], input_ids[:, 1:]


def next_token_ce(logits: Tensor, input_ids: Tensor, valid: Tensor) -> Tensor:
    """Mean next-token cross-entropy over the positions whose next token is real."""
    pos, targets = next_token_targets(input_ids, valid)
    pos = pos.to(logits.device)
    return F.cross_entropy(logits[:, :-1][pos].float(), targets.to(logits.device)[pos])


def top1_agreement(logits_p: Tensor, logits_q: Tensor, mask: Tensor | None = None) -> Tensor:
    """Fraction of positions (where `mask`) at which both argmax tokens are the same."""
    same = (logits_p.argmax(-1) == logits_q.argmax(-1)).float()
    return same[mask].mean() if mask is not None else same.mean()


# --- exact accumulators --------------------------------------------------------------------------
def _nan_if_empty(n: int, value: float) -> float:
    return value if n > 0 else math.nan


@dataclass
class ReconStats:
    """Sums over batches for one (token group, unit): exact, not an average of averages.

    The per-dimension mean and squared deviations (M2) merge batch by batch with Chan et al.'s
    formula, so SST (and FVU) equal those of all tokens pooled, without float cancellation."""

    num_latents: int
    n: int = 0
    sse: float = 0.0
    sum_sq: float = 0.0
    l0_sum: int = 0
    mean: Tensor | None = None
    m2: Tensor | None = None
    fired: Tensor | None = None

    def add(self, y: Tensor, y_hat: Tensor, codes: SparseCodes) -> None:
        """y, y_hat [N, D] of the group's tokens; codes: the same rows' sparse codes."""
        nb = int(y.shape[0])
        if nb == 0:
            return
        y = y.float()
        self.sse += float((y - y_hat.float()).pow(2).sum())
        self.sum_sq += float(y.pow(2).sum())
        mean_b = y.mean(0)
        m2_b = (y - mean_b).pow(2).sum(0).double().cpu()
        mean_b = mean_b.double().cpu()
        if self.mean is None or self.m2 is None:
            self.mean, self.m2 = mean_b, m2_b
        else:
            n = self.n + nb
            delta = mean_b - self.mean
            self.mean = self.mean + delta * (nb / n)
            self.m2 = self.m2 + m2_b + delta.pow(2) * (self.n * nb / n)
        self.n += nb
        active = codes.active()
        self.l0_sum += int(active.sum())
        hits = torch.zeros(self.num_latents, dtype=torch.bool, device=codes.indices.device)
        hits[codes.indices[active]] = True
        self.fired = hits.cpu() if self.fired is None else self.fired | hits.cpu()

    @property
    def sst(self) -> float:
        return float(self.m2.sum()) if self.m2 is not None else 0.0

    def result(self) -> dict[str, float]:
        n = self.n
        tiny = torch.finfo(torch.float64).tiny
        f = _nan_if_empty(n, self.sse / max(self.sst, tiny))
        fired = int(self.fired.sum()) if self.fired is not None else 0
        return {
            "fvu": f,
            "explained_variance": 1.0 - f,
            "normalized_mse": _nan_if_empty(n, self.sse / max(self.sum_sq, tiny)),
            "l0": _nan_if_empty(n, self.l0_sum / max(n, 1)),
            "dead_fraction": _nan_if_empty(n, 1.0 - fired / self.num_latents),
        }


def pooled_recon(stats: Sequence[ReconStats]) -> dict[str, float]:
    """Overall reconstruction metrics of several units (see the module docstring). Units may
    see different numbers of rows (a projector's patches beside a language model's tokens):
    L0 is per row of all of them."""
    n = sum(s.n for s in stats)
    tiny = torch.finfo(torch.float64).tiny
    sse = sum(s.sse for s in stats)
    f = _nan_if_empty(n, sse / max(sum(s.sst for s in stats), tiny))
    latents = sum(s.num_latents for s in stats)
    fired = sum(int(s.fired.sum()) for s in stats if s.fired is not None)
    return {
        "fvu": f,
        "explained_variance": 1.0 - f,
        "normalized_mse": _nan_if_empty(n, sse / max(sum(s.sum_sq for s in stats), tiny)),
        "l0": _nan_if_empty(n, sum(s.l0_sum for s in stats) / max(n, 1)),
        "dead_fraction": _nan_if_empty(n, 1.0 - fired / max(latents, 1)),
    }


@dataclass
class NextTokenStats:
    """Sums over positions of one (token group, forward pass)."""

    n: int = 0
    ce_sum: float = 0.0
    kl_sum: float = 0.0
    agree_sum: int = 0

    def add(self, ce: Tensor, kl: Tensor, agree: Tensor) -> None:
        self.n += int(ce.numel())
        self.ce_sum += float(ce.double().sum())
        self.kl_sum += float(kl.double().sum())
        self.agree_sum += int(agree.sum())

    @property
    def ce(self) -> float:
        return _nan_if_empty(self.n, self.ce_sum / max(self.n, 1))

    @property
    def kl(self) -> float:
        return _nan_if_empty(self.n, self.kl_sum / max(self.n, 1))

    @property
    def top1(self) -> float:
        return _nan_if_empty(self.n, self.agree_sum / max(self.n, 1))


# --- the report ----------------------------------------------------------------------------------
@dataclass
class EvalReport:
    """What `evaluate` measured. `reconstruction[group]` has n_tokens, overall and per_unit
    metrics; `next_token[group]` has n_positions, ce_original, all_layers and per_layer (keyed by
    unit; empty without per-layer passes). Units are labelled by the hook they read."""

    model: str
    kind: str
    units: list[str]
    writes: list[str]
    replace_tokens: str
    per_layer: bool
    n_batches: int
    n_samples: int
    n_tokens: int
    forward_passes: int
    reconstruction: dict[str, dict[str, Any]] = field(default_factory=dict)
    next_token: dict[str, dict[str, Any]] = field(default_factory=dict)
    dictionaries: str | None = None
    #: what was evaluated: the dataset, its split and the token budget (None: all of it).
    dataset: str | None = None
    split: str | None = None
    max_tokens: int | None = None
    #: True when dataset and split are the dictionaries' training data (scores are then
    #: optimistic); None when the training run is unknown.
    same_data_as_training: bool | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict; NaN (an empty group, an undefined score) becomes None (null)."""
        return _json_safe(
            {
                "model": self.model,
                "dictionaries": self.dictionaries,
                "dataset": self.dataset,
                "split": self.split,
                "max_tokens": self.max_tokens,
                "same_data_as_training": self.same_data_as_training,
                "kind": self.kind,
                "units": self.units,
                "writes": self.writes,
                "replace_tokens": self.replace_tokens,
                "per_layer": self.per_layer,
                "n_batches": self.n_batches,
                "n_samples": self.n_samples,
                "n_tokens": self.n_tokens,
                "forward_passes": self.forward_passes,
                "reconstruction": self.reconstruction,
                "next_token": self.next_token,
            }
        )

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write to_dict() as JSON atomically (temporary file, then rename); returns the path."""
        return write_text_atomically(path, json.dumps(self.to_dict(), indent=1) + "\n")

    def table(self) -> str:
        """The report as short plain-text tables (reconstruction, then next-token)."""
        w = max([len(u) for u in self.units] + [12])
        lines = [
            f"{self.model}: {self.kind} over {len(self.units)} units; {self.n_tokens} tokens in "
            f"{self.n_samples} samples, {self.forward_passes} forward passes",
            f"data: {self.dataset or '(given batches)'}"
            + (f", split {self.split}" if self.split else "")
            + f"; token budget {self.max_tokens if self.max_tokens else 'none (all data)'}",
        ]
        if self.same_data_as_training:
            lines.append(f"WARNING: {TRAINING_DATA_WARNING}")
        lines += ["", "Reconstruction (clean activations)"]
        head = f"{'unit':<{w}} {'FVU':>8} {'EV':>8} {'nMSE':>8} {'L0':>8} {'dead %':>7}"
        for group, res in self.reconstruction.items():
            lines.append(f"  tokens: {group} ({res['n_tokens']})")
            if not res["n_tokens"]:
                continue
            lines.append("  " + head)
            rows = [*res["per_unit"].items(), ("overall", res["overall"])]
            for name, m in rows:
                lines.append(
                    f"  {name:<{w}} {_f(m['fvu'], 4):>8} {_f(m['explained_variance'], 4):>8} "
                    f"{_f(m['normalized_mse'], 4):>8} {_f(m['l0'], 2):>8} "
                    f"{_f(100 * m['dead_fraction'], 2):>7}"
                )
        lines += [
            "",
            "Next token (score = (CE_zero - CE_repl) / (CE_zero - CE_orig); KL(orig || repl))",
        ]
        head = (
            f"{'replaced':<{w}} {'CE repl':>8} {'CE zero':>8} {'score':>8} {'KL':>8} {'top-1':>7}"
        )
        for group, res in self.next_token.items():
            lines.append(
                f"  predicted: {group} ({res['n_positions']} positions), "
                f"CE original {_f(res['ce_original'], 4)}"
            )
            if not res["n_positions"]:
                continue
            if not res["all_layers"]["ce_zero_ablation"] > res["ce_original"]:
                lines.append(
                    "  (zero-ablating every MLP does not raise the loss here: the model has not "
                    "learned to predict these tokens, so the score says little)"
                )
            lines.append("  " + head)
            rows = [("all layers", res["all_layers"]), *res["per_layer"].items()]
            for name, m in rows:
                lines.append(
                    f"  {name:<{w}} {_f(m['ce_replaced'], 4):>8} "
                    f"{_f(m['ce_zero_ablation'], 4):>8} {_f(m['ce_loss_score'], 4):>8} "
                    f"{_f(m['kl'], 4):>8} {_f(m['top1_agreement'], 4):>7}"
                )
        return "\n".join(lines)


def _f(v: float | None, digits: int) -> str:
    if v is None or not math.isfinite(v):
        return "-"
    return f"{v:.{digits}f}"


def _json_safe(x: Any) -> Any:
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, Mapping):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    return x


# --- data ----------------------------------------------------------------------------------------
def _as_batch(item: Batch | Mapping[str, Any]) -> Batch:
    if isinstance(item, Batch):
        return item
    ids = item["input_ids"]
    n = int(ids.shape[0])
    answer = torch.zeros(ids.shape, dtype=torch.bool)
    return Batch(dict(item), [str(i) for i in range(n)], answer)


def _is_batch_like(x: Any) -> bool:
    return isinstance(x, Batch) or (isinstance(x, Mapping) and "input_ids" in x)


def iter_batches(
    vlm: HookedVLM,
    data: Batch | Mapping[str, Any] | Iterable[Any],
    *,
    batch_size: int = 8,
    ctx_len: int = 2048,
    skips: SkipCounter | None = None,
) -> Iterator[Batch]:
    """Batches from a Batch, processed inputs, an iterable of either, or a dataset of records
    (encoded with the model's processor and chat template, as the trainer does)."""
    if _is_batch_like(data):
        yield _as_batch(data)  # type: ignore[arg-type]
        return
    it = iter(data)  # type: ignore[arg-type]
    first = next(it, None)
    if first is None:
        return
    if _is_batch_like(first):
        yield _as_batch(first)
        for item in it:
            yield _as_batch(item)
        return

    def records() -> Iterator[Any]:
        yield first
        yield from it

    processed = None
    if getattr(first, "tensors", None):  # rows of the processed schema: checked, not processed
        from vlmscope.data.processed import ProcessedSpec

        processed = ProcessedSpec(vlm)
    encoder = SampleEncoder(
        vlm.processor,
        ctx_len,
        vlm.adapter.image_token_ids(),
        processed=processed,
        videos=vlm.adapter.capabilities.video,
    )
    samples = encode_stream(records(), encoder, skips if skips is not None else SkipCounter())
    pad = vlm.tokenizer.pad_token_id
    yield from batches(samples, batch_size, pad if pad is not None else 0, masks=vlm.masks)


# --- evaluation ----------------------------------------------------------------------------------
class _Evaluator:
    """Runs the forward passes of one batch and feeds the accumulators."""

    def __init__(
        self,
        vlm: HookedVLM,
        rm: ReplacementModel,
        groups: Sequence[TokenKind],
        per_layer: bool,
    ) -> None:
        self.vlm = vlm
        self.rm = rm
        self.b = rm.bundle
        self.groups = list(groups)
        self.per_layer = per_layer
        n_units = len(self.b.units)
        f = self.b.cfg.num_latents
        self.recon = {g: [ReconStats(f) for _ in range(n_units)] for g in self.groups}
        self.passes = ["replaced", "zero"]
        if per_layer:
            self.passes += [f"{p}:{t}" for t in range(n_units) for p in ("replaced", "zero")]
        self.next = {
            g: {p: NextTokenStats() for p in ["clean", *self.passes]} for g in NEXT_TOKEN_GROUPS
        }
        self.forward_passes = 0

    def _forward(
        self, batch: Batch, hooks: Sequence[tuple[str, HookFn]], masks: TokenMasks
    ) -> Tensor:
        self.forward_passes += 1
        with self.vlm.hooks(list(hooks), masks=masks):
            return self.vlm.forward(batch.inputs, masks=masks).logits

    def run(self, batch: Batch, masks: TokenMasks) -> None:
        b, dev = self.b, self.vlm.device
        ids = batch.inputs["input_ids"]
        replace = self.rm._replace_mask(ids, batch.inputs.get("attention_mask")).to(dev)
        codes, logits = self._clean(batch, masks)
        pos, targets = next_token_targets(ids.cpu(), masks.valid)
        group_pos = {
            "all": pos,
            "text": pos & masks.text[:, 1:],
            "answer": pos & batch.answer.cpu().bool()[:, 1:],
        }
        sel = {g: m[pos].to(dev) for g, m in group_pos.items()}  # within the selected rows
        pos, targets = pos.to(dev), targets.to(dev)[pos]
        clean_lp = F.log_softmax(logits[:, :-1][pos].float(), -1)
        clean_top = clean_lp.argmax(-1)
        del logits

        def score(name: str, out: Tensor) -> None:
            logits = out[:, :-1][pos]
            # In row chunks of ~2**26 logits: a few float32 temporaries per chunk, not per batch.
            step = max(1, 2**26 // max(logits.shape[-1], 1))
            ce, kl, agree = [], [], []
            for i in range(0, logits.shape[0], step):
                lp = F.log_softmax(logits[i : i + step].float(), -1)
                ce.append(-lp.gather(1, targets[i : i + step, None]).squeeze(1))
                kl.append(_kl_rows(clean_lp[i : i + step], lp))
                agree.append(lp.argmax(-1) == clean_top[i : i + step])
            if not ce:
                return  # no position predicts a real token in this batch
            ce_t, kl_t, agree_t = torch.cat(ce), torch.cat(kl), torch.cat(agree)
            for g, m in sel.items():
                self.next[g][name].add(ce_t[m], kl_t[m], agree_t[m])

        ce_clean = -clean_lp.gather(1, targets[:, None]).squeeze(1)
        for g, m in sel.items():
            c = ce_clean[m]
            self.next[g]["clean"].add(c, torch.zeros_like(c), torch.ones_like(c, dtype=torch.bool))
        self.forward_passes += 1
        score("replaced", self.rm.forward(batch.inputs, masks=masks).logits)
        zero = self._zero(batch, replace)
        score("zero", self._forward(batch, [(w, zero) for w in b.writes], masks))
        if not self.per_layer:
            return
        for t, w in enumerate(b.writes):
            single = self._single(t, codes, replace, batch)
            score(f"replaced:{t}", self._forward(batch, single, masks))
            score(f"zero:{t}", self._forward(batch, [(w, zero)], masks))

    def _zero(self, batch: Batch, replace: Tensor) -> HookFn:
        """Zero ablation where the replacement model replaces (LM tokens or vision rows)."""

        def fn(t: Tensor, ctx: HookContext) -> Tensor:
            return t.masked_fill(self.rm.replaced_rows(batch.inputs, ctx.name, t, replace), 0.0)

        return fn

    def _group_rows(
        self, batch: Batch, name: str, t: Tensor, lm_rows: Mapping[str, Tensor]
    ) -> dict[str, Tensor]:
        """Rows of each reconstruction group in hook `name`'s flattened activation: the
        group's tokens for LM hooks; for vision hooks the vision rows the dictionaries were
        trained on, in groups "all" and "image" ("text" has none)."""
        if not is_vision_hook(name):
            return dict(lm_rows)
        layout = self.vlm.vision_positions(batch.inputs, name, t.shape[:-1])
        rows = vision_row_mask(layout, self.rm.trained_special).to(t.device)
        return {g: rows if g != "text" else torch.zeros_like(rows) for g in lm_rows}

    def _clean(self, batch: Batch, masks: TokenMasks) -> tuple[dict[int, SparseCodes], Tensor]:
        """Clean forward: encode every unit's read, decode its write, accumulate the stats."""
        b = self.b
        dev = self.vlm.device
        group_rows = {g: masks.select(g).reshape(-1).to(dev) for g in self.groups}
        codes: dict[int, SparseCodes] = {}
        xs: dict[int, Tensor] = {}

        def read(i: int) -> HookFn:
            def fn(t: Tensor, ctx: HookContext) -> None:
                xs[i] = flat_rows(t)
                codes[i] = b.encode_unit(i, xs[i])

            return fn

        def write(i: int) -> HookFn:
            def fn(t: Tensor, ctx: HookContext) -> None:
                y = flat_rows(t)
                y_hat = b.decode_unit(i, codes, xs.pop(i))
                for g, rows in self._group_rows(batch, ctx.name, t, group_rows).items():
                    c = codes[i]
                    sub = SparseCodes(c.values[rows], c.indices[rows], c.num_latents)
                    self.recon[g][i].add(y[rows], y_hat[rows], sub)

            return fn

        logits = self._forward(batch, unit_hooks(b, read, write), masks)
        return codes, logits

    def _single(
        self, t: int, codes: Mapping[int, SparseCodes], replace: Tensor, batch: Batch
    ) -> list[tuple[str, HookFn]]:
        """Hooks that replace only unit t's write by its reconstruction from the clean codes."""
        b = self.b
        xs: dict[int, Tensor] = {}

        def read(i: int) -> HookFn:
            def fn(t_: Tensor, ctx: HookContext) -> None:
                xs[i] = flat_rows(t_)  # clean: nothing before unit t's write is replaced

            return fn

        def write(i: int) -> HookFn:
            def fn(t_: Tensor, ctx: HookContext) -> Tensor:
                y = b.decode_unit(i, codes, xs.pop(i)).reshape(t_.shape).to(t_.dtype)
                m = self.rm.replaced_rows(batch.inputs, ctx.name, t_, replace)
                return torch.where(m, y, t_)

            return fn

        return unit_hooks(self.b, read, write, [t])

    def report(self, **meta: Any) -> EvalReport:
        b = self.b
        units = b.units
        recon: dict[str, dict[str, Any]] = {}
        for g, stats in self.recon.items():
            recon[g] = {
                # units may read different rows (a projector's patches beside the language
                # model's tokens): the most any unit read, 0 only when none read any
                "n_tokens": max(s.n for s in stats),
                "overall": pooled_recon(stats),
                "per_unit": {u: s.result() for u, s in zip(units, stats, strict=True)},
            }
        nxt: dict[str, dict[str, Any]] = {}
        for g, st in self.next.items():
            orig = st["clean"].ce

            def block(rep: NextTokenStats, zero: NextTokenStats, orig: float = orig) -> Any:
                return {
                    "ce_replaced": rep.ce,
                    "ce_zero_ablation": zero.ce,
                    "ce_loss_score": ce_loss_score(zero.ce, rep.ce, orig),
                    "kl": rep.kl,
                    "top1_agreement": rep.top1,
                }

            per = {}
            if self.per_layer:
                per = {u: block(st[f"replaced:{t}"], st[f"zero:{t}"]) for t, u in enumerate(units)}
            nxt[g] = {
                "n_positions": st["clean"].n,
                "ce_original": orig,
                "all_layers": block(st["replaced"], st["zero"]),
                "per_layer": per,
            }
        return EvalReport(
            kind=b.kind,
            units=list(units),
            writes=list(b.writes),
            per_layer=self.per_layer,
            forward_passes=self.forward_passes,
            reconstruction=recon,
            next_token=nxt,
            **meta,
        )


def _groups(tokens: TokenKind | Sequence[TokenKind] | None) -> list[TokenKind]:
    if tokens is None:
        return list(RECON_GROUPS)
    groups = [tokens] if isinstance(tokens, str) else list(tokens)
    bad = [g for g in groups if g not in RECON_GROUPS]
    if bad or not groups:
        raise ValueError(f"tokens must be among {RECON_GROUPS}, got {tokens!r}")
    return list(dict.fromkeys(groups))  # type: ignore[arg-type]


@torch.no_grad()
def evaluate(
    vlm: HookedVLM,
    bundle: DictionaryBundle | str | os.PathLike[str],
    data: Batch | Mapping[str, Any] | Iterable[Any],
    *,
    max_batches: int | None = None,
    max_tokens: int | None = None,
    tokens: TokenKind | Sequence[TokenKind] | None = None,
    per_layer: bool = True,
    replace_tokens: ReplaceTokens = "trained",
    batch_size: int = 8,
    ctx_len: int = 2048,
    progress: bool = True,
    model_name: str | None = None,
    dataset: str | None = None,
    split: str | None = None,
) -> EvalReport:
    """Evaluate dictionaries on `vlm` (see the module docstring for every definition).

    `data`: a Batch, processed inputs, an iterable of either, or a dataset of records (then
    `batch_size` / `ctx_len` apply). Stops after `max_batches` batches or once `max_tokens`
    non-pad tokens are in (whole batches: the last one may overshoot); else at the data's end.
    `tokens` picks the reconstruction groups (default all three: "all", "image", "text").
    `per_layer=False` skips the 2 L single-layer passes. `replace_tokens` is the
    ReplacementModel's: where replacement and zero ablation act. Dictionaries made for another
    model raise ModelMismatchError before any forward pass. `dataset` / `split` name the data
    in the report (with `max_tokens`), so a metrics file says what it measured. Memory:
    besides the model's logits, one batch's clean next-token log-probs ([positions, vocab]
    float32) and every unit's sparse codes are held; lower `batch_size` for large vocabularies.
    """
    from tqdm.auto import tqdm

    groups = _groups(tokens)
    if max_batches is not None and max_batches < 1:
        raise ValueError(f"max_batches must be >= 1 (or None), got {max_batches}")
    if max_tokens is not None and max_tokens < 0:
        raise ValueError(f"max_tokens must be >= 0 (or None), got {max_tokens}")
    path = None
    if not isinstance(bundle, DictionaryBundle):
        path = str(bundle)
        bundle = DictionaryBundle.load(bundle, device=vlm.device)
    was_training = bundle.training
    rm = ReplacementModel(vlm, bundle, replace_tokens=replace_tokens)  # checks the model first
    ev = _Evaluator(vlm, rm, groups, per_layer)
    n_batches = n_samples = n_tokens = left_out = 0
    skips = SkipCounter()
    bar = tqdm(total=max_tokens or None, unit="tok", disable=not progress, desc="eval")
    try:
        for batch in iter_batches(vlm, data, batch_size=batch_size, ctx_len=ctx_len, skips=skips):
            if vlm.skipped_hooks(batch.inputs, bundle.hook_names()):
                left_out += 1  # the model skips layers the dictionaries read (Mllama's
                continue  # cross-attention layers without an image): nothing to replace
            masks = batch.masks if batch.masks is not None else vlm.masks(batch.inputs)
            ev.run(batch, masks)
            n_batches += 1
            n_samples += batch.size
            valid = int(masks.valid.sum())
            n_tokens += valid
            bar.update(valid)
            if (max_batches is not None and n_batches >= max_batches) or (
                max_tokens and n_tokens >= max_tokens
            ):
                break  # before the next batch is read or encoded
    finally:
        bar.close()
        bundle.train(was_training)
    if n_batches == 0:
        # records a Dataset refused (unreadable images, wrong columns) never reach the
        # encoder, so they are in its own stats, not in `skips`
        stats = getattr(data, "stats", None)
        if stats is not None:
            skips.merge(stats.counts, stats.examples)
        why = f"; {vlm.left_out_note(left_out)}" if left_out else ""
        raise ValueError(f"no batches to evaluate ({skips.summary()}){why}")
    if left_out:
        print(vlm.left_out_note(left_out), file=sys.stderr)
    if skips.total:
        print(skips.summary(), file=sys.stderr)
    name = model_name or str(getattr(vlm.model.config, "_name_or_path", "") or "model")
    return ev.report(
        model=name,
        replace_tokens=replace_tokens,
        n_batches=n_batches,
        n_samples=n_samples,
        n_tokens=n_tokens,
        dictionaries=path,
        dataset=dataset,
        split=split,
        max_tokens=max_tokens or None,
    )


# --- command line --------------------------------------------------------------------------------
TRAINING_DATA_WARNING = (
    "this dataset and split are the ones the dictionaries were trained on: the scores measure "
    "fit, not generalisation (evaluate another --split)"
)


def training_config(dictionaries: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The train_config.json of the run that wrote `dictionaries` (the run folder, or a
    checkpoint inside it), or None when there is none to read."""
    folder = Path(dictionaries).resolve()
    for d in (folder, folder.parent, folder.parent.parent):
        f = d / "train_config.json"
        if f.is_file():
            try:
                data = json.loads(f.read_text())
            except (OSError, ValueError):
                return None
            return data if isinstance(data, dict) else None
    try:  # moved away from its run folder: the provenance stored in the dictionaries
        data = DictionaryBundle.load(folder).model_info.get("data")
    except Exception:  # not loadable here; the caller reports that properly
        return None
    return dict(data) if isinstance(data, dict) else None


def same_data_as_training(dictionaries: str | os.PathLike[str], cfg: Any) -> bool | None:
    """Whether `cfg`'s dataset and split are the training run's (None: run unknown). Two
    shapes worlds with the same seed and split overlap whatever their size: a smaller one is a
    prefix of a larger one."""
    run = training_config(dictionaries)
    if run is None or "dataset" not in run:
        return None
    if run.get("split", "train") != cfg.split:
        return False
    trained = str(run["dataset"])
    if cfg.is_shapes_dataset():
        return is_shapes_dataset(trained) and int(run.get("seed", 0)) == int(cfg.seed)
    if trained == cfg.dataset:
        return True
    a, b = Path(trained), Path(cfg.dataset)
    return a.exists() and b.exists() and a.resolve() == b.resolve()


def add_eval_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Flags of `vlmscope eval MODEL DICTIONARIES DATASET`."""
    p = parser
    p.add_argument("model", help="HF model name or local path (a zoo name such as `toy` works)")
    p.add_argument("dictionaries", help="folder written by `vlmscope train` (run/dictionaries)")
    p.add_argument("dataset", help="Parquet/JSONL/JSON file or folder, or `shapes` / `shapes:N`")
    p.add_argument(
        "--max-tokens",
        "--max_tokens",
        type=int,
        default=100_000,
        metavar="N",
        help="stop after this many non-pad tokens (0: the whole dataset; default 100000)",
    )
    p.add_argument(
        "--max-batches",
        "--max_batches",
        type=int,
        default=0,
        metavar="N",
        help="stop after this many batches (0: no limit)",
    )
    p.add_argument("--batch-size", "--batch_size", type=int, default=8, metavar="B",
                   help="samples per forward pass (default 8)")  # fmt: skip
    p.add_argument("--ctx-len", "--ctx_len", type=int, default=2048, metavar="C",
                   help="longer samples are truncated to C tokens (default 2048)")  # fmt: skip
    p.add_argument(
        "--tokens",
        choices=RECON_GROUPS,
        default=None,
        help="report reconstruction on this token group only (default: all, image "
        "and text separately)",
    )
    p.add_argument(
        "--no-per-layer",
        dest="per_layer",
        action="store_false",
        help="skip the 2 passes per layer (one layer replaced / zero-ablated)",
    )
    p.add_argument(
        "--replace-tokens",
        "--replace_tokens",
        choices=("trained", "all"),
        default="trained",
        help="where layers are replaced and ablated: the tokens "
        "the dictionaries were trained on (default) or every non-pad token",
    )
    p.add_argument("--device", default=None, metavar="D",
                   help="cpu, cuda, cuda:1 ... (default: cuda if any)")  # fmt: skip
    p.add_argument(
        "--dtype",
        default=None,
        choices=("float32", "bfloat16", "float16"),
        help="model dtype (default: the checkpoint's)",
    )
    p.add_argument(
        "--split",
        default=None,
        help="dataset split (default: `test` for the generated shapes world, whose `train` "
        "split is what `vlmscope train` trains on; `train` for other datasets)",
    )
    p.add_argument(
        "--schema",
        default="auto",
        choices=("auto", "llava", "chat", "processed", "text"),
        help="dataset schema (default: auto)",
    )
    p.add_argument(
        "--image-root",
        "--image_root",
        default="",
        metavar="DIR",
        help="folder that relative image paths resolve against; paths must stay inside it "
        "unless --allow-outside-image-root (default: the dataset's folder)",
    )
    p.add_argument(
        "--allow-outside-image-root",
        "--allow_outside_image_root",
        action="store_true",
        help="read image paths that lead outside --image-root (absolute paths, '..', links); "
        "only for datasets you trust",
    )
    p.add_argument(
        "--columns",
        nargs="+",
        default=[],
        metavar="KEY=NAME",
        help="source column names that differ from the schema's, e.g. messages=conversation "
        "(as in `vlmscope train`)",
    )
    p.add_argument(
        "--output",
        default=None,
        metavar="PATH",
        help=f"where to write the JSON (default: DICTIONARIES/{METRICS_FILE})",
    )
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    return p


def run_eval_command(args: argparse.Namespace) -> int:
    """`vlmscope eval`: check everything cheap first (dictionaries, output, model match), then
    evaluate, print the table and write metrics.json atomically. Returns the exit code."""
    from vlmscope.dictionaries import DictionaryFormatError
    from vlmscope.training.bundle import ModelMismatchError
    from vlmscope.training.config import TrainConfig
    from vlmscope.training.trainer import open_training_data, resolve_model_path

    def fail(msg: str, code: int = 1) -> int:
        print(f"vlmscope eval: error: {msg}", file=sys.stderr)
        return code

    # A parser that leaves out some optional flags still works: their defaults apply.
    defaults = {"max_batches": 0, "tokens": None, "per_layer": True, "replace_tokens": "trained",
                "device": None, "dtype": None, "split": None, "schema": "auto",
                "image_root": "", "columns": [], "output": None, "progress": True,
                "allow_outside_image_root": False}  # fmt: skip
    args = argparse.Namespace(**{**defaults, **vars(args)})
    for flag in ("max_tokens", "max_batches"):
        if getattr(args, flag) < 0:
            return fail(f"--{flag.replace('_', '-')} must be >= 0", 2)
    for flag in ("batch_size", "ctx_len"):
        if getattr(args, flag) < 1:
            return fail(f"--{flag.replace('_', '-')} must be >= 1", 2)
    try:
        bundle = DictionaryBundle.load(args.dictionaries)
    except (OSError, ValueError, DictionaryFormatError) as e:
        return fail(f"cannot load dictionaries from {args.dictionaries}: {e}")
    out = Path(args.output) if args.output else Path(args.dictionaries) / METRICS_FILE
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        probe = out.with_name(f".write-test-{os.getpid()}")
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        return fail(f"cannot write {out}: {e}")
    try:
        cfg = TrainConfig(
            model=args.model,
            dataset=args.dataset,
            batch_size=args.batch_size,
            ctx_len=args.ctx_len,
            split=args.split or "train",
            schema=args.schema,
            image_root=args.image_root,
            allow_outside_image_root=args.allow_outside_image_root,
            columns=list(args.columns),
        )
    except ValueError as e:
        return fail(str(e), 2)
    if not args.split and cfg.is_shapes_dataset():
        cfg.split = "test"  # held out: `train` is the stream the dictionaries were trained on
    same = same_data_as_training(args.dictionaries, cfg)
    if same:
        print(f"vlmscope eval: WARNING: {TRAINING_DATA_WARNING}", file=sys.stderr)
    try:
        vlm = HookedVLM.from_pretrained(
            resolve_model_path(args.model), device=args.device or None, dtype=args.dtype or None
        )
    except (OSError, ValueError) as e:
        return fail(f"cannot load model {args.model}: {e}")
    try:
        bundle.check_model(vlm.adapter)  # before the data is opened and any forward pass
    except ModelMismatchError as e:
        return fail(str(e))
    bundle.to(vlm.device)
    try:
        dataset = open_training_data(cfg)
        report = evaluate(
            vlm,
            bundle,
            dataset,
            max_batches=args.max_batches or None,
            max_tokens=args.max_tokens or None,
            tokens=args.tokens,
            per_layer=args.per_layer,
            replace_tokens=args.replace_tokens,
            batch_size=args.batch_size,
            ctx_len=args.ctx_len,
            progress=args.progress,
            model_name=args.model,
            dataset=args.dataset,
            split=cfg.split,
        )
    except (OSError, ValueError) as e:
        return fail(str(e))
    report.dictionaries = str(args.dictionaries)
    report.same_data_as_training = same
    print(report.table())
    report.save(out)
    print(f"\nmetrics written to {out}")
    return 0


__all__ = [
    "METRICS_FILE",
    "NEXT_TOKEN_GROUPS",
    "RECON_GROUPS",
    "EvalReport",
    "NextTokenStats",
    "ReconStats",
    "add_eval_arguments",
    "ce_loss_score",
    "evaluate",
    "explained_variance",
    "fvu",
    "iter_batches",
    "kl_divergence",
    "next_token_ce",
    "next_token_targets",
    "normalized_mse",
    "pooled_recon",
    "run_eval_command",
    "top1_agreement",
]
