"""SaeModel (the PEFT tuner), PeftSaeModel (its PeftModel) and the functions around them.

`SaeModel` is what peft's `inject_adapter_in_model(config, model)` and `PeftModel` build for
an `SaeConfig`: it wraps every module that `target_modules` names in an `SaeLayer`. Adapter
tensors are saved as `<module>.sae_coders.<tensor>` (the adapter name removed, as PEFT does),
in `adapter_model.safetensors` next to `adapter_config.json`.

`PeftSaeModel.forward` accepts `sae_mask` (see `layer.sae_mask`) and, when the adapters
measured something in that forward and no `labels` were passed, puts the sum of their losses
in the output's `loss`, which is what Hugging Face's `Trainer` minimises.
"""

from __future__ import annotations

import contextlib
import difflib
import re
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from peft import PeftModel
from peft.tuners.tuners_utils import BaseTuner
from peft.utils.error import NoMatchingPeftModuleError
from torch import Tensor, nn

from vlmscope.peft.config import SaeConfig
from vlmscope.peft.layer import MaskSpec, SaeLayer, sae_mask
from vlmscope.peft.registry import PREFIX, register


class TargetNotFoundError(NoMatchingPeftModuleError):
    """`target_modules` named no module of the model."""


class AdapterMismatchError(ValueError):
    """A saved adapter does not fit the model it is loaded onto."""


class SaeModel(BaseTuner):
    """The PEFT tuner of SAE adapters: wraps each targeted module in an SaeLayer."""

    prefix: str = PREFIX
    tuner_layer_cls = SaeLayer
    target_module_mapping: dict[str, list[str]] = {}  # noqa: RUF012 - peft's interface

    def _prepare_adapter_config(self, peft_config: Any, model_config: dict[str, Any]) -> Any:
        if peft_config.target_modules is None:
            raise ValueError(
                "SaeConfig.target_modules is not set: name the modules (e.g. ['mlp']) or give a "
                "regular expression over their full names"
            )
        return peft_config

    def _create_and_replace(
        self,
        peft_config: Any,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        parameter_name: str | None = None,
    ) -> None:
        if parameter_name is not None:
            raise ValueError("SAE adapters target modules, not parameters (target_parameters)")
        if isinstance(target, SaeLayer):
            target.update_layer(adapter_name, peft_config)
            return
        new = SaeLayer(target, adapter_name, peft_config, module_name=current_key)
        if adapter_name not in self.active_adapters:
            new.requires_grad_(False)
        self._replace_module(parent, target_name, new, target)

    def _replace_module(
        self, parent: nn.Module, child_name: str, new_module: nn.Module, child: nn.Module
    ) -> None:
        # Unloading puts each wrapped module back. PEFT's own replacement then copies the
        # wrapper's `weight` onto it, which only a Linear-like module has: an MLP or a decoder
        # layer (which SAE adapters sit on) has none, so unload() raised AttributeError. The
        # module is the one the wrapper held, weights and all: set it back as it is.
        if new_module is getattr(child, "base_layer", None):
            if isinstance(child, SaeLayer):
                child.detach_from_base()
            setattr(parent, child_name, new_module)
            return
        super()._replace_module(parent, child_name, new_module, child)

    def inject_adapter(
        self, model: nn.Module, adapter_name: str, *args: Any, **kwargs: Any
    ) -> None:
        try:
            super().inject_adapter(model, adapter_name, *args, **kwargs)
        except NoMatchingPeftModuleError as e:
            cfg = self.peft_config[adapter_name]
            if getattr(cfg, "target_modules", None) is None:
                raise
            raise TargetNotFoundError(_no_match_message(model, cfg.target_modules)) from e

    @classmethod
    def _remove_adapter_name_from_key(cls, key: str, adapter_name: str) -> str:
        # `<module>.sae_coders.<adapter>.<tensor path>`: the path may be nested (activation.*).
        return key.replace(f"sae_coders.{adapter_name}.", "sae_coders.", 1)

    @classmethod
    def _remap_adapter_state_dict_for_load(
        cls,
        model: nn.Module,
        config: Any,
        adapter_name: str,
        state_dict: dict[str, Tensor],
    ) -> dict[str, Tensor]:
        remapped = super()._remap_adapter_state_dict_for_load(
            model, config, adapter_name, state_dict
        )
        check_adapter_fits(model, remapped, adapter_name)
        return remapped


