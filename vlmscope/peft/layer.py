"""SaeLayer: a PEFT tuner layer that puts vlmscope SparseCoders on the output of any module.

The wrapped module runs unchanged. Its output's hidden-state tensor H [..., d_out] (the
output itself, the first element of a tuple, or the first tensor of a ModelOutput) is
flattened to rows Y [N, d_out]; the rows that the current `sae_mask` selects (all rows
without one) feed every active adapter:

    SAE         codes = act(W_enc (Y - b_dec) + b_enc),  Y_hat = W_dec^T codes + b_dec
    transcoder  X = the module's input rows, codes = act(W_enc X + b_enc),  Y_hat as above

(`vlmscope.dictionaries.SparseCoder` does the maths: one implementation of TopK, BatchTopK
and JumpReLU for PEFT adapters and `vlmscope train` alike.) In training mode each adapter
records its loss (FVU + AuxK + sparsity penalty, see coder.py) for `collect_sae_outputs`;
its input is detached, so each dictionary learns from its own reconstruction only. In
"replace" mode the selected rows of H become Y_hat (the mean of Y_hat over several active
replace-mode adapters) and the output is rebuilt with the same structure; in "observe" mode H
passes through untouched.
"""

from __future__ import annotations

import contextlib
import fnmatch
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import Tensor, nn

from vlmscope.dictionaries import SparseCoder
from vlmscope.peft.config import SaeConfig

RowSelector = Tensor | Callable[[Tensor], Tensor]
MaskSpec = RowSelector | Mapping[str, RowSelector] | None

_MASK: ContextVar[MaskSpec] = ContextVar("vlmscope_sae_mask", default=None)


@contextlib.contextmanager
def sae_mask(mask: MaskSpec) -> Iterator[None]:
    """Select the rows the adapters read during the block.

    A bool tensor applies to every adapter layer and must have the shape of its output minus
    the last dim (e.g. [batch, seq] for language-model modules); a function of the layer's
    hidden-state tensor returns such a mask (vision rows depend on the tensor's shape). A
    mapping {pattern: mask or function} gives each layer the one of the first fnmatch pattern
    that matches its module name; layers that no pattern matches read every row.
    """
    token = _MASK.set(mask)
    try:
        yield
    finally:
        _MASK.reset(token)


@dataclass
class SaeStats:
    """What one adapter measured in the last forward of its layer: the loss keeps its graph
    in training; the metrics are detached."""

    loss: Tensor
    fvu: Tensor
    l0: Tensor
    rows: int


