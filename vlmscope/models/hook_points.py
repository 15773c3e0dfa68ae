"""The one table of named hook points, and name resolution with wildcards.

Each row says which module of the adapter's mapping a hook point attaches to, whether it reads
the module's input or output, and how the tensor is viewed (per head for q/k/v/z).
"""

from __future__ import annotations

import difflib
import fnmatch
import re
from dataclasses import dataclass
from typing import Literal

from vlmscope.models.adapter import ModelAdapter

Target = Literal[
    "block",
    "mlp_in_norm",
    "q",
    "k",
    "v",
    "o",
    "attn",
    "attn_out",
    "mlp",
    "mlp_out",
    "vision_block",
    "vision_mlp",
    "projector",
]


@dataclass(frozen=True)
class HookPoint:
    """One row of the table: a hook name template and where it attaches."""

    template: str
    target: Target
    io: Literal["in", "out", "computed"]
    view: Literal["q_heads", "kv_heads"] | None
    doc: str

    @property
    def per_layer(self) -> bool:
        return "{i}" in self.template


HOOK_POINTS: tuple[HookPoint, ...] = (
    HookPoint("lm.blocks.{i}.hook_resid_pre", "block", "in", None,
              "residual stream entering decoder layer i"),
    HookPoint("lm.blocks.{i}.hook_resid_mid", "mlp_in_norm", "in", None,
              "residual stream the MLP reads: after attention (a parallel block's input); "
              "edits carry to the layer output"),
    HookPoint("lm.blocks.{i}.hook_resid_post", "block", "out", None,
              "residual stream leaving decoder layer i"),
    HookPoint("lm.blocks.{i}.attn.hook_q", "q", "out", "q_heads",
              "queries [batch, pos, heads, d_head], before q-norm and RoPE"),
    HookPoint("lm.blocks.{i}.attn.hook_k", "k", "out", "kv_heads",
              "keys [batch, pos, kv_heads, d_head], before k-norm and RoPE"),
    HookPoint("lm.blocks.{i}.attn.hook_v", "v", "out", "kv_heads",
              "values [batch, pos, kv_heads, d_head]"),
    HookPoint("lm.blocks.{i}.attn.hook_z", "o", "in", "q_heads",
              "per-head attention output [batch, pos, heads, d_head], before o_proj"),
    HookPoint("lm.blocks.{i}.attn.hook_pattern", "attn", "computed", None,
              "attention pattern [batch, heads, q, k], recomputed from q and k (read-only)"),
    HookPoint("lm.blocks.{i}.attn.hook_out", "attn_out", "out", None,
              "attention block's contribution to the residual stream"),
    HookPoint("lm.blocks.{i}.mlp.hook_in", "mlp", "in", None,
              "MLP input (after its pre-norm; a whole MoE block's input)"),
    HookPoint("lm.blocks.{i}.mlp.hook_out", "mlp_out", "out", None,
              "MLP block's contribution to the residual stream (after any post-norm; a "
              "whole MoE block's output)"),
    HookPoint("vision.blocks.{i}.hook_resid_post", "vision_block", "out", None,
              "vision encoder residual stream leaving block i"),
    HookPoint("vision.blocks.{i}.mlp.hook_in", "vision_mlp", "in", None,
              "vision block i's MLP input (after its pre-norm)"),
    HookPoint("vision.blocks.{i}.mlp.hook_out", "vision_mlp", "out", None,
              "vision block i's MLP output, its contribution to the vision residual stream"),
    HookPoint("projector.hook_out", "projector", "out", None,
              "image features after the projector, as they enter the language model"),
)  # fmt: skip

_NAME_RE = re.compile(r"^(lm|vision)\.blocks\.(\d+)\.(.+)$")


@dataclass(frozen=True)
class ResolvedHook:
    """A concrete hook name bound to its table row and layer index."""

    name: str
    point: HookPoint
    layer: int | None


def all_hook_names(adapter: ModelAdapter) -> list[str]:
    """Every concrete hook name the model has, in forward order within each group."""
    names = []
    for p in HOOK_POINTS:
        if p.template.startswith("lm."):
            names += [p.template.format(i=i) for i in range(adapter.n_layers)]
        elif p.template.startswith("vision."):
            if p.target == "vision_mlp" and not adapter.has_vision_mlp():
                continue
            names += [p.template.format(i=i) for i in range(adapter.n_vision_layers)]
        elif p.target == "projector" and adapter.projector is not None:
            names.append(p.template)
    return names


def _sort_key(name: str) -> tuple[int, int, int]:
    """Forward order: vision blocks, projector, then LM layers; table order within a layer."""
    m = _NAME_RE.match(name)
    if m is None:
        return (1, 0, 0)
    templates = [p.template for p in HOOK_POINTS]
    t = f"{m.group(1)}.blocks.{{i}}.{m.group(3)}"
    return (0 if m.group(1) == "vision" else 2, int(m.group(2)), templates.index(t))


def resolve_names(adapter: ModelAdapter, patterns: str | list[str] | None) -> list[ResolvedHook]:
    """Expand names and fnmatch wildcards (`lm.blocks.*.hook_resid_post`) to concrete hooks.

    A pattern that matches nothing is an error listing the closest existing names.
    """
    available = all_hook_names(adapter)
    if patterns is None:
        chosen = list(available)
    else:
        pats = [patterns] if isinstance(patterns, str) else list(patterns)
        chosen = []
        for pat in pats:
            hits = [n for n in available if fnmatch.fnmatchcase(n, pat)]
            if not hits:
                close = difflib.get_close_matches(pat, available, n=5, cutoff=0.5)
                hint = f"; did you mean {', '.join(close)}?" if close else ""
                raise KeyError(
                    f"no hook point matches {pat!r} in this {adapter.family} model "
                    f"({adapter.n_layers} LM layers, {adapter.n_vision_layers} vision blocks){hint}"
                )
            chosen += hits
        chosen = list(dict.fromkeys(chosen))
    chosen.sort(key=_sort_key)
    return [_bind(n) for n in chosen]


def _bind(name: str) -> ResolvedHook:
    m = _NAME_RE.match(name)
    if m is None:
        point = next(p for p in HOOK_POINTS if p.template == name)
        return ResolvedHook(name, point, None)
    template = f"{m.group(1)}.blocks.{{i}}.{m.group(3)}"
    point = next(p for p in HOOK_POINTS if p.template == template)
    return ResolvedHook(name, point, int(m.group(2)))
