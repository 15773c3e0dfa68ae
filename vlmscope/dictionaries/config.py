"""SparseCoderConfig: the one description of an SAE, transcoder or cross-layer transcoder.

Dimensions (`d_in`, `d_out`, `n_layers`) may be left at 0 while a run is being configured and
filled in by the trainer once it knows the model (`with_dims`); a module can only be built from a
config whose dimensions are set. Derived values (`d_out`, `num_latents`, `normalize_decoder`)
are resolved as soon as they can be, so `to_dict()` always shows what is actually used and
`from_dict(cfg.to_dict()) == cfg`.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import json
import math
from dataclasses import dataclass, field
from typing import Any

KINDS: tuple[str, ...] = ("sae", "transcoder", "clt")
ACTIVATION_NAMES: tuple[str, ...] = ("topk", "batchtopk", "jumprelu")
NORMALIZATIONS: tuple[str, ...] = ("none", "mean_norm")

_INT_FIELDS = (
    "d_in",
    "d_out",
    "num_latents",
    "expansion_factor",
    "k",
    "n_layers",
    "n_targets",
    "aux_k",
    "dead_tokens_threshold",
)
_FLOAT_FIELDS = (
    "aux_k_coeff",
    "jumprelu_init_threshold",
    "jumprelu_bandwidth",
    "sparsity_coeff",
    "threshold_momentum",
)


@dataclass
class SparseCoderConfig:
    """Architecture and loss settings of one sparse dictionary (see the module docstring).

    kind: "sae" (reconstruct the input), "transcoder" (predict another tensor, e.g. the MLP
        output from the MLP input) or "clt" (cross-layer transcoder over `n_layers` layers).
    activation: "topk" (k per row), "batchtopk" (k * rows per batch, a threshold at eval),
        "jumprelu" (learned per-latent threshold, L0 penalty).
    d_in, d_out: input and output widths; d_out = 0 means d_in. Must be equal for an SAE.
    num_latents: dictionary size F (per layer for a CLT); 0 means expansion_factor * d_in.
    k: active latents per row for topk and batchtopk (mean per row for batchtopk).
    skip_connection: learn a linear W_skip [d_out, d_in] from input to output (transcoders).
    n_layers: number of source layers L of a CLT (0 until known; CLT only).
    n_targets: CLT window: the decoder of source layer l writes to layers
        l .. min(l + n_targets, L) - 1; 0 means every later layer. n_targets = 1 is a set of
        per-layer transcoders. A window wider than the layers that exist is clamped to them
        (the same command works on a model, or a --layers selection, of any depth).
    normalize_decoder: keep decoder rows at unit norm (the trainer calls
        `set_decoder_norm_to_unit_norm` each step); None means True for SAEs, else False.
    aux_k, aux_k_coeff: AuxK loss of Gao et al. (2024): the aux_k largest pre-activations of
        dead latents reconstruct the residual error; aux_k = 0 means d_out // 2.
    dead_tokens_threshold: a latent is dead after this many training rows without firing.
    jumprelu_init_threshold, jumprelu_bandwidth, sparsity_coeff: JumpReLU (Rajamanoharan et
        al. 2024) initial threshold, rectangle-kernel width of the pseudo-gradient, and the
        weight of the L0 penalty (must be > 0 for jumprelu, else nothing makes codes sparse).
    threshold_momentum: BatchTopK eval threshold estimate: 0 is the plain mean over training
        steps of the smallest kept activation; m > 0 an exponential moving average.
    normalize_activations: "none" or "mean_norm": inputs (and targets) are scaled by a constant
        estimated from data so that their mean L2 norm is sqrt(width), stored as a buffer.
    metadata: free JSON-serialisable dict the trainer fills (hook point names per layer, model
        name, ...); not used by the dictionaries themselves.
    """

    kind: str = "sae"
    activation: str = "topk"
    d_in: int = 0
    d_out: int = 0
    num_latents: int = 0
    expansion_factor: int = 32
    k: int = 32
    skip_connection: bool = False
    n_layers: int = 0
    n_targets: int = 0
    normalize_decoder: bool | None = None
    aux_k: int = 0
    aux_k_coeff: float = 1.0 / 32.0
    dead_tokens_threshold: int = 10_000_000
    jumprelu_init_threshold: float = 0.001
    jumprelu_bandwidth: float = 0.001
    sparsity_coeff: float = 0.0
    threshold_momentum: float = 0.0
    normalize_activations: str = "none"
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._check_types()
        if self.normalize_decoder is None:
            self.normalize_decoder = self.kind == "sae"
        if self.d_in > 0:
            if self.d_out == 0:
                self.d_out = self.d_in
            if self.num_latents == 0:
                self.num_latents = self.expansion_factor * self.d_in
        self._check_values()

    # ---------------------------------------------------------------- validation

    def _check_types(self) -> None:
        for name in _INT_FIELDS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"SparseCoderConfig.{name} must be an int, got {value!r}")
        for name in _FLOAT_FIELDS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"SparseCoderConfig.{name} must be a number, got {value!r}")
            setattr(self, name, float(value))
        for name in ("kind", "activation", "normalize_activations"):
            value = getattr(self, name)
            if not isinstance(value, str):
                raise TypeError(f"SparseCoderConfig.{name} must be a str, got {value!r}")
        if not isinstance(self.skip_connection, bool):
            raise TypeError(
                f"SparseCoderConfig.skip_connection must be a bool, got {self.skip_connection!r}"
            )
        if self.normalize_decoder is not None and not isinstance(self.normalize_decoder, bool):
            raise TypeError(
                "SparseCoderConfig.normalize_decoder must be a bool or None, "
                f"got {self.normalize_decoder!r}"
            )
        if not isinstance(self.metadata, dict) or not all(
            isinstance(key, str) for key in self.metadata
        ):
            raise TypeError("SparseCoderConfig.metadata must be a dict with str keys")
        try:
            json.dumps(self.metadata, allow_nan=False)
        except (TypeError, ValueError) as err:
            raise TypeError(
                f"SparseCoderConfig.metadata must be JSON-serialisable: {err}"
            ) from None

    def _check_values(self) -> None:
        def bad(message: str) -> ValueError:
            return ValueError(f"SparseCoderConfig: {message}")

        if self.kind not in KINDS:
            raise bad(f"kind must be one of {KINDS}, got {self.kind!r}")
        if self.activation not in ACTIVATION_NAMES:
            raise bad(f"activation must be one of {ACTIVATION_NAMES}, got {self.activation!r}")
        if self.normalize_activations not in NORMALIZATIONS:
            raise bad(
                f"normalize_activations must be one of {NORMALIZATIONS}, "
                f"got {self.normalize_activations!r}"
            )
        for name in _INT_FIELDS:
            if getattr(self, name) < 0:
                raise bad(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.expansion_factor == 0 and self.num_latents == 0:
            raise bad("set num_latents or expansion_factor (both are 0)")
        if self.dead_tokens_threshold < 1:
            raise bad("dead_tokens_threshold must be >= 1")
        if self.activation in ("topk", "batchtopk"):
            if self.k < 1:
                raise bad(f"k must be >= 1 for {self.activation}, got {self.k}")
            if self.num_latents and self.k > self.num_latents:
                raise bad(f"k={self.k} exceeds num_latents={self.num_latents}")
        if self.activation == "jumprelu" and self.sparsity_coeff <= 0:
            raise bad(
                "jumprelu needs sparsity_coeff > 0: without the L0 penalty nothing makes the "
                "codes sparse (on the command line: --sae.sparsity-coeff, e.g. 0.01)"
            )
        if self.jumprelu_init_threshold <= 0 or not math.isfinite(self.jumprelu_init_threshold):
            raise bad("jumprelu_init_threshold must be a finite number > 0")
        if self.jumprelu_bandwidth <= 0 or not math.isfinite(self.jumprelu_bandwidth):
            raise bad("jumprelu_bandwidth must be a finite number > 0")
        for name in ("aux_k_coeff", "sparsity_coeff"):
            value = getattr(self, name)
            if value < 0 or not math.isfinite(value):
                raise bad(f"{name} must be a finite number >= 0, got {value}")
        if not 0.0 <= self.threshold_momentum < 1.0:
            raise bad(f"threshold_momentum must be in [0, 1), got {self.threshold_momentum}")
        if self.kind == "sae":
            if self.d_in and self.d_out != self.d_in:
                raise bad(f"an SAE reconstructs its input: d_out={self.d_out} != d_in={self.d_in}")
            if self.skip_connection:
                raise bad("skip_connection is for transcoders and CLTs, not SAEs")
        if self.kind != "clt" and (self.n_layers or self.n_targets):
            raise bad(f"n_layers and n_targets are for kind='clt', not {self.kind!r}")

    def check_buildable(self) -> None:
        """Raise unless every dimension a module needs is known (the trainer fills them in)."""
        missing = [name for name in ("d_in",) if getattr(self, name) == 0]
        if self.kind == "clt" and self.n_layers == 0:
            missing.append("n_layers")
        if missing:
            raise ValueError(
                f"SparseCoderConfig: {', '.join(missing)} not set; use cfg.with_dims(...) once "
                "the model's dimensions are known"
            )

    # ---------------------------------------------------------------- derived values

    def with_dims(
        self, d_in: int, d_out: int | None = None, n_layers: int | None = None
    ) -> SparseCoderConfig:
        """A copy with the model-dependent dimensions filled in (derived values re-resolved)."""
        values = self.to_dict()
        values["d_in"] = d_in
        values["d_out"] = d_in if d_out is None else d_out
        if self.d_in == 0:
            # num_latents was not derived yet: keep an explicit one, else derive from d_in.
            values["num_latents"] = self.num_latents
        elif self.num_latents == self.expansion_factor * self.d_in:
            values["num_latents"] = 0
        if n_layers is not None:
            values["n_layers"] = n_layers
        return SparseCoderConfig.from_dict(values)

    def window(self) -> int:
        """Number of target layers a CLT source layer can write to (n_targets or all),
        clamped to n_layers once that is known."""
        if self.n_targets and self.n_layers:
            return min(self.n_targets, self.n_layers)
        return self.n_targets or self.n_layers

    def n_out(self, layer: int) -> int:
        """Target layers written by CLT source `layer`: layer .. layer + n_out(layer) - 1."""
        if not 0 <= layer < self.n_layers:
            raise IndexError(f"layer {layer} out of range for n_layers={self.n_layers}")
        return min(self.window(), self.n_layers - layer)

    # ---------------------------------------------------------------- (de)serialisation

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable dict of every field (derived values resolved)."""
        return {f.name: copy.deepcopy(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> SparseCoderConfig:
        """Build from `to_dict()` output; unknown keys are an error (catches typos early)."""
        if not isinstance(values, dict):
            raise TypeError(f"SparseCoderConfig.from_dict expects a dict, got {type(values)}")
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = [key for key in values if key not in known]
        if unknown:
            hints = []
            for key in unknown:
                close = difflib.get_close_matches(str(key), known, n=1)
                hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
            raise ValueError(
                f"SparseCoderConfig: unknown key(s) {', '.join(hints)}; valid keys: {known}"
            )
        return cls(**copy.deepcopy(values))