class SaeLayer(nn.Module, BaseTunerLayer):
    """Wraps `base_layer`; holds one SparseCoder per adapter name (see the module docstring)."""

    adapter_layer_names: tuple[str, ...] = ("sae_coders",)
    other_param_names: tuple[str, ...] = ("sae_mode",)

    def __init__(
        self, base_layer: nn.Module, adapter_name: str, config: SaeConfig, module_name: str = ""
    ) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.sae_coders = nn.ModuleDict()
        self.sae_mode: dict[str, str] = {}
        self.sae_stats: dict[str, SaeStats] = {}
        self.sae_initialized: dict[str, bool] = {}
        self.sae_module_name = module_name or type(base_layer).__name__
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config)
        # The adapters act in a forward hook of the wrapped module, kept ahead of the hook
        # transformers records a layer's output with (the hidden_states a LLaVA-style
        # projector reads), which must see the replacement.
        from vlmscope.models.hooked import register_vlmscope_hook

        object.__setattr__(base_layer, "_sae_owner", self)  # not a submodule: no cycle
        register_vlmscope_hook(base_layer, _adapters_after_base, with_kwargs=True)

    def __getattr__(self, name: str) -> Any:
        """Attributes the wrapped module has (e.g. an attention layer's `scaling`) stay
        readable through the wrapper, so model code that reads them keeps working."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name.startswith("_") or name in ("base_layer", "sae_coders"):
                raise  # private state (also while the object is being built or copied)
            return getattr(self._modules["base_layer"], name)

    # --- adapters ----------------------------------------------------------------------------
    def update_layer(self, adapter_name: str, config: SaeConfig) -> None:
        """Add (or replace) adapter `adapter_name`; an adapter of the same name and settings is
        kept with its weights (re-wrapping a model that already carries it)."""
        d_in, d_out = module_widths(self.get_base_layer(), config, self.sae_module_name)
        cfg = config.coder_config(d_in, d_out)
        old = self.sae_coders._modules.get(adapter_name)
        if old is not None and old.cfg.to_dict() == cfg.to_dict():
            self.sae_mode[adapter_name] = config.mode
            return
        device = _device_of(self.get_base_layer())
        self.sae_coders[adapter_name] = SparseCoder(cfg, device=device)
        self.sae_mode[adapter_name] = config.mode
        self.sae_initialized[adapter_name] = not config.init_from_data
        self.set_adapter(self.active_adapters)

    def _move_adapter_to_device_of_base_layer(
        self, adapter_name: str, device: torch.device | None = None
    ) -> None:
        """Move the adapter to the wrapped module's device; dictionaries stay float32."""
        if adapter_name not in self.sae_coders:
            return
        target = device if device is not None else _device_of(self.get_base_layer())
        coder = self.sae_coders[adapter_name]
        if target is None or any(p.device.type == "meta" for p in coder.parameters()):
            return
        self.sae_coders[adapter_name] = coder.to(target)

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        self.sae_stats.pop(adapter_name, None)
        self.sae_initialized.pop(adapter_name, None)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        raise NotImplementedError(
            f"{self.sae_module_name}: a sparse dictionary is not a weight delta and cannot be "
            "merged into the module; use unload() to remove it"
        )

    def unmerge(self) -> None:
        raise NotImplementedError(f"{self.sae_module_name}: SAE adapters are never merged")

    def _load_from_state_dict(
        self, state_dict: Mapping[str, Any], prefix: str, *args: Any, **kwargs: Any
    ) -> None:
        # Loaded weights are trained weights: no data-driven init on the first training step.
        for name in self.sae_coders:
            head = f"{prefix}sae_coders.{name}."
            if any(k.startswith(head) for k in state_dict):
                self.sae_initialized[name] = True
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)  # type: ignore[arg-type]

    def detach_from_base(self) -> None:
        """Take the adapters' hook off the wrapped module (unload puts the module back)."""
        base = self.base_layer
        for key, fn in list(base._forward_hooks.items()):
            if fn is _adapters_after_base:
                for hooks in (base._forward_hooks, base._forward_hooks_with_kwargs,
                              base._forward_hooks_always_called):  # fmt: skip
                    hooks.pop(key, None)
        base.__dict__.pop("_sae_owner", None)

    # --- forward -----------------------------------------------------------------------------
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        from vlmscope.models.hooked import run_recorders_last

        run_recorders_last(self.base_layer)  # transformers may have hooked it since
        return self.base_layer(*args, **kwargs)

    def _after_base(self, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> Any:
        """The wrapped module's output with the active adapters' reconstructions in place
        (replace mode), or unchanged."""
        active = [a for a in self.active_adapters if a in self.sae_coders]
        if self.disable_adapters or not active:
            return out
        hidden, rebuild = split_output(out, self.sae_module_name)
        y = hidden.reshape(-1, hidden.shape[-1])
        rows = self._rows(hidden)
        x: Tensor | None = None
        replaced: list[Tensor] = []
        for name in active:
            coder: SparseCoder = self.sae_coders[name]  # type: ignore[assignment]
            if y.shape[1] != coder.cfg.d_out:
                raise ValueError(
                    f"{self.sae_module_name}: adapter {name!r} expects outputs of width "
                    f"{coder.cfg.d_out}, the module gave {tuple(hidden.shape)}; set d_out in the "
                    "config if the width was guessed wrong"
                )
            if coder.cfg.kind == "transcoder" and x is None:
                x = module_input(args, kwargs, self.sae_module_name)
                x = x.reshape(-1, x.shape[-1])
                if x.shape[0] != y.shape[0] or x.shape[1] != coder.cfg.d_in:
                    raise ValueError(
                        f"{self.sae_module_name}: transcoder {name!r} reads inputs [N, "
                        f"{coder.cfg.d_in}] with one row per output row; input rows are "
                        f"{tuple(x.shape)}, output rows {tuple(y.shape)}"
                    )
            src = x if coder.cfg.kind == "transcoder" else y
            assert src is not None
            x_sel = (src if rows is None else src[rows]).detach()
            y_sel = (y if rows is None else y[rows]).detach()
            recon = self._run(name, coder, x_sel, y_sel)
            if self.sae_mode[name] != "replace":
                continue
            if rows is None:
                replaced.append(recon)
            else:
                full = y.to(recon.dtype)
                replaced.append(full.index_put((rows.nonzero().squeeze(1),), recon))
        if not replaced:
            return out
        new = replaced[0] if len(replaced) == 1 else torch.stack(replaced).mean(0)
        return rebuild(new.to(hidden.dtype).reshape(hidden.shape))

    def _run(self, name: str, coder: SparseCoder, x: Tensor, y: Tensor) -> Tensor:
        """Reconstruction of rows y (from x for a transcoder); records the adapter's stats."""
        sae = coder.cfg.kind == "sae"
        if x.shape[0] == 0:
            self.sae_stats.pop(name, None)
            return y.new_zeros((0, coder.cfg.d_out), dtype=coder.W_dec.dtype)
        if self.training and not self.sae_initialized.get(name, True):
            coder.init_from_data(x.float(), None if sae else y.float())
            self.sae_initialized[name] = True
        keep_graph = self.training or self.sae_mode[name] == "replace"
        with contextlib.nullcontext() if keep_graph else torch.no_grad():
            res = coder(x, None if sae else y)
        self.sae_stats[name] = SaeStats(res.loss, res.fvu.detach(), res.l0, int(x.shape[0]))
        return res.reconstruction

    def _rows(self, hidden: Tensor) -> Tensor | None:
        """Flat bool row selection of the current `sae_mask` for this layer (None: all)."""
        spec = _MASK.get()
        if isinstance(spec, Mapping):
            spec = next(
                (m for pat, m in spec.items() if fnmatch.fnmatchcase(self.sae_module_name, pat)),
                None,
            )
        if spec is None:
            return None
        if callable(spec):
            spec = spec(hidden)
        want = tuple(hidden.shape[:-1])
        if tuple(spec.shape) != want:
            raise ValueError(
                f"sae_mask of shape {tuple(spec.shape)} does not fit {self.sae_module_name}, "
                f"whose output is {tuple(hidden.shape)}: the mask must be {list(want)}; give "
                "masks per module as {pattern: mask} when modules differ"
            )
        return spec.to(hidden.device).bool().reshape(-1)

    def __repr__(self) -> str:
        return "sae." + super().__repr__()


# --- helpers -------------------------------------------------------------------------------------
def split_output(out: Any, where: str) -> tuple[Tensor, Callable[[Tensor], Any]]:
    """(hidden-state tensor, function that rebuilds `out` around a replacement for it)."""
    if isinstance(out, Tensor):
        return out, lambda t: t
    if isinstance(out, Mapping):  # transformers ModelOutput (a dict-like dataclass)
        key = next((k for k, v in out.items() if isinstance(v, Tensor)), None)
        if key is not None:

            def rebuild_mapping(t: Tensor) -> Any:
                return type(out)(**{**out, key: t})

            return out[key], rebuild_mapping
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
        rest = list(out[1:])
        if isinstance(out, list):
            return out[0], lambda t: [t, *rest]
        if hasattr(out, "_fields"):  # a namedtuple
            return out[0], lambda t: type(out)(t, *rest)
        return out[0], lambda t: (t, *rest)
    raise TypeError(
        f"{where} returned {type(out).__name__}, which holds no hidden-state tensor to "
        "reconstruct (a tensor, a tuple starting with one, or a ModelOutput)"
    )


def module_input(args: tuple[Any, ...], kwargs: Mapping[str, Any], where: str) -> Tensor:
    """The tensor a module reads: its first positional argument or `hidden_states`."""
    if args and isinstance(args[0], Tensor):
        return args[0]
    for key in ("hidden_states", "x", "input", "inputs_embeds"):
        if isinstance(kwargs.get(key), Tensor):
            return kwargs[key]
    raise TypeError(f"{where}: cannot find the input tensor of the module for a transcoder")


def _device_of(module: nn.Module) -> torch.device | None:
    for t in module.parameters():
        return t.device
    for t in module.buffers():
        return t.device
    return None


_WIDTH_ATTRS = ("hidden_size", "embed_dim", "d_model", "dim")


def _adapters_after_base(
    module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any
) -> Any:
    """Forward hook of a module an SaeLayer wraps: hands its output to the layer's adapters.
    A module-level function, not a closure, so a deep copy of the model hooks the copy."""
    layer = module.__dict__.get("_sae_owner")
    return None if layer is None else layer._after_base(args, kwargs, out)


def module_widths(module: nn.Module, config: SaeConfig, where: str) -> tuple[int, int]:
    """(input width, output width) of `module`: the config's d_in / d_out where set, else
    read off the module (Linear features, norm / embedding sizes, its first and last Linear,
    a hidden_size-like attribute). The output width is checked again on every forward."""
    d_in, d_out = config.d_in, config.d_out
    guess_in, guess_out = _guess_widths(module)
    d_in = d_in or guess_in or 0
    d_out = d_out or guess_out or 0
    if config.kind == "sae":
        d_in = d_out = config.d_out or config.d_in or d_out
    if not d_out or not d_in:
        missing = "d_out" if not d_out else "d_in"
        raise ValueError(
            f"cannot tell the {'output' if missing == 'd_out' else 'input'} width of {where} "
            f"({type(module).__name__}); set {missing} in the SaeConfig"
        )
    return int(d_in), int(d_out)


def _guess_widths(module: nn.Module) -> tuple[int | None, int | None]:
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if isinstance(module, nn.Embedding):
        return None, module.embedding_dim
    weight = getattr(module, "weight", None)
    if isinstance(weight, Tensor) and weight.dim() == 1:  # LayerNorm, RMSNorm
        return weight.shape[0], weight.shape[0]
    linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
    if linears:
        return linears[0].in_features, linears[-1].out_features
    for attr in _WIDTH_ATTRS:
        value = getattr(module, attr, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value, value
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cfg = getattr(module, "config", None)
    size = getattr(cfg, "hidden_size", None)
    return (size, size) if isinstance(size, int) else (None, None)


__all__ = [
    "MaskSpec",
    "RowSelector",
    "SaeLayer",
    "SaeStats",
    "module_input",
    "module_widths",
    "sae_mask",
    "split_output",
]
