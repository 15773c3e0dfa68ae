"""Shared memory accounting: named parts on the device or the host, their sum, and a table.

A plan lists every buffer a job keeps (weights, recorded state, caches) and every transient it
builds (activations of one layer, chunks), each with its size in bytes and whether it grows
with the batch. Peaks are sums of the parts that live at the same time; planners model the
phases of their job and report the largest. Sizes come from shapes, never from running the
job, so a 7B model can be planned on a laptop: `meta_model` builds a model from its config on
the meta device (no memory) and `parameter_bytes` sums its parameters by module.

The training planner's half (`ModelShape`, `Budget`) reads a model's shapes off its config the
same way and adds per-GPU budgets as named lines of bytes in GiB (what `nvidia-smi` prints).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

#: planners print and take sizes in GB of 10^9 bytes (what GPU datasheets say: "80 GB").
GB = 1e9

#: "cache": the host's page cache (memory-mapped files read): reclaimable, so shown apart.
Where = Literal["device", "host", "cache", "disk"]


@dataclass
class Part:
    """One buffer or transient of a plan."""

    name: str
    bytes: float
    where: Where
    note: str = ""
    #: the part is this many bytes per copy (batch element) times the batch.
    per_copy: bool = False


@dataclass
class MemoryPlan:
    """The parts live at a job's peak, and what the plan chose."""

    parts: list[Part] = field(default_factory=list)
    batch: int = 1
    choices: dict[str, Any] = field(default_factory=dict)

    def add(
        self, name: str, nbytes: float, where: Where, note: str = "", per_copy: bool = False
    ) -> None:
        if nbytes > 0:
            self.parts.append(Part(name, float(nbytes), where, note, per_copy))

    def total(self, where: Where) -> float:
        return sum(p.bytes for p in self.parts if p.where == where)

    def table(self) -> str:
        """The parts as a text table, device first, sizes in GB."""
        lines = [f"{'part':<46} {'where':<7} {'GB':>9}  note"]
        for where in ("device", "host", "cache", "disk"):
            for p in self.parts:
                if p.where == where:
                    note = (f"{p.note}; " if p.note else "") + (
                        f"batch {self.batch}" if p.per_copy else ""
                    )
                    lines.append(
                        f"{p.name:<46} {where:<7} {p.bytes / GB:>9.3f}  {note.rstrip('; ')}"
                    )
        for where in ("device", "host", "cache", "disk"):
            if any(p.where == where for p in self.parts):
                lines.append(f"{'total ' + where:<46} {'':<7} {self.total(where) / GB:>9.3f}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "batch": self.batch,
            "choices": self.choices,
            "totals_gb": {w: self.total(w) / GB for w in ("device", "host", "cache", "disk")},  # type: ignore[arg-type]
            "parts": [asdict(p) for p in self.parts],
        }


def fmt_bytes(n: float) -> str:
    """`1.23 GB` or `45.6 MB` (10^9 and 10^6 bytes)."""
    return f"{n / GB:.2f} GB" if n >= 0.1 * GB else f"{n / 1e6:.1f} MB"


def dtype_size(dtype: torch.dtype | str) -> int:
    if isinstance(dtype, str):
        from vlmscope.models.hooked import _dtype

        dtype = _dtype(dtype) or torch.float32
    return torch.empty((), dtype=dtype).element_size()


def meta_model(path_or_name: str | os.PathLike[str], dtype: torch.dtype | None = None) -> nn.Module:
    """The HF model of a config (local folder or hub name) on the meta device: every
    parameter's shape and dtype, no memory and no weights read."""
    from transformers import AutoConfig

    return meta_model_from_config(AutoConfig.from_pretrained(str(path_or_name)), dtype)


def meta_model_from_config(config: Any, dtype: torch.dtype | None = None) -> nn.Module:
    """`meta_model` for a config object already read (e.g. from a lone config.json)."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    auto = (
        AutoModelForImageTextToText
        if config.model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES
        else AutoModelForCausalLM
    )
    kw: dict[str, Any] = {}
    want = dtype or getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if want is not None:
        kw["dtype"] = getattr(torch, want) if isinstance(want, str) else want
    try:
        with torch.device("meta"):
            return auto.from_config(config, **kw)  # type: ignore[no-any-return]
    except ValueError as e:
        raise ValueError(
            f"plan: transformers has no model class for {type(config).__name__}: {e}"
        ) from None


def parameter_bytes(modules: Iterable[nn.Module]) -> int:
    """Bytes of the distinct parameters of `modules` (tied weights counted once)."""
    seen: dict[int, int] = {}
    for m in modules:
        for p in m.parameters():
            seen[id(p)] = p.numel() * p.element_size()
    return sum(seen.values())


def available_host_bytes() -> float:
    """MemAvailable of /proc/meminfo (Linux), else half of physical memory."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return float(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2
    except (ValueError, OSError):
        return 8 * GB


