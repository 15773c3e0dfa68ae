"""Baseline image-patch saliency for one answer token, to compare attribution graphs against.

Each method returns a [rows, cols] map over the image's patch grid (image 0, view 0) for the
logit of one token at the last position (the token the model is about to write), so the
grounding benchmark can score it against the shapes world's per-patch labels the same way it
scores a graph's `patch_influence`. Let ``x_p`` be the decoder's input embedding at image
position ``p`` (the projector's output, ``lm.blocks.0.hook_resid_pre``) and ``f`` the target
logit minus the mean logit (the graph's logit direction ``W_U[t] - mean(W_U)``), or, given
``against`` (the answer's competitors, e.g. the other colours), minus the mean of their logits:

- ``gradient x input``: ``|sum_d x_p[d] * df/dx_p[d]|``.
- ``integrated gradients`` (Sundararajan et al. 2017) from a baseline ``x'``: ``|sum_d (x_p -
  x'_p)[d] * mean_k df/dx_p[d] at x' + a_k (x - x')|`` with ``a_k`` the midpoints of ``steps``
  equal intervals of [0, 1]. The signed values over all positions sum to about ``f(x) - f(x')``
  (completeness). The default baseline is the embedding of a blank image (every pixel the
  colour of the top-left one: the shapes world's background), text unchanged. The common zero
  baseline is available but a poor fit for a decoder that normalises its input: RMSNorm is
  scale-invariant except within ~sqrt(eps) of zero, so on the path from 0 the logit jumps in
  the first sliver of [0, 1] and the midpoint sums miss the jump (on the toy, 64 or 256 steps
  give the same sum, 13% off ``f(x) - f(0)``). With ``freeze_path``, the LM's attention patterns
  and norm scales are recorded at each point of the path and held there for its gradient: IG of
  the model linearised point by point as an attribution graph linearises it at the input (the
  grounding benchmark's test of whether a graph integrated along the path would close the gap
  to IG: it does not, see benchmarks/README.md).
- ``attention``: the attention weights from the last position to each image position, averaged
  over heads and layers.
- ``attention rollout`` (Abnar & Zuidema 2020) over the decoder: per layer ``A = (mean_heads
  attn + I) / 2`` (rows renormalised), ``R = A_L ... A_1``, the last position's row of ``R``.

Absolute values: a patch that pushes the logit down is still one the answer depends on, and the
graph's influence is also taken on absolute edge weights.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from vlmscope.attribution.freeze import FreezeState, frozen
from vlmscope.models.hooked import HookContext, HookedVLM

EMBED_HOOK = "lm.blocks.0.hook_resid_pre"

__all__ = [
    "attention_from_answer",
    "attention_rollout",
    "blank_inputs",
    "gradient_x_input",
    "image_grid",
    "integrated_gradients",
    "to_grid",
]


def image_grid(vlm: HookedVLM, inputs: Mapping[str, Any]) -> tuple[Tensor, Tensor, Tensor]:
    """(positions, rows, cols) of the first image's grid tokens (view 0) in sample 0."""
    masks = vlm.masks(inputs)
    pm = masks.patch_map[0]
    keep = masks.image[0] & (pm[:, 0] == 0) & (pm[:, 1] == 0) & (pm[:, 2] >= 0) & (pm[:, 3] >= 0)
    pos = keep.nonzero().squeeze(1)
    if len(pos) == 0:
        raise ValueError("the prompt has no image tokens on a patch grid")
    return pos, pm[pos, 2], pm[pos, 3]


