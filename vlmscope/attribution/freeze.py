"""Freezing attention patterns and normalisation scales of an unmodified HF model.

A `record` pass stores every LM attention pattern and every norm's scale; a `replay` pass uses
the stored values, so the model becomes linear in its residual stream (attention mixes values
with fixed weights, norms multiply by fixed per-position scales). Attention runs through an
attention function registered with transformers (the family's own eager code when recording);
norms are rescaled by forward hooks. Nothing in the model is patched.

A norm computes out = s(x) * h(x) with s(x) = 1/rms(x) (1/std for LayerNorm) and h linear
(x * w, or centred x * w + b). Two replays:

- the value replay (`linear=False`, for interventions) rescales the module's own output by
  s0 / s(x), exact for any input;
- the linear replay (`linear=True`, for attribution) returns s0 * h(x) directly, with s0 the
  recorded scale (a constant) and h applied through its effective weight. The module's own
  forward runs on an empty slice of positions, so nothing of it is kept: a multiplication by
  constants saves
  only the constants, and the replayed model keeps no tensor per copy of the prompt.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, eager_mask

from vlmscope.models.hooked import HookedVLM

FROZEN_ATTENTION = "vlmscope_frozen"


@dataclass
class FreezeState:
    """Patterns by LM layer ([1, heads, q, k]) and norm scales by module name ([1, seq, 1])."""

    mode: Literal["record", "replay"] = "record"
    patterns: dict[int, Tensor] = field(default_factory=dict)
    scales: dict[str, Tensor] = field(default_factory=dict)
    #: what a replay freezes: attention patterns, norm scales, or both.
    attention: bool = True
    norms: bool = True
    #: replay norms as x -> s0 * h(x) with no graph through the module (attribution); see the
    #: module docstring.
    linear: bool = False
    #: per norm (linear replay): its effective elementwise weight, probed once.
    weights: dict[str, Tensor] = field(default_factory=dict)


_STATE: ContextVar[FreezeState | None] = ContextVar("vlmscope_freeze", default=None)


def _frozen_attention(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    **kwargs: Any,
) -> tuple[Tensor, Tensor]:
    state = _STATE.get()
    layer = int(module.layer_idx)
    if state is None or state.mode == "record" or not state.attention:
        eager = sys.modules[type(module).__module__].eager_attention_forward
        out, weights = eager(module, query, key, value, attention_mask, **kwargs)
        if state is not None and state.mode == "record":
            # In the model's dtype: what the replay multiplies by (half the memory in bf16).
            state.patterns[layer] = weights.detach()
        return out, weights
    if layer not in state.patterns:
        raise RuntimeError(f"no recorded attention pattern for layer {layer}; record first")
    weights = state.patterns[layer]
    weights = weights.to(value.dtype)
    groups = weights.shape[1] // value.shape[1]
    v = value.repeat_interleave(groups, dim=1) if groups > 1 else value
    return _mix(weights, v).transpose(1, 2).contiguous(), weights


def _mix(weights: Tensor, v: Tensor) -> Tensor:
    """weights @ v for v [copies, heads, k, d] and one recorded pattern [1, heads, q, k].

    A broadcast matmul would materialise the pattern once per copy (and autograd would keep
    those copies): [copies, heads, q, k] per layer is what grows with the square of the prompt
    length. Folding the copies into the value's columns multiplies by the single pattern."""
    c, h, k, d = v.shape
    if weights.shape[0] != 1 or c == 1:
        return torch.matmul(weights, v)
    folded = v.permute(1, 2, 0, 3).reshape(h, k, c * d)
    out = torch.matmul(weights[0], folded)  # [heads, q, copies * d]
    return out.reshape(h, -1, c, d).permute(2, 0, 1, 3)


def _frozen_mask(*args: Any, **kwargs: Any) -> Tensor | None:
    """The eager 4-D mask, except while replaying frozen patterns, which carry the mask
    already: no [copies, 1, q, k] tensor is built for nothing."""
    state = _STATE.get()
    if state is not None and state.mode == "replay" and state.attention:
        return None
    return eager_mask(*args, **kwargs)


AttentionInterface.register(FROZEN_ATTENTION, _frozen_attention)
AttentionMaskInterface.register(FROZEN_ATTENTION, _frozen_mask)


def _is_norm(m: nn.Module) -> bool:
    return isinstance(m, nn.LayerNorm) or type(m).__name__.endswith("RMSNorm")