def check_adapter_fits(
    model: nn.Module, state_dict: Mapping[str, Tensor], adapter_name: str
) -> None:
    """Raise AdapterMismatchError naming the module and shapes when adapter tensors have no
    place in `model` or a different shape there."""
    here = model.state_dict()
    prefix = "base_model.model."
    for key, value in state_dict.items():
        if ".sae_coders." not in key:
            continue
        mine = key if key in here else prefix + key if prefix + key in here else None
        module = key.split(".sae_coders.")[0].removeprefix(prefix)
        if mine is None:
            raise AdapterMismatchError(
                f"adapter {adapter_name!r} has a dictionary on module {module!r}, which this "
                f"model has no SAE layer for ({key})"
            )
        if tuple(here[mine].shape) != tuple(value.shape):
            tensor = key.split(f".sae_coders.{adapter_name}.")[-1]
            raise AdapterMismatchError(
                f"adapter {adapter_name!r} does not fit module {module!r}: {tensor} is "
                f"{list(value.shape)} in the adapter but {list(here[mine].shape)} for this model "
                "(the adapter was made for a module of another width)"
            )


def _no_match_message(model: nn.Module, targets: Any) -> str:
    names = [n for n, _ in model.named_modules() if n]
    wanted = [targets] if isinstance(targets, str) else sorted(targets)
    close: list[str] = []
    tails = sorted({n.rsplit(".", 1)[-1] for n in names})
    for pattern in wanted:
        if "." in pattern or "\\" in pattern:  # a path (or a regex over paths)
            close += difflib.get_close_matches(pattern, names, n=5, cutoff=0.3)
        for tail in difflib.get_close_matches(pattern.rsplit(".", 1)[-1], tails, n=2):
            close += [n for n in names if n == tail or n.endswith("." + tail)][:3]
    close = list(dict.fromkeys(close))[:8]
    kind = "regular expression" if isinstance(targets, str) else "names"
    hint = f"; closest module names: {', '.join(close)}" if close else ""
    return (
        f"target_modules {kind} {wanted if not isinstance(targets, str) else targets!r} match no "
        f"module of {type(model).__name__}{hint}"
    )


# --- losses and metrics --------------------------------------------------------------------------
@dataclass
class SaeOutputs:
    """What the adapters measured in one forward: the summed loss (with its graph in
    training; None when no adapter saw a row) and per "module/adapter" metrics."""

    loss: Tensor | None
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)

    @property
    def fvu(self) -> float:
        """Mean FVU over the adapters that measured something."""
        values = [m["fvu"] for m in self.metrics.values()]
        return sum(values) / len(values) if values else float("nan")


def sae_layers(model: nn.Module) -> Iterator[tuple[str, SaeLayer]]:
    """Every SaeLayer of `model` with its module name."""
    for name, module in model.named_modules():
        if isinstance(module, SaeLayer):
            yield name, module


def collect_sae_outputs(model: nn.Module, clear: bool = True) -> SaeOutputs:
    """Sum the losses the active adapters recorded in the last forward, with their FVU, L0 and
    row counts; `clear` forgets them, so a layer that does not run next time adds nothing."""
    losses: list[Tensor] = []
    metrics: dict[str, dict[str, float]] = {}
    for _, layer in sae_layers(model):
        for adapter, stats in layer.sae_stats.items():
            losses.append(stats.loss)
            metrics[f"{layer.sae_module_name}/{adapter}"] = {
                "fvu": float(stats.fvu),
                "l0": float(stats.l0),
                "rows": float(stats.rows),
            }
        if clear:
            layer.sae_stats.clear()
    loss = torch.stack([x.float() for x in losses]).sum() if losses else None
    return SaeOutputs(loss, metrics)


