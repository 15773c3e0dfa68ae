"""The attribution planner: device and host memory of `attribute`, part by part, the largest
batch that fits, and the time to expect.

Symbols: N positions, d the model width, L layers, H heads, a the model dtype's bytes, units
s = 1..S (dictionary layers) with A_s active features, U_s distinct ones and n_s targets,
F latents, b the dictionary dtype's bytes, c the batch (copies of the prompt replayed at
once), R = logits + explored features (rows), C = sum A_s + (L + 1) N (columns).

Device, while the backward passes run (context.py):

    weights          all parameters (less MLPs, vision tower, embeddings with --offload)
    patterns         L H N^2 a                       (recorded attention, model dtype)
    outputs, errors  (L + S + 1) N d 4               (fp32: MLP outputs, errors, embeddings)
    decoder rows     sum_s (U_s + 1) n_s d b         (read from the files into one copy on
                                                      the device, a CPU too; with --offload
                                                      only one target's rows at a time)
    skip matrices    S d^2 4                         (when the dictionaries have them)
    feature index    sum_s A_s (8 + 1)
    per copy         c N d max(5 a, a + 3 * 4)        (one layer's live set in the replay:
                                                      the attention block's 5 vectors, or a
                                                      norm's float32 ones; nothing is kept
                                                      per copy; see per_copy_bytes)
    rows             c C 4                           (the rows being filled)
    chunk            P (k d b [+ k d 4] + 8 c k)      (feature-column dot products over P
                                                      positions, P as many as fit 256 MB at
                                                      context.py's own count; k: features
                                                      per position; see _chunk_need)

Recording (one forward) adds one unit's encoder F d b and pre-activations N F (b + 4), and
eager attention's scores H N^2 (4 + a). Host: the rows R C 4 (a memory-mapped file above a
budget), the influence estimate's block R^2 4, the assembled adjacency (R + (L + 1) N)^2 4,
and, with --offload cpu, the decoder rows and the offloaded weights. Page cache: the encoders
S F d b, memory-mapped and read whole (every feature is scored); decoder rows are read from the
files (pread), not through the map, which would leave each row's page-cache folio (up to
2 MiB) mapped in the process, most of the decoder. Nothing here is fitted: every part is
counted from the code; benchmarks/attribution_memory.py checks the sum against measured peaks
at 1, 2 and 4 layers of the LLaVA-7B-shaped model on a CPU.

Time: FLOPs of the record forward (2 params N), of the replay and each backward (attention's
value and output projections and pattern mixing, c copies), and of the edge products (c A n d
per batch), at an assumed device throughput; bytes moved per batch (decoder rows from the host
with --offload) at an assumed link bandwidth. Rates are flags: the figures are an estimate.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from vlmscope.plan.memory import (
    GB,
    MemoryPlan,
    available_device_bytes,
    dtype_size,
    fmt_bytes,
    meta_model,
    parameter_bytes,
)

#: per copy and position, the vectors of width d one replayed layer holds at once (see
#: `per_copy_bytes`): the attention block's, in the model's dtype, and a frozen norm's, in float32
#: beside the residual.
ATTENTION_VECTORS = 5
NORM_FP32_VECTORS = 3
#: bound of the feature-column chunk (context.py's chunk_bytes).
CHUNK_BYTES = 256 << 20
#: room left free on the device for the allocator's fragmentation and the framework.
DEVICE_MARGIN = 0.06


@dataclass
class Rates:
    """Assumed throughputs for the time estimate (H100-class defaults)."""

    flops: float = 300e12  # sustained matmul FLOP/s in the model's dtype
    memory_bandwidth: float = 2.0e12  # device memory bytes/s
    link_bandwidth: float = 20e9  # host <-> device bytes/s (PCIe)
    disk_bandwidth: float = 2e9  # memory-mapped dictionary reads, bytes/s


@dataclass
class AttributionShape:
    """Everything the plan depends on: model, dictionaries, prompt and budget of features."""

    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    d_head: int
    act_bytes: int
    model_bytes: int
    #: parameters the replay never runs (MLPs, vision tower, projector, embeddings, unembedding)
    unused_bytes: int
    mlp_bytes: int
    unit_layers: list[int]
    n_out: list[int]
    latents: int
    dict_bytes: int
    d_in: int
    skip: bool
    positions: int
    active: list[int]
    unique: list[int]
    max_feature_nodes: int
    n_logits: int = 10
    vision_tokens: int = 0
    vision_heads: int = 0
    #: input nodes past the sequence: vision features cross-attention reads (Mllama).
    cross_inputs: int = 0
    estimated: bool = True  # active/unique counts are estimates (before recording)

    @property
    def n_units(self) -> int:
        return len(self.unit_layers)

    @property
    def n_active(self) -> int:
        return sum(self.active)

    @property
    def n_cols(self) -> int:
        return self.n_active + (self.n_layers + 1) * self.positions + self.cross_inputs

    @property
    def n_rows(self) -> int:
        return self.n_logits + min(self.max_feature_nodes, self.n_active)

    def decoder_cache_bytes(self) -> float:
        d = self.d_model
        return float(
            sum(
                (u + 1) * n * d * self.dict_bytes
                for u, n in zip(self.unique, self.n_out, strict=True)
            )
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---------------------------------------------------------------------------- shapes


def parse_dictionary_spec(spec: str) -> dict[str, Any] | None:
    """`clt:F:k[:n_targets][:dtype]` or `transcoder:F:k[:dtype]` (hypothetical dictionaries on
    every layer), or None when `spec` is not one."""
    m = re.fullmatch(r"(clt|transcoder):(\d+):(\d+)((?::\w+)*)", spec)
    if m is None:
        return None
    kind, f, k, rest = m.group(1), int(m.group(2)), int(m.group(3)), m.group(4)
    out: dict[str, Any] = {"kind": kind, "latents": f, "k": k, "n_targets": 0, "dtype": None}
    for item in [x for x in rest.split(":") if x]:
        if item.isdigit():
            out["n_targets"] = int(item)
        else:
            out["dtype"] = item
    return out


def dictionary_config(path_or_spec: str, n_layers: int) -> dict[str, Any]:
    """kind, latents, k, n_targets, dtype, skip, unit layers of a dictionary folder (its
    config only, no weights) or of a spec (`parse_dictionary_spec`)."""
    spec = parse_dictionary_spec(path_or_spec)
    if spec is not None:
        spec.update(skip=False, layers=list(range(n_layers)))
        return spec
    folder = Path(path_or_spec)
    run = folder / "config.json"
    if not run.is_file():
        raise FileNotFoundError(
            f"{folder}: no config.json; give a dictionary folder or a spec like clt:32768:32"
        )
    header = json.loads(run.read_text())
    if header.get("type") == "clt":
        cfg = header["config"]
        weights = folder / "layer_0.safetensors"
    else:
        first = header.get("hookpoints", [None])[0]
        sub = json.loads((folder / str(first) / "cfg.json").read_text())
        cfg = sub["config"]
        weights = folder / str(first) / "sae.safetensors"
    meta = cfg.get("metadata", {}).get("vlmscope_bundle", {})
    reads = meta.get("reads") or [f"lm.blocks.{i}.x" for i in range(cfg.get("n_layers") or 1)]
    layers = [int(r.split(".")[2]) for r in reads]
    return {
        "kind": cfg.get("kind", "clt"),
        "latents": int(cfg.get("num_latents") or cfg["expansion_factor"] * cfg["d_in"]),
        "k": int(cfg.get("k", 32)),
        "n_targets": int(cfg.get("n_targets") or 0),
        "dtype": _safetensors_dtype(weights),
        "skip": bool(cfg.get("skip_connection", False)),
        "layers": layers,
    }


def _safetensors_dtype(path: Path) -> str | None:
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n))
        names = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}
        return names.get(header.get("W_enc", {}).get("dtype"))
    except (OSError, ValueError):
        return None


def shape_from_config(
    model: str | os.PathLike[str],
    dictionaries: str,
    positions: int,
    *,
    dtype: str | None = None,
    max_feature_nodes: int = 4096,
    n_logits: int = 10,
    replaced: int | None = None,
    unique_fraction: float = 1.0,
) -> AttributionShape:
    """The shape of attributing a `positions`-long prompt with `dictionaries` (a folder or a
    spec) on `model` (a local model folder or a hub name: its config only). Active features:
    k per replaced position and unit (TopK exactly; the expected L0 otherwise); distinct
    features: min(F, active) * unique_fraction (1: the worst case)."""
    from vlmscope.models.registry import resolve_adapter

    tdtype = _torch_dtype(dtype)
    net = meta_model(model, tdtype)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        adapter = resolve_adapter(net)
    return _shape(adapter, net, dictionaries, positions, max_feature_nodes, n_logits, replaced,
                  unique_fraction)  # fmt: skip


def _torch_dtype(name: str | None) -> torch.dtype | None:
    if name is None:
        return None
    from vlmscope.models.hooked import _dtype

    return _dtype(name)


def _shape(
    adapter: Any,
    net: torch.nn.Module,
    dictionaries: str,
    positions: int,
    max_feature_nodes: int,
    n_logits: int,
    replaced: int | None,
    unique_fraction: float,
) -> AttributionShape:
    from vlmscope.attribution.offload import replay_unused_modules

    n_layers = adapter.n_layers
    dc = dictionary_config(dictionaries, n_layers)
    layers = dc["layers"]
    s = len(layers)
    n_t = dc["n_targets"] if dc["kind"] == "clt" else 1
    n_out = [min(n_t or s, s - i) for i in range(s)]
    act = next(net.parameters()).element_size()
    rep = positions if replaced is None else replaced
    active = [rep * dc["k"]] * s
    unique = [max(1, int(min(dc["latents"], a) * unique_fraction)) for a in active]
    vcfg = getattr(net.config, "vision_config", None)
    vision_tokens = 0
    if vcfg is not None and getattr(vcfg, "image_size", None) and getattr(vcfg, "patch_size", None):
        vision_tokens = (int(vcfg.image_size) // int(vcfg.patch_size)) ** 2 + 1
    return AttributionShape(
        n_layers=n_layers,
        d_model=adapter.d_model,
        n_heads=adapter.n_heads,
        n_kv_heads=adapter.n_kv_heads,
        d_head=adapter.d_head,
        act_bytes=act,
        model_bytes=parameter_bytes([net]),
        unused_bytes=parameter_bytes(replay_unused_modules_of(adapter, net, replay_unused_modules)),
        mlp_bytes=parameter_bytes([adapter.part(i, "mlp") for i in range(n_layers)]),
        unit_layers=layers,
        n_out=n_out,
        latents=dc["latents"],
        dict_bytes=dtype_size(dc["dtype"] or "float32"),
        d_in=adapter.d_model,
        skip=dc["skip"],
        positions=positions,
        active=active,
        unique=unique,
        max_feature_nodes=max_feature_nodes,
        n_logits=n_logits,
        vision_tokens=vision_tokens,
        vision_heads=int(getattr(vcfg, "num_attention_heads", 0) or 0) if vcfg else 0,
    )


def replay_unused_modules_of(adapter: Any, net: torch.nn.Module, fn: Any) -> list[torch.nn.Module]:
    class _V:  # the part of HookedVLM that replay_unused_modules reads
        pass

    v = _V()
    v.adapter = adapter  # type: ignore[attr-defined]
    v.model = net  # type: ignore[attr-defined]
    return fn(v)


def shape_from_context(ctx: Any, max_feature_nodes: int, n_logits: int) -> AttributionShape:
    """The shape of an attribution already recorded: counts are exact."""
    from vlmscope.attribution.offload import replay_unused_modules

    vlm, w = ctx.vlm, ctx.weights
    a = vlm.adapter
    return AttributionShape(
        n_layers=ctx.n_layers,
        d_model=a.d_model,
        n_heads=a.n_heads,
        n_kv_heads=a.n_kv_heads,
        d_head=a.d_head,
        act_bytes=torch.empty((), dtype=vlm.dtype).element_size(),
        model_bytes=parameter_bytes([vlm.model]),
        unused_bytes=parameter_bytes(replay_unused_modules(vlm)),
        mlp_bytes=parameter_bytes([a.part(i, "mlp") for i in range(ctx.n_layers)]),
        unit_layers=list(ctx.unit_layers),
        n_out=[w.n_out(s) for s in range(ctx.n_units)],
        latents=int(w.module(0).W_enc.shape[0]),
        dict_bytes=torch.empty((), dtype=w.dtype).element_size(),
        d_in=w.d_in,
        skip=w.skip_weight(0) is not None,
        positions=int(ctx.embeddings.shape[0]),
        active=[u.count for u in ctx.units],
        unique=[len(u.unique) for u in ctx.units],
        max_feature_nodes=max_feature_nodes,
        n_logits=n_logits,
        cross_inputs=ctx.n_inputs - int(ctx.embeddings.shape[0]),
        estimated=False,
    )


# ---------------------------------------------------------------------------- plans


def plan(
    shape: AttributionShape, batch: int, offload: str | None, device_type: str = "cuda"
) -> MemoryPlan:
    """The parts live at attribution's peak for `batch` copies and `offload` (None, "cpu",
    "disk"); on a CPU device, "device" parts are host memory too."""
    sh = shape
    n, d, a, L = sh.positions, sh.d_model, sh.act_bytes, sh.n_layers
    p = MemoryPlan(batch=batch)
    weights = sh.model_bytes - (sh.unused_bytes if offload in ("cpu", "disk") else 0)
    p.add("model weights", weights, "device", "less MLPs/vision/embeddings" if offload else "")
    p.add("attention patterns", L * sh.n_heads * n * n * a, "device", "recorded, model dtype")
    p.add("MLP outputs, errors, embeddings (fp32)", (L + sh.n_units + 1) * n * d * 4, "device")
    cache = sh.decoder_cache_bytes()
    if offload is None:
        p.add("decoder rows of active features", cache, "device", "cached once")
    else:
        one = max((u + 1) * d * sh.dict_bytes for u in sh.unique)
        p.add("decoder rows, one target at a time", one, "device", "streamed")
    if sh.skip:
        p.add("skip matrices (fp32)", sh.n_units * d * sh.d_in * 4, "device")
    p.add("feature index", sh.n_active * 9 + sh.n_units * n * 8, "device")
    per_copy = per_copy_bytes(sh)
    p.add("replay / backward activations, per copy", batch * per_copy, "device",
          "one layer at a time", per_copy=True)  # fmt: skip
    p.add("edge rows being filled", batch * sh.n_cols * 4, "device", per_copy=True)
    p.add("feature-column chunk", _chunk_need(sh, batch), "device")
    # host
    rows = sh.n_rows * sh.n_cols * 4
    p.add("edge rows (all explored)", rows, "host", "a memory-mapped file above the budget")
    p.add("rows of one batch, copied to the host", batch * sh.n_cols * 4, "host", per_copy=True)
    n_graph = min(sh.max_feature_nodes, sh.n_active) + (L + 1) * n + sh.n_logits
    p.add("assembled adjacency", n_graph * n_graph * 4, "host", "after the backward passes")
    p.add("influence estimate block", sh.n_rows * sh.n_rows * 4, "host")
    p.add("feature table", sh.n_active * 36, "host")
    # Encoders are read whole through the map (every feature is scored); decoder rows are read
    # from the files (TensorChecks.read_rows), through the page cache, into the rows above.
    enc = sh.n_units * sh.latents * sh.d_in * sh.dict_bytes
    p.add(DICTIONARY_PAGES, enc, "cache", "encoders, memory-mapped, reclaimable")
    if offload == "cpu":
        p.add("decoder rows of active features", cache, "host", "pinned")
        p.add("offloaded weights", sh.unused_bytes, "host")
    elif offload == "disk":
        p.add("offloaded weights", sh.unused_bytes, "disk")
    p.choices.update(offload=offload, device_type=device_type)
    return p


#: the plan part of the dictionary pages attribution maps into the process.
DICTIONARY_PAGES = "dictionary pages mapped"


def per_copy_bytes(sh: AttributionShape) -> float:
    """Bytes one copy of the prompt adds while a layer is replayed: nothing is kept across
    layers, so it is the larger of two live sets, per position, of vectors of width d.

    - The attention block: the residual stream, the normed input, the values, the mixed values
      (made contiguous for the output projection) and the projection's output, in the model's
      dtype: ATTENTION_VECTORS a.
    - A frozen norm (freeze.py's linear replay): the residual, and its input cast to float32,
      times the recorded scale, times the weight: a + NORM_FP32_VECTORS 4 (in float32 the cast
      is no copy: 2 vectors of 4 bytes).

    The backward's live set is smaller: the gradient, its float32 position-major copy for the
    edge products (context._position_major) and one projection's gradient."""
    n, d, a = sh.positions, sh.d_model, sh.act_bytes
    norm = a + (NORM_FP32_VECTORS if a != 4 else NORM_FP32_VECTORS - 1) * 4
    return float(n * d * max(ATTENTION_VECTORS * a, norm))


def _chunk_need(sh: AttributionShape, batch: int) -> float:
    """Bytes of one chunk of `context._feature_columns` for `batch` copies: it takes as many
    positions as fit CHUNK_BYTES at its own (conservative) count of 4 d (n + 2 k) + 4 n k per
    position, and allocates per position the gathered decoder rows k d b, their float32 copy
    when b != 4, the products and their transposed copy 2 * 4 n k (gradients are sliced when
    every position holds features, the case of a full prompt)."""
    d, b = sh.d_model, sh.dict_bytes
    kmax = max(1, max(a // max(1, sh.positions) for a in sh.active) if sh.active else 1)
    counted = 4 * d * (batch + 2 * kmax) + 4 * batch * kmax
    step = min(sh.positions, max(1, CHUNK_BYTES // counted))
    real = kmax * d * b + (kmax * d * 4 if b != 4 else 0) + 2 * 4 * batch * kmax
    return float(step * real)


def record_peak(shape: AttributionShape) -> float:
    """Device bytes at the peak of the recording forward (one copy)."""
    sh = shape
    n, d, a, L = sh.positions, sh.d_model, sh.act_bytes, sh.n_layers
    patterns = L * sh.n_heads * n * n * a
    kept = (L + sh.n_units + 1) * n * d * 4
    scores = sh.n_heads * n * n * (4 + a) * 2
    vision = sh.vision_heads * sh.vision_tokens**2 * 4 * 3
    encode = sh.latents * sh.d_in * sh.dict_bytes + n * sh.latents * (sh.dict_bytes + 4) * 2
    return sh.model_bytes + patterns + kept + max(scores, vision, encode)


def peak(p: MemoryPlan, shape: AttributionShape, where: str = "device") -> float:
    if where == "device":
        return max(p.total("device"), record_peak(shape))
    return p.total(where)  # type: ignore[arg-type]


@dataclass
class Choice:
    batch: int
    offload: str | None
    plan: MemoryPlan
    device_peak: float
    host_peak: float
    fits: bool
    seconds: dict[str, float] = field(default_factory=dict)


def choose(
    shape: AttributionShape,
    device_budget: float,
    *,
    batch: int | str = "auto",
    offload: str | None = "auto",
    host_budget: float | None = None,
    max_batch: int = 512,
    device_type: str = "cuda",
    rates: Rates | None = None,
) -> Choice:
    """The batch and offload for `device_budget` bytes: with `batch="auto"`, the largest
    batch (at most what the rows need, and `max_batch`) whose peak fits; with
    `offload="auto"`, the least offloading (none, then cpu, then disk) that fits a batch of
    at least min(64, rows), else the one that fits the largest batch."""
    wanted = max(1, min(max_batch, max(shape.n_logits, shape.n_rows - shape.n_logits)))
    usable = device_budget * (1 - DEVICE_MARGIN)
    options = [None, "cpu", "disk"] if offload == "auto" else [offload]
    tried: list[Choice] = []
    for off in options:
        base = plan(shape, 0, off, device_type).total("device")
        per_copy = plan(shape, 1, off, device_type).total("device") - base
        if batch == "auto":
            b = min(wanted, int((usable - base) // per_copy)) if usable > base else 0
        else:  # as asked, but never more copies than there are rows to compute
            b = min(int(batch), max(1, shape.n_logits, shape.n_rows - shape.n_logits))
        p = plan(shape, max(b, 1), off, device_type)
        dev, host = peak(p, shape), p.total("host")
        fits = b >= 1 and dev <= usable and (host_budget is None or host <= host_budget)
        tried.append(Choice(max(b, 1), off, p, dev, host, fits))
        if fits and (batch != "auto" or b >= min(wanted, 64)):
            break
    fitting = [c for c in tried if c.fits]
    best = (
        tried[-1]
        if not fitting
        else fitting[-1]
        if fitting[-1] is tried[-1]
        else max(fitting, key=lambda c: c.batch)
    )
    best.seconds = expected_seconds(shape, best.batch, best.offload, rates or Rates())
    best.plan.choices.update(offload=best.offload, fits=best.fits)
    return best


def expected_seconds(
    shape: AttributionShape, batch: int, offload: str | None, rates: Rates
) -> dict[str, float]:
    """Seconds per phase at the assumed rates (an estimate, see `Rates`)."""
    sh = shape
    n, d, L = sh.positions, sh.d_model, sh.n_layers
    kv = sh.n_kv_heads * sh.d_head
    n_batches = math.ceil(sh.n_logits / batch) + math.ceil(
        min(sh.max_feature_nodes, sh.n_active) / batch
    )
    record = 2 * (sh.model_bytes / sh.act_bytes) * n + 4 * L * n * n * d
    record += 2 * n * sh.latents * sh.d_in * sh.n_units
    attn = 2 * n * d * (2 * d + 2 * kv) + 2 * sh.n_heads * n * n * sh.d_head
    replay = attn * L * batch
    backward = (2 * n * d * (d + kv) + 2 * sh.n_heads * n * n * sh.d_head) * L * batch
    targets = sum(a * t for a, t in zip(sh.active, sh.n_out, strict=True))
    edges_bytes = batch * n * d * 4 * sum(sh.n_out) + targets * d * (sh.dict_bytes + 4)
    moved = sh.decoder_cache_bytes() if offload else 0.0
    link = rates.disk_bandwidth if offload == "disk" else rates.link_bandwidth
    rows_host = sh.n_rows * sh.n_cols * 4
    updates = max(1, min(sh.max_feature_nodes, sh.n_active) // (4 * batch))
    return {
        "record": record / rates.flops + sh.decoder_cache_bytes() / rates.disk_bandwidth,
        "replay": replay / rates.flops,
        "backward passes": n_batches
        * (backward / rates.flops + edges_bytes / rates.memory_bandwidth),
        "decoder rows moved": n_batches * moved / link,
        "influence estimates": updates * 2 * rows_host / 10e9,
    }


# ---------------------------------------------------------------------------- after recording


def plan_after_record(
    ctx: Any,
    max_feats: int,
    n_logits: int,
    batch: int | str,
    offload: str | None,
    memory_gb: float | None,
) -> MemoryPlan:
    """The batch and offload for an attribution whose recording is done, from its exact
    feature counts: within `memory_gb` of device memory, or what is free now plus what the
    recording already holds (model, patterns, recorded outputs)."""
    shape = shape_from_context(ctx, max_feats, n_logits)
    device = ctx.device
    if memory_gb is not None:
        budget = memory_gb * GB
    else:
        held = plan(shape, 0, None, device.type)
        already = sum(
            p.bytes
            for p in held.parts
            if p.name in ("model weights", "attention patterns", "feature index")
            or p.name.startswith("MLP outputs")
        )
        budget = available_device_bytes(device) + already
    c = choose(shape, budget, batch=batch, offload=offload, device_type=device.type)
    if not c.fits:
        raise MemoryError(
            f"attribution does not fit: {c.device_peak / GB:.1f} GB needed on {device} at "
            f"batch {c.batch} (offload {c.offload or 'none'}), {budget / GB:.1f} GB available; "
            + ("try " if c.offload == "disk" else "try --offload disk, ")
            + ("a smaller --batch-size, " if batch != "auto" else "")
            + "a shorter prompt or fewer dictionary layers"
        )
    c.plan.choices["summary"] = (
        f"batch size {c.batch}, offload {c.offload or 'none'}: planned peak "
        f"{fmt_bytes(c.device_peak)} of {fmt_bytes(budget)} on {device}"
    )
    return c.plan


def with_counts(shape: AttributionShape, active: list[int], unique: list[int]) -> AttributionShape:
    return replace(shape, active=list(active), unique=list(unique), estimated=False)
