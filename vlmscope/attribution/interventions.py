"""Interventions on dictionary features: set, ablate or steer features and watch the output.

As in circuit-tracer, an intervention runs the replacement model with the reconstruction
errors of the clean run held fixed: with no intervention it reproduces the original model,
and setting a feature changes its decoder outputs, which later features then read. Attention
patterns (and, optionally, norm scales) can be frozen at their clean values, isolating the
effect that flows through the residual stream and the MLP replacements.
"""

from __future__ import annotations

import contextlib
import operator
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from vlmscope.attribution.context import _READ_RE
from vlmscope.attribution.freeze import FreezeState, frozen
from vlmscope.dictionaries import SparseCodes
from vlmscope.models.hooked import HookContext
from vlmscope.replacement.model import (
    ActiveFeatures,
    ReplacementModel,
    check_left_padded,
    flat_rows,
    unit_hooks,
)

#: (layer, position, feature, value): the model's LM layer (as in a graph's features), the
#: position in the sequence (None: every position the dictionaries replace, generated ones too).
Intervention = tuple[int, int | None, int, float]


def layer_units(bundle: Any) -> dict[int, int]:
    """Model layer -> the bundle unit reading at that layer, for layers with exactly one unit."""
    found: dict[int, list[int]] = {}
    for u, hook in enumerate(bundle.reads):
        m = _READ_RE.match(hook)
        if m is not None:
            found.setdefault(int(m.group(1)), []).append(u)
    return {layer: us[0] for layer, us in found.items() if len(us) == 1}


def _check_position(
    rm: ReplacementModel, ids: Tensor, attn: Tensor | None, pos: int, limit: int
) -> int:
    """`pos` if every sample's dictionaries replace it; else a ValueError naming why not."""
    seq = ids.shape[1]
    if pos < 0:
        raise ValueError(f"intervention position {pos} is negative: positions count from 0")
    if pos >= limit:
        more = f" (plus {limit - seq} generated)" if limit > seq else ""
        raise ValueError(
            f"intervention position {pos} is out of range: the prompt has {seq} positions "
            f"(0..{seq - 1}){more}"
        )
    if pos >= seq:
        return pos  # a generated position: replaced when it is generated
    for b in range(ids.shape[0]):
        why = rm.not_replaced_reason(ids, attn, b, pos)
        if why is not None:
            tok = rm.vlm.tokenizer.decode([int(ids[b, pos])]) if rm.vlm.tokenizer else ""
            sample = f"sample {b}, " if ids.shape[0] > 1 else ""
            raise ValueError(
                f"intervention position {pos} ({sample}token {tok!r}) is not replaced by the "
                f"dictionaries: {why}"
            )
    return pos


def _generation_limit(model: Any, seq: int, kwargs: Mapping[str, Any]) -> int | None:
    """The sequence length generation can reach, from the kwargs or the generation config."""
    cfg = getattr(model, "generation_config", None)
    new = kwargs.get("max_new_tokens")
    if new is None and "max_length" not in kwargs:
        new = getattr(cfg, "max_new_tokens", None)
    if new is not None:
        return seq + int(new)
    total = kwargs.get("max_length", getattr(cfg, "max_length", None))
    return int(total) if total is not None else None


@dataclass
class InterventionResult:
    logits: Tensor
    clean_logits: Tensor
    #: active features of the intervened run (values after the intervention).
    features: ActiveFeatures


def _override(codes: SparseCodes, items: Sequence[tuple[int, int, float]]) -> SparseCodes:
    """Codes with (row, feature, value) set, appending columns for features not yet active.
    A (row, feature) set twice takes its last value, whether or not it was active (appended
    twice, an inactive feature's two columns would add up in the decoder)."""
    values, indices = codes.values.clone(), codes.indices.clone()
    extra: dict[int, int] = {}
    appended: list[tuple[int, int, float]] = []
    last = {(row, feat): val for row, feat, val in items}
    for (row, feat), val in last.items():
        hit = (indices[row] == feat) & (values[row] != 0)
        if bool(hit.any()):
            values[row, hit] = val
        else:
            extra[row] = extra.get(row, 0) + 1
            appended.append((row, feat, val))
    if appended:
        width = max(extra.values())
        values = torch.cat([values, values.new_zeros(values.shape[0], width)], dim=1)
        indices = torch.cat([indices, indices.new_zeros(indices.shape[0], width)], dim=1)
        used: dict[int, int] = {}
        for row, feat, val in appended:
            col = codes.values.shape[1] + used.get(row, 0)
            used[row] = used.get(row, 0) + 1
            indices[row, col] = feat
            values[row, col] = val
    return SparseCodes(values, indices, codes.num_latents)


