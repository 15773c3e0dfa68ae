"""PEFT SAE adapters <-> vlmscope dictionary runs, with identical weights.

An adapter on module M corresponds to the hook points that attach to M:

    SAE         reads and writes M's output hook   (model.language_model.layers.2.mlp ->
                                                    lm.blocks.2.mlp.hook_out)
    transcoder  reads M's input hook, writes its output hook   (a vision block's mlp ->
                                                    vision.blocks.i.mlp.hook_in / hook_out)

`to_bundle` makes a DictionaryBundle (what `vlmscope eval`, ReplacementModel and attribution
load; `bundle.save(path)` writes the run folder) from an adapter; `from_bundle` puts a run's
dictionaries on a model as an adapter. Both copy every tensor of the SparseCoders (weights,
normalisation scales, dead-latent counters, BatchTopK / JumpReLU thresholds) unchanged. A
dictionary whose hooks are not the input and output of one module (vlmscope's LM
transcoders read hook_resid_mid, the input of the MLP's norm, not of the MLP) and CLTs have
no adapter form: they are refused with the reason.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping
from typing import Any

from torch import nn

from vlmscope.dictionaries import SparseCoder
from vlmscope.models.hooked import HookedVLM
from vlmscope.peft.config import SaeConfig
from vlmscope.peft.layer import SaeLayer
from vlmscope.peft.model import PeftSaeModel, get_peft_sae_model, module_name_pattern, sae_layers
from vlmscope.training.bundle import DictionaryBundle, hook_width


class ConversionError(ValueError):
    """Dictionaries that have no PEFT adapter form, or an adapter with no hook points."""


def to_dictionaries(model: nn.Module, adapter_name: str = "default") -> dict[str, SparseCoder]:
    """Copies of the adapter's SparseCoders keyed by the module they sit on."""
    out = {}
    for _, layer in sae_layers(_hf_model(model)):
        if adapter_name in layer.sae_coders:
            out[layer.sae_module_name] = copy.deepcopy(layer.sae_coders[adapter_name])
    if not out:
        raise ConversionError(f"the model has no SAE adapter named {adapter_name!r}")
    return out  # type: ignore[return-value]


def to_bundle(
    model: nn.Module,
    adapter_name: str = "default",
    *,
    vlm: HookedVLM | None = None,
    model_name: str | None = None,
    tokens: str | None = None,
    include_special_tokens: bool | None = None,
) -> DictionaryBundle:
    """The adapter as a DictionaryBundle bound to vlmscope hook names (weights copied).

    `tokens` / `include_special_tokens` record which positions the adapter was trained on
    (the replacement model replaces those); None: what the adapter's config records (an
    adapter written by `from_bundle` records its run's), else "all" and False. `vlm` is built
    from the model when not given."""
    hf = _hf_model(model)
    recorded = _adapter_config(model, adapter_name)
    if tokens is None:
        tokens = getattr(recorded, "tokens", None) or "all"
    if include_special_tokens is None:
        include_special_tokens = bool(getattr(recorded, "include_special_tokens", None))
    vlm = vlm or HookedVLM(hf)
    by_module = _hooks_by_module(vlm)
    coders = to_dictionaries(hf, adapter_name)
    kinds = {c.cfg.kind for c in coders.values()}
    if len(kinds) != 1:
        raise ConversionError(f"adapter {adapter_name!r} mixes kinds {sorted(kinds)}")
    kind = kinds.pop()
    reads, writes, dicts = [], [], {}
    dims = vlm.adapter.dims()
    for module_name, coder in coders.items():
        hooks = by_module.get(module_name, {})
        write = hooks.get("out")
        read = write if kind == "sae" else hooks.get("in")
        if write is None or read is None:
            need = "output" if kind == "sae" else "input and output"
            raise ConversionError(
                f"module {module_name!r} is not where vlmscope hook points read a module's "
                f"{need}; hook points attach to: {_known(by_module)}"
            )
        if read in dicts:
            raise ConversionError(f"two adapter layers map to hook point {read!r}")
        # PEFT loads an adapter onto any model with modules of the same names: its widths are
        # the config's, not the module's, so one made for another model loads without a word
        for hook, width in ((read, coder.cfg.d_in), (write, coder.cfg.d_out)):
            want = hook_width(hook, dims)
            if want is not None and want != width:
                raise ConversionError(
                    f"adapter {adapter_name!r} on {module_name}: its dictionary is {width} wide "
                    f"where {hook} of this model is {want}; it was made for another model"
                )
        reads.append(read)
        writes.append(write)
        dicts[read] = coder
    widths = {(c.cfg.d_in, c.cfg.d_out, c.cfg.num_latents) for c in dicts.values()}
    if len(widths) != 1:
        raise ConversionError(
            f"a run holds dictionaries of one size; adapter {adapter_name!r} has {sorted(widths)}"
        )
    order = {h: i for i, h in enumerate(vlm.hook_names())}
    ranked = sorted(range(len(reads)), key=lambda i: order[reads[i]])
    reads, writes = [reads[i] for i in ranked], [writes[i] for i in ranked]
    info = {
        "name": model_name or str(getattr(hf.config, "_name_or_path", "") or "model"),
        "family": vlm.adapter.family,
        "dims": vlm.adapter.dims(),
        "layers": [],
        "tokens": tokens,
        "include_special_tokens": include_special_tokens,
        "source": f"PEFT adapter {adapter_name!r}",
    }
    return DictionaryBundle(kind, dicts, reads, writes, info)