def clear_sae_outputs(model: nn.Module) -> None:
    """Forget what the adapters recorded (e.g. before a forward whose loss is not wanted)."""
    for _, layer in sae_layers(model):
        layer.sae_stats.clear()


# --- the PeftModel -------------------------------------------------------------------------------
class PeftSaeModel(PeftModel):
    """A PeftModel of SAE adapters; `forward(..., sae_mask=...)` returns the adapters' loss
    as `loss` (see the module docstring); `last_sae_outputs` keeps their metrics."""

    def __init__(
        self,
        model: nn.Module,
        peft_config: SaeConfig,
        adapter_name: str = "default",
        autocast_adapter_dtype: bool = True,
        low_cpu_mem_usage: bool = False,
    ) -> None:
        register()
        with warnings.catch_warnings():
            # Wrapping a model that already carries injected SAE layers reuses them.
            warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
            # transformers 5 deprecates the attribute PeftModel reads; nothing to do here.
            warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated")
            super().__init__(
                model,
                peft_config,
                adapter_name,
                autocast_adapter_dtype=autocast_adapter_dtype,
                low_cpu_mem_usage=low_cpu_mem_usage,
            )
        self.last_sae_outputs = SaeOutputs(None)

    def forward(self, *args: Any, sae_mask: MaskSpec = None, **kwargs: Any) -> Any:  # type: ignore[override]
        model = self.get_base_model()
        clear_sae_outputs(model)
        ctx = _mask_context(sae_mask)
        with ctx:
            out = super().forward(*args, **kwargs)
        collected = collect_sae_outputs(model)
        self.last_sae_outputs = SaeOutputs(
            collected.loss.detach() if collected.loss is not None else None, collected.metrics
        )
        if collected.loss is not None and kwargs.get("labels") is None and isinstance(out, Mapping):
            out["loss"] = collected.loss  # type: ignore[index]
        elif collected.loss is not None and isinstance(out, Tensor) and self.training:
            self._pending_loss = collected.loss
        return out

    def sae_loss(self) -> Tensor | None:
        """The adapters' summed loss of the last training forward of a model whose output is
        a plain tensor (HF models carry it in `output.loss` instead)."""
        return getattr(self, "_pending_loss", None)


def _mask_context(mask: MaskSpec) -> contextlib.AbstractContextManager[None]:
    return sae_mask(mask) if mask is not None else contextlib.nullcontext()


def get_peft_sae_model(
    model: nn.Module,
    peft_config: SaeConfig,
    adapter_name: str = "default",
    mixed: bool = False,
    autocast_adapter_dtype: bool = True,
    revision: str | None = None,
    low_cpu_mem_usage: bool = False,
) -> PeftSaeModel:
    """Wrap `model` with SAE adapters as `peft.get_peft_model` does with LoRA; a model that
    already carries this adapter (from `inject_adapter_in_model` with the same config) keeps
    its weights."""
    if mixed:
        raise ValueError("SAE adapters do not mix with other PEFT methods (mixed=True)")
    if not isinstance(peft_config, SaeConfig):
        raise TypeError(f"get_peft_sae_model needs an SaeConfig, got {type(peft_config).__name__}")
    peft_config.base_model_name_or_path = model.__dict__.get("name_or_path", None) or None
    if revision is not None:
        peft_config.revision = revision
    return PeftSaeModel(
        model,
        peft_config,
        adapter_name,
        autocast_adapter_dtype=autocast_adapter_dtype,
        low_cpu_mem_usage=low_cpu_mem_usage,
    )


def module_name_pattern(names: list[str]) -> str:
    """A regular expression for target_modules that matches exactly these module names."""
    return "|".join(re.escape(n) for n in names)


register()  # with peft, as soon as the tuner exists

__all__ = [
    "AdapterMismatchError",
    "PeftSaeModel",
    "SaeModel",
    "SaeOutputs",
    "TargetNotFoundError",
    "check_adapter_fits",
    "clear_sae_outputs",
    "collect_sae_outputs",
    "get_peft_sae_model",
    "module_name_pattern",
    "sae_layers",
]
