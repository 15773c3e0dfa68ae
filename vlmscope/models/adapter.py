"""Model adapters: one declared component mapping per family, over the unmodified HF model.

An adapter never runs the model itself. It names where the language model's layers, attention,
MLP, norms, vision blocks and projector live, gives the dimensions, lays out image tokens on a
patch grid, and recomputes attention patterns from hooked q and k with the family's own RoPE.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

import torch
from torch import nn

from vlmscope.models.chat import tokenizer_special_ids
from vlmscope.models.vision import (
    VisionView,
    one_view_per_image,
    per_view_shape,
    view_layout,
    views_from_token_grids,
)


@dataclass(frozen=True)
class Capabilities:
    """What a family supports; acceptance tests are gated on these flags."""

    has_vision: bool = True
    #: resid_post[i] is exactly resid_pre[i+1] (False when something is added between layers).
    strict_residual_stream: bool = True
    #: each image's tokens form one unbroken run of image-token ids.
    contiguous_image_tokens: bool = True
    #: image tokens map to (image, view, row, col) cells of a patch grid.
    patch_grid: bool = True
    #: the text attention uses sliding windows on some layers.
    sliding_window: bool = False
    #: attention logits are soft-capped (tanh) before the softmax.
    attn_softcap: bool = False
    #: some MLPs are mixtures of experts; mlp.hook_in/hook_out are the whole block's
    #: input and output (router, experts and shared expert together).
    moe_mlp: bool = False
    #: attention and MLP read the same normalised input and both add to it (Cohere-style);
    #: hook_resid_mid is then the layer's input, the stream the MLP reads.
    parallel_block: bool = False
    #: image features enter through cross-attention layers, not image tokens (Mllama).
    cross_attention: bool = False
    #: videos (`pixel_values_videos`) are laid out: their placeholders are image tokens, each
    #: video one image whose views are its frames (Qwen-VL: its temporal patches).
    video: bool = False

    def to_dict(self) -> dict[str, bool]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(frozen=True)
class LayerMap:
    """Dotted paths of a decoder layer's parts, relative to the layer module.

    `attn_out` and `mlp_out` name the module whose output is the block's contribution to the
    residual stream (after a post-norm where the family has one); `mlp_in_norm` is the norm that
    reads the mid-layer residual stream. In a parallel block it is `attn_in_norm` itself: the
    MLP reads the layer's input, so hook_resid_mid equals hook_resid_pre there. `mlp` may be a
    mixture of experts (its output may come back flattened to [tokens, d]; hooks see
    [batch, pos, d]).
    """

    attn: str = "self_attn"
    q: str = "self_attn.q_proj"
    k: str = "self_attn.k_proj"
    v: str = "self_attn.v_proj"
    #: one fused projection whose output is [q | k | v] (Phi-3/4); hook_q/k/v slice it, and
    #: q/k/v above are then ignored.
    qkv: str | None = None
    o: str = "self_attn.o_proj"
    q_norm: str | None = None
    k_norm: str | None = None
    attn_in_norm: str = "input_layernorm"
    attn_out: str = "self_attn.o_proj"
    mlp: str = "mlp"
    mlp_in_norm: str = "post_attention_layernorm"
    mlp_out: str = "mlp"
    mlp_projections: Mapping[str, str] = field(
        default_factory=lambda: {
            "gate": "mlp.gate_proj",
            "up": "mlp.up_proj",
            "down": "mlp.down_proj",
        }
    )


GEMMA_LAYER = LayerMap(
    attn_out="post_attention_layernorm",
    mlp_in_norm="pre_feedforward_layernorm",
    mlp_out="post_feedforward_layernorm",
)


def get_submodule(root: nn.Module, path: str) -> nn.Module:
    """`root.get_submodule(path)` with an error that says which family path was wrong.

    A module that a PEFT tuner layer (LoRA, vlmscope's SAE adapters, ...) has wrapped is found
    at its usual path: the wrapper is returned (hooks on it see what flows on), and the path
    continues inside its `base_layer`."""
    mod = root
    for part in path.split(".") if path else []:
        while part not in mod._modules and isinstance(mod._modules.get("base_layer"), nn.Module):
            mod = mod._modules["base_layer"]  # type: ignore[assignment]
        child = mod._modules.get(part)
        if child is None:
            raise AttributeError(
                f"{type(root).__name__} has no submodule {path!r}; the adapter's component "
                "mapping does not match this model"
            )
        mod = child
    return mod


def unwrap_tuner_layer(module: nn.Module) -> nn.Module:
    """The module a PEFT tuner layer wraps (the module itself when it is not wrapped)."""
    while isinstance(module._modules.get("base_layer"), nn.Module):
        module = module._modules["base_layer"]  # type: ignore[assignment]
    return module


def unwrap_peft_model(model: nn.Module) -> nn.Module:
    """The model inside a PeftModel or a PEFT tuner (the model itself otherwise), so that
    component paths stay those of the Hugging Face model, without `base_model.model.`.
    peft is only consulted when something has imported it already."""
    peft = sys.modules.get("peft")
    if peft is None:
        return model
    from peft.tuners.tuners_utils import BaseTuner

    while True:
        if isinstance(model, peft.PeftModel):
            model = model.get_base_model()
        elif isinstance(model, BaseTuner):
            model = model.model
        else:
            return model


@dataclass
class AttentionInputs:
    """What the attention module received in one forward: enough to recompute its pattern."""

    position_embeddings: Any = None
    attention_mask: torch.Tensor | None = None


class ModelAdapter:
    """Base adapter. Subclasses declare paths and flags; most need no code at all."""

    #: family name shown by `vlmscope models`.
    family: ClassVar[str] = "base"
    #: config.model_type values this adapter handles.
    model_types: ClassVar[tuple[str, ...]] = ()
    #: config.architectures values this adapter handles.
    architectures: ClassVar[tuple[str, ...]] = ()
    #: dotted path of the text decoder model (has the layer list, final norm, embeddings).
    language_model: ClassVar[str] = "model.language_model"
    layers: ClassVar[str] = "layers"
    final_norm: ClassVar[str] = "norm"
    embed_tokens: ClassVar[str] = "embed_tokens"
    lm_head: ClassVar[str] = "lm_head"
    #: dotted path of the vision encoder's block list, and of the projector into the LM.
    vision_blocks: ClassVar[str | None] = None
    projector: ClassVar[str | None] = None
    #: dotted path of a vision block's MLP, relative to the block.
    vision_mlp: ClassVar[str] = "mlp"
    layer_map: ClassVar[LayerMap] = LayerMap()
    capabilities: ClassVar[Capabilities] = Capabilities()
    #: token strings whose ids are image placeholders in the LM input.
    image_token_strings: ClassVar[tuple[str, ...]] = ()
    #: norm classes (by name) that centre their input like LayerNorm without being
    #: nn.LayerNorm (Cohere's); RMS norms are recognised by name, nn.LayerNorm by type.
    centred_norms: ClassVar[tuple[str, ...]] = ()
    #: input keys that carry pixels (images, video frames) when a batch has visual inputs.
    pixel_keys: ClassVar[tuple[str, ...]] = ("pixel_values", "pixel_values_videos")
    #: the model numbers positions 0..n-1 regardless of padding, so a left-padded batch needs
    #: position_ids from the attention mask (as generate() passes them); False where the
    #: model derives positions from the mask itself (M-RoPE, PaliGemma).
    positions_from_padding: ClassVar[bool] = True

    def __init__(self, model: nn.Module, processor: Any = None) -> None:
        self.model = unwrap_peft_model(model)
        self.processor = processor
        self.config = self.model.config
        self.text_config = self.config.get_text_config(decoder=True)

    # --- component access -------------------------------------------------------------------
    def lm(self) -> nn.Module:
        """The text decoder model (embeddings, layers, final norm)."""
        return get_submodule(self.model, self.language_model)

    def blocks(self) -> nn.ModuleList:
        """The language model's decoder layers."""
        return get_submodule(self.lm(), self.layers)  # type: ignore[return-value]

    def block(self, i: int) -> nn.Module:
        return self.blocks()[i]

    def skippable_blocks(self) -> frozenset[int]:
        """Decoder layers the language model skips for a batch without images (Mllama's
        cross-attention layers). Sharding keeps them in the root unit, so ranks whose
        batches differ in images still gather the same units."""
        return frozenset()

    def skipped_blocks(self, inputs: Mapping[str, Any]) -> frozenset[int]:
        """The decoder layers a forward of `inputs` skips: `skippable_blocks` when the batch
        holds no image (transformers then runs no cross-attention layer), else none."""
        skippable = self.skippable_blocks()
        if not skippable or any(inputs.get(k) is not None for k in self.pixel_keys):
            return frozenset()
        return skippable

    def layer_map_of(self, i: int) -> LayerMap:
        """The component mapping of decoder layer `i` (one for every layer unless a family
        mixes layer kinds, as Mllama mixes self- and cross-attention layers)."""
        return self.layer_map

    def part(self, i: int, name: str) -> nn.Module:
        """Part `name` of LayerMap (e.g. "attn", "mlp_in_norm") of decoder layer `i`."""
        lmap = self.layer_map_of(i)
        if name in ("q", "k", "v") and lmap.qkv is not None:
            name = "qkv"
        path = getattr(lmap, name)
        if path is None:
            raise AttributeError(f"{self.family} layer {i} has no {name}")
        return get_submodule(self.block(i), path)

    def qkv_slice(self, i: int, which: str) -> slice | None:
        """Where `which` ("q", "k" or "v") sits in the output of layer i's fused qkv
        projection; None when the layer projects q, k and v separately."""
        if self.layer_map_of(i).qkv is None:
            return None
        nq, nkv = self.n_heads * self.d_head, self.n_kv_heads * self.d_head
        return {"q": slice(0, nq), "k": slice(nq, nq + nkv), "v": slice(nq + nkv, nq + 2 * nkv)}[
            which
        ]

    def norm(self) -> nn.Module:
        return get_submodule(self.lm(), self.final_norm)

    def embedding(self) -> nn.Module:
        return get_submodule(self.lm(), self.embed_tokens)

    def unembed(self) -> nn.Module:
        return get_submodule(self.model, self.lm_head)

    def norm_kind(self, module: nn.Module) -> str | None:
        """ "layer" for a norm that centres and divides by the std, "rms" for one that divides
        by the root mean square, None for anything else."""
        if isinstance(module, nn.LayerNorm) or type(module).__name__ in self.centred_norms:
            return "layer"
        return "rms" if type(module).__name__.endswith("RMSNorm") else None

    def frozen_norms(self) -> list[tuple[str, nn.Module]]:
        """The norms attribution freezes, by dotted name under `lm()`: every norm (a module
        `norm_kind` recognises) inside a decoder layer, at any depth, and the final norm.

        Why this set, family by family of the zoo: the norms on the residual path (direct
        parts of a layer: input, post-attention, pre/post-feedforward norms) must be frozen
        for the replay to be linear; this is every norm the zoo has there, Cohere's centring
        norm (Aya Vision) included, which a search by class (nn.LayerNorm or *RMSNorm) misses.
        Norms inside attention are frozen too: per-head q/k norms (Gemma 3, Qwen3, Mllama's
        cross-attention) only feed the frozen pattern, so freezing them changes nothing, but a
        norm on the value path (Gemma 3n's v_norm) must be frozen, and a walk that stops at a
        layer's direct children would miss it. Norms under `lm()` but outside the decoder
        layers are not: Phi-4-multimodal's LM owns its image and audio towers, whose
        LayerNorms run before the decoder (and the attribution replay never runs them)."""
        out = []
        for i, layer in enumerate(self.blocks()):
            for name, m in layer.named_modules():
                if name and self.norm_kind(m) is not None:
                    out.append((f"{self.layers}.{i}.{name}", m))
        out.append((self.final_norm, self.norm()))
        return out

    def vision_block_list(self) -> nn.ModuleList | None:
        if self.vision_blocks is None:
            return None
        return get_submodule(self.model, self.vision_blocks)  # type: ignore[return-value]

    def projector_module(self) -> nn.Module | None:
        if self.projector is None:
            return None
        return get_submodule(self.model, self.projector)

    def vision_mlp_module(self, i: int) -> nn.Module:
        """The MLP of vision block i."""
        blocks = self.vision_block_list()
        if blocks is None:
            raise AttributeError(f"{self.family} models have no vision tower")
        return get_submodule(blocks[i], self.vision_mlp)

    def vision_mlp_out_scale(self, i: int) -> torch.Tensor | None:
        """What vision block i multiplies its MLP's output by before adding it to the stream
        (a layer scale), or None: `vision.blocks.{i}.mlp.hook_out` shows the product, the
        block's contribution, whatever module computes it."""
        return None

    def has_vision_mlp(self) -> bool:
        """Whether vision blocks have an MLP at `vision_mlp` (for its hook points)."""
        try:
            return self.n_vision_layers > 0 and self.vision_mlp_module(0) is not None
        except AttributeError:
            return False

    # --- dimensions -------------------------------------------------------------------------
    @property
    def n_layers(self) -> int:
        return len(self.blocks())

    @property
    def n_heads(self) -> int:
        return int(self.text_config.num_attention_heads)

    @property
    def n_kv_heads(self) -> int:
        return int(getattr(self.text_config, "num_key_value_heads", None) or self.n_heads)

    @property
    def d_head(self) -> int:
        hd = getattr(self.text_config, "head_dim", None)
        return int(hd) if hd else self.d_model // self.n_heads

    @property
    def d_model(self) -> int:
        return int(self.text_config.hidden_size)

    @property
    def d_mlp(self) -> int:
        return int(self.text_config.intermediate_size)

    @property
    def n_vision_layers(self) -> int:
        blocks = self.vision_block_list()
        return 0 if blocks is None else len(blocks)

    def dims(self) -> dict[str, int]:
        """All dimensions in one dict, as stored next to dictionaries trained on this model."""
        return {
            "n_layers": self.n_layers,
            "n_heads": self.n_heads,
            "n_kv_heads": self.n_kv_heads,
            "d_head": self.d_head,
            "d_model": self.d_model,
            "d_mlp": self.d_mlp,
            "n_vision_layers": self.n_vision_layers,
        }

    # --- tokens -----------------------------------------------------------------------------
    def image_token_ids(self) -> tuple[int, ...]:
        """Ids of the placeholder tokens that the LM sees in place of image features."""
        ids = []
        for attr in ("image_token_id", "image_token_index"):
            v = getattr(self.config, attr, None)
            if isinstance(v, int) and v >= 0:
                ids.append(v)
        tok = self.tokenizer
        if tok is not None:
            for s in self.image_token_strings:
                i = tok.convert_tokens_to_ids(s)
                if isinstance(i, int) and i != tok.unk_token_id:
                    ids.append(i)
        return tuple(dict.fromkeys(ids))

    @property
    def tokenizer(self) -> Any:
        p = self.processor
        return getattr(p, "tokenizer", p)

    def special_token_ids(self) -> tuple[int, ...]:
        """BOS/EOS/pad and every added special token (chat-template and image markers),
        except the image placeholders themselves."""
        ids = tokenizer_special_ids(self.tokenizer) - set(self.image_token_ids())
        return tuple(sorted(ids))

    def image_token_grids(self, inputs: Mapping[str, Any]) -> list[torch.Tensor]:
        """For every image in `inputs` (in pixel_values order): a LongTensor [n_tokens, 3] of
        (view, row, col) per image token, in sequence order. view 0 is the whole image (or its
        base/global view); tiles and high-resolution views count from 1; col -1 marks a
        row-separator token that belongs to the image but not to a grid cell."""
        raise NotImplementedError(f"{self.family}: image token layout not implemented")

    # --- vision-encoder positions ------------------------------------------------------------
    def vision_views(self, inputs: Mapping[str, Any]) -> list[VisionView]:
        """(image, view, tile_row, tile_col) of every view the vision encoder sees, in its
        order (see models/vision.py); by default each image of pixel_values is one view."""
        return one_view_per_image(inputs)

    def vision_layout(
        self, inputs: Mapping[str, Any], name: str, shape: tuple[int, ...]
    ) -> torch.Tensor:
        """[rows, 4] (image, view, row, col) of each row of vision hook `name`, whose
        activation has shape `shape` (width left out); row = col = -1 for CLS / register
        tokens, -2 for padding patches (see models/vision.py)."""
        return view_layout(self.vision_views(inputs), shape, name)

    # --- attention --------------------------------------------------------------------------
    def sliding_window(self, i: int) -> int | None:
        """The sliding window of layer i, None where it attends to everything before it."""
        tc = self.text_config
        window = getattr(tc, "sliding_window", None)
        types = getattr(tc, "layer_types", None)
        if window is None or types is None:
            return None
        return int(window) if types[i] == "sliding_attention" else None

    def apply_rope(
        self, i: int, q: torch.Tensor, k: torch.Tensor, position_embeddings: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE with the family's own function (q, k: [batch, heads, pos, d_head])."""
        cos, sin = position_embeddings
        module = sys.modules[type(unwrap_tuner_layer(self.part(i, "attn"))).__module__]
        return module.apply_rotary_pos_emb(q, k, cos, sin)

    def attention_scores(
        self, i: int, q: torch.Tensor, k: torch.Tensor, ctx: AttentionInputs
    ) -> torch.Tensor:
        """Masked pre-softmax scores [batch, heads, q_pos, k_pos] of layer i from the raw
        q_proj / k_proj outputs as [batch, pos, heads, d_head], as the model computes them.
        A cross-attention layer (`attn` named cross_attn) attends from the text to the
        vision features: its keys are viewed per sample, with no RoPE and no causal order."""
        attn = unwrap_tuner_layer(self.part(i, "attn"))
        lmap = self.layer_map_of(i)
        cross = lmap.attn == "cross_attn"
        if cross:  # k_proj may run on [batch x images x tiles, patches, ...]
            k = k.reshape(q.shape[0], -1, *k.shape[-2:])
        if lmap.q_norm is not None:
            q = self.part(i, "q_norm")(q)
        if lmap.k_norm is not None:
            k = self.part(i, "k_norm")(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        if ctx.position_embeddings is not None and not cross:
            q, k = self.apply_rope(i, q, k, ctx.position_embeddings)
        groups = q.shape[1] // k.shape[1]
        k = k.repeat_interleave(groups, dim=1)
        scores = (q @ k.transpose(-1, -2)) * attn.scaling
        cap = getattr(attn, "attn_logit_softcapping", None) or getattr(
            self.text_config, "attn_logit_softcapping", None
        )
        if cap:
            scores = torch.tanh(scores / cap) * cap
        return self._mask_scores(i, scores, ctx.attention_mask, attn)

    def _mask_scores(
        self, i: int, scores: torch.Tensor, mask: Any, attn: nn.Module
    ) -> torch.Tensor:
        n_q, n_k = scores.shape[-2:]
        if isinstance(mask, torch.Tensor):
            m = mask[..., :n_q, :n_k]
            if m.dtype == torch.bool:
                return scores.masked_fill(~m, float("-inf"))
            return scores + m.to(scores.dtype)
        if mask is not None:
            raise TypeError(
                f"cannot recompute attention patterns from a {type(mask).__name__} mask; "
                "load the model with attn_implementation='sdpa' or 'eager'"
            )
        if not getattr(attn, "is_causal", True) or self.layer_map_of(i).attn == "cross_attn":
            return scores
        qi = torch.arange(n_k - n_q, n_k, device=scores.device)[:, None]
        ki = torch.arange(n_k, device=scores.device)[None, :]
        allowed = ki <= qi
        window = self.sliding_window(i)
        if window is not None:
            allowed &= qi - ki < window
        return scores.masked_fill(~allowed, float("-inf"))

    def attention_pattern(
        self, i: int, q: torch.Tensor, k: torch.Tensor, ctx: AttentionInputs
    ) -> torch.Tensor:
        """Softmaxed attention pattern [batch, heads, q_pos, k_pos], computed in fp32."""
        scores = self.attention_scores(i, q.float(), k.float(), ctx)
        return torch.softmax(scores, dim=-1).nan_to_num(0.0)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(family={self.family!r})"


class TileRunViews(ModelAdapter):
    """Base of families whose encoder sees one view per run of g x g image tokens (tiles and
    a global view, in prompt order: Aya Vision, InternVL, Llama 4); they define `tile_grid`."""

    def tile_grid(self) -> int:
        raise NotImplementedError

    def vision_views(self, inputs: Mapping[str, Any]) -> list[VisionView]:
        """One encoder view per tile run of the image's tokens, in their order (pixel_values
        holds the tiles in the order the prompt lays them out)."""
        g = self.tile_grid()
        return views_from_token_grids(self.image_token_grids(inputs), g * g)

    def vision_layout(
        self, inputs: Mapping[str, Any], name: str, shape: tuple[int, ...]
    ) -> torch.Tensor:
        """The base layout over [views, P] (the projector may hand its rows over as
        [views, h, w], or flat)."""
        shape = per_view_shape(shape, len(self.vision_views(inputs)))
        return super().vision_layout(inputs, name, shape)
