"""Sparse dictionaries on any module, as PEFT adapters.

    from peft import inject_adapter_in_model
    from vlmscope.peft import TopKSaeConfig, get_peft_sae_model, PeftSaeModel

    config = TopKSaeConfig(k=1, num_latents=5, target_modules=["linear"])
    model = inject_adapter_in_model(config, model)  # peft's own function
    peft_model = get_peft_sae_model(model, config)
    peft_model.save_pretrained("out")     # adapter_config.json + adapter_model.safetensors
    peft_model = PeftSaeModel.from_pretrained(fresh_model, "out")

Using any name of this package (a config class, the model, the layer) registers the SAE as a
PEFT method (see registry.py). Names load on first use, so `vlmscope.peft.cli` (the `vlmscope
peft` command's flags) costs nothing until a command runs, and the rest of vlmscope never
imports peft. The dictionaries are vlmscope's own `SparseCoder`s; `convert.py` turns adapters
into dictionary runs that `vlmscope eval` / `ReplacementModel` / attribution read, and back.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from vlmscope.peft.config import (
        BatchTopKSaeConfig,
        JumpReLUSaeConfig,
        SaeConfig,
        TopKSaeConfig,
    )
    from vlmscope.peft.layer import SaeLayer, sae_mask
    from vlmscope.peft.model import (
        AdapterMismatchError,
        PeftSaeModel,
        SaeModel,
        SaeOutputs,
        TargetNotFoundError,
        clear_sae_outputs,
        collect_sae_outputs,
        get_peft_sae_model,
        sae_layers,
    )
    from vlmscope.peft.registry import register

_LAZY = {
    "BatchTopKSaeConfig": "vlmscope.peft.config",
    "JumpReLUSaeConfig": "vlmscope.peft.config",
    "SaeConfig": "vlmscope.peft.config",
    "TopKSaeConfig": "vlmscope.peft.config",
    "SaeLayer": "vlmscope.peft.layer",
    "sae_mask": "vlmscope.peft.layer",
    "AdapterMismatchError": "vlmscope.peft.model",
    "PeftSaeModel": "vlmscope.peft.model",
    "SaeModel": "vlmscope.peft.model",
    "SaeOutputs": "vlmscope.peft.model",
    "TargetNotFoundError": "vlmscope.peft.model",
    "clear_sae_outputs": "vlmscope.peft.model",
    "collect_sae_outputs": "vlmscope.peft.model",
    "get_peft_sae_model": "vlmscope.peft.model",
    "sae_layers": "vlmscope.peft.model",
    "register": "vlmscope.peft.registry",
}

__all__ = [
    "AdapterMismatchError",
    "BatchTopKSaeConfig",
    "JumpReLUSaeConfig",
    "PeftSaeModel",
    "SaeConfig",
    "SaeLayer",
    "SaeModel",
    "SaeOutputs",
    "TargetNotFoundError",
    "TopKSaeConfig",
    "clear_sae_outputs",
    "collect_sae_outputs",
    "get_peft_sae_model",
    "register",
    "sae_layers",
    "sae_mask",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'vlmscope.peft' has no attribute {name!r}")
