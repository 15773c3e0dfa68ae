"""ReplacementModel: the model with its MLP outputs replaced by dictionary reconstructions.

For a CLT, layer l's encoder reads the resid_mid of the *same* (replaced) forward pass and the
output written at layer t sums the decoders of every source s <= t. With `error_terms=True` the
difference to the true MLP output is added back, so the model computes what the original does,
while the reconstruction carries the gradient (what attribution needs).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn

from vlmscope.dictionaries import SparseCodes
from vlmscope.models.hooked import HookContext, HookedVLM, HookFn
from vlmscope.models.vision import is_vision_hook, vision_row_mask
from vlmscope.training.bundle import DictionaryBundle

ReplaceTokens = Literal["trained", "all"]


@dataclass
class ActiveFeatures:
    """Active features of one or more forward passes, as parallel 1-D tensors.

    unit[n] indexes `units` (for a CLT: the source layer), position is absolute in the sequence
    (also during cached generation), feature the latent index, value its activation.
    """

    units: list[str]
    unit: list[Tensor] = field(default_factory=list)
    batch: list[Tensor] = field(default_factory=list)
    position: list[Tensor] = field(default_factory=list)
    feature: list[Tensor] = field(default_factory=list)
    value: list[Tensor] = field(default_factory=list)

    def add(
        self,
        unit: int,
        codes: SparseCodes,
        shape: tuple[int, int],
        offset: int,
        keep: Tensor | None = None,
    ) -> None:
        """Record the nonzero codes of one hook call; `keep` ([batch, seq] bool) limits them to
        the positions the dictionaries replace (padding and kept-original tokens are not
        features of the replacement model)."""
        active = codes.values != 0
        if keep is not None:
            active &= keep.reshape(-1, 1).to(active.device)
        rows, slot = active.nonzero(as_tuple=True)
        s = shape[1]
        self.unit.append(torch.full_like(rows, unit).cpu())
        self.batch.append((rows // s).cpu())
        self.position.append((rows % s + offset).cpu())
        self.feature.append(codes.indices[rows, slot].cpu())
        self.value.append(codes.values[rows, slot].detach().float().cpu())

    def table(self) -> dict[str, Tensor]:
        """All records concatenated: {"unit", "batch", "position", "feature", "value"}."""
        cat = {
            "unit": self.unit,
            "batch": self.batch,
            "position": self.position,
            "feature": self.feature,
            "value": self.value,
        }
        return {
            k: torch.cat(v)
            if v
            else torch.zeros(0, dtype=torch.float32 if k == "value" else torch.long)
            for k, v in cat.items()
        }

    def __len__(self) -> int:
        return sum(len(v) for v in self.value)


class ReplacementModel:
    """A HookedVLM whose dictionary-covered hook points are replaced by reconstructions.

    `replace_tokens="trained"` replaces at the tokens the dictionaries were trained on (never
    padding; BOS and chat-template markers only if they were included) and keeps the true
    activation elsewhere; "all" replaces at every non-padding token.
    """

    def __init__(
        self,
        vlm: HookedVLM,
        dictionaries: DictionaryBundle | str | os.PathLike[str],
        error_terms: bool = False,
        *,
        replace_tokens: ReplaceTokens = "trained",
    ) -> None:
        if not isinstance(dictionaries, DictionaryBundle):
            dictionaries = DictionaryBundle.load(dictionaries, device=vlm.device)
        dictionaries.check_model(vlm.adapter)  # before any forward pass
        self.vlm = vlm
        self.bundle = dictionaries.to(vlm.device).eval()
        self.error_terms = error_terms
        if replace_tokens not in ("trained", "all"):
            raise ValueError(f"replace_tokens must be 'trained' or 'all', not {replace_tokens!r}")
        self.replace_tokens = replace_tokens
        info = self.bundle.model_info
        self.trained_tokens = info.get("tokens", "all")
        self.trained_special = bool(info.get("include_special_tokens", False))
        self.last_features: ActiveFeatures | None = None
        self.last_errors: dict[str, Tensor] = {}

    # --- which positions are replaced -------------------------------------------------------
    def _replace_mask(self, input_ids: Tensor, attention_mask: Tensor | None) -> Tensor:
        return replace_positions(
            self.vlm.adapter, self.bundle.model_info, self.replace_tokens, input_ids, attention_mask
        )

    def replaced_rows(
        self, inputs: Mapping[str, Any], name: str, t: Tensor, lm_mask: Tensor
    ) -> Tensor:
        """Where hook `name`'s activation t is replaced, shaped to broadcast over t: the
        language-model positions `lm_mask` ([batch, seq]) for lm.* hooks; for vision and
        projector hooks the image patches (and CLS / register tokens where the dictionaries
        were trained on them, or with replace_tokens="all"), never padding patches."""
        if not is_vision_hook(name):
            return lm_mask.reshape(*lm_mask.shape, *([1] * (t.dim() - 2)))
        layout = self.vlm.vision_positions(inputs, name, t.shape[:-1])
        special = self.replace_tokens == "all" or self.trained_special
        rows = vision_row_mask(layout, special).to(t.device)
        return rows.reshape(*t.shape[:-1], 1)

    def not_replaced_reason(
        self, input_ids: Tensor, attention_mask: Tensor | None, sample: int, position: int
    ) -> str | None:
        """Why the dictionaries leave (sample, position) alone, or None where they replace it;
        for error messages that name the culprit."""
        if bool(self._replace_mask(input_ids, attention_mask)[sample, position]):
            return None
        a = self.vlm.adapter
        tok_row = input_ids[sample]
        tok = int(tok_row[position])
        m = attention_mask
        if m is not None and m.dim() == 2 and not bool(m[sample, -len(tok_row) + position]):
            return "it is padding"
        if tok in a.image_token_ids():
            return "it is an image token and the dictionaries were trained on text tokens"
        if tok in a.special_token_ids():
            return "it is a special token (BOS, chat template), which the dictionaries skip"
        return "it is a text token and the dictionaries were trained on image tokens"

    # --- hooks ------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _call_state(self, state: dict[str, Any], *per_call: dict[Any, Any]) -> Iterator[None]:
        """For the block, before every call of the HF model: state["mask"], the positions the
        dictionaries replace, and state["offset"], the absolute position of the call's first
        token (after what a KV cache holds); the `per_call` dicts are emptied."""

        def on_call(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            ids = kwargs.get("input_ids", args[0] if args else None)
            if ids is None:
                raise ValueError("the replacement model needs input_ids to place its dictionaries")
            mask = kwargs.get("attention_mask")
            state["mask"] = self._replace_mask(ids, mask).to(ids.device)
            state["inputs"] = kwargs  # vision hooks place their rows from the images
            # Absolute positions during cached generation start after what the cache holds.
            cache = kwargs.get("cache", kwargs.get("past_key_values"))
            past = cache.get_seq_length() if hasattr(cache, "get_seq_length") else 0
            state["offset"] = int(past)
            for d in per_call:
                d.clear()

        handle = self.vlm.model.register_forward_pre_hook(on_call, with_kwargs=True)
        try:
            yield
        finally:
            handle.remove()

    @contextlib.contextmanager
    def _installed(
        self, capture: bool = False, record_errors: bool = False, error_terms: bool | None = None
    ) -> Iterator[None]:
        b = self.bundle
        use_errors = self.error_terms if error_terms is None else error_terms
        state: dict[str, Any] = {}
        codes: dict[int, SparseCodes] = {}
        xs: dict[int, Tensor] = {}
        features = ActiveFeatures(b.units) if capture else None
        errors: dict[str, Tensor] = {}

        def read(i: int) -> HookFn:
            def fn(t: Tensor, ctx: HookContext) -> None:
                x = flat_rows(t)
                xs[i] = x
                codes[i] = b.encode_unit(i, x)
                if features is not None and not is_vision_hook(ctx.name):
                    shape = (t.shape[0], t.shape[1])
                    features.add(i, codes[i], shape, state["offset"], state["mask"])

            return fn

        def write(i: int) -> HookFn:
            def fn(t: Tensor, ctx: HookContext) -> Tensor:
                y = b.decode_unit(i, codes, xs[i]).reshape(t.shape).to(t.dtype)
                mask = self.replaced_rows(state["inputs"], ctx.name, t, state["mask"])
                if record_errors:
                    errors[ctx.name] = (t - y).detach()
                if use_errors:
                    y = y + (t - y).detach()
                return torch.where(mask, y, t)

            return fn

        try:
            with self._call_state(state, codes, xs), self.vlm.hooks(unit_hooks(b, read, write)):
                yield
        finally:
            self.last_features = features
            self.last_errors = errors

    # --- running ------------------------------------------------------------------------------
    def forward(
        self,
        inputs: Mapping[str, Any],
        *,
        capture_features: bool = False,
        record_errors: bool = False,
        error_terms: bool | None = None,
        **kwargs: Any,
    ) -> Any:
        """The replaced model's output; `capture_features` fills `last_features`,
        `record_errors` fills `last_errors` (true minus reconstructed, per written hook)."""
        with self._installed(capture_features, record_errors, error_terms):
            return self.vlm.forward(inputs, **kwargs)

    __call__ = forward

    def run_with_cache(
        self,
        inputs: Mapping[str, Any],
        names: str | list[str] | None = None,
        *,
        capture_features: bool = False,
        **kwargs: Any,
    ) -> tuple[Any, Any]:
        """HookedVLM.run_with_cache on the replaced model (caches see replaced activations)."""
        with self._installed(capture_features):
            return self.vlm.run_with_cache(inputs, names, **kwargs)

    @torch.no_grad()
    def generate(
        self, inputs: Mapping[str, Any], *, capture_features: bool = False, **generate_kwargs: Any
    ) -> Tensor:
        """`model.generate` with the replacement applied at every step (KV cache included)."""
        check_left_padded(inputs)
        self.vlm.masks(inputs)
        model_inputs = self.vlm._model_inputs(inputs)
        with self._installed(capture_features):
            return self.vlm.model.generate(**model_inputs, **generate_kwargs)

    def units(self) -> Sequence[str]:
        return self.bundle.units


def replace_positions(
    adapter: Any,
    model_info: Mapping[str, Any],
    replace_tokens: ReplaceTokens,
    input_ids: Tensor,
    attention_mask: Tensor | None,
) -> Tensor:
    """[batch, seq] bool (CPU): the positions dictionaries trained as `model_info` records
    replace. "trained": the tokens they were trained on (never padding; BOS and chat-template
    markers only if they were included); "all": every non-padding token."""
    ids = input_ids.cpu()
    image = torch.isin(ids, torch.tensor(adapter.image_token_ids(), dtype=ids.dtype))
    special = torch.isin(ids, torch.tensor(adapter.special_token_ids(), dtype=ids.dtype)) & ~image
    valid = torch.ones_like(image)
    if attention_mask is not None and attention_mask.dim() == 2:
        valid = attention_mask[:, -ids.shape[1] :].bool().cpu()
    if replace_tokens == "all":
        return valid
    keep = valid if bool(model_info.get("include_special_tokens", False)) else valid & ~special
    trained = model_info.get("tokens", "all")
    if trained == "image":
        keep &= image
    elif trained == "text":
        keep &= ~image
    return keep


def flat_rows(t: Tensor) -> Tensor:
    """[B, S, ...] -> [B * S, D] float rows, one per (sample, position): head-view hooks
    ([B, S, H, d_head]) are flattened over heads, as the trainer trains their dictionaries.
    A vision tower that runs on flat rows ([N, D], Qwen-VL) keeps them."""
    if t.dim() == 2:
        return t.float()
    return t.reshape(t.shape[0] * t.shape[1], -1).float()


def unit_hooks(
    bundle: DictionaryBundle,
    read: Callable[[int], HookFn],
    write: Callable[[int], HookFn],
    units: Iterable[int] | None = None,
) -> list[tuple[str, HookFn]]:
    """Hooks for the units' reads and writes (one hook, read then write, where a unit reads
    the hook point it writes)."""
    hooks: list[tuple[str, HookFn]] = []
    for i in units if units is not None else range(len(bundle.units)):
        r, w = read(i), write(i)
        if bundle.reads[i] == bundle.writes[i]:

            def both(t: Tensor, ctx: HookContext, r: HookFn = r, w: HookFn = w) -> Any:
                r(t, ctx)
                return w(t, ctx)

            hooks.append((bundle.reads[i], both))
        else:
            hooks += [(bundle.reads[i], r), (bundle.writes[i], w)]
    return hooks


def check_left_padded(inputs: Mapping[str, Any]) -> None:
    """Raise unless every prompt of the batch ends at the last position: with right padding,
    generation would continue after the padding and answer the wrong prompt."""
    mask = inputs.get("attention_mask")
    if mask is None or mask.dim() != 2:
        return
    short = (mask[:, -1] == 0).nonzero().squeeze(1).tolist()
    if short:
        raise ValueError(
            f"generation needs left padding: prepare(..., padding_side='left') "
            f"(samples {short} end in padding)"
        )
