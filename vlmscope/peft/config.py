"""SaeConfig: a PEFT adapter config whose dictionary settings are vlmscope's SparseCoderConfig.

The dictionary fields (activation, k, num_latents, expansion_factor, AuxK, JumpReLU and
BatchTopK settings, ...) are generated from `SparseCoderConfig`, so there is one description
of a dictionary in vlmscope and a PEFT adapter is exactly a vlmscope SAE or transcoder on a
module. The PEFT fields say where it goes (`target_modules`, `exclude_modules`) and what it
does there (`mode`).

`TopKSaeConfig`, `BatchTopKSaeConfig` and `JumpReLUSaeConfig` only change the default
`activation`; a saved adapter records the activation, so it loads back as an `SaeConfig`
with the same behaviour whichever class wrote it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from peft.config import PeftConfig

from vlmscope.dictionaries.config import SparseCoderConfig
from vlmscope.peft.registry import PEFT_TYPE
from vlmscope.training.config import TOKEN_KINDS

#: SparseCoderConfig fields that a module fills in (widths) or that are for CLTs / the trainer.
_NOT_ADAPTER_FIELDS = ("d_in", "d_out", "n_layers", "n_targets", "metadata")
MODES: tuple[str, ...] = ("replace", "observe")
ADAPTER_KINDS: tuple[str, ...] = ("sae", "transcoder")


def _coder_field(f: dataclasses.Field[Any]) -> tuple[str, Any, Any]:
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
    return (f.name, f.type, field(default=default))


_CoderFields = dataclasses.make_dataclass(
    "_CoderFields",
    [
        _coder_field(f)
        for f in dataclasses.fields(SparseCoderConfig)
        if f.name not in _NOT_ADAPTER_FIELDS
    ],
    bases=(PeftConfig,),
)
_CoderFields.__doc__ = "SparseCoderConfig's dictionary fields on a PeftConfig (generated)."
CODER_FIELDS: tuple[str, ...] = tuple(
    f.name for f in dataclasses.fields(SparseCoderConfig) if f.name not in _NOT_ADAPTER_FIELDS
)


@dataclass
class SaeConfig(_CoderFields):  # type: ignore[misc, valid-type]
    """A sparse dictionary on every module that `target_modules` names.

    target_modules: module names (a name matches itself and every module whose dotted path
        ends with it) or one regular expression matched against the full path, as in PEFT.
    exclude_modules: the same, for modules to leave out.
    mode: "replace": the module's output (its hidden-state tensor) becomes the reconstruction;
        "observe": the output passes through unchanged while the dictionary reads (and, in
        training mode, learns) it.
    kind: "sae" reconstructs the module's output; "transcoder" predicts the output from the
        module's input (first positional argument or `hidden_states`).
    d_in, d_out: the input / output width where it cannot be read off the module (0: infer).
    init_from_data: set b_dec to the mean of the first training batch (as `vlmscope train`).
    tokens, include_special_tokens: the positions the dictionaries were trained on ("all",
        "image" or "text"; BOS and chat-template markers too or not), as `vlmscope train`
        records them in a run. `from_bundle` (`vlmscope peft export`) copies them from the run
        and `to_bundle` (`vlmscope peft import`) back into one, so the replacement model
        replaces the same positions after the round trip; None: not recorded.
    Every other field is a SparseCoderConfig field with its meaning and default.
    """

    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    mode: str = "replace"
    d_in: int = 0
    d_out: int = 0
    init_from_data: bool = True
    tokens: str | None = None
    include_special_tokens: bool | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PEFT_TYPE
        if isinstance(self.target_modules, (list, tuple, set)):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, (list, tuple, set)):
            self.exclude_modules = set(self.exclude_modules)
        if self.mode not in MODES:
            raise ValueError(
                f"{type(self).__name__}: mode must be one of {MODES}, got {self.mode!r}"
            )
        if self.kind not in ADAPTER_KINDS:
            raise ValueError(
                f"{type(self).__name__}: kind must be one of {ADAPTER_KINDS}, got {self.kind!r} "
                "(a cross-layer transcoder spans modules: train it with `vlmscope train`)"
            )
        if self.tokens not in (None, *TOKEN_KINDS):
            raise ValueError(
                f"{type(self).__name__}: tokens must be one of {TOKEN_KINDS} or None, "
                f"got {self.tokens!r}"
            )
        for name in ("d_in", "d_out"):
            if getattr(self, name) < 0:
                raise ValueError(f"{type(self).__name__}: {name} must be >= 0")
        try:
            self.coder_config(0, 0)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{type(self).__name__}: {e}") from None

    def coder_config(self, d_in: int, d_out: int) -> SparseCoderConfig:
        """The SparseCoderConfig of the dictionary on a module with these widths (0: unknown)."""
        values = {name: getattr(self, name) for name in CODER_FIELDS}
        if isinstance(values.get("normalize_decoder"), str):  # JSON round trip keeps bools
            values["normalize_decoder"] = values["normalize_decoder"] == "true"
        cfg = SparseCoderConfig(**values)
        if d_in:
            cfg = cfg.with_dims(d_in, d_out or d_in)
        return cfg

    @classmethod
    def from_coder_config(cls, cfg: SparseCoderConfig, **peft_fields: Any) -> SaeConfig:
        """An SaeConfig with `cfg`'s dictionary settings (num_latents resolved) and the given
        PEFT fields (target_modules, mode, ...)."""
        values = {name: getattr(cfg, name) for name in CODER_FIELDS}
        return cls(**values, **peft_fields)


@dataclass
class TopKSaeConfig(SaeConfig):
    """An SaeConfig whose activation is TopK (k latents per row) unless told otherwise."""

    activation: str = "topk"


@dataclass
class BatchTopKSaeConfig(SaeConfig):
    """An SaeConfig with BatchTopK: k latents per row on average over a batch, a threshold at
    inference (estimated while training)."""

    activation: str = "batchtopk"


@dataclass
class JumpReLUSaeConfig(SaeConfig):
    """An SaeConfig with JumpReLU: learned per-latent thresholds and an L0 penalty."""

    activation: str = "jumprelu"
    sparsity_coeff: float = 0.01


# Registration needs SaeModel, which needs this module: import it once the configs exist.
import vlmscope.peft.model  # noqa: E402, F401

__all__ = [
    "ADAPTER_KINDS",
    "CODER_FIELDS",
    "MODES",
    "BatchTopKSaeConfig",
    "JumpReLUSaeConfig",
    "SaeConfig",
    "TopKSaeConfig",
]
