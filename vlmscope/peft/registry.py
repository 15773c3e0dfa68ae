"""Registration of vlmscope's SAE as a PEFT method.

peft's extension API is `peft.utils.register_peft_method(name=..., config_cls=..., model_cls=...,
prefix=...)`: it fills the mappings that `inject_adapter_in_model`, `get_peft_model`,
`PeftModel.from_pretrained` and `PeftConfig.from_pretrained` dispatch through. It accepts only
names that `peft.utils.PeftType` (an Enum) lists, and peft offers no call to add one, so the
one step taken outside the public API is adding the `VLMSCOPE_SAE` member to that Enum, the
way Enum members are stored (name map, value map, member list). Everything else goes through
`register_peft_method`.
"""

from __future__ import annotations

from typing import Any

from peft.utils import PeftType

NAME = "vlmscope_sae"
#: the state-dict prefix of every adapter tensor (`<module>.sae_coders.<adapter>.W_enc`, ...).
PREFIX = "sae_"


def _add_peft_type(name: str) -> Any:
    """The PeftType member `name`, added to the Enum if peft does not list it."""
    if name in PeftType.__members__:
        return PeftType[name]
    member = str.__new__(PeftType, name)
    member._name_ = name
    member._value_ = name
    member._sort_order_ = len(PeftType._member_names_)
    PeftType._member_names_.append(name)
    PeftType._member_map_[name] = member
    PeftType._value2member_map_[name] = member
    type.__setattr__(PeftType, name, member)  # EnumType.__setattr__ refuses new members
    return member


PEFT_TYPE = _add_peft_type(NAME.upper())


def register() -> None:
    """Register SaeConfig / SaeModel with peft (idempotent: a second call does nothing)."""
    from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING
    from peft.utils import register_peft_method

    from vlmscope.peft.config import SaeConfig
    from vlmscope.peft.model import SaeModel

    if PEFT_TYPE_TO_TUNER_MAPPING.get(PEFT_TYPE) is SaeModel:
        return
    register_peft_method(name=NAME, config_cls=SaeConfig, model_cls=SaeModel, prefix=PREFIX)
