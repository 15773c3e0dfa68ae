"""The dictionary weights attribution reads, moved to the device piece by piece.

A 7B model's CLT holds hundreds of GB of decoders; attribution needs one unit's encoder at a
time (to find the active features), the encoder rows of the features it explores, and the
decoder rows of the active features. `DictionaryWeights` hands out exactly those, as device
copies, and leaves the bundle where it is (memory-mapped on the host when loaded with
`DictionaryBundle.load(..., mmap=True)`). Every read goes through the bundle's checksums, so
a memory-mapped block is verified (CRC-32, NaN/Inf) the first time it is read.

Units are the bundle's: a CLT's source layer s, or transcoder s. Decoders are viewed as
[F, n_out, d] (n_out = 1 for a transcoder): row f, column j is what feature f of unit s writes
to unit s + j, in the dictionary's normalised units (divide by the target's output scale).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlmscope.dictionaries import SparseCodes
from vlmscope.training.bundle import DictionaryBundle


class _UnitEncoder(nn.Module):
    """`bundle.encode_unit(unit, x)` as a module call, for `torch.func.functional_call`."""

    def __init__(self, bundle: DictionaryBundle, unit: int) -> None:
        super().__init__()
        self.bundle = bundle
        self.unit = unit

    def forward(self, x: Tensor) -> SparseCodes:
        return self.bundle.encode_unit(self.unit, x)


class DictionaryWeights:
    """Per-unit weights of `bundle` as float32 (or the dictionary's dtype) device tensors."""

    def __init__(self, bundle: DictionaryBundle, device: torch.device) -> None:
        self.bundle = bundle
        self.device = device
        self.n_units = len(bundle.reads)
        self.is_clt = bundle.clt is not None
        first = self.module(0)
        self.dtype: torch.dtype = first.W_dec.dtype
        self.d_in = int(first.W_enc.shape[1])
        self.d_out = int(first.W_dec.shape[-1])
        self._skips: dict[int, Tensor | None] = {}

    def module(self, s: int) -> Any:
        """Unit s's dictionary: the CLT's layer s, or transcoder s."""
        b = self.bundle
        return b.clt.layers[s] if b.clt is not None else b.coders[s]

    def _name(self, s: int, tensor: str) -> str:
        return f"clt.layers.{s}.{tensor}" if self.is_clt else f"coders.{s}.{tensor}"

    def _read(self, s: int, tensor: str, rows: Tensor | None = None) -> Tensor:
        """Unit s's `tensor` (verified: all of it, or the blocks holding `rows`)."""
        self.bundle.check(self._name(s, tensor), rows)
        return getattr(self.module(s), tensor)

    def n_out(self, s: int) -> int:
        """How many units unit s's decoders write to (s itself included)."""
        if not self.is_clt:
            return 1
        return min(int(self.module(s).W_dec.shape[1]), self.n_units - s)

    def targets(self, s: int) -> range:
        return range(s, s + self.n_out(s))

    def _scale(self, s: int, which: str) -> float:
        mod = self.module(s)
        v = float(self._read(s, which))
        if self.bundle.cfg.normalize_activations == "mean_norm" and not v > 0:
            raise RuntimeError(f"unit {s}: {which} is not estimated (mean_norm needs it)")
        # The dictionary multiplies in its own dtype: use the scale as it sees it.
        return float(torch.tensor(v).to(mod.W_enc.dtype))

    def input_scale(self, s: int) -> float:
        return self._scale(s, "input_scale")

    def output_scale(self, s: int) -> float:
        return self._scale(s, "output_scale")

    @torch.no_grad()
    def encode(self, s: int, x: Tensor) -> SparseCodes:
        """Codes of unit s for x [N, d_in] on the device, with a device copy of the unit's
        encoder side only (the decoders stay where they are)."""
        mod = self.module(s)
        subs: dict[str, Tensor] = {}
        prefix = "bundle." + self._name(s, "")
        for name, t in [*mod.named_parameters(), *mod.named_buffers()]:
            if name.split(".")[0] in ("W_dec", "W_skip", "num_tokens_since_fired"):
                continue
            self.bundle.check(self._name(s, name))
            subs[prefix + name] = t.detach().to(self.device, non_blocking=True)
        enc = _UnitEncoder(self.bundle, s)
        return torch.func.functional_call(enc, subs, (x,), strict=False)

    def encoder_rows(self, s: int, f: Tensor) -> Tensor:
        """[len(f), d_in] float32: d(pre-activation of features f of unit s) / d(input)."""
        w = self._read(s, "W_enc", f)
        rows = w[f.to(w.device)].detach().to(self.device, non_blocking=True).float()
        return rows * self.input_scale(s)

    def decoder_rows(self, s: int, f: Tensor, j: int | None = None) -> Tensor:
        """[n_out(s), len(f), d_out] in the dictionary's dtype, on the bundle's device: what
        features f of unit s write to each target (normalised units), target-major so each
        target's rows are contiguous; [len(f), d_out] for target j alone."""
        w = self._read(s, "W_dec", f)
        idx = f.to(w.device)
        # A memory-mapped decoder is read from its file, row by row (see TensorChecks.read_rows).
        col = j if self.is_clt else None
        rows = self.bundle.tensor_checks.read_rows(self._name(s, "W_dec"), idx, col)
        if rows is None:  # in memory: read in place
            rows = (w[idx] if col is None else w[idx, col]).detach()
        if not self.is_clt:
            return rows if j is not None else rows.unsqueeze(0)
        if j is not None:
            return rows
        return rows[:, : self.n_out(s)].transpose(0, 1).contiguous()

    def b_dec(self, t: int) -> Tensor:
        return self._read(t, "b_dec").detach().to(self.device).float()

    def skip_weight(self, t: int) -> Tensor | None:
        """Unit t's skip matrix [d_out, d_in] as float32 on the device (cached), or None."""
        if t not in self._skips:
            mod = self.module(t)
            if getattr(mod, "W_skip", None) is None:
                self._skips[t] = None
            else:
                self._skips[t] = self._read(t, "W_skip").detach().to(self.device).float()
        return self._skips[t]

    def skip(self, t: int, x: Tensor) -> Tensor | None:
        """The linear skip path's output of unit t for x [.., d_in] (caller's units)."""
        w = self.skip_weight(t)
        if w is None:
            return None
        return F.linear(x.float() * self.input_scale(t), w) / self.output_scale(t)
