"""Sparse dictionaries on any module, as PEFT adapters.

    from peft import inject_adapter_in_model
    from vlmscope.peft import TopKSaeConfig, get_peft_sae_model, PeftSaeModel

    config = TopKSaeConfig(k=1, num_latents=5, target_modules=["linear"])
    model = inject_adapter_in_model(config, model)  # peft's own function
    peft_model = get_peft_sae_model(model, config)
    peft_model.save_pretrained("out")     # adapter_config.json + adapter_model.safetensors
    peft_model = PeftSaeModel.from_pretrained(fresh_model, "out")

Importing this package registers the SAE as a PEFT method (see registry.py). The rest of
vlmscope never imports it, so peft loads only when PEFT adapters are used. The dictionaries
are vlmscope's own `SparseCoder`s; `convert.py` turns adapters into dictionary runs that
`vlmscope eval` / `ReplacementModel` / attribution read, and back.
"""

from __future__ import annotations

from vlmscope.peft.config import BatchTopKSaeConfig, JumpReLUSaeConfig, SaeConfig, TopKSaeConfig
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

register()

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
    "sae_layers",
    "sae_mask",
]
