"""Input nodes of cross-attention VLMs (Mllama): the vision features cross-attention reads.

No token position of a cross-attention VLM carries the image. Every cross-attention layer l
reads the projected vision features V (one vector per tile patch, each tile's CLS first) as
keys k_l = k_proj_l(V) and values v_l = v_proj_l(V), and adds gate_l * o_proj_l(P_l v_l) to the
residual stream. With the patterns P_l frozen (as attribution freezes every pattern), that
update is linear in V and the key path carries no gradient. So each vision feature V_j is an
input node, and its direct effect on a target t is

    A[t, j] = < dt/dV_j , V_j >,

the gradient summed over every cross-attention layer that reads V_j: one backward pass, exactly
as for a token's embedding.

In the replay (context.py) V is a constant source like the embeddings and MLP outputs: the
language model runs alone, and the features the clean run handed it (`cross_attention_states`,
recorded by a pre-hook on the LM) go back in through a tap whose backward callback writes their
columns, placed after the token input columns. The LM's two masks go back in as recorded: the
cross-attention mask (which the frozen pattern already holds) and the mask that zeroes the
cross-attention MLP of text rows that see no image (a constant factor). What the replay keeps
per copy does not grow: V is one [n, d] constant; v_proj's input, V repeated per copy (the
model views keys and values per sample), is a transient of the forward, as every layer's
activations are.

Their patch map is (image, tile, row, col); CLS tokens and padding tiles are nodes too (rows
that see no image attend to them) but lie off the grid, so heatmaps leave them out.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from vlmscope.models.hooked import HookedVLM

#: the LM's keyword arguments the recording keeps and the replay passes back.
_LM_KWARGS = ("cross_attention_mask", "full_text_row_masked_out_mask")


class CrossAttentionInputs:
    """The vision features a cross-attention VLM's layers read, as attribution input nodes."""

    def __init__(self, vlm: HookedVLM, inputs: Mapping[str, Any]) -> None:
        self.lm: nn.Module = vlm.adapter.lm()
        #: [n, 4] (image, tile, row, col) of each feature; -1 off the grid.
        self.patch_map: Tensor = vlm.adapter.vision_token_grid(inputs, 0).cpu()  # type: ignore[attr-defined]
        self.kinds = ["image"] * len(self.patch_map)
        self.labels = [
            f"<image {i} tile {t} " + ("cls>" if r < 0 else f"({r},{c})>")
            for i, t, r, c in self.patch_map.tolist()
        ]
        self.values: Tensor | None = None  # [n, d] float32 recorded features
        self._views = 0  # images x tiles: the LM reads V as [views, patches, d] per sample
        self._kwargs: dict[str, Any] = {}

    @property
    def n(self) -> int:
        return len(self.patch_map)

    def record_hook(self) -> tuple[nn.Module, Callable[..., None]]:
        """(module, forward pre-hook with kwargs) that keeps what the LM is handed."""

        def pre(_m: nn.Module, _args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            states = kwargs.get("cross_attention_states")
            if states is None:
                raise ValueError(
                    "the language model got no cross_attention_states although the prompt "
                    "has images; cannot attribute to the vision features"
                )
            self._views = int(states.shape[0])  # batch of one: images x tiles
            self.values = states.detach().float().reshape(-1, states.shape[-1])
            if len(self.values) != self.n:
                raise ValueError(
                    f"cross_attention_states holds {len(self.values)} vision features per "
                    f"sample, but the adapter lays out {self.n}; cannot attribute to them"
                )
            self._kwargs = {k: kwargs.get(k) for k in _LM_KWARGS}

        return self.lm, pre

    def replay_kwargs(
        self, copies: int, dtype: torch.dtype, tap: Callable[[Tensor], Tensor]
    ) -> dict[str, Any]:
        """The LM's keyword arguments for a replay on `copies` copies: the features through
        `tap` (a constant source, [copies, n, d]) and the recorded masks (batch 1, broadcast)."""
        assert self.values is not None, "record first"
        v = tap(self.values.to(dtype)[None].expand(copies, -1, -1))
        states = v.reshape(copies * self._views, -1, v.shape[-1])
        return {"cross_attention_states": states, **self._kwargs}

    def columns(self, grad: Tensor) -> Tensor:
        """[targets, n] direct effects from the features' gradient [targets, n, d]."""
        assert self.values is not None
        return torch.einsum("tnd,nd->tn", grad.float(), self.values)


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
