"""Input nodes of cross-attention VLMs (Mllama): the vision features cross-attention reads.

No token position of a cross-attention VLM carries the image. Every cross-attention layer l
reads the projected vision features V (one vector per tile patch, each tile's CLS first) as
keys k_l = k_proj_l(V) and values v_l = v_proj_l(V), and adds gate_l * o_proj_l(P_l v_l) to the
residual stream. With the patterns P_l frozen (as attribution freezes every pattern), that
update is linear in V and the key path carries no gradient. So each vision feature V_j is an
input node, and its direct effect on a target t is

    A[t, j] = < dt/dV_j , V_j >,

the gradient summed over every cross-attention layer that reads V_j: one backward pass, exactly
as for a token's embedding. The features are the projector's output (hook `projector.hook_out`),
recorded in the clean run and swapped for a leaf tensor of the same value in the frozen replay.
Their patch map is (image, tile, row, col); CLS tokens and padding tiles are nodes too (rows
that see no image attend to them) but lie off the grid, so heatmaps leave them out.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor

from vlmscope.models.hooked import HookContext, HookedVLM

HookSpec = tuple[str, Any]


class CrossAttentionInputs:
    """The vision features a cross-attention VLM's layers read, as attribution input nodes."""

    hook = "projector.hook_out"

    def __init__(self, vlm: HookedVLM, inputs: Mapping[str, Any]) -> None:
        #: [n, 4] (image, tile, row, col) of each feature; -1 off the grid.
        self.patch_map: Tensor = vlm.adapter.vision_token_grid(inputs, 0).cpu()  # type: ignore[attr-defined]
        self.kinds = ["image"] * len(self.patch_map)
        self.labels = [
            f"<image {i} tile {t} " + ("cls>" if r < 0 else f"({r},{c})>")
            for i, t, r, c in self.patch_map.tolist()
        ]
        self.values: Tensor | None = None  # [n, d] recorded features
        self.leaf: Tensor | None = None  # [copies, n, d] during a replay
        self._shape: tuple[int, ...] = ()

    @property
    def n(self) -> int:
        return len(self.patch_map)

    def record_hook(self) -> HookSpec:
        def fn(t: Tensor, ctx: HookContext) -> None:
            self._shape = tuple(t.shape[1:])
            self.values = t[0].detach().float().reshape(-1, t.shape[-1])
            if len(self.values) != self.n:
                raise ValueError(
                    f"{ctx.name} holds {len(self.values)} vision features per sample, but the "
                    f"adapter lays out {self.n}; cannot attribute to them"
                )

        return (self.hook, fn)

    def replay_hook(self, copies: int) -> HookSpec:
        assert self.values is not None, "record() first"
        self.leaf = self.values.expand(copies, -1, -1).clone().requires_grad_(True)

        def fn(t: Tensor, ctx: HookContext) -> Tensor:
            assert self.leaf is not None
            return self.leaf.reshape(copies, *self._shape).to(t.dtype)

        return (self.hook, fn)

    def columns(self, grad: Tensor) -> Tensor:
        """[targets, n] direct effects from the leaf's gradient [targets, n, d]."""
        assert self.values is not None
        return (grad * self.values).sum(-1)


def cross_attention_inputs(
    vlm: HookedVLM, inputs: Mapping[str, Any]
) -> CrossAttentionInputs | None:
    """The extra input nodes of a prompt: vision features for cross-attention VLMs that
    were given images, else None (token-based VLMs put their images in the sequence)."""
    a = vlm.adapter
    if not a.capabilities.cross_attention or not hasattr(a, "vision_token_grid"):
        return None  # the generic adapter does not know the vision features' layout
    if inputs.get("pixel_values") is None:
        return None
    return CrossAttentionInputs(vlm, inputs)


__all__ = ["CrossAttentionInputs", "cross_attention_inputs"]
