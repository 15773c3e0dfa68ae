"""HookedVLM: named hook points on an unmodified Hugging Face VLM or causal LM.

All hooks are PyTorch hooks registered from the one table in hook_points.py and removed when
their context ends, also on exceptions. Nothing in the HF model is patched or reimplemented.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from vlmscope import VlmscopeWarning
from vlmscope.models.adapter import AttentionInputs, ModelAdapter
from vlmscope.models.adapters.generic import DecoderNotFoundError
from vlmscope.models.chat import add_special_tokens_for_rendered
from vlmscope.models.hook_points import ResolvedHook, resolve_names
from vlmscope.models.masks import TokenKind, TokenMasks, compute_masks
from vlmscope.models.registry import resolve_adapter
from vlmscope.models.vision import is_vision_hook, join_firings

HookFn = Callable[[torch.Tensor, "HookContext"], "torch.Tensor | None"]
MaskSpec = TokenKind | torch.Tensor | None


@dataclass
class HookContext:
    """Passed to every hook function: which hook fired, on which layer, for which batch."""

    name: str
    layer: int | None
    masks: TokenMasks | None


class ActivationCache(dict[str, torch.Tensor]):
    """Activations by hook name. With a token mask, LM activations are stored as
    [n_selected_tokens, ...] in row-major (sample, position) order of `positions`."""

    def __init__(self, masks: TokenMasks | None = None, positions: torch.Tensor | None = None):
        super().__init__()
        self.masks = masks
        self.positions = positions

    def stack(self, pattern: str) -> torch.Tensor:
        """Stack the cached tensors whose names match `pattern` (fnmatch), in layer order."""
        import fnmatch

        keys = [k for k in self if fnmatch.fnmatchcase(k, pattern)]
        if not keys:
            raise KeyError(f"no cached activation matches {pattern!r}; cached: {list(self)[:8]}")
        return torch.stack([self[k] for k in keys])


def _dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    names = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
             "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}  # fmt: skip
    if dtype not in names:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(names)}")
    return names[dtype]


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_hf(
    name_or_path: str | os.PathLike[str],
    *,
    dtype: str | torch.dtype | None = None,
    attn_implementation: str | None = None,
    weights: bool = True,
    **model_kwargs: Any,
) -> tuple[nn.Module, Any]:
    """Load model and processor with the Auto classes, as a user of transformers would.

    `weights=False` builds the model from its config on the meta device instead: no weights
    are read, yet the adapter, the image-token layout and the vocabulary are all there (what
    `vlmscope data process` needs from a 7B model)."""
    from transformers import (
        AutoConfig,
        AutoModelForCausalLM,
        AutoModelForImageTextToText,
        AutoProcessor,
        AutoTokenizer,
    )
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES,
    )

    path = str(name_or_path)
    config = AutoConfig.from_pretrained(path)
    is_vlm = config.model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES
    auto = AutoModelForImageTextToText if is_vlm else AutoModelForCausalLM
    remote = set(getattr(config, "auto_map", None) or {})
    if (
        not is_vlm
        and config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
        and not remote & {auto.__name__, AutoModelForImageTextToText.__name__}
    ):
        # Say so before transformers' long "Unrecognized configuration class" list.
        raise DecoderNotFoundError(
            f"no usable decoder in model_type={config.model_type!r} ({path}): it has no "
            "text-generating model class; searched transformers' AutoModelForImageTextToText "
            "and AutoModelForCausalLM mappings (a vision-only or encoder-only checkpoint has "
            "no language-model decoder to hook)"
        )
    kwargs = dict(model_kwargs)
    if dtype is not None:
        kwargs["dtype"] = _dtype(dtype)
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    if weights:
        model = auto.from_pretrained(path, **kwargs)
    else:
        with torch.device("meta"):
            model = auto.from_config(config)
    # Zoo models saved to disk name small image-only processor subclasses (no torchvision
    # video processor); importing the zoo registers them with AutoProcessor.
    from vlmscope.models import zoo

    if os.path.isdir(path):
        zoo.import_saved_classes(path)
    processor: Any
    try:
        processor = AutoProcessor.from_pretrained(path)
    except ImportError as e:
        # The processor's class (or its image/video processor) needs a package that is not
        # installed, typically torchvision: say which, and go on with the tokenizer.
        warnings.warn(missing_package_message(path, e), category=VlmscopeWarning, stacklevel=3)
        processor = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, TypeError):
        processor = AutoTokenizer.from_pretrained(path)
    if is_vlm and not hasattr(processor, "image_processor"):
        warnings.warn(
            f"{path} is an image-text model but no image processor was found with it; "
            "prepare() can only process text for it",
            category=VlmscopeWarning,
            stacklevel=3,
        )
    return model.eval(), processor


def missing_package_message(path: str, error: ImportError) -> str:
    """One line saying which package the processor of `path` wants, from its ImportError."""
    import re

    text = str(error).strip()
    name = getattr(error, "name", None)
    m = re.search(r"requires the (\w+) library", text)
    package = (m.group(1).lower() if m else None) or name or "a package that is missing"
    first = next((line.strip() for line in text.splitlines() if line.strip()), text)
    return (
        f"{path}: its processor needs the `{package}` package, which is not installed "
        f"({first}); using the tokenizer alone, so prepare() handles text only. Install "
        f"{package} to process images"
    )


def register_vlmscope_hook(module: nn.Module, fn: Callable[..., Any], **kw: Any) -> RemovableHandle:
    """`module.register_forward_hook(fn, **kw)`, then transformers' output recorders moved
    after it (see `run_recorders_last`); every forward hook vlmscope registers goes here."""
    handle = module.register_forward_hook(fn, **kw)
    run_recorders_last(module)
    return handle


def run_recorders_last(module: nn.Module) -> None:
    """Move the forward hooks transformers (5.x) uses to record `hidden_states` after every
    other hook on `module`, the others keeping their order. transformers installs them on a
    model's first forward, and a LLaVA-style model feeds its projector the recorded output of
    a vision layer: a hook registered after them (every vlmscope hook on every forward but a
    fresh model's first) edited an output that had already been recorded, so its edit was
    lost."""
    hooks = module._forward_hooks
    for key in [k for k, fn in hooks.items() if _is_output_recorder(fn)]:
        hooks.move_to_end(key)


def _is_output_recorder(fn: Any) -> bool:
    """Whether `fn` is one of transformers' hidden-state recording hooks
    (`transformers.utils.output_capturing`)."""
    return "output_captur" in (getattr(fn, "__module__", None) or "") + (
        getattr(fn, "__qualname__", None) or ""
    )


def _first_tensor(x: Any) -> torch.Tensor:
    return x[0] if isinstance(x, (tuple, list)) else x


class HookedVLM:
    """An HF VLM (or causal LM) with stable hook names, caches and token masks.

    >>> vlm = HookedVLM.from_pretrained("llava-hf/llava-1.5-7b-hf", dtype="bfloat16")
    >>> inputs = vlm.prepare("What colour is the circle?", images=[img])
    >>> logits, cache = vlm.run_with_cache(inputs, names="lm.blocks.*.hook_resid_post")
    """

    def __init__(
        self, model: nn.Module, processor: Any = None, adapter: ModelAdapter | None = None
    ) -> None:
        self.model = model
        self.processor = processor
        self.adapter = adapter if adapter is not None else resolve_adapter(model, processor)
        self._handles: list[RemovableHandle] = []

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike[str],
        *,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        attn_implementation: str | None = None,
        **model_kwargs: Any,
    ) -> HookedVLM:
        """Load a hub name or local path through transformers' from_pretrained and wrap it."""
        model, processor = load_hf(
            name_or_path, dtype=dtype, attn_implementation=attn_implementation, **model_kwargs
        )
        model.to(torch.device(device) if device is not None else default_device())
        return cls(model, processor)

    # --- basics ---------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def tokenizer(self) -> Any:
        return self.adapter.tokenizer

    def hook_names(self, pattern: str | list[str] | None = None) -> list[str]:
        """Concrete hook names, all or those matching `pattern` (with * wildcards)."""
        return [r.name for r in resolve_names(self.adapter, pattern)]

    def prepare(
        self,
        prompts: str | Sequence[Any],
        images: Any = None,
        *,
        add_generation_prompt: bool = True,
        padding_side: str | None = None,
        videos: Any = None,
    ) -> Mapping[str, torch.Tensor]:
        """Process prompts and images into model inputs on the model's device.

        A prompt is a string (wrapped into one user turn, images first, when the processor has a
        chat template) or a list of chat messages. `images` holds one image or a list per prompt.
        `videos` (families with a video path: LLaVA-NeXT-Video, Qwen2/2.5/3-VL) holds one video
        or a list per prompt, a video being a list of frames; its tokens count as one image
        whose frames (Qwen: temporal patches of 2 frames) are views. `padding_side` None keeps
        the processor's choice (left for InternVL, else the tokenizer's); left-padded batches
        run with positions counted from each sample's first real token (see `forward`).
        """
        batch = [prompts] if isinstance(prompts, str) or _is_messages(prompts) else list(prompts)
        per_sample = _images_per_sample(images, len(batch))
        video_lists = _videos_per_sample(videos, len(batch))
        proc = self.processor
        template = getattr(proc, "chat_template", None) or getattr(
            self.tokenizer, "chat_template", None
        )
        texts, rendered = [], []
        for p, imgs, vids in zip(batch, per_sample, video_lists, strict=True):
            if isinstance(p, str) and template is not None:
                content = [{"type": "image"} for _ in imgs] + [{"type": "video"} for _ in vids]
                content.append({"type": "text", "text": p})
                p = [{"role": "user", "content": content}]
            rendered.append(not isinstance(p, str))
            if not isinstance(p, str):
                # The tokenizer renders when only it has the template (some processors lose
                # theirs on loading).
                renderer = proc if getattr(proc, "chat_template", None) else self.tokenizer
                p = renderer.apply_chat_template(
                    p, add_generation_prompt=add_generation_prompt, tokenize=False
                )
            texts.append(p)
        # Template output already holds its special tokens (a BOS, where the template writes
        # one): tokenize it as apply_chat_template(tokenize=True) does, never adding a second.
        kw: dict[str, Any] = {}
        if all(rendered):
            kw["add_special_tokens"] = add_special_tokens_for_rendered(proc, texts)
        tok = self.tokenizer
        old_side = tok.padding_side
        if padding_side is not None:
            # Also as a call argument: a processor's own default (InternVL pads on the left
            # whatever its tokenizer says) outranks the tokenizer's attribute, not the call.
            tok.padding_side = padding_side
            kw["padding_side"] = padding_side
        try:
            if any(video_lists):
                kw["videos"] = [v for vids in video_lists for v in vids]
            if any(per_sample):
                out = proc(text=texts, images=per_sample, padding=True, return_tensors="pt", **kw)
            elif any(video_lists):
                out = proc(text=texts, padding=True, return_tensors="pt", **kw)
            elif proc is tok:
                out = proc(texts, padding=True, return_tensors="pt", **kw)
            else:
                out = proc(text=texts, padding=True, return_tensors="pt", **kw)
        finally:
            tok.padding_side = old_side
        out.pop("labels", None)  # PaliGemma's processor adds training labels; not an input here
        return out.to(self.device)

    def skipped_hooks(self, inputs: Mapping[str, Any], names: Iterable[str]) -> list[str]:
        """The hook points of `names` that a forward of `inputs` never reaches: those in the
        language-model layers the model skips for this batch (Mllama's cross-attention
        layers without an image). Whoever needs every name's activations leaves such a
        batch out, or refuses it, by this."""
        skipped = self.adapter.skipped_blocks(inputs)
        if not skipped:
            return []
        return [n for n in names if (i := _lm_layer(n)) is not None and i in skipped]

    def skipped_layers(self) -> str:
        """The layers `skipped_hooks` leaves out, said once for every message that names them:
        'mllama: a batch without images skips the language model's layers [1, 3]'."""
        layers = sorted(self.adapter.skippable_blocks())
        return (
            f"{self.adapter.family}: a batch without images skips the language model's "
            f"layers {layers}"
        )

    def left_out_note(self, n: int) -> str:
        """What eval and features say of the batches they left out by `skipped_hooks`."""
        return f"{n} batch(es) left out ({self.skipped_layers()}, which the dictionaries read)"

    def masks(self, inputs: Mapping[str, Any]) -> TokenMasks:
        """Token masks and patch map of a processed batch; raises if images and placeholders
        disagree, naming the sample."""
        pv = next((inputs[k] for k in self.adapter.pixel_keys if k in inputs), None)
        grids = None
        if pv is not None:
            try:
                grids = self.adapter.image_token_grids(inputs)
            except NotImplementedError:
                grids = None
        masks = compute_masks(
            inputs["input_ids"],
            inputs.get("attention_mask"),
            self.adapter.image_token_ids(),
            self.adapter.special_token_ids(),
            grids,
            images_given=pv is not None,
        )
        return masks

    def _model_inputs(self, inputs: Mapping[str, Any]) -> dict[str, Any]:
        dev = self.device
        out = {}
        for k, v in inputs.items():
            if isinstance(v, torch.Tensor):
                v = v.to(dev)
                if v.is_floating_point() and k in self.adapter.pixel_keys:
                    v = v.to(self.dtype)
            out[k] = v
        return out

    def forward(
        self, inputs: Mapping[str, Any], *, masks: TokenMasks | None = None, **kwargs: Any
    ) -> Any:
        """Validate the batch, then run the HF model on it (no KV cache unless asked).

        `masks`: the batch's masks, already computed (and so validated) by the caller."""
        if masks is None:
            self.masks(inputs)
        kwargs.setdefault("use_cache", False)
        model_inputs = self._model_inputs(inputs)
        mask = model_inputs.get("attention_mask")
        if (
            self.adapter.positions_from_padding
            and "position_ids" not in model_inputs
            and "position_ids" not in kwargs
            and mask is not None
            and mask.dim() == 2
            and bool((mask[:, 0] == 0).any())
        ):
            # Left padding: count positions from each sample's first real token, so a sample
            # gets the same positions (and activations) as when run alone.
            kwargs["position_ids"] = (mask.long().cumsum(-1) - 1).clamp(min=0)
        return self.model(**model_inputs, **kwargs)

    __call__ = forward

    # --- hooks ----------------------------------------------------------------------------
    @contextlib.contextmanager
    def hooks(
        self,
        fwd_hooks: Sequence[tuple[str, HookFn]] = (),
        masks: TokenMasks | None = None,
    ) -> Iterator[HookedVLM]:
        """Register `(name_or_pattern, fn)` hooks for the duration of the block.

        `fn(activation, ctx)` returns None to leave the activation unchanged or a tensor of the
        same shape to replace it. Every hook is removed on exit, also when an exception escapes.
        """
        handles: list[RemovableHandle] = []
        try:
            for pattern, fn in fwd_hooks:
                for rh in resolve_names(self.adapter, pattern):
                    handles += self._attach(rh, fn, masks)
            self._handles += handles
            yield self
        finally:
            for h in handles:
                h.remove()
            self._handles = [h for h in self._handles if h not in handles]

    def run_with_hooks(
        self,
        inputs: Mapping[str, Any],
        fwd_hooks: Sequence[tuple[str, HookFn]],
        *,
        masks: TokenMasks | None = None,
        **kwargs: Any,
    ) -> Any:
        """One forward pass with the given hooks; returns the HF model output. `masks`: the
        batch's masks when the caller has them (else they are computed here)."""
        if masks is None:
            masks = self.masks(inputs)
        with self.hooks(fwd_hooks, masks=masks):
            return self.forward(inputs, masks=masks, **kwargs)

    def run_with_cache(
        self,
        inputs: Mapping[str, Any],
        names: str | list[str] | None = None,
        *,
        mask: MaskSpec = None,
        fwd_hooks: Sequence[tuple[str, HookFn]] = (),
        detach: bool = True,
        device: str | torch.device | None = None,
        masks: TokenMasks | None = None,
        stop_early: bool = False,
        **kwargs: Any,
    ) -> tuple[Any, ActivationCache]:
        """Forward pass that records activations of `names` (default: every hook point).

        `mask` ("all", "image", "text" or a [batch, seq] bool tensor) keeps only the selected
        token positions of LM activations, flattened to [n_tokens, ...]; padding is always
        dropped by the string forms. Vision and projector activations are kept whole.
        `masks`: the batch's masks when the caller has them (else they are computed here).
        `stop_early`: end the forward at the first language-model hook after which every
        language-model name has been recorded, and return None for the output: training on
        layer 8 of 32 then skips the 24 layers after it and the logits. (Vision and projector
        hooks, which run before the language model, are recorded by then if the batch has
        images at all; a batch without images stops at the same layer as one with them.)
        A vision or projector hook that fires more than once in the forward (a part that runs
        once per image) is cached as its firings' rows in order, [rows, width].
        """
        if masks is None:
            masks = self.masks(inputs)
        positions = None
        if isinstance(mask, str):
            positions = masks.select(mask)
        elif isinstance(mask, torch.Tensor):
            positions = mask.bool().cpu()
        cache = ActivationCache(masks, positions)
        pos_dev = positions.to(self.device) if positions is not None else None

        def store(t: torch.Tensor, ctx: HookContext) -> None:
            x = t.detach() if detach else t
            if pos_dev is not None and ctx.name.startswith("lm."):
                if ctx.name.endswith("hook_pattern"):
                    x = x.transpose(1, 2)[pos_dev]
                elif x.shape[:2] == pos_dev.shape:
                    x = x[pos_dev]
                # else: keys/values of a cross-attention layer run over image features, not
                # over the token positions the mask selects; they are kept whole.
            x = x.to(device) if device is not None else x
            if ctx.name in seen and is_vision_hook(ctx.name):
                x = join_firings(cache[ctx.name], x)  # a part that runs once per image
            cache[ctx.name] = x
            seen.add(ctx.name)
            if stop_early and ctx.name.startswith("lm.") and seen >= wanted:
                raise _ForwardDone
            return None

        resolved = resolve_names(self.adapter, names)
        # The stop waits for the language-model hooks only: a batch without images never fires
        # a vision or projector hook (and every rank of a sharded model must stop at one layer)
        wanted = {rh.name for rh in resolved if rh.name.startswith("lm.")}
        seen = set[str]()
        grad = contextlib.nullcontext() if not detach else torch.no_grad()
        out = None
        with grad, self.hooks(list(fwd_hooks), masks=masks):
            handles: list[RemovableHandle] = []
            try:
                for rh in resolved:
                    handles += self._attach(rh, store, masks)
                out = self.forward(inputs, masks=masks, **kwargs)
            except _ForwardDone:
                pass
            finally:
                for h in handles:
                    h.remove()
        return out, cache

    def vision_positions(
        self, inputs: Mapping[str, Any], name: str, shape: Sequence[int]
    ) -> torch.Tensor:
        """[rows, 4] (image, view, row, col) of each row of vision hook `name` (a vision block
        or projector hook) whose activation has shape `shape` (width left out, e.g. the
        cached tensor's shape[:-1]); row = col = -1 for CLS / register tokens, -2 for
        padding patches (see models/vision.py). `image` indexes
        the batch's images (`masks.image_sample` gives each one's sample)."""
        return self.adapter.vision_layout(inputs, name, tuple(int(n) for n in shape))

    def hook_module(self, name: str) -> tuple[nn.Module, str]:
        """(module, "in" | "out" | "computed"): where hook point `name` attaches and whether it
        reads that module's input or output (e.g. to put a PEFT adapter on the same tensor)."""
        rh = resolve_names(self.adapter, name)
        if len(rh) != 1 or rh[0].name != name:
            raise KeyError(f"{name!r} is not one hook point (patterns are not allowed here)")
        return self._target(rh[0]), rh[0].point.io

    def _target(self, rh: ResolvedHook) -> nn.Module:
        t, i, a = rh.point.target, rh.layer, self.adapter
        if t == "block":
            return a.block(i)  # type: ignore[arg-type]
        if t == "vision_block":
            blocks = a.vision_block_list()
            assert blocks is not None
            return blocks[i]  # type: ignore[index]
        if t == "projector":
            mod = a.projector_module()
            assert mod is not None
            return mod
        if t == "vision_mlp":
            return a.vision_mlp_module(i)  # type: ignore[arg-type]
        return a.part(i, t)  # type: ignore[arg-type]

    def _attach(
        self, rh: ResolvedHook, fn: HookFn, masks: TokenMasks | None
    ) -> list[RemovableHandle]:
        ctx = HookContext(rh.name, rh.layer, masks)
        p = rh.point
        heads = {"q_heads": self.adapter.n_heads, "kv_heads": self.adapter.n_kv_heads}.get(
            p.view or ""
        )

        def call(t: torch.Tensor) -> torch.Tensor | None:
            v = t.unflatten(-1, (heads, -1)) if heads else t
            r = fn(v, ctx)
            if r is None:
                return None
            if r.shape != v.shape:
                raise ValueError(
                    f"hook on {rh.name} returned shape {tuple(r.shape)}, expected {tuple(v.shape)}"
                )
            return r.flatten(-2) if heads else r

        module = self._target(rh)
        base = getattr(module, "base_layer", None)
        if p.io == "out" and base is not None and base.__dict__.get("_sae_owner") is module:
            # A module a vlmscope PEFT adapter wraps: the adapters act in a hook on it, first;
            # hooking the module itself puts this hook after them and before transformers'
            # recorders (a hook on the wrapper would run after both).
            module = base
        if p.io == "computed":
            return self._attach_pattern(rh, fn, ctx)
        if p.io == "out":
            # A fused qkv projection: q, k and v are slices of one output.
            fused = p.target in ("q", "k", "v")
            sl = self.adapter.qkv_slice(rh.layer, p.target) if fused else None  # type: ignore[arg-type]
            # Mixture-of-experts blocks may return [tokens, d]: shown as the input's [b, s, d].
            in_shape: dict[str, torch.Size] = {}
            # A vision MLP whose block scales its output (InternViT's lambda_2): the hook
            # shows the block's contribution, and an edit of it moves the MLP's output by the
            # edit over the scale (no edit: the output untouched, bit for bit).
            scale = (
                self.adapter.vision_mlp_out_scale(rh.layer)  # type: ignore[arg-type]
                if p.target == "vision_mlp"
                else None
            )

            def out_hook(_m: nn.Module, _args: Any, output: Any) -> Any:
                t = _first_tensor(output)
                view = t
                if sl is not None:
                    view = t[..., sl]
                elif t.dim() == 2 and len(in_shape.get("x", ())) == 3:
                    view = t.view(*in_shape["x"][:-1], t.shape[-1])
                s = None if scale is None else scale.to(view.dtype)
                shown = view if s is None else view * s
                r = call(shown)
                if r is None:
                    return None
                if s is not None:
                    r = view + (r - shown) / s
                if sl is not None:
                    r = torch.cat([t[..., : sl.start], r, t[..., sl.stop :]], dim=-1)
                elif view is not t:
                    r = r.reshape(t.shape)
                if isinstance(output, tuple):
                    return (r, *output[1:])
                return r

            def shape_hook(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
                x = args[0] if args else kwargs.get("hidden_states")
                if isinstance(x, torch.Tensor):
                    in_shape["x"] = x.shape

            handles = [register_vlmscope_hook(module, out_hook)]
            if p.target in ("mlp", "mlp_out"):
                handles.append(module.register_forward_pre_hook(shape_hook, with_kwargs=True))
            return handles

        # io == "in": the tensor is the first positional argument or `hidden_states`.
        resid_mid = p.target == "mlp_in_norm"
        pending: dict[str, torch.Tensor] = {}

        def in_hook(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            if args:
                t = args[0]
            else:
                key = next(k for k in ("hidden_states", "x", "input") if k in kwargs)
                t = kwargs[key]
            r = call(t)
            if r is None:
                return None
            if resid_mid:
                pending["delta"] = r - t
            if args:
                return (r, *args[1:]), kwargs
            return args, {**kwargs, key: r}

        handles = [module.register_forward_pre_hook(in_hook, with_kwargs=True)]
        if resid_mid:
            # The norm's input edit must also reach the residual branch that bypasses the MLP.
            def carry(_m: nn.Module, _args: Any, output: Any) -> Any:
                delta = pending.pop("delta", None)
                if delta is None:
                    return None
                if isinstance(output, tuple):
                    return (output[0] + delta, *output[1:])
                return output + delta

            block = self.adapter.block(rh.layer)  # type: ignore[arg-type]
            handles.append(register_vlmscope_hook(block, carry, prepend=True))
        return handles

    def _attach_pattern(
        self, rh: ResolvedHook, fn: HookFn, ctx: HookContext
    ) -> list[RemovableHandle]:
        i = rh.layer
        assert i is not None
        a = self.adapter
        seen: dict[str, Any] = {}

        def grab(key: str) -> Callable[[nn.Module, Any, Any], None]:
            def hook(_m: nn.Module, _args: Any, output: Any) -> None:
                seen[key] = _first_tensor(output)

            return hook

        def pre(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            seen["ctx"] = AttentionInputs(
                kwargs.get("position_embeddings"), kwargs.get("attention_mask")
            )

        def post(_m: nn.Module, _args: Any, _output: Any) -> None:
            q = seen.pop("q").unflatten(-1, (a.n_heads, -1))
            k = seen.pop("k").unflatten(-1, (a.n_kv_heads, -1))
            pattern = a.attention_pattern(i, q, k, seen.pop("ctx"))
            if fn(pattern, ctx) is not None:
                raise RuntimeError(
                    f"{rh.name} is read-only: patterns are recomputed from q and k; edit "
                    "hook_q / hook_k (or hook_z for the output) instead"
                )

        attn = a.part(i, "attn")
        q_slice, k_slice = a.qkv_slice(i, "q"), a.qkv_slice(i, "k")
        if q_slice is not None and k_slice is not None:

            def grab_qkv(_m: nn.Module, _args: Any, output: Any) -> None:
                t = _first_tensor(output)
                seen["q"], seen["k"] = t[..., q_slice], t[..., k_slice]

            grabs = [register_vlmscope_hook(a.part(i, "q"), grab_qkv)]
        else:
            grabs = [
                register_vlmscope_hook(a.part(i, "q"), grab("q")),
                register_vlmscope_hook(a.part(i, "k"), grab("k")),
            ]
        return [
            *grabs,
            attn.register_forward_pre_hook(pre, with_kwargs=True),
            register_vlmscope_hook(attn, post),
        ]

    # --- ready-made hook functions ----------------------------------------------------------
    @staticmethod
    def zero_ablate(positions: torch.Tensor | None = None) -> HookFn:
        """Hook that zeroes the activation, at `positions` ([batch, seq] bool) or everywhere."""

        def fn(t: torch.Tensor, ctx: HookContext) -> torch.Tensor:
            if positions is None:
                return torch.zeros_like(t)
            return t.masked_fill(_expand(positions, t), 0.0)

        return fn

    @staticmethod
    def patch(source: torch.Tensor, positions: torch.Tensor | None = None) -> HookFn:
        """Hook that replaces the activation by `source` (same shape), at `positions` or all."""

        def fn(t: torch.Tensor, ctx: HookContext) -> torch.Tensor:
            src = source.to(t.device, t.dtype)
            if positions is None:
                return src.expand_as(t).clone()
            return torch.where(_expand(positions, t), src, t)

        return fn

    @staticmethod
    def add(
        vector: torch.Tensor, positions: torch.Tensor | None = None, scale: float = 1.0
    ) -> HookFn:
        """Hook that adds `scale * vector` (broadcast over positions), at `positions` or all."""

        def fn(t: torch.Tensor, ctx: HookContext) -> torch.Tensor:
            v = vector.to(t.device, t.dtype) * scale
            if positions is None:
                return t + v
            return t + v * _expand(positions, t).to(t.dtype)

        return fn


class _ForwardDone(Exception):
    """Ends a `run_with_cache(stop_early=True)` forward once every hook has been recorded."""


def _expand(positions: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    p = positions.to(t.device).bool()
    return p.reshape(*p.shape, *([1] * (t.dim() - p.dim())))


def _videos_per_sample(videos: Any, n: int) -> list[list[Any]]:
    """One list of videos per prompt. A video is a list of frames (images or arrays); a
    prompt's entry is one video or a list of videos."""

    def as_videos(entry: Any) -> list[Any]:
        if isinstance(entry, (list, tuple)) and not entry:
            return []
        if not isinstance(entry, (list, tuple)):
            raise ValueError("a video is a list of frames; give one video or a list per prompt")
        return (
            [list(entry)] if not isinstance(entry[0], (list, tuple)) else [list(v) for v in entry]
        )

    if videos is None:
        return [[] for _ in range(n)]
    if n == 1:
        return [as_videos(videos)]
    if len(videos) != n:
        raise ValueError(f"got {len(videos)} video lists for {n} prompts; give one list per prompt")
    return [as_videos(v) for v in videos]


def _is_messages(x: Any) -> bool:
    return isinstance(x, list) and len(x) > 0 and isinstance(x[0], dict) and "role" in x[0]


def _images_per_sample(images: Any, n: int) -> list[list[Any]]:
    if images is None:
        return [[] for _ in range(n)]
    if not isinstance(images, (list, tuple)):
        images = [images]
    if n == 1 and not any(isinstance(x, (list, tuple)) for x in images):
        return [list(images)]
    if len(images) != n:
        raise ValueError(f"got {len(images)} image lists for {n} prompts; give one list per prompt")
    return [list(x) if isinstance(x, (list, tuple)) else [x] for x in images]


__all__ = ["ActivationCache", "HookContext", "HookFn", "HookedVLM"]


def _lm_layer(name: str) -> int | None:
    """The language-model layer a hook point lies in (lm.blocks.I.*), else None."""
    parts = name.split(".")
    if len(parts) > 2 and parts[0] == "lm" and parts[1] == "blocks" and parts[2].isdigit():
        return int(parts[2])
    return None
