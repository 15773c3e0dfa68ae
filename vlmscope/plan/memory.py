"""Shared memory accounting: named parts on the device or the host, their sum, and a table.

A plan lists every buffer a job keeps (weights, recorded state, caches) and every transient it
builds (activations of one layer, chunks), each with its size in bytes and whether it grows
with the batch. Peaks are sums of the parts that live at the same time; planners model the
phases of their job and report the largest. Sizes come from shapes, never from running the
job, so a 7B model can be planned on a laptop: `meta_model` builds a model from its config on
the meta device (no memory) and `parameter_bytes` sums its parameters by module.
"""

from __future__ import annotations

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
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    config = AutoConfig.from_pretrained(str(path_or_name))
    auto = (
        AutoModelForImageTextToText
        if config.model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES
        else AutoModelForCausalLM
    )
    kw: dict[str, Any] = {}
    if dtype is not None:
        kw["dtype"] = dtype
    elif (
        getattr(config, "dtype", None) is not None
        or getattr(config, "torch_dtype", None) is not None
    ):
        want = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
        kw["dtype"] = getattr(torch, want) if isinstance(want, str) else want
    with torch.device("meta"):
        return auto.from_config(config, **kw)


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