def _eps(m: nn.Module) -> float:
    for attr in ("variance_epsilon", "eps", "epsilon"):
        v = getattr(m, attr, None)
        if isinstance(v, float):
            return v
    return 1e-6


def norm_scale(m: nn.Module, x: Tensor) -> Tensor:
    """The per-position scale s(x) a norm divides by: 1/rms (RMSNorm) or 1/std (LayerNorm)."""
    xf = x.float()
    if isinstance(m, nn.LayerNorm):
        return torch.rsqrt(xf.var(-1, keepdim=True, unbiased=False) + m.eps)
    return torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + _eps(m))


def effective_weight(m: nn.Module, like: Tensor) -> Tensor:
    """The elementwise weight w of an RMSNorm-like module, out = x * s(x) * w, probed once on a
    vector of ones (so weight, 1 + weight as in Gemma, or none are all read the same way)."""
    probe = torch.ones(1, like.shape[-1], device=like.device, dtype=torch.float32)
    with torch.no_grad():
        out = m.forward(probe).float()  # not m(...): the freeze hooks are on m
    return (out / norm_scale(m, probe))[0]


def _linear_norm(m: nn.Module, x: Tensor, s0: Tensor, w: Tensor) -> Tensor:
    """s0 * h(x) in fp32, cast back to x's dtype: autograd keeps only s0 and w (constants)."""
    xf = x.float()
    if isinstance(m, nn.LayerNorm):
        xf = xf - xf.mean(-1, keepdim=True)
        out = xf * s0 * (w if m.weight is None else m.weight.float())
        return (out if m.bias is None else out + m.bias.float()).to(x.dtype)
    return (xf * s0 * w).to(x.dtype)


def _norm_hooks(name: str, m: nn.Module, state: FreezeState) -> list[Any]:
    inputs: list[Tensor] = []

    def pre(m: nn.Module, args: tuple[Any, ...]) -> Any:
        if state.mode == "replay" and state.norms and state.linear:
            # The module's own output is replaced below: it runs on no positions (its input
            # is kept for the hook), so it costs nothing and builds no graph.
            inputs.append(args[0])
            return (args[0][:, :0], *args[1:])
        return None

    def hook(m: nn.Module, args: tuple[Any, ...], out: Tensor) -> Tensor | None:
        x = args[0]
        if state.mode == "replay" and state.norms and state.linear:
            x = inputs.pop()
            if x.numel() == 0:  # a skipped MLP's post-norm (see AttributionContext.replay)
                return None
            if name not in state.scales:
                raise RuntimeError(f"no recorded scale for norm {name}; record first")
            if name not in state.weights:
                state.weights[name] = (
                    torch.ones(x.shape[-1], device=x.device)
                    if isinstance(m, nn.LayerNorm)
                    else effective_weight(m, x)
                )
            return _linear_norm(m, x, state.scales[name], state.weights[name])
        s = norm_scale(m, x)
        if state.mode == "record":
            state.scales[name] = s.detach()
            return None
        if not state.norms:
            return None
        if name not in state.scales:
            raise RuntimeError(f"no recorded scale for norm {name}; record first")
        # out = s(x) * h(x) with h linear (after centering for LayerNorm): rescaling by
        # s0 / s(x) leaves the value at the recorded point and drops s's dependence on x.
        ratio = state.scales[name] / s
        bias = getattr(m, "bias", None) if isinstance(m, nn.LayerNorm) else None
        if bias is not None:
            return ((out.float() - bias) * ratio + bias).to(out.dtype)
        return (out.float() * ratio).to(out.dtype)

    return [m.register_forward_pre_hook(pre), m.register_forward_hook(hook)]


@contextlib.contextmanager
def frozen(vlm: HookedVLM, state: FreezeState) -> Iterator[FreezeState]:
    """Run the LM with recorded (mode "record") or replayed (mode "replay") attention
    patterns and norm scales. Use the same prompt (or copies of it) in both passes."""
    tc = vlm.adapter.text_config
    old = tc._attn_implementation
    lm = vlm.adapter.lm()
    handles = [
        h for name, m in lm.named_modules() if _is_norm(m) for h in _norm_hooks(name, m, state)
    ]
    token = _STATE.set(state)
    tc._attn_implementation = FROZEN_ATTENTION
    try:
        yield state
    finally:
        tc._attn_implementation = old
        _STATE.reset(token)
        for h in handles:
            h.remove()
