"""Structural fallback adapter for decoders vlmscope does not list.

It finds the text decoder as the module that owns a token embedding and a list of layers, and
maps every layer by its parts' standard HF names: an attention module (self- or cross-
attention, q/k/v/o projections or one fused qkv), an MLP (dense or mixture of experts, named
`mlp` or `feed_forward`), and its norms, which tell the block's shape: sequential (a norm before
attention and one before the MLP), Gemma- or GLM-style (post-norms after attention and MLP), or
parallel (one input norm feeding both). Layers may differ (Mllama's cross-attention layers);
a layer that matches none of these (a convolution) rejects the candidate, naming the layer.

When the config has an image token id the adapter is a VLM adapter: image tokens are the runs of
that id, and each run's patch layout comes from the vision config (image / patch size over the
merge, pixel-shuffle or downsample factor, or the configured tokens per image). A run that is a
whole number of such grids is that many views; otherwise the run becomes a square grid when its
length is a square, else a 1-D row, and a warning names the guess.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from vlmscope import VlmscopeWarning
from vlmscope.models.adapter import GEMMA_LAYER, Capabilities, LayerMap, ModelAdapter
from vlmscope.models.adapters.llava import grid_cells

_ATTN_NAMES = ("self_attn", "attention", "attn", "cross_attn")
_MLP_NAMES = ("mlp", "feed_forward", "block_sparse_moe")
_PROJ = ("q_proj", "k_proj", "v_proj", "o_proj")
_PROJECTOR_NAMES = (
    "multi_modal_projector",
    "mm_projector",
    "connector",
    "merger",
    "projector",
    "img_projection_down",  # Phi-4-multimodal: the last layer of its up/down projection
)
_VISION_HINTS = ("vision", "visual", "img_processor", "image_encoder")


class DecoderNotFoundError(ValueError):
    """Raised when no usable decoder can be found in a model."""


def _attention(layer: nn.Module) -> tuple[str, nn.Module] | None:
    for name in _ATTN_NAMES:
        a = getattr(layer, name, None)
        if a is None:
            continue
        if all(hasattr(a, p) for p in _PROJ) or (hasattr(a, "qkv_proj") and hasattr(a, "o_proj")):
            return name, a
    return None


def layer_map(layer: nn.Module) -> LayerMap | None:
    """The component mapping of one decoder layer, or None when it is not an attention + MLP
    block this adapter knows how to read."""
    found = _attention(layer)
    mlp = next((n for n in _MLP_NAMES if hasattr(layer, n)), None)
    if found is None or mlp is None:
        return None
    attn, a = found
    children = dict(layer.named_children())
    gemma = {"pre_feedforward_layernorm", "post_feedforward_layernorm"} <= set(children)
    glm = {"post_self_attn_layernorm", "post_mlp_layernorm"} <= set(children)
    if "input_layernorm" not in children:
        return None
    if gemma:
        attn_out, mlp_in, mlp_out = (
            GEMMA_LAYER.attn_out,
            GEMMA_LAYER.mlp_in_norm,
            GEMMA_LAYER.mlp_out,
        )
    elif glm:
        attn_out, mlp_in, mlp_out = (
            "post_self_attn_layernorm",
            "post_attention_layernorm",
            "post_mlp_layernorm",
        )
    elif "post_attention_layernorm" in children:
        attn_out, mlp_in, mlp_out = f"{attn}.o_proj", "post_attention_layernorm", mlp
    else:  # parallel block: one input norm feeds attention and the MLP
        attn_out, mlp_in, mlp_out = f"{attn}.o_proj", "input_layernorm", mlp
    fused = not all(hasattr(a, p) for p in _PROJ[:3])
    m = getattr(layer, mlp)
    return LayerMap(
        attn=attn,
        q=f"{attn}.q_proj",
        k=f"{attn}.k_proj",
        v=f"{attn}.v_proj",
        o=f"{attn}.o_proj",
        qkv=f"{attn}.qkv_proj" if fused else None,
        q_norm=f"{attn}.q_norm" if hasattr(a, "q_norm") else None,
        k_norm=f"{attn}.k_norm" if hasattr(a, "k_norm") else None,
        attn_in_norm="input_layernorm",
        attn_out=attn_out,
        mlp=mlp,
        mlp_in_norm=mlp_in,
        mlp_out=mlp_out,
        mlp_projections={
            k: f"{mlp}.{k}_proj"
            for k in ("gate", "up", "down", "gate_up")
            if hasattr(m, f"{k}_proj")
        },
    )


def _is_moe(mlp: nn.Module) -> bool:
    return any(hasattr(mlp, n) for n in ("experts", "router")) or (
        hasattr(mlp, "gate") and not hasattr(mlp, "gate_proj")
    )


def _find_decoder(model: nn.Module) -> tuple[str, str]:
    """(path of the text decoder, attribute name of its layer list)."""
    text_cfg = model.config.get_text_config(decoder=True)
    want = getattr(text_cfg, "num_hidden_layers", None)
    candidates, rejected = [], []
    for name, mod in model.named_modules():
        layers = getattr(mod, "layers", None)
        if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
            continue
        if not isinstance(getattr(mod, "embed_tokens", None), nn.Embedding):
            continue
        bad = next((i for i, layer in enumerate(layers) if layer_map(layer) is None), None)
        if bad is not None:
            rejected.append(f"{name or 'the model'}.layers.{bad} ({type(layers[bad]).__name__})")
            continue
        candidates.append((len(layers) == want, name))
    if not candidates:
        why = f"; layers that match no known block: {', '.join(rejected)}" if rejected else ""
        raise DecoderNotFoundError(
            f"no usable decoder in model_type={model.config.model_type!r} "
            f"({type(model).__name__}): searched every submodule for one with `embed_tokens` "
            f"(nn.Embedding) and `layers` (nn.ModuleList) whose every layer has an attention "
            f"module ({'/'.join(_ATTN_NAMES)} with {', '.join(_PROJ)} or a fused qkv_proj), an "
            f"MLP ({'/'.join(_MLP_NAMES)}) and an input_layernorm{why}"
        )
    candidates.sort(key=lambda c: (not c[0], len(c[1])))
    return candidates[0][1], "layers"


def _module_list_under(model: nn.Module, hints: tuple[str, ...], skip: str) -> str | None:
    """The first ModuleList of blocks under a submodule whose path has one of `hints`."""
    for name, mod in model.named_modules():
        if name.startswith(skip) or not isinstance(mod, nn.ModuleList) or len(mod) == 0:
            continue
        if any(h in name for h in hints):
            return name
    return None


def _first_int(*values: Any) -> int | None:
    for v in values:
        if isinstance(v, (list, tuple)) and v:
            v = v[0]
        if isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0:
            return int(v)
    return None


class GenericAdapter(ModelAdapter):
    """Adapter whose component mapping is discovered from the module structure."""

    family = "generic"
    pixel_keys = ("pixel_values", "pixel_values_videos", "image_pixel_values")

    def __init__(self, model: nn.Module, processor: Any = None) -> None:
        super().__init__(model, processor)
        model = self.model  # a PEFT-wrapped model's paths are those of the model inside
        path, layers = _find_decoder(model)
        self.language_model = path  # type: ignore[misc]
        self.layers = layers  # type: ignore[misc]
        self._maps = [layer_map(layer) for layer in self.blocks()]
        self.layer_map = self._maps[0]  # type: ignore[misc,assignment]
        head = model.get_output_embeddings()
        self.lm_head = next(n for n, m in model.named_modules() if m is head)  # type: ignore[misc]
        self.cross_layers = frozenset(
            i for i, m in enumerate(self._maps) if m and m.attn == "cross_attn"
        )
        has_vision = bool(self.image_token_ids())
        if has_vision:
            lm_layers = f"{path}.{layers}" if path else layers
            self.vision_blocks = _module_list_under(model, _VISION_HINTS, lm_layers)  # type: ignore[misc]
            self.projector = next(  # type: ignore[misc]
                (n for n, _ in model.named_modules()
                 if n.rsplit(".", 1)[-1] in _PROJECTOR_NAMES and not n.startswith(lm_layers)),
                None,
            )  # fmt: skip
        tc = self.text_config
        rope = getattr(tc, "rope_parameters", None) or getattr(tc, "rope_scaling", None) or {}
        # M-RoPE models derive positions from the mask and the image grids themselves.
        self.positions_from_padding = "mrope_section" not in rope  # type: ignore[misc]
        maps = [m for m in self._maps if m is not None]
        self.capabilities = Capabilities(  # type: ignore[misc]
            has_vision=has_vision,
            strict_residual_stream=True,
            contiguous_image_tokens=False,
            patch_grid=has_vision,
            sliding_window=getattr(tc, "sliding_window", None) is not None,
            attn_softcap=bool(getattr(tc, "attn_logit_softcapping", None)),
            moe_mlp=any(_is_moe(self.part(i, "mlp")) for i in range(self.n_layers)),
            parallel_block=any(m.mlp_in_norm == m.attn_in_norm for m in maps),
            cross_attention=bool(self.cross_layers),
        )
        self._norm_kinds: dict[type, str | None] = {}

    def layer_map_of(self, i: int) -> LayerMap:
        m = self._maps[i]
        assert m is not None
        return m

    # --- tokens and layout --------------------------------------------------------------------
    def image_token_ids(self) -> tuple[int, ...]:
        ids = list(super().image_token_ids())
        for cfg in (self.config, getattr(self.config, "vision_config", None)):
            for attr in ("image_token_id", "image_token_index", "video_token_id"):
                v = getattr(cfg, attr, None)
                if isinstance(v, int) and v >= 0:
                    ids.append(v)
        return tuple(dict.fromkeys(ids))

    def view_grid(self) -> tuple[int | None, str]:
        """Side of one view's token grid from the vision config, and where it came from."""
        cfg, vc = self.config, getattr(self.config, "vision_config", None)
        n_tokens = _first_int(
            getattr(cfg, "mm_tokens_per_image", None),
            getattr(cfg, "image_seq_length", None),
            getattr(vc, "num_image_tokens", None),
        )
        if n_tokens is not None and math.isqrt(n_tokens) ** 2 == n_tokens:
            return math.isqrt(n_tokens), f"{n_tokens} tokens per image in the config"
        size = _first_int(getattr(vc, "image_size", None))
        patch = _first_int(getattr(vc, "patch_size", None))
        if size is None or patch is None:
            return None, "the vision config has no image_size / patch_size"
        side = size // patch
        merge = _first_int(
            getattr(vc, "spatial_merge_size", None),
            getattr(cfg, "spatial_merge_size", None),
            getattr(cfg, "downsample_factor", None),
            getattr(cfg, "scale_factor", None),
        )
        for ratio in (
            getattr(cfg, "downsample_ratio", None),
            getattr(vc, "pixel_shuffle_ratio", None),
        ):
            if isinstance(ratio, float) and 0 < ratio < 1:
                merge = round(1 / ratio)
        side //= merge or 1
        return side, f"image_size {size} / patch_size {patch} / merge {merge or 1}"

    def image_token_grids(self, inputs: Mapping[str, Any]) -> list[torch.Tensor]:
        """One image per unbroken run of image tokens, laid out from the vision config."""
        g, source = self.view_grid()
        is_image = torch.isin(
            inputs["input_ids"].cpu(), torch.tensor(self.image_token_ids(), dtype=torch.long)
        )
        out, guesses = [], set()
        for row in is_image.tolist():
            n = 0
            for x in [*row, False]:
                if x:
                    n += 1
                    continue
                if n:
                    cells, guess = self._run_cells(n, g)
                    out.append(cells)
                    if guess:
                        guesses.add(guess)
                n = 0
        for guess in sorted(guesses):
            warnings.warn(
                f"generic adapter ({self.config.model_type}): {guess}; the view grid from the "
                f"vision config ({source}) does not fit. Patch positions in the patch map and "
                "heatmaps are a guess for these images",
                category=VlmscopeWarning,
                stacklevel=3,
            )
        return out

    @staticmethod
    def _run_cells(n: int, g: int | None) -> tuple[torch.Tensor, str | None]:
        if g and n % (g * g) == 0:
            return torch.cat([grid_cells(g, g, view=v) for v in range(n // (g * g))]), None
        side = math.isqrt(n)
        if side * side == n:
            return grid_cells(side, side), f"guessed a square {side}x{side} grid for a run of {n}"
        return grid_cells(1, n), f"guessed a 1-D order (one row) for a run of {n} image tokens"

    # --- norms --------------------------------------------------------------------------------
    def norm_kind(self, module: nn.Module) -> str | None:
        """Known norm types as the base class reads them; any other module whose class name
        says Norm is probed: a norm that centres its input ignores a constant added to it."""
        kind = super().norm_kind(module)
        if kind is not None or "Norm" not in type(module).__name__:
            return kind
        if type(module) not in self._norm_kinds:
            w = getattr(module, "weight", None)
            d = int(w.shape[-1]) if isinstance(w, torch.Tensor) and w.dim() else self.d_model
            x = torch.randn(2, d, generator=torch.Generator().manual_seed(0))
            p = next(module.parameters(), torch.empty(0))
            with torch.no_grad():
                a = module(x.to(p.device, p.dtype if p.is_floating_point() else torch.float32))
                b = module((x + 3.0).to(a.device, a.dtype))
            self._norm_kinds[type(module)] = "layer" if torch.allclose(a, b, atol=1e-4) else "rms"
        return self._norm_kinds[type(module)]
