"""Freezing attention patterns and normalisation scales of an unmodified HF model.

A `record` pass stores every LM attention pattern and every norm's scale; a `replay` pass uses
the stored values, so the model becomes linear in its residual stream (attention mixes values
with fixed weights, norms multiply by fixed per-position scales). Attention runs through an
attention function registered with transformers (the family's own eager code when recording);
norms are rescaled by forward hooks. Nothing in the model is patched.

A norm computes out = s(x) * h(x) with s(x) = 1/rms(x) (1/std for LayerNorm and any norm the
adapter's `norm_kind` calls "layer", such as Cohere's) and h linear (x * w, or centred
x * w + b). Which norms: `ModelAdapter.frozen_norms()` (every norm inside a decoder layer, and
the final norm; see its docstring for why, family by family). Two replays:

- the value replay (`linear=False`, for interventions) rescales the module's own output by
  s0 / s(x), exact for any input;
- the linear replay (`linear=True`, for attribution) returns s0 * h(x) directly, with s0 the
  recorded scale (a constant) and h applied through its effective weight. The module's own
  forward runs on an empty slice of positions, so nothing of it is kept: a multiplication by
  constants saves only the constants, and the replayed model keeps no tensor per copy of the
  prompt. The effective weight and bias of a norm other than nn.LayerNorm are probed once, on a
  zero-mean vector z and on -z (`effective_weight`).
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
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from vlmscope.models.hooked import HookedVLM, register_vlmscope_hook

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
    if getattr(module, "layer_idx", None) is None:
        # Not a decoder layer's attention: a vision or audio tower whose config shares the
        # setting (Phi-4-multimodal's sub-configs follow the text config). It runs unfrozen.
        return ALL_ATTENTION_FUNCTIONS["sdpa"](module, query, key, value, attention_mask, **kwargs)
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


def _eps(m: nn.Module) -> float:
    for attr in ("variance_epsilon", "eps", "epsilon"):
        v = getattr(m, attr, None)
        if isinstance(v, float):
            return v
    return 1e-6


def norm_scale(m: nn.Module, x: Tensor, kind: str | None = None) -> Tensor:
    """The per-position scale s(x) a norm divides by: 1/rms (RMSNorm) or 1/std (LayerNorm,
    and `kind` "layer" for norms that centre without being nn.LayerNorm, as Cohere's)."""
    xf = x.float()
    if isinstance(m, nn.LayerNorm) or kind == "layer":
        return torch.rsqrt(xf.var(-1, keepdim=True, unbiased=False) + _eps(m))
    return torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + _eps(m))


def _zero_mean_probe(d: int, device: torch.device) -> Tensor:
    """[1, d] float32 of entries +-1 (and one 2 when d is odd) summing to zero: centring
    leaves it unchanged, and no entry is zero."""
    z = torch.ones(d, device=device)
    z[1::2] = -1.0
    if d % 2 and d >= 3:
        z[-3:] = torch.tensor([2.0, -1.0, -1.0], device=device)
    return z[None]


def effective_weight(m: nn.Module, like: Tensor, kind: str | None = None) -> Tensor:
    """[2, d]: the elementwise weight w and bias b of a norm module, out = h(x) * s(x) * w + b
    with h the identity (RMS) or centring ("layer"), probed once on a zero-mean vector z and on
    -z (so weight, 1 + weight as in Gemma, none, or a bias are all read the same way)."""
    z = _zero_mean_probe(like.shape[-1], like.device)
    with torch.no_grad():
        # m.forward, not m(...): the freeze hooks are on m.
        plus, minus = m.forward(z).float(), m.forward(-z).float()
    s = norm_scale(m, z, kind)  # the same for z and -z
    return torch.cat([(plus - minus) / (2 * z * s), (plus + minus) / 2])


def _linear_norm(m: nn.Module, x: Tensor, s0: Tensor, w: Tensor, kind: str | None = None) -> Tensor:
    """s0 * h(x) in fp32, cast back to x's dtype: autograd keeps only s0 and w (constants).
    `w` is nn.LayerNorm's [d] placeholder, or `effective_weight`'s [2, d] (weight, bias)."""
    xf = x.float()
    if isinstance(m, nn.LayerNorm):
        xf = xf - xf.mean(-1, keepdim=True)
        out = xf * s0 * (w if m.weight is None else m.weight.float())
        return (out if m.bias is None else out + m.bias.float()).to(x.dtype)
    if kind == "layer":
        xf = xf - xf.mean(-1, keepdim=True)
    out = xf * s0 * w[0]
    return (out + w[1] if bool(w[1].any()) else out).to(x.dtype)


def _norm_hooks(name: str, m: nn.Module, state: FreezeState, kind: str | None) -> list[Any]:
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
                    else effective_weight(m, x, kind)
                )
            return _linear_norm(m, x, state.scales[name], state.weights[name], kind)
        s = norm_scale(m, x, kind)
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
        bias = getattr(m, "bias", None) if kind == "layer" else None
        if isinstance(bias, Tensor):
            return ((out.float() - bias) * ratio + bias).to(out.dtype)
        return (out.float() * ratio).to(out.dtype)

    return [m.register_forward_pre_hook(pre), register_vlmscope_hook(m, hook)]


@contextlib.contextmanager
def frozen(vlm: HookedVLM, state: FreezeState) -> Iterator[FreezeState]:
    """Run the LM with recorded (mode "record") or replayed (mode "replay") attention
    patterns and norm scales. Use the same prompt (or copies of it) in both passes."""
    tc = vlm.adapter.text_config
    old = tc._attn_implementation
    a = vlm.adapter
    handles = [
        h for name, m in a.frozen_norms() for h in _norm_hooks(name, m, state, a.norm_kind(m))
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