def from_bundle(
    model: nn.Module,
    bundle: DictionaryBundle | str | os.PathLike[str],
    adapter_name: str = "default",
    *,
    mode: str = "replace",
    vlm: HookedVLM | None = None,
) -> PeftSaeModel:
    """Put a run's dictionaries on `model` as adapter `adapter_name` (weights copied); a
    PeftSaeModel gets the adapter added, any other model is wrapped in one."""
    if not isinstance(bundle, DictionaryBundle):
        bundle = DictionaryBundle.load(bundle)
    if bundle.clt is not None:
        raise ConversionError(
            "a cross-layer transcoder writes to several layers from one encoder; a PEFT adapter "
            "lives on one module, so CLTs have no adapter form"
        )
    hf = _hf_model(model)
    vlm = vlm or HookedVLM(hf)
    bundle.check_model(vlm.adapter)
    names = {id(m): n for n, m in hf.named_modules()}
    targets: dict[str, SparseCoder] = {}
    for read, write, coder in zip(bundle.reads, bundle.writes, bundle.coders, strict=True):
        w_mod, w_io = vlm.hook_module(write)
        r_mod, r_io = vlm.hook_module(read)
        ok = w_io == "out" and (
            (bundle.kind == "sae" and read == write) or (r_mod is w_mod and r_io == "in")
        )
        if not ok:
            what = "the output" if bundle.kind == "sae" else "the input and the output"
            raise ConversionError(
                f"{bundle.kind} reading {read} and writing {write}: a PEFT adapter reads "
                f"{what} of one module, and these hook points are not that (a vlmscope "
                "transcoder reads hook_resid_mid, the input of the MLP's norm)"
            )
        targets[names[id(w_mod)]] = coder  # type: ignore[assignment]
    config = SaeConfig.from_coder_config(
        bundle.cfg,
        target_modules=module_name_pattern(list(targets)),
        mode=mode,
        d_in=bundle.cfg.d_in,
        d_out=bundle.cfg.d_out,
        init_from_data=False,
        tokens=bundle.model_info.get("tokens"),
        include_special_tokens=bundle.model_info.get("include_special_tokens"),
    )
    if isinstance(model, PeftSaeModel):
        model.add_adapter(adapter_name, config)
        peft_model = model
    else:
        peft_model = get_peft_sae_model(model, config, adapter_name)
    for _, layer in sae_layers(_hf_model(peft_model)):
        coder = targets.get(layer.sae_module_name)
        if coder is not None:
            _copy_into(layer, adapter_name, coder)
    return peft_model


def _copy_into(layer: SaeLayer, adapter_name: str, coder: SparseCoder) -> None:
    target: SparseCoder = layer.sae_coders[adapter_name]  # type: ignore[assignment]
    device = target.W_enc.device
    target.load_state_dict({k: v.to(device) for k, v in coder.state_dict().items()})
    layer.sae_initialized[adapter_name] = True


def _adapter_config(model: nn.Module, adapter_name: str) -> Any:
    """The PEFT config of adapter `adapter_name` on model (a PeftSaeModel, or a model PEFT
    injected adapters into), None where there is none."""
    for holder in (model, _hf_model(model)):
        configs = getattr(holder, "peft_config", None)
        if isinstance(configs, Mapping) and adapter_name in configs:
            return configs[adapter_name]
    return None


def _hf_model(model: nn.Module) -> nn.Module:
    from vlmscope.models.adapter import unwrap_peft_model

    return unwrap_peft_model(model)


def _hooks_by_module(vlm: HookedVLM) -> dict[str, dict[str, str]]:
    """module name -> {"in": hook reading its input, "out": hook reading its output}."""
    names = {id(m): n for n, m in vlm.adapter.model.named_modules()}
    out: dict[str, dict[str, str]] = {}
    for hook in vlm.hook_names():
        module, io = vlm.hook_module(hook)
        if io not in ("in", "out"):
            continue
        name = names.get(id(module))
        if name is None:
            continue
        if isinstance(module, SaeLayer):
            name = module.sae_module_name
        out.setdefault(name, {}).setdefault(io, hook)
    return out


def _known(by_module: Mapping[str, Any]) -> str:
    shown = list(by_module)[:6]
    return ", ".join(shown) + (", ..." if len(by_module) > 6 else "")


__all__ = ["ConversionError", "from_bundle", "to_bundle", "to_dictionaries"]
