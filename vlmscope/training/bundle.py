"""DictionaryBundle: a run's dictionaries bound to the hook points they read and write.

The dictionaries layer maps tensors to tensors; this is where they meet a model. A bundle knows,
for each unit (an SAE, a transcoder, or one layer of a CLT), which hook point it reads and which
it reconstructs, and the model it was trained on, so that a replacement model, an evaluation or
an attribution graph can refuse dictionaries made for another model before any forward pass.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from vlmscope.dictionaries import (
    CrossLayerTranscoder,
    SparseCoder,
    SparseCoderConfig,
    SparseCodes,
    TensorChecks,
    load_dictionaries,
    save_dictionaries,
)

BUNDLE_KEY = "vlmscope_bundle"


class ModelMismatchError(ValueError):
    """Dictionaries were trained for a model that differs from the one given."""


def resid_mid(layer: int) -> str:
    return f"lm.blocks.{layer}.hook_resid_mid"


def mlp_out(layer: int) -> str:
    return f"lm.blocks.{layer}.mlp.hook_out"


_D_MODEL_HOOKS = ("hook_resid_pre", "hook_resid_mid", "hook_resid_post", "mlp.hook_in",
                  "mlp.hook_out", "attn.hook_out")  # fmt: skip


def hook_width(name: str, dims: Mapping[str, int]) -> int | None:
    """Width of an LM hook point's activation per token (heads flattened), from the model's
    dimensions; None where it is not known from them (vision, projector, patterns)."""
    if not name.startswith("lm."):
        return None
    if name.endswith(_D_MODEL_HOOKS):
        return dims["d_model"]
    if name.endswith(("attn.hook_q", "attn.hook_z")):
        return dims["n_heads"] * dims["d_head"]
    if name.endswith(("attn.hook_k", "attn.hook_v")):
        return dims["n_kv_heads"] * dims["d_head"]
    return None


@dataclass
class BundleOutput:
    """Losses and metrics of one training forward, per unit and summed."""

    loss: Tensor
    fvu: Tensor
    fvu_per_unit: Tensor
    l0_per_unit: Tensor
    reconstructions: list[Tensor]


class DictionaryBundle(nn.Module):
    """SAEs / transcoders keyed by the hook they read, or a CLT, plus their hook bindings."""

    def __init__(
        self,
        kind: str,
        dictionaries: Mapping[str, SparseCoder] | CrossLayerTranscoder,
        reads: Sequence[str],
        writes: Sequence[str],
        model_info: Mapping[str, Any],
    ) -> None:
        super().__init__()
        self.kind = kind
        #: checksums of memory-mapped weights, verified on first read (empty when read eagerly).
        self.tensor_checks = TensorChecks()
        self.reads = list(reads)
        self.writes = list(writes)
        self.model_info = dict(model_info)
        if isinstance(dictionaries, CrossLayerTranscoder):
            self.clt: CrossLayerTranscoder | None = dictionaries
            self.coders = nn.ModuleList()
        else:
            self.clt = None
            self.coders = nn.ModuleList([dictionaries[r] for r in self.reads])
        if len(self.reads) != len(self.writes):
            raise ValueError("a bundle needs one written hook per read hook")

    # --- construction --------------------------------------------------------------------
    @classmethod
    def create(
        cls,
        cfg: SparseCoderConfig,
        reads: Sequence[str],
        writes: Sequence[str],
        d_in: int,
        d_out: int,
        model_info: Mapping[str, Any],
        device: torch.device | str | None = None,
    ) -> DictionaryBundle:
        """Fresh dictionaries for the given hook bindings (one CLT, or one coder per read)."""
        meta = {"reads": list(reads), "writes": list(writes), "model": dict(model_info)}
        if cfg.kind == "clt":
            full = cfg.with_dims(d_in, d_out, n_layers=len(reads))
            full.metadata = {BUNDLE_KEY: meta}
            dicts: Mapping[str, SparseCoder] | CrossLayerTranscoder = CrossLayerTranscoder(
                full, device=device
            )
        else:
            full = cfg.with_dims(d_in, d_out)
            full.metadata = {BUNDLE_KEY: meta}
            dicts = {r: SparseCoder(full, device=device) for r in reads}
        return cls(cfg.kind, dicts, reads, writes, model_info)

    @property
    def cfg(self) -> SparseCoderConfig:
        return self.clt.cfg if self.clt is not None else self.coders[0].cfg  # type: ignore[return-value]

    @property
    def units(self) -> list[str]:
        """One label per unit: the hook it reads."""
        return list(self.reads)

    def hook_names(self) -> list[str]:
        return list(dict.fromkeys(self.reads + self.writes))

    # --- maps ------------------------------------------------------------------------------
    @torch.no_grad()
    def init_from_data(self, xs: Sequence[Tensor], ys: Sequence[Tensor]) -> None:
        if self.clt is not None:
            self.clt.init_from_data(xs, ys)
            return
        for coder, x, y in zip(self.coders, xs, ys, strict=True):
            coder.init_from_data(x, y if self.kind != "sae" else None)  # type: ignore[operator]

    def forward(self, xs: Sequence[Tensor], ys: Sequence[Tensor]) -> BundleOutput:
        """Training forward: xs read at `reads`, ys the true activations at `writes`."""
        if self.clt is not None:
            out = self.clt(xs, ys)
            return BundleOutput(
                out.loss, out.fvu, out.fvu_per_layer, out.l0_per_layer, out.reconstruction
            )
        outs = [
            coder(x) if self.kind == "sae" else coder(x, y)
            for coder, x, y in zip(self.coders, xs, ys, strict=True)
        ]
        fvus = torch.stack([o.fvu for o in outs])
        return BundleOutput(
            torch.stack([o.loss for o in outs]).sum(),
            fvus.sum(),
            fvus.detach(),
            torch.stack([o.l0 for o in outs]).detach(),
            [o.reconstruction for o in outs],
        )

    def encode_unit(self, i: int, x: Tensor) -> SparseCodes:
        """Codes of unit i (a CLT source layer) for its read activation x [N, d_in]."""
        if self.clt is not None:
            return self.clt.encode_layer(i, x)
        return self.coders[i].encode(x)  # type: ignore[operator]

    def decode_unit(self, t: int, codes: Mapping[int, SparseCodes], x: Tensor) -> Tensor:
        """Reconstruction written at `writes[t]` from the codes of the units that write there
        (for a CLT, every source s <= t in its window; else unit t). x: unit t's input."""
        if self.clt is not None:
            return self.clt.decode_layer(t, codes, x)
        return self.coders[t].decode(codes[t], x)  # type: ignore[operator]

    def dead_fraction(self) -> Tensor:
        """[units] fraction of latents that have not fired within the dead-token window."""
        if self.clt is not None:
            return self.clt.dead_mask().float().mean(dim=1)
        return torch.stack([c.dead_mask().float().mean() for c in self.coders])  # type: ignore[operator]

    def set_decoder_norm_to_unit_norm(self) -> None:
        for m in self._dicts():
            m.set_decoder_norm_to_unit_norm()

    def remove_gradient_parallel_to_decoder_directions(self) -> None:
        for m in self._dicts():
            m.remove_gradient_parallel_to_decoder_directions()

    def activations(self) -> list[nn.Module]:
        """The sparse activation module of every unit (to anneal k)."""
        if self.clt is not None:
            return [layer.activation for layer in self.clt.layers]  # type: ignore[union-attr]
        return [c.activation for c in self.coders]  # type: ignore[union-attr]

    @contextlib.contextmanager
    def frozen_statistics(self) -> Iterator[None]:
        """Training-mode forwards inside leave running estimates (BatchTopK thresholds) alone;
        dead-latent counters only change in `forward`, never in encode/decode_unit."""
        acts = self.activations()
        before = [getattr(a, "track_statistics", True) for a in acts]
        for a in acts:
            a.track_statistics = False  # type: ignore[assignment]
        try:
            yield
        finally:
            for a, flag in zip(acts, before, strict=True):
                a.track_statistics = flag  # type: ignore[assignment]

    def _dicts(self) -> list[Any]:
        return [self.clt] if self.clt is not None else list(self.coders)

    # --- files ------------------------------------------------------------------------------
    def metadata(self) -> dict[str, Any]:
        """The bindings every saved dictionary carries (under BUNDLE_KEY)."""
        return {"reads": self.reads, "writes": self.writes, "model": self.model_info}

    def save(self, path: str | os.PathLike[str]) -> Path:
        """One folder: the dictionaries (JSON config + safetensors) with the bindings inside."""
        meta = self.metadata()
        if self.clt is not None:
            self.clt.cfg.metadata = {BUNDLE_KEY: meta}
            return save_dictionaries(self.clt, path)
        for c in self.coders:
            c.cfg.metadata = {BUNDLE_KEY: meta}  # type: ignore[union-attr]
        return save_dictionaries(
            dict(zip(self.reads, self.coders, strict=True)),  # type: ignore[arg-type]
            path,
            metadata={BUNDLE_KEY: meta},
        )

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str],
        *,
        device: torch.device | str | None = None,
        mmap: bool = False,
    ) -> DictionaryBundle:
        """Read a folder written by `save` (or by vlmscope train). `mmap` maps the weights on
        the host instead of reading them (attribution reads only the rows it needs); every
        block is checked against its checksum the first time `check` is asked for it, and all
        of them before the bundle moves to another device."""
        loaded = load_dictionaries(path, device=device, mmap=mmap)
        if isinstance(loaded, SparseCoder):
            raise ModelMismatchError(
                f"{path} holds a single dictionary without hook bindings; load it with "
                "SparseCoder.load, or save runs with DictionaryBundle.save"
            )
        if isinstance(loaded, CrossLayerTranscoder):
            cfg = loaded.cfg
            dicts: Mapping[str, SparseCoder] | CrossLayerTranscoder = loaded
        else:
            cfg = next(iter(loaded.values())).cfg
            dicts = loaded
        meta = cfg.metadata.get(BUNDLE_KEY)
        if not meta:
            raise ModelMismatchError(f"{path}: no hook bindings in the dictionaries' metadata")
        bundle = cls(cfg.kind, dicts, meta["reads"], meta["writes"], meta["model"])
        if isinstance(loaded, CrossLayerTranscoder):
            bundle.tensor_checks.add("clt.", getattr(loaded, "tensor_checks", TensorChecks()))
        else:
            for i, coder in enumerate(bundle.coders):
                checks = getattr(coder, "tensor_checks", TensorChecks())
                bundle.tensor_checks.add(f"coders.{i}.", checks)
        return bundle

    def check(self, name: str, rows: Tensor | None = None) -> None:
        """Verify parameter `name` (e.g. "clt.layers.3.W_dec") of a memory-mapped bundle,
        only the blocks holding `rows` when given; nothing to do for one read eagerly."""
        self.tensor_checks.check(name, rows)

    def check_all(self) -> None:
        """Verify every tensor of a memory-mapped bundle (before it is read as a whole)."""
        self.tensor_checks.check_all()

    def _apply(self, fn: Any, recurse: bool = True) -> DictionaryBundle:
        # .to() / .cuda() / .float() read every tensor: verify a mapped bundle first.
        self.check_all()
        return super()._apply(fn, recurse)

    def check_model(self, adapter: Any) -> None:
        """Raise ModelMismatchError naming what differs between the training model and this one."""
        info = self.model_info
        dims = adapter.dims()
        problems = []
        for key in ("d_model", "n_layers"):
            if key in info.get("dims", {}) and info["dims"][key] != dims[key]:
                problems.append(f"{key}: dictionaries {info['dims'][key]}, model {dims[key]}")
        if info.get("family") and info["family"] != adapter.family:
            problems.append(f"family: dictionaries {info['family']!r}, model {adapter.family!r}")
        from vlmscope.models.hook_points import all_hook_names

        available = set(all_hook_names(adapter))
        missing = [h for h in self.hook_names() if h not in available]
        vision = [h for h in missing if h.startswith(("vision.", "projector."))]
        if vision and adapter.n_vision_layers == 0:
            problems.append(
                f"{vision[:2]} are vision-tower hooks and this is a text-only model (family "
                f"{adapter.family}) with no vision tower"
            )
        elif missing:
            problems.append(f"hook points not in this model: {missing[:4]}")
        # The weights themselves, whatever the metadata says (it may be absent or hand-made).
        d_in, d_out = self.cfg.d_in, self.cfg.d_out or self.cfg.d_in
        for side, names, width in (("reads", self.reads, d_in), ("writes", self.writes, d_out)):
            for h in names:
                want = hook_width(h, dims)
                if want is not None and width != want:
                    problems.append(f"{h}: dictionaries {side} width {width}, model {want}")
                    break
        if problems:
            name = info.get("name", "?")
            raise ModelMismatchError(
                f"dictionaries trained on {name!r} do not match this model: " + "; ".join(problems)
            )