def to_grid(values: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
    """[n] values of grid tokens -> [rows, cols] map (tokens on one cell add up)."""
    out = torch.zeros(int(rows.max()) + 1, int(cols.max()) + 1, dtype=torch.float64)
    out.index_put_((rows.long(), cols.long()), values.detach().double().cpu(), accumulate=True)
    return out


def _wide(t: Tensor) -> Tensor:
    """fp32, or fp64 when the model runs in fp64."""
    return t if t.dtype == torch.float64 else t.float()


def _centred_logit(logits: Tensor, token_id: int, against: Sequence[int] = ()) -> Tensor:
    """[batch] target logit minus the mean logit (or the mean of the `against` tokens'
    logits), at the last position."""
    last = _wide(logits[:, -1])
    if against:
        return last[:, token_id] - last[:, list(against)].mean(-1)
    return last[:, token_id] - last.mean(-1)


def _batched(inputs: Mapping[str, Any], n: int) -> dict[str, Any]:
    """`inputs` (batch 1) repeated n times along the batch."""
    out: dict[str, Any] = {}
    for k, v in inputs.items():
        out[k] = v.expand(n, *v.shape[1:]) if isinstance(v, Tensor) and v.shape[0] == 1 else v
    return out


def _embeddings(vlm: HookedVLM, inputs: Mapping[str, Any]) -> Tensor:
    """[1, seq, d] decoder input embeddings of the prompt."""
    _, cache = vlm.run_with_cache(inputs, EMBED_HOOK)
    return _wide(cache[EMBED_HOOK])


def _logits_at(
    vlm: HookedVLM,
    inputs: Mapping[str, Any],
    embeds: Tensor,
    token_id: int,
    against: Sequence[int] = (),
) -> Tensor:
    """[n] centred answer logit with the decoder's input embeddings replaced by each of
    `embeds` ([n, seq, d])."""

    def swap(t: Tensor, _ctx: HookContext) -> Tensor:
        return embeds.to(t.dtype)

    out = vlm.run_with_hooks(_batched(inputs, embeds.shape[0]), [(EMBED_HOOK, swap)])
    return _centred_logit(out.logits, token_id, against)


def _gradients(
    vlm: HookedVLM,
    inputs: Mapping[str, Any],
    embeds: Tensor,
    token_id: int,
    against: Sequence[int] = (),
) -> Tensor:
    """[n, seq, d] gradient of the centred answer logit at each of `embeds`."""
    point = embeds.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        f = _logits_at(vlm, inputs, point, token_id, against)
        (grad,) = torch.autograd.grad(f.sum(), point)
    return grad


def gradient_x_input(
    vlm: HookedVLM, inputs: Mapping[str, Any], token_id: int, against: Sequence[int] = ()
) -> Tensor:
    """[rows, cols] |gradient x input| of the centred answer logit on the image embeddings."""
    pos, rows, cols = image_grid(vlm, inputs)
    x = _embeddings(vlm, inputs)
    per_pos = (x[0] * _gradients(vlm, inputs, x, token_id, against)[0]).sum(-1)
    return to_grid(per_pos[pos].abs(), rows, cols)


def blank_inputs(inputs: Mapping[str, Any]) -> dict[str, Any]:
    """`inputs` with every image and video blank: every pixel of every image, tile and video
    frame the (processed) colour of the first image's top-left pixel (the first video's when
    there is no image). Pixels laid out as [..., C, H, W] take it per channel; flattened
    patches ([patches, C x T x P x P] rows, Qwen-VL and GLM-4V, channel by channel) take each
    channel's first value across its block. (Taking each tile's own corner gave a tiled image
    several colours, and a flattened row one value for all channels; leaving the videos as
    they were measured their patches from themselves.)"""
    keys = [k for k in ("pixel_values", "pixel_values_videos") if inputs.get(k) is not None]
    if not keys:
        raise ValueError("blank_inputs: the prompt has no pixel_values or pixel_values_videos")
    out = dict(inputs)
    colour = _corner_colour(inputs[keys[0]], keys[0])
    for k in keys:
        pv = inputs[k]
        if pv.dim() >= 4:
            out[k] = colour.to(pv)[:, None, None].expand_as(pv).clone()
        else:
            block = _channel_block(pv, k)
            out[k] = colour.to(pv).repeat_interleave(block).expand_as(pv).clone()
    return out


def _channel_block(pv: Tensor, key: str) -> int:
    """Values per channel in a row of flattened RGB patches ([patches, 3 x block])."""
    if pv.dim() == 2 and pv.shape[1] % 3 == 0:
        return pv.shape[1] // 3
    raise ValueError(
        f"blank_inputs: {key} of shape {tuple(pv.shape)} are neither [..., C, H, W] nor rows "
        "of flattened RGB patches"
    )


def _corner_colour(pv: Tensor, key: str) -> Tensor:
    """[C] the first image's top-left pixel: of [..., C, H, W] pixels, or the first value of
    each channel's block of the first flattened patch."""
    if pv.dim() >= 4:
        return pv.reshape(-1, *pv.shape[-3:])[0, :, 0, 0]
    return pv[0, :: _channel_block(pv, key)]


def integrated_gradients(
    vlm: HookedVLM,
    inputs: Mapping[str, Any],
    token_id: int,
    steps: int = 32,
    *,
    baseline: str = "blank",
    signed: dict[str, Tensor] | None = None,
    against: Sequence[int] = (),
    freeze_path: bool = False,
) -> Tensor:
    """[rows, cols] |integrated gradients| of the centred answer logit on the image
    embeddings, from the ``blank`` image's embeddings or ``zero`` ones (`steps` midpoints, one
    batched pass). Pass a dict as `signed` to receive the signed attribution of every position
    (``"all"``, [seq]) and ``f(x) - f(x')`` (``"delta"``): the completeness check (which
    `freeze_path`, patterns and norm scales held at each point, gives up)."""
    pos, rows, cols = image_grid(vlm, inputs)
    x = _embeddings(vlm, inputs)
    if baseline == "blank":
        base = _embeddings(vlm, blank_inputs(inputs))
    elif baseline == "zero":
        base = x.clone()
        base[0, pos] = 0.0
    else:
        raise ValueError(f"baseline must be 'blank' or 'zero', got {baseline!r}")
    alphas = ((torch.arange(steps, dtype=x.dtype) + 0.5) / steps).to(x.device)
    points = base + alphas[:, None, None] * (x - base)
    if freeze_path:
        state = FreezeState(mode="record")  # one row per point: each held at its own values
        with torch.no_grad(), frozen(vlm, state):
            _logits_at(vlm, inputs, points, token_id, against)
        state.mode = "replay"
        with frozen(vlm, state):
            grad = _gradients(vlm, inputs, points, token_id, against)
    else:
        grad = _gradients(vlm, inputs, points, token_id, against)
    per_pos = ((x - base)[0] * grad.mean(0)).sum(-1)
    if signed is not None:
        with torch.no_grad():
            f = _logits_at(vlm, inputs, torch.cat([base, x]), token_id, against)
        signed["all"], signed["delta"] = per_pos.detach(), (f[1] - f[0]).detach()
    return to_grid(per_pos[pos].abs(), rows, cols)


def _patterns(vlm: HookedVLM, inputs: Mapping[str, Any]) -> list[Tensor]:
    """Per decoder layer, [heads, q, k] attention pattern of sample 0 (fp32)."""
    names = [f"lm.blocks.{i}.attn.hook_pattern" for i in range(vlm.adapter.n_layers)]
    _, cache = vlm.run_with_cache(inputs, names)
    return [_wide(cache[n][0]) for n in names]


def attention_from_answer(vlm: HookedVLM, inputs: Mapping[str, Any]) -> Tensor:
    """[rows, cols] attention from the last position to each image patch, averaged over heads
    and layers."""
    pos, rows, cols = image_grid(vlm, inputs)
    mean = torch.stack([p[:, -1].mean(0) for p in _patterns(vlm, inputs)]).mean(0)
    return to_grid(mean[pos], rows, cols)


def attention_rollout(vlm: HookedVLM, inputs: Mapping[str, Any]) -> Tensor:
    """[rows, cols] attention rollout from the last position to each image patch."""
    pos, rows, cols = image_grid(vlm, inputs)
    rollout: Tensor | None = None
    for p in _patterns(vlm, inputs):
        a = p.mean(0)
        a = 0.5 * a + 0.5 * torch.eye(a.shape[0])
        a = a / a.sum(-1, keepdim=True)
        rollout = a if rollout is None else a @ rollout
    assert rollout is not None
    return to_grid(rollout[-1, pos], rows, cols)