class _Session:
    """Hooks of one intervened run: fixed clean errors, feature overrides."""

    def __init__(
        self,
        rm: ReplacementModel,
        interventions: Sequence[Intervention],
        inputs: Mapping[str, Any],
        limit: int | None = None,
    ) -> None:
        """Check every intervention against the dictionaries and the prompt. Positions at or
        past the prompt's end are allowed below `limit` (generation), else rejected."""
        self.rm = rm
        self.errors: dict[str, Tensor] = {}
        self.by_layer: dict[int, list[tuple[int | None, int, float]]] = {}
        units = layer_units(rm.bundle)
        ids, attn = inputs["input_ids"], inputs.get("attention_mask")
        seq = ids.shape[1]
        limit = seq if limit is None else limit
        for layer, pos, feat, val in interventions:
            if layer not in units:
                raise ValueError(
                    f"intervention on layer {layer}: the dictionaries cover layers {sorted(units)}"
                )
            if not 0 <= feat < rm.bundle.cfg.num_latents:
                raise ValueError(f"feature {feat} out of range ({rm.bundle.cfg.num_latents})")
            if pos is not None:
                pos = _check_position(rm, ids, attn, int(operator.index(pos)), limit)
            self.by_layer.setdefault(units[layer], []).append((pos, feat, float(val)))

    @contextlib.contextmanager
    def hooks(self, features: ActiveFeatures | None, fixed_errors: bool) -> Iterator[None]:
        rm, b = self.rm, self.rm.bundle
        codes: dict[int, SparseCodes] = {}
        clean_codes: dict[int, SparseCodes] = {}
        xs: dict[int, Tensor] = {}
        state: dict[str, Any] = {}

        def read(i: int) -> Any:
            def fn(t: Tensor, ctx: HookContext) -> None:
                x = xs[i] = flat_rows(t)
                c = clean_codes[i] = b.encode_unit(i, x)
                bsz, seq = t.shape[0], t.shape[1]
                items = []
                for pos, feat, val in self.by_layer.get(i, []):
                    cols = range(seq) if pos is None else [pos - state["offset"]]
                    for p in cols:
                        if 0 <= p < seq:
                            items += [(bi * seq + p, feat, val) for bi in range(bsz)]
                codes[i] = _override(c, items) if items else c
                if features is not None:
                    features.add(i, codes[i], (bsz, seq), state["offset"], state["mask"])

            return fn

        def write(i: int) -> Any:
            def fn(t: Tensor, ctx: HookContext) -> Tensor:
                y = b.decode_unit(i, codes, xs[i]).reshape(t.shape).to(t.dtype)
                err = self.errors.get(ctx.name) if fixed_errors else None
                if err is None or err.shape != t.shape:
                    # Generated positions: the error of this very step keeps the MLP exact
                    # up to the change the intervention makes.
                    clean = b.decode_unit(i, clean_codes, xs[i]).reshape(t.shape)
                    err = t - clean.to(t.dtype)
                mask = state["mask"].reshape(*state["mask"].shape, 1)
                return torch.where(mask, y + err, t)

            return fn

        with rm._call_state(state), rm.vlm.hooks(unit_hooks(b, read, write)):
            yield


@torch.no_grad()
def intervene(
    model: ReplacementModel,
    inputs: Mapping[str, Any],
    interventions: Sequence[Intervention],
    *,
    freeze_attention: bool = True,
    freeze_norms: bool = False,
) -> InterventionResult:
    """Logits and active features of the replacement model (clean errors held fixed) with
    `interventions` applied, plus the clean logits for comparison.

    Layers are the model's (as a graph's features carry them); a position must be one the
    dictionaries replace (not padding, nor a token kind they were not trained on), else
    ValueError: setting a feature there would change nothing."""
    rm, vlm = model, model.vlm
    session = _Session(rm, interventions, inputs)
    state = FreezeState(mode="record", attention=freeze_attention, norms=freeze_norms)
    with frozen(vlm, state):
        clean = rm.forward(inputs, record_errors=True, error_terms=True)
    session.errors = dict(rm.last_errors)
    state.mode = "replay"
    feats = ActiveFeatures(rm.bundle.units)
    ctx = frozen(vlm, state) if (freeze_attention or freeze_norms) else contextlib.nullcontext()
    with ctx, session.hooks(feats, fixed_errors=True):
        out = vlm.forward(inputs)
    return InterventionResult(out.logits, clean.logits, feats)


def image_interventions(
    model: ReplacementModel, inputs: Mapping[str, Any], layer: int, feature: int, value: float
) -> list[Intervention]:
    """One intervention per image token of the (single) prompt: set `feature` to `value`."""
    masks = model.vlm.masks(inputs)
    if masks.image.shape[0] != 1:
        raise ValueError("image interventions take one prompt (batch size 1)")
    return [(layer, int(p), feature, value) for p in masks.image[0].nonzero().squeeze(1)]


def ablate_on_image(
    model: ReplacementModel, inputs: Mapping[str, Any], layer: int, feature: int, **kw: Any
) -> InterventionResult:
    """Zero a feature at every image position."""
    return intervene(model, inputs, image_interventions(model, inputs, layer, feature, 0.0), **kw)


def steer_on_image(
    model: ReplacementModel,
    inputs: Mapping[str, Any],
    layer: int,
    feature: int,
    value: float,
    **kw: Any,
) -> InterventionResult:
    """Set a feature to `value` at every image position."""
    its = image_interventions(model, inputs, layer, feature, value)
    return intervene(model, inputs, its, **kw)


@torch.no_grad()
def generate_with_interventions(
    model: ReplacementModel,
    inputs: Mapping[str, Any],
    interventions: Sequence[Intervention],
    **generate_kwargs: Any,
) -> Tensor:
    """`generate` with features set as given. Prompt positions run the replacement model with
    the clean prompt's errors fixed; interventions with position None also apply at every
    generated position."""
    rm, vlm = model, model.vlm
    check_left_padded(inputs)
    limit = _generation_limit(vlm.model, inputs["input_ids"].shape[1], generate_kwargs)
    session = _Session(rm, interventions, inputs, limit)
    rm.forward(inputs, record_errors=True, error_terms=True)
    session.errors = dict(rm.last_errors)
    vlm.masks(inputs)
    with session.hooks(None, fixed_errors=True):
        return vlm.model.generate(**vlm._model_inputs(inputs), **generate_kwargs)