def available_device_bytes(device: torch.device) -> float:
    """Free memory on `device` for new tensors: the driver's free memory plus what torch's
    caching allocator holds unused (CUDA), or the host's available memory (CPU)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return float(free + cached)
    return available_host_bytes()


# --- the training planner's model shapes and per-GPU budgets -------------------------------
GiB = 1024**3

DTYPE_BYTES = {"float32": 4, "fp32": 4, "bfloat16": 2, "bf16": 2, "float16": 2, "fp16": 2}


@dataclass
class ModelShape:
    """What the planners need to know about a model, read off its config."""

    name: str
    n_params: int
    n_layers: int
    d_model: int
    d_ffn: int
    vocab: int
    #: parameters of the largest decoder layer (what FSDP gathers at once).
    largest_layer: int
    dtype: str
    #: parameters outside the sharded decoder layers (embeddings, head, vision tower,
    #: projector, Mllama's cross-attention layers): FSDP's root unit, gathered whole for
    #: every forward.
    root_unit: int = 0

    @classmethod
    def from_config(cls, model: str) -> ModelShape:
        """`model`: a folder or config.json (a hub model's config.json suffices), a zoo / toy
        name, or a config shipped in plan/configs (qwen2_5_vl_72b). The model is built on the
        meta device to count its parameters exactly."""
        from transformers import AutoConfig

        from vlmscope.training.sources import resolve_model_path

        shipped = Path(__file__).parent / "configs" / model
        path = shipped if (shipped / "config.json").is_file() else Path(resolve_model_path(model))
        if path.is_file():
            raw = json.loads(path.read_text())
            config = AutoConfig.for_model(**raw)
        elif (path / "config.json").is_file():
            config = AutoConfig.from_pretrained(path)
        else:
            raise ValueError(
                f"plan: {model!r} is not a model folder or config.json; give a local path "
                "(its config.json is enough) or a zoo name"
            )
        text = getattr(config, "text_config", None) or config
        module = meta_model_from_config(config)
        layers = _decoder_layers(module, int(text.num_hidden_layers))
        # layers a forward without images skips stay in the root unit (shard_frozen_model)
        skipped = set(getattr(text, "cross_attention_layers", None) or ())
        sizes = [
            sum(p.numel() for p in lay.parameters())
            for i, lay in enumerate(layers)
            if i not in skipped
        ]
        n_params = sum(p.numel() for p in module.parameters())
        dtype = str(getattr(text, "dtype", None) or getattr(config, "torch_dtype", None) or "")
        return cls(
            name=model,
            n_params=n_params,
            n_layers=int(text.num_hidden_layers),
            d_model=int(text.hidden_size),
            d_ffn=int(getattr(text, "intermediate_size", 4 * text.hidden_size)),
            vocab=int(text.vocab_size),
            largest_layer=max(sizes, default=0),
            dtype=dtype.replace("torch.", "") or "bfloat16",
            root_unit=n_params - sum(sizes),
        )


def _decoder_layers(module: torch.nn.Module, n_layers: int) -> list[torch.nn.Module]:
    """The language model's decoder layers, the units --shard-model fsdp shards: the
    ModuleList of the text config's length outside the vision tower (Qwen2-VL's 32 vision
    blocks outnumber its 28 decoder layers, so the longest list is not it), else the longest."""
    lists = [(name, m) for name, m in module.named_modules() if isinstance(m, torch.nn.ModuleList)]
    text = [m for name, m in lists if len(m) == n_layers and not _in_vision_tower(name)]
    if text:
        return list(text[0])
    return list(max((m for _, m in lists), key=len)) if lists else []


def _in_vision_tower(name: str) -> bool:
    return any(
        part in ("visual", "vision_tower", "vision_model", "vision") for part in name.split(".")
    )


@dataclass
class Line:
    """One row of a per-GPU budget."""

    what: str
    bytes: float
    note: str = ""


@dataclass
class Budget:
    """Per-GPU memory as named lines, grouped."""

    groups: dict[str, list[Line]] = field(default_factory=dict)

    def add(self, group: str, what: str, n_bytes: float, note: str = "") -> None:
        self.groups.setdefault(group, []).append(Line(what, float(n_bytes), note))

    def total(self, group: str | None = None) -> float:
        rows = self.groups.get(group, []) if group else [x for g in self.groups.values() for x in g]
        return sum(x.bytes for x in rows)

    def table(self) -> str:
        out = [f"{'group':<11} {'what':<38} {'size':>10}  note"]
        for g, rows in self.groups.items():
            for x in rows:
                out.append(f"{g:<11} {x.what:<38} {human(x.bytes):>10}  {x.note}")
        out.append(f"{'total':<11} {'':<38} {human(self.total()):>10}")
        return "\n".join(out)

    def to_dict(self) -> dict[str, Any]:
        return {
            g: [{"what": x.what, "bytes": int(x.bytes), "note": x.note} for x in rows]
            for g, rows in self.groups.items()
        } | {"total_bytes": int(self.total())}


def human(n_bytes: float) -> str:
    """Bytes as GiB, MiB or KiB, whichever reads best."""
    for unit, size in (("GiB", GiB), ("MiB", 1024**2), ("KiB", 1024)):
        if n_bytes >= size or unit == "KiB":
            return f"{n_bytes / size:.2f} {unit}"
    return f"{n_bytes:.0f} B"
