"""Memory accounting shared by the planners: a model's shapes from its config alone (the model
is built on the meta device, so a 72B config costs no memory and nothing is downloaded), and
per-GPU budgets as named lines of bytes."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

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
        module = _meta_model(config)
        layers = _decoder_layers(module)
        largest = max((sum(p.numel() for p in lay.parameters()) for lay in layers), default=0)
        dtype = str(getattr(text, "dtype", None) or getattr(config, "torch_dtype", None) or "")
        return cls(
            name=model,
            n_params=sum(p.numel() for p in module.parameters()),
            n_layers=int(text.num_hidden_layers),
            d_model=int(text.hidden_size),
            d_ffn=int(getattr(text, "intermediate_size", 4 * text.hidden_size)),
            vocab=int(text.vocab_size),
            largest_layer=int(largest),
            dtype=dtype.replace("torch.", "") or "bfloat16",
        )


def _meta_model(config: Any) -> torch.nn.Module:
    import transformers

    with torch.device("meta"):
        for auto in ("AutoModelForImageTextToText", "AutoModelForCausalLM"):
            try:
                return getattr(transformers, auto).from_config(config)  # type: ignore[no-any-return]
            except ValueError:
                continue
    raise ValueError(f"plan: transformers has no model class for {type(config).__name__}")


def _decoder_layers(module: torch.nn.Module) -> list[torch.nn.Module]:
    """The longest ModuleList of the model (its decoder layers)."""
    lists = [m for m in module.modules() if isinstance(m, torch.nn.ModuleList)]
    return list(max(lists, key=len)) if lists else []


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
