"""Saving, loading and exporting dictionaries: JSON configs + safetensors, never pickle.

vlmscope layout (read back by `load_dictionaries`):

    one SparseCoder            <dir>/cfg.json + <dir>/sae.safetensors
    per-hookpoint coders       <dir>/config.json (type "sparse_coders", list of hookpoints)
                               <dir>/<hookpoint>/cfg.json + sae.safetensors
    CrossLayerTranscoder       <dir>/config.json (type "clt", the config)
                               <dir>/layer_{l}.safetensors (everything of `clt.layers[l]`)

Every file is written under a temporary name and renamed, and the config last, so a crash
never leaves a torn file and a folder with a config has all its weights. Loading checks every
tensor name and shape against the config and says which file, tensor and shapes disagree.

Corruption is detected, not trained on: the config records, for every safetensors file it
refers to, the CRC-32 of the file's header and of each 16 MiB block of each tensor's bytes
(`checksums`). An eager load (the default) verifies every block and refuses NaN or Inf values,
naming the file and tensor. `mmap=True` maps the files instead (nothing is read until used:
a 7B model's CLT stays on disk but for the rows attribution asks for) and verifies each block
the first time a reader asks for it (`TensorChecks`). Folders written before checksums existed
load without them.

Exporters fold the normalisation scales into the weights (the exported dictionary computes the
same outputs on raw activations) and write:

    circuit-tracer, CLT        config.yaml (model_kind: cross_layer_transcoder, hooks)
                               W_enc_{l}.safetensors: W_enc_{l} [F, d], b_enc_{l} [F], b_dec_{l}
                               [d], threshold_{l} [F] (JumpReLU/BatchTopK)
                               W_dec_{l}.safetensors: W_dec_{l} [F, L - l, d], zero beyond the
                               n_targets window
    circuit-tracer, per-layer  config.yaml (model_kind: transcoder_set, hooks, activation)
                               layer_{l}.safetensors: W_enc [F, d_in], W_dec [F, d_out], b_enc,
                               b_dec, W_skip [d_out, d_in] (applied as x @ W_skip.T), and
                               "activation_function.threshold" [F] for JumpReLU/BatchTopK
    SAELens (SAEs)             cfg.json + sae_weights.safetensors: W_enc [d_in, d_sae], W_dec
                               [d_sae, d_in], b_enc, b_dec, threshold (jumprelu)

BatchTopK exports as JumpReLU with its eval threshold for every latent, which is exactly its
eval behaviour. TopK has no threshold: SAELens "topk" matches it (top-k, then ReLU), but
circuit-tracer 0.5.0 loads a transcoder file without a threshold as ReLU (`load_transcoder_set`,
`load_clt`: every positive pre-activation fires), so TopK dictionaries are refused for it. So is
a CLT with a skip connection: 0.5.0's `load_clt` never reads one from these files (its CLT has
`W_skip` only from other formats), and the export would load without it.

Runs written by `vlmscope train` carry their hook bindings and model in
`cfg.metadata["vlmscope_bundle"]` (reads, writes, model name and dims). The exporters use it
to take a run as `load_dictionaries` returns it, to name the model, and to refuse a run on a
subset of the layers for circuit-tracer, which numbers a model's layers 0..L-1 and expects all.
"""

from __future__ import annotations

import json
import os
import re
import warnings
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from vlmscope import VlmscopeWarning
from vlmscope.dictionaries.activations import BatchTopK, SparseActivation
from vlmscope.dictionaries.clt import CrossLayerTranscoder
from vlmscope.dictionaries.coder import SparseCoder
from vlmscope.dictionaries.config import SparseCoderConfig
from vlmscope.files import write_atomically, write_text_atomically

#: bytes per checksummed block of a tensor (the unit a lazy reader verifies at a time).
CHECKSUM_BLOCK = 16 << 20

FORMAT = "vlmscope.dictionaries"
FORMAT_VERSION = 1
RUN_CONFIG = "config.json"
CODER_CONFIG = "cfg.json"
CODER_WEIGHTS = "sae.safetensors"

PathLike = str | os.PathLike[str]

#: cfg.metadata key under which vlmscope.training records a run's hook bindings and model.
RUN_METADATA = "vlmscope_bundle"
_RESID_MID = re.compile(r"lm\.blocks\.(\d+)\.hook_resid_mid")


class DictionaryFormatError(ValueError):
    """A dictionary folder or file is missing pieces, corrupt, or disagrees with its config."""


# ---------------------------------------------------------------------------- file helpers


def _write_json(path: Path, obj: Any) -> None:
    write_text_atomically(path, json.dumps(obj, indent=2, allow_nan=False) + "\n")


_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}  # fmt: skip
_ST_NAMES = {dtype: name for name, dtype in _ST_DTYPES.items()}


def _tensor_bytes(t: Tensor) -> Any:
    """The raw bytes of a tensor as safetensors stores them (a numpy uint8 view, no copy when
    the tensor is contiguous on the CPU)."""
    return t.detach().reshape(-1).contiguous().cpu().view(torch.uint8).numpy()


def block_crcs(data: Any, block: int = CHECKSUM_BLOCK) -> list[int]:
    """CRC-32 of each `block`-byte block of `data` (one entry for empty data)."""
    acc = _BlockCRC(block)
    acc.feed(memoryview(data).cast("B"))
    return acc.result()


def _safetensors_header(path: Path) -> tuple[bytes, dict[str, Any]]:
    """The header bytes (length prefix included) and parsed header of a safetensors file."""
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise DictionaryFormatError(f"{path} is not a readable safetensors file: too short")
        n = int.from_bytes(prefix, "little")
        if n > 100 << 20:
            raise DictionaryFormatError(
                f"{path} is not a readable safetensors file: a header of {n} bytes"
            )
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DictionaryFormatError(
            f"{path} is not a readable safetensors file: corrupt header ({err})"
        ) from None
    if not isinstance(header, dict):
        raise DictionaryFormatError(f"{path} is not a readable safetensors file: corrupt header")
    return prefix + raw, header


def _write_safetensors(path: Path, tensors: Mapping[str, Tensor]) -> dict[str, Any]:
    """safetensors file of detached, contiguous CPU copies, written atomically; returns its
    checksum record (header CRC and per-tensor block CRCs) for the folder's config."""
    plain = {name: t.detach().to("cpu").contiguous().clone() for name, t in tensors.items()}
    write_atomically(path, lambda tmp: save_file(plain, str(tmp), metadata={"format": FORMAT}))
    raw, _ = _safetensors_header(path)
    return {
        "header_crc32": zlib.crc32(raw),
        "block_bytes": CHECKSUM_BLOCK,
        "tensors": {
            name: block_crcs(_tensor_bytes(t), CHECKSUM_BLOCK) for name, t in plain.items()
        },
    }


def _header_order(specs: Mapping[str, tuple[torch.dtype, Sequence[int]]]) -> list[str]:
    """The order safetensors stores tensors in (by dtype, then name; its own rule, read off a
    file of one-element stand-ins so that it is never restated here)."""
    from safetensors.torch import save

    dummies = {name: torch.zeros(1, dtype=dtype) for name, (dtype, _) in specs.items()}
    raw = save(dummies)
    n = int.from_bytes(raw[:8], "little")
    return [k for k in json.loads(raw[8 : 8 + n]) if k != "__metadata__"]


class _BlockCRC:
    """CRC-32 of each `block`-byte block of a byte stream fed in pieces of any size."""

    def __init__(self, block: int) -> None:
        self.block, self.crcs, self.crc, self.filled = block, [], 0, 0

    def feed(self, data: memoryview) -> None:
        while len(data):
            take = min(len(data), self.block - self.filled)
            self.crc = zlib.crc32(data[:take], self.crc)
            self.filled += take
            data = data[take:]
            if self.filled == self.block:
                self.crcs.append(self.crc)
                self.crc, self.filled = 0, 0

    def result(self) -> list[int]:
        return [*self.crcs, self.crc] if self.filled or not self.crcs else self.crcs


def stream_safetensors(
    path: Path,
    specs: Mapping[str, tuple[torch.dtype, Sequence[int]]],
    pieces: Any,
    metadata: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Write a safetensors file whose tensors arrive in pieces, never whole in memory: the
    header (from `specs`: name -> dtype, shape) first, then, tensor by tensor in the file's
    order, the bytes `pieces(name)` yields (CPU tensors or byte buffers, in row-major order).
    The file is byte for byte what `save_file` writes for the same tensors; it is written
    under a temporary name and renamed. Returns its checksum record, as `_write_safetensors`
    (tensors listed in the order of `specs`: give them in state-dict order to match it)."""
    order = _header_order(specs)
    header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    sizes, offset = {}, 0
    for name in order:
        dtype, shape = specs[name]
        n = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        header[name] = {"dtype": _ST_NAMES[dtype], "shape": [int(d) for d in shape],
                        "data_offsets": [offset, offset + n]}  # fmt: skip
        sizes[name], offset = n, offset + n
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * ((8 - len(text) % 8) % 8)
    raw = len(text).to_bytes(8, "little") + text
    crcs: dict[str, list[int]] = {}

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            f.write(raw)
            for name in order:
                acc, written = _BlockCRC(CHECKSUM_BLOCK), 0
                for piece in pieces(name):
                    data = memoryview(
                        _tensor_bytes(piece) if isinstance(piece, Tensor) else piece
                    ).cast("B")
                    acc.feed(data)
                    f.write(data)
                    written += len(data)
                if written != sizes[name]:
                    raise ValueError(
                        f"{path}: tensor {name!r} got {written} bytes, its shape needs "
                        f"{sizes[name]}"
                    )
                crcs[name] = acc.result()

    write_atomically(path, write)
    in_order = {name: crcs[name] for name in specs}  # the record lists them as `specs` does
    return {"header_crc32": zlib.crc32(raw), "block_bytes": CHECKSUM_BLOCK, "tensors": in_order}


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: not a vlmscope dictionary folder?")
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DictionaryFormatError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(obj, dict):
        raise DictionaryFormatError(f"{path} must hold a JSON object")
    return obj


def _read_header(path: Path, expected_type: str | None) -> dict[str, Any]:
    obj = _read_json(path)
    if obj.get("format") != FORMAT:
        raise DictionaryFormatError(f"{path}: 'format' is {obj.get('format')!r}, not {FORMAT!r}")
    if obj.get("format_version") != FORMAT_VERSION:
        raise DictionaryFormatError(
            f"{path}: format_version {obj.get('format_version')!r} is not supported "
            f"(this vlmscope reads {FORMAT_VERSION})"
        )
    if expected_type is not None and obj.get("type") != expected_type:
        raise DictionaryFormatError(
            f"{path}: type is {obj.get('type')!r}, expected {expected_type!r}"
        )
    return obj


def _read_config(path: Path, obj: dict[str, Any]) -> SparseCoderConfig:
    try:
        return SparseCoderConfig.from_dict(obj["config"])
    except KeyError:
        raise DictionaryFormatError(f"{path} has no 'config'") from None
    except (TypeError, ValueError) as err:
        raise DictionaryFormatError(f"{path}: invalid config: {err}") from None


def _read_safetensors(path: Path) -> dict[str, Tensor]:
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found (the weights its config refers to)")
    try:
        return load_file(str(path))
    except Exception as err:  # safetensors raises its own error types for corrupt headers
        raise DictionaryFormatError(f"{path} is not a readable safetensors file: {err}") from None


def _verify_tensors(
    path: Path, tensors: Mapping[str, Tensor], record: Mapping[str, Any] | None
) -> None:
    """Check the file's header and every tensor block against the checksum `record` (when
    the config has one), and every tensor for NaN/Inf."""
    if record is not None:
        raw, _ = _safetensors_header(path)
        _check_header(path, raw, record)
    for name, t in tensors.items():
        if record is not None:
            want = _recorded_blocks(path, record, name)
            block = int(record["block_bytes"])
            for b, crc in enumerate(block_crcs(_tensor_bytes(t), block)):
                _check_block(path, name, b, block, crc, want)
        check_tensor_finite(path, name, t)


def check_tensor_finite(path: Path | str, name: str, t: Tensor, first_row: int = 0) -> None:
    """Raise DictionaryFormatError naming the file and tensor when `t` holds NaN or Inf."""
    if not t.is_floating_point():
        return
    finite = torch.isfinite(t)
    if bool(finite.all()):
        return
    bad = (~finite).nonzero()[0].tolist()
    n_nan = int(torch.isnan(t).sum())
    n_inf = int((~finite).sum()) - n_nan
    at = [bad[0] + first_row, *bad[1:]] if bad else []
    raise DictionaryFormatError(
        f"{path}: tensor {name!r} holds {n_nan} NaN and {n_inf} Inf values (first at index "
        f"{tuple(at)}); these dictionaries are corrupt or diverged in training"
    )


def _check_header(path: Path, raw: bytes, record: Mapping[str, Any]) -> None:
    want = record.get("header_crc32")
    if want is not None and zlib.crc32(raw) != int(want):
        raise DictionaryFormatError(
            f"{path}: the safetensors header fails its checksum (crc32 {zlib.crc32(raw):08x}, "
            f"recorded {int(want):08x}): the file is corrupt; copy it again or re-train"
        )


def _recorded_blocks(path: Path, record: Mapping[str, Any], name: str) -> list[int]:
    want = record.get("tensors", {}).get(name)
    if not isinstance(want, list):
        raise DictionaryFormatError(f"{path}: no checksum recorded for tensor {name!r}")
    return [int(c) for c in want]


def _check_block(path: Path, name: str, b: int, block: int, crc: int, want: Sequence[int]) -> None:
    if b >= len(want) or crc != want[b]:
        recorded = f"{want[b]:08x}" if b < len(want) else "none"
        raise DictionaryFormatError(
            f"{path}: tensor {name!r} bytes {b * block}-{(b + 1) * block - 1} fail their "
            f"checksum (crc32 {crc:08x}, recorded {recorded}): the file is corrupt; copy it "
            "again or re-train"
        )


@dataclass
class _LazyTensor:
    """One memory-mapped tensor with its recorded block checksums."""

    path: Path
    name: str
    tensor: Tensor
    block: int
    crcs: list[int] | None
    verified: set[int] = field(default_factory=set)


class TensorChecks:
    """Checksum and NaN/Inf checks of memory-mapped tensors, each block verified the first
    time a reader asks for it. Keys are the parameter names in the loaded module."""

    def __init__(self) -> None:
        self.entries: dict[str, _LazyTensor] = {}

    def add(self, prefix: str, other: TensorChecks) -> None:
        for key, entry in other.entries.items():
            self.entries[prefix + key] = entry

    def check(self, key: str, rows: Tensor | None = None) -> None:
        """Verify the blocks of tensor `key` that hold `rows` (indices along its first
        dimension), or all of them; raises DictionaryFormatError naming file and tensor."""
        e = self.entries.get(key)
        if e is None:
            return
        t = e.tensor
        n_bytes = t.numel() * t.element_size()
        n_blocks = max(1, -(-n_bytes // e.block))
        if rows is None or t.dim() == 0 or t.shape[0] == 0:
            blocks = range(n_blocks)
        else:
            row_bytes = n_bytes // t.shape[0]
            r = torch.as_tensor(rows).reshape(-1).cpu().long().unique()
            first, last = (r * row_bytes) // e.block, ((r + 1) * row_bytes - 1) // e.block
            width = int((last - first).max()) + 1 if len(r) else 0
            spans = first[:, None] + torch.arange(width)[None, :]  # rows span <= width blocks
            blocks = spans[spans <= last[:, None]].unique().tolist()
        todo = [b for b in blocks if b not in e.verified]
        if not todo:
            return
        # Blocks are read from the file, not through the map: a block is verified whole, and
        # reading it through the map would keep all of it mapped in the process (a CLT's whole
        # decoder, when its active features fall in every block), where the reader wants a
        # few rows. Read with pread, the block passes through the page cache only.
        per = t.element_size()
        start = t.storage_offset() * per  # the mapped storage starts at the file's byte 0
        buf = bytearray(min(e.block, n_bytes))
        with open(e.path, "rb", buffering=0) as f:
            for b in todo:
                lo, hi = b * e.block, min((b + 1) * e.block, n_bytes)
                view = memoryview(buf)[: hi - lo]
                f.seek(start + lo)
                if f.readinto(view) != hi - lo:
                    raise DictionaryFormatError(f"{e.path}: tensor {e.name!r} is cut short")
                if e.crcs is not None:
                    _check_block(e.path, e.name, b, e.block, zlib.crc32(view), e.crcs)
                if t.is_floating_point():
                    values = torch.frombuffer(buf, dtype=t.dtype, count=(hi - lo) // per)
                    check_tensor_finite(e.path, e.name, values)
                e.verified.add(b)

    def check_all(self) -> None:
        for key in self.entries:
            self.check(key)

    def read_rows(self, key: str, rows: Tensor, col: int | None = None) -> Tensor | None:
        """Rows `rows` of mapped tensor `key` (its index `col` along dim 1 alone when given),
        read from the file into a new tensor; None when `key` is not mapped. Reading through
        the map would leave whole page-cache folios (up to 2 MiB on current Linux) mapped in
        the process for each row; this holds the rows' bytes only. Verify them first."""
        e = self.entries.get(key)
        if e is None:
            return None
        t = e.tensor
        r = torch.as_tensor(rows).reshape(-1).cpu().long()
        per = t.element_size()
        row_bytes = (t.numel() // max(1, t.shape[0])) * per
        shape = list(t.shape[1:])
        skip, size = 0, row_bytes
        if col is not None:
            size = row_bytes // shape[0]
            skip, shape = col * size, shape[1:]
        out = torch.empty(len(r), *shape, dtype=t.dtype)
        raw = out.view(torch.uint8).numpy().reshape(len(r), size) if len(r) else None
        start = t.storage_offset() * per + skip
        with open(e.path, "rb", buffering=0) as f:
            for i, row in enumerate(r.tolist()):
                f.seek(start + row * row_bytes)
                if f.readinto(raw[i]) != size:  # type: ignore[index]
                    raise DictionaryFormatError(f"{e.path}: tensor {e.name!r} is cut short")
        return out


def _map_safetensors(path: Path) -> dict[str, Tensor]:
    """The tensors of `path` as views of a private memory map (read on first touch)."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found (the weights its config refers to)")
    raw, header = _safetensors_header(path)
    size = path.stat().st_size
    storage = torch.UntypedStorage.from_file(str(path), shared=False, nbytes=size)
    start = len(raw)
    out: dict[str, Tensor] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = _ST_DTYPES[info["dtype"]]
            shape = [int(d) for d in info["shape"]]
            lo, hi = (int(o) for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise DictionaryFormatError(f"{path}: corrupt header entry for {name!r}") from None
        per = torch.empty((), dtype=dtype).element_size()
        n = 1
        for d in shape:
            n *= d
        if hi - lo != n * per or start + hi > size or (start + lo) % per:
            raise DictionaryFormatError(f"{path}: tensor {name!r} does not fit the file")
        t = torch.empty(0, dtype=dtype).set_(storage, (start + lo) // per, shape)
        out[name] = t
    return out


def _register_checks(
    path: Path, tensors: Mapping[str, Tensor], record: Mapping[str, Any] | None
) -> TensorChecks:
    """After the names and shapes passed: check the header now, each block on first read."""
    checks = TensorChecks()
    if record is not None:
        raw, _ = _safetensors_header(path)
        _check_header(path, raw, record)
    block = int(record["block_bytes"]) if record is not None else CHECKSUM_BLOCK
    for name, t in tensors.items():
        crcs = _recorded_blocks(path, record, name) if record is not None else None
        checks.entries[name] = _LazyTensor(path, name, t, block, crcs)
    return checks


def _load_checked(
    module: nn.Module, tensors: dict[str, Tensor], path: Path, *, assign: bool = False
) -> None:
    """Copy `tensors` into `module` (or, with `assign`, make them its tensors: a module built
    on the meta device takes memory-mapped tensors without a copy) after checking names and
    shapes against its config."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise DictionaryFormatError(
            f"{path}: tensors do not match the config: missing {missing}, unexpected {unexpected}"
        )
    wrong = [
        f"tensor {name!r} has shape {tuple(tensors[name].shape)} but the config implies "
        f"{tuple(want.shape)}"
        for name, want in expected.items()
        if tensors[name].shape != want.shape
    ]
    if wrong:
        raise DictionaryFormatError(f"{path}: " + "; ".join(wrong))
    module.load_state_dict(tensors, assign=assign)


def _file_dtype(tensors: Mapping[str, Tensor], dtype: torch.dtype | None) -> torch.dtype | None:
    if dtype is not None:
        return dtype
    w = tensors.get("W_enc")
    return w.dtype if w is not None and w.is_floating_point() else None


def _check_hookpoint(name: object) -> str:
    if (
        not isinstance(name, str)
        or not name
        or name in (".", "..", RUN_CONFIG)
        or any(c in name for c in ("/", "\\", "\0"))
    ):
        raise ValueError(
            f"hookpoint {name!r} cannot name a folder (empty, '.', '..', {RUN_CONFIG!r}, or "
            "containing a path separator)"
        )
    return name


def _header(kind: str, **extra: Any) -> dict[str, Any]:
    return {"format": FORMAT, "format_version": FORMAT_VERSION, "type": kind, **extra}


# ---------------------------------------------------------------------------- vlmscope layout


def save_sparse_coder(coder: SparseCoder, path: PathLike) -> Path:
    """Write `path/sae.safetensors`, then `path/cfg.json` (with its checksums); returns the
    folder."""
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    sums = _write_safetensors(folder / CODER_WEIGHTS, coder.state_dict())
    header = _header("sparse_coder", config=coder.cfg.to_dict())
    header["checksums"] = {CODER_WEIGHTS: sums}
    _write_json(folder / CODER_CONFIG, header)
    return folder


def _checksum_record(cfg_path: Path, obj: Mapping[str, Any], file: str) -> Mapping[str, Any] | None:
    """The checksum record of `file` in a config (None for folders written without them)."""
    sums = obj.get("checksums")
    if sums is None:
        return None
    rec = sums.get(file) if isinstance(sums, dict) else None
    if not isinstance(rec, dict) or "block_bytes" not in rec:
        raise DictionaryFormatError(f"{cfg_path}: no valid checksum recorded for {file}")
    return rec


def load_sparse_coder(
    path: PathLike,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    mmap: bool = False,
) -> SparseCoder:
    """Read a folder written by `save_sparse_coder`. `mmap`: map the weights instead of
    reading them (checked on first use through `coder.tensor_checks`)."""
    folder = Path(path)
    cfg_path = folder / CODER_CONFIG
    obj = _read_header(cfg_path, "sparse_coder")
    cfg = _read_config(cfg_path, obj)
    record = _checksum_record(cfg_path, obj, CODER_WEIGHTS)
    file = folder / CODER_WEIGHTS
    if mmap and dtype is None and device is None:
        tensors = _map_safetensors(file)
        with torch.device("meta"):
            coder = SparseCoder(cfg, dtype=_file_dtype(tensors, None))
        _load_checked(coder, tensors, file, assign=True)
        coder.tensor_checks = _register_checks(file, tensors, record)  # type: ignore[assignment]
        return coder
    tensors = _read_safetensors(file)
    coder = SparseCoder(cfg, dtype=_file_dtype(tensors, dtype))
    _load_checked(coder, tensors, file)
    _verify_tensors(file, tensors, record)
    return coder.to(device) if device is not None else coder


def save_clt(clt: CrossLayerTranscoder, path: PathLike) -> Path:
    """Write `path/layer_{l}.safetensors` for every layer, then `path/config.json` (with the
    files' checksums)."""
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    sums = {}
    for layer in clt.layers:
        name = f"layer_{layer.layer}.safetensors"
        sums[name] = _write_safetensors(folder / name, layer.state_dict())
    write_clt_config(folder, clt.cfg, sums)
    return folder


def write_clt_config(folder: Path, cfg: SparseCoderConfig, sums: Mapping[str, Any]) -> None:
    """A CLT folder's config.json, written once every layer file is (with their checksums)."""
    _write_json(folder / RUN_CONFIG, _header("clt", config=cfg.to_dict(), checksums=dict(sums)))


def write_coders_config(
    folder: Path, hookpoints: Sequence[str], metadata: Mapping[str, Any] | None
) -> None:
    """A per-hookpoint run's config.json, written once every coder's folder is."""
    header = _header("sparse_coders", hookpoints=list(hookpoints), metadata=dict(metadata or {}))
    _write_json(folder / RUN_CONFIG, header)


def load_clt(
    path: PathLike,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    mmap: bool = False,
) -> CrossLayerTranscoder:
    """Read a folder written by `save_clt`. `mmap`: map the weights instead of reading them
    (checked on first use through `clt.tensor_checks`, keys `layers.{l}.<tensor>`)."""
    folder = Path(path)
    cfg_path = folder / RUN_CONFIG
    obj = _read_header(cfg_path, "clt")
    cfg = _read_config(cfg_path, obj)
    files = [folder / f"layer_{layer}.safetensors" for layer in range(cfg.n_layers)]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(
            f"{folder}: config.json says n_layers={cfg.n_layers} but {missing} are missing"
        )
    lazy = mmap and dtype is None and device is None
    checks = TensorChecks()
    clt: CrossLayerTranscoder | None = None
    for layer, file in enumerate(files):
        record = _checksum_record(cfg_path, obj, file.name)
        tensors = _map_safetensors(file) if lazy else _read_safetensors(file)
        if clt is None:
            if lazy:
                with torch.device("meta"):
                    clt = CrossLayerTranscoder(cfg, dtype=_file_dtype(tensors, None))
            else:
                clt = CrossLayerTranscoder(cfg, dtype=_file_dtype(tensors, dtype))
        _load_checked(clt.layers[layer], tensors, file, assign=lazy)
        if lazy:
            checks.add(f"layers.{layer}.", _register_checks(file, tensors, record))
        else:
            _verify_tensors(file, tensors, record)
    assert clt is not None
    if lazy:
        clt.tensor_checks = checks  # type: ignore[assignment]
        return clt
    return clt.to(device) if device is not None else clt


def save_dictionaries(
    dictionaries: Mapping[str, SparseCoder] | CrossLayerTranscoder,
    path: PathLike,
    metadata: Mapping[str, Any] | None = None,
) -> Path:
    """Save one run: a CLT, or SparseCoders keyed by hookpoint (one subfolder each).

    `metadata` (JSON-serialisable) goes into the run's config.json for per-hookpoint runs.
    """
    if isinstance(dictionaries, CrossLayerTranscoder):
        return save_clt(dictionaries, path)
    if not isinstance(dictionaries, Mapping) or not dictionaries:
        raise TypeError("save_dictionaries expects a CrossLayerTranscoder or a non-empty mapping")
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    for name, coder in dictionaries.items():
        if not isinstance(coder, SparseCoder):
            raise TypeError(f"dictionaries[{name!r}] is a {type(coder).__name__}, not SparseCoder")
        save_sparse_coder(coder, folder / _check_hookpoint(name))
    write_coders_config(folder, list(dictionaries), metadata)
    return folder


def load_dictionaries(
    path: PathLike,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    mmap: bool = False,
) -> dict[str, SparseCoder] | CrossLayerTranscoder | SparseCoder:
    """Load whatever `path` holds: a run of per-hookpoint coders (dict, in saved order), a
    CLT, or a single SparseCoder folder. `mmap` (with no device or dtype given) maps the
    weights on the host instead of reading them; see the module docstring."""
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder")
    kw: dict[str, Any] = {"device": device, "dtype": dtype, "mmap": mmap}
    if not (folder / RUN_CONFIG).is_file():
        if (folder / CODER_CONFIG).is_file():
            return load_sparse_coder(folder, **kw)
        raise FileNotFoundError(
            f"{folder} has neither {RUN_CONFIG} (a run) nor {CODER_CONFIG} (one dictionary)"
        )
    header = _read_header(folder / RUN_CONFIG, None)
    kind = header.get("type")
    if kind == "clt":
        return load_clt(folder, **kw)
    if kind != "sparse_coders":
        raise DictionaryFormatError(f"{folder / RUN_CONFIG}: unknown type {kind!r}")
    hookpoints = header.get("hookpoints")
    if not isinstance(hookpoints, list) or not hookpoints:
        raise DictionaryFormatError(f"{folder / RUN_CONFIG}: 'hookpoints' must be a list")
    return {_check_hookpoint(name): load_sparse_coder(folder / name, **kw) for name in hookpoints}


# ---------------------------------------------------------------------------- exporters


def _yaml_scalar(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid double-quoted YAML scalar
    raise TypeError(f"cannot write {type(value).__name__} as a YAML scalar")


def _write_yaml(path: Path, values: Mapping[str, object]) -> None:
    """Flat `key: scalar` YAML written by hand (no YAML dependency)."""
    lines = []
    for key, value in values.items():
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            raise ValueError(f"YAML key {key!r} is not a plain identifier")
        lines.append(f"{key}: {_yaml_scalar(value)}")
    write_text_atomically(path, "\n".join(lines) + "\n")


def _cast(t: Tensor, dtype: torch.dtype | None) -> Tensor:
    return t.detach().to(dtype) if dtype is not None else t.detach()


def _threshold(activation: SparseActivation, what: str) -> Tensor | None:
    """Eval threshold of an activation for export; checks BatchTopK has estimated one."""
    if isinstance(activation, BatchTopK) and int(activation.num_updates) == 0:
        raise ValueError(f"{what}: BatchTopK threshold not estimated yet (no training steps)")
    return activation.export_threshold()


def _folded_coder(coder: SparseCoder) -> dict[str, Tensor]:
    """W_enc, b_enc, W_dec, b_dec, W_skip of `coder` acting on raw (unnormalised) tensors.

    Pre-activations are unchanged, so thresholds and top-k choices carry over exactly.
    """
    s_in = float(coder._scale(coder.input_scale))
    s_out = float(coder._scale(coder.output_scale))
    out = {
        "W_enc": coder.W_enc.detach() * s_in,
        "b_enc": coder.b_enc.detach().clone(),
        "W_dec": coder.W_dec.detach() / s_out,
        "b_dec": coder.b_dec.detach() / s_out,
    }
    if coder.W_skip is not None:
        out["W_skip"] = coder.W_skip.detach() * (s_in / s_out)
    return out


def _run_metadata(cfg: SparseCoderConfig) -> dict[str, Any]:
    """The training run's bindings and model info (empty for dictionaries built by hand)."""
    meta = cfg.metadata.get(RUN_METADATA)
    return meta if isinstance(meta, dict) else {}


def _model_layers(cfg: SparseCoderConfig) -> int | None:
    """Number of layers of the model the run was trained on, when recorded."""
    model = _run_metadata(cfg).get("model")
    n = model.get("dims", {}).get("n_layers") if isinstance(model, dict) else None
    return n if isinstance(n, int) else None


def _layer_of(hook: object) -> int:
    """Layer index of `lm.blocks.{i}.hook_resid_mid`, where circuit-tracer's features read."""
    match = _RESID_MID.fullmatch(hook) if isinstance(hook, str) else None
    if match is None:
        raise ValueError(
            f"circuit-tracer transcoders read lm.blocks.<i>.hook_resid_mid, got {hook!r}"
        )
    return int(match.group(1))


def _check_every_layer(layers: list[int], n_model: int | None) -> None:
    """circuit-tracer numbers the model's layers 0..L-1 and loads one dictionary for each:
    exporting a subset would silently shift every layer index."""
    want = list(range(n_model if n_model is not None else len(layers)))
    if layers != want:
        of = f" of the {n_model}-layer model" if n_model is not None else ""
        raise ValueError(
            f"circuit-tracer needs a transcoder for every layer 0..L-1{of}; these dictionaries "
            f"are for layers {layers}: train on every layer (no --layers) to export"
        )


def export_circuit_tracer(
    dictionaries: CrossLayerTranscoder
    | Sequence[SparseCoder]
    | Mapping[int, SparseCoder]
    | Mapping[str, SparseCoder],
    path: PathLike,
    *,
    feature_input_hook: str = "hook_resid_mid",
    feature_output_hook: str = "hook_mlp_out",
    dtype: torch.dtype | None = None,
    extra_config: Mapping[str, str | int | float | bool] | None = None,
) -> Path:
    """Write a CLT, or per-layer transcoders (layer 0..L-1), in circuit-tracer's layout.

    Transcoders come as a list (index = layer), a mapping layer -> transcoder, or a mapping
    `lm.blocks.{i}.hook_resid_mid` -> transcoder (a `vlmscope train` run as `load_dictionaries`
    returns it). Dictionaries trained on a subset of the model's layers are refused.
    The hook names are circuit-tracer's (TransformerLens-style) names, written as given.
    `extra_config` adds flat keys to config.yaml (e.g. model_name).
    """
    folder = Path(path)
    config: dict[str, object]
    if isinstance(dictionaries, CrossLayerTranscoder):
        _check_clt_layers(dictionaries.cfg)
        folder.mkdir(parents=True, exist_ok=True)
        _export_ct_clt(dictionaries, folder, dtype)
        config = {
            "model_kind": "cross_layer_transcoder",
            "feature_input_hook": feature_input_hook,
            "feature_output_hook": feature_output_hook,
        }
    else:
        coders = _layer_list(dictionaries)
        if coders[0].cfg.activation == "topk":
            raise ValueError(
                "circuit-tracer 0.5.0 loads a transcoder without a threshold as ReLU (every "
                "positive pre-activation fires), so a TopK transcoder set would not compute "
                "what it computes here: train it with --sae.activation jumprelu (or batchtopk, "
                "whose eval threshold exports as JumpReLU)"
            )
        folder.mkdir(parents=True, exist_ok=True)
        _export_ct_transcoders(coders, folder, dtype)
        config = {
            "model_kind": "transcoder_set",
            "feature_input_hook": feature_input_hook,
            "feature_output_hook": feature_output_hook,
        }
        config["activation"] = "jumprelu"
    config.update(extra_config or {})
    _write_yaml(folder / "config.yaml", config)
    return folder


def _check_clt_layers(cfg: SparseCoderConfig) -> None:
    if cfg.skip_connection:
        raise ValueError(
            "circuit-tracer 0.5.0's load_clt reads no skip connection from a CLT folder (its "
            "W_skip comes only from other formats), so this CLT would load without its skip "
            "and reconstruct something else: export a CLT trained without "
            "--sae.skip-connection"
        )
    if cfg.activation == "topk":
        raise ValueError(
            "circuit-tracer's CrossLayerTranscoder supports only ReLU and JumpReLU, and a TopK "
            "CLT has no threshold form, so it cannot be exported exactly: train it with "
            "--sae.activation jumprelu (or batchtopk, whose eval threshold exports as JumpReLU)"
        )
    reads = _run_metadata(cfg).get("reads")
    layers = [_layer_of(r) for r in reads] if reads else list(range(cfg.n_layers))
    _check_every_layer(layers, _model_layers(cfg))


def _layer_list(
    dictionaries: Sequence[SparseCoder] | Mapping[int, SparseCoder] | Mapping[str, SparseCoder],
) -> list[SparseCoder]:
    if isinstance(dictionaries, Mapping):
        by_layer = {
            key if isinstance(key, int) else _layer_of(key): coder
            for key, coder in dictionaries.items()
        }
        if len(by_layer) != len(dictionaries):
            raise ValueError(f"two transcoders for one layer: {list(dictionaries)}")
        layers = sorted(by_layer)
        coders = [by_layer[k] for k in layers]
    else:
        coders = list(dictionaries)
        layers = list(range(len(coders)))
    if not coders:
        raise ValueError("no transcoders to export")
    for i, coder in enumerate(coders):
        if not isinstance(coder, SparseCoder) or coder.cfg.kind != "transcoder":
            raise TypeError(f"layer {i}: circuit-tracer transcoder sets take transcoders")
    reads = _run_metadata(coders[0].cfg).get("reads")
    if reads and not isinstance(dictionaries, Mapping):
        layers = [_layer_of(r) for r in reads]  # a list of a run's coders, in the run's order
    _check_every_layer(layers, _model_layers(coders[0].cfg))
    first = coders[0].cfg
    for i, coder in enumerate(coders):
        c = coder.cfg
        same = (c.num_latents, c.d_in, c.d_out, c.activation, c.skip_connection) == (
            first.num_latents,
            first.d_in,
            first.d_out,
            first.activation,
            first.skip_connection,
        )
        if not same or (c.activation == "topk" and c.k != first.k):
            raise ValueError(
                f"layer {i}: every transcoder of a set needs the same sizes, activation, k and "
                "skip connection"
            )
    return coders


def _export_ct_transcoders(
    coders: list[SparseCoder], folder: Path, dtype: torch.dtype | None
) -> None:
    for layer, coder in enumerate(coders):
        tensors = _folded_coder(coder)
        threshold = _threshold(coder.activation, f"layer {layer}")
        if threshold is not None:
            tensors["activation_function.threshold"] = threshold
        tensors = {name: _cast(t, dtype) for name, t in tensors.items()}
        _write_safetensors(folder / f"layer_{layer}.safetensors", tensors)


def _export_ct_clt(clt: CrossLayerTranscoder, folder: Path, dtype: torch.dtype | None) -> None:
    cfg = clt.cfg
    n_layers = cfg.n_layers
    layers = list(clt.layers)
    s_in = [float(clt._scale(layer.input_scale)) for layer in layers]
    s_out = [float(clt._scale(layer.output_scale)) for layer in layers]
    for l_idx, layer in enumerate(layers):
        enc = {
            f"W_enc_{l_idx}": layer.W_enc.detach() * s_in[l_idx],
            f"b_enc_{l_idx}": layer.b_enc.detach().clone(),
            f"b_dec_{l_idx}": layer.b_dec.detach() / s_out[l_idx],
        }
        threshold = _threshold(layer.activation, f"layer {l_idx}")
        if threshold is not None:
            enc[f"threshold_{l_idx}"] = threshold
        f, n_out, d = layer.W_dec.shape
        w_dec = layer.W_dec.new_zeros(f, n_layers - l_idx, d)
        for j in range(n_out):
            w_dec[:, j] = layer.W_dec.detach()[:, j] / s_out[l_idx + j]
        _write_safetensors(
            folder / f"W_enc_{l_idx}.safetensors", {k: _cast(v, dtype) for k, v in enc.items()}
        )
        _write_safetensors(
            folder / f"W_dec_{l_idx}.safetensors", {f"W_dec_{l_idx}": _cast(w_dec, dtype)}
        )


def _model_name(cfg: SparseCoderConfig) -> str | None:
    name = cfg.metadata.get("model_name")
    if name is None:
        model = _run_metadata(cfg).get("model")
        name = model.get("name") if isinstance(model, dict) else None
    return name if isinstance(name, str) else None


def export_saelens(
    coders: SparseCoder | Mapping[str, SparseCoder],
    path: PathLike,
    *,
    hook_name: str | None = None,
    hook_names: Mapping[str, str] | None = None,
    model_name: str | None = None,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write SAEs in SAELens' layout: `cfg.json` + `sae_weights.safetensors`.

    One SAE goes into `path`; a mapping hookpoint -> SAE into `path/<hookpoint>/`, with hook
    name `hook_names[hookpoint]` (default: the hookpoint itself). A single SAE's hook name is
    `hook_name`, else `cfg.metadata["hook_name"]`. The model name defaults to
    `cfg.metadata["model_name"]`, else the model a `vlmscope train` run was trained on.

    For families TransformerLens supports (`dictionaries/transformer_lens.py`) the config gets
    the TransformerLens hook name and the Hugging Face model id, so `HookedSAETransformer`
    attaches it; vlmscope's names stay under `metadata` (`vlmscope_hook_name`,
    `vlmscope_model_name`). Elsewhere a warning, and `metadata.transformer_lens_note`, say why
    SAELens can load the SAE but not hook the model.
    """
    folder = Path(path)
    if isinstance(coders, Mapping):
        for key, coder in coders.items():
            name = (hook_names or {}).get(key, key)
            export_saelens(
                coder,
                folder / _check_hookpoint(key),
                hook_name=name,
                model_name=model_name,
                dtype=dtype,
            )
        return folder
    coder = coders
    cfg = coder.cfg
    if cfg.kind != "sae":
        raise ValueError(f"SAELens export is for SAEs; this dictionary is a {cfg.kind}")
    hook = hook_name if hook_name is not None else cfg.metadata.get("hook_name")
    if not isinstance(hook, str):
        raise ValueError("export_saelens: pass hook_name (or set cfg.metadata['hook_name'])")
    folded = _folded_coder(coder)
    # SAELens computes (x - b_dec) @ W_enc + b_enc: W_enc is [d_in, d_sae].
    tensors = {
        "W_enc": folded["W_enc"].T,
        "W_dec": folded["W_dec"],
        "b_enc": folded["b_enc"],
        "b_dec": folded["b_dec"],
    }
    threshold = _threshold(coder.activation, "export_saelens")
    if threshold is not None:
        tensors["threshold"] = threshold
    tensors = {name: _cast(t, dtype) for name, t in tensors.items()}
    ours = model_name if model_name is not None else _model_name(cfg)
    model = _run_metadata(cfg).get("model")
    family = model.get("family") if isinstance(model, dict) else None
    from vlmscope.dictionaries.transformer_lens import prepends_bos, transformer_lens_names

    tl_hook, hf_id, why = transformer_lens_names(hook, family, ours)
    if why:
        warnings.warn(f"SAELens export of {hook}: {why}", category=VlmscopeWarning, stacklevel=2)
    meta: dict[str, Any] = {
        "sae_lens_version": "6.0.0",  # the config layout written (metadata block)
        "model_name": hf_id or ours,
        "hook_name": tl_hook or hook,
        "hook_head_index": None,
        "prepend_bos": prepends_bos(family),
        "vlmscope_model_name": ours,
        "vlmscope_hook_name": hook,
        "vlmscope_family": family,
        "transformer_lens": bool(tl_hook and hf_id),
    }
    if why:
        meta["transformer_lens_note"] = why
    data = model.get("data") if isinstance(model, dict) else None
    data = data if isinstance(data, dict) else {}
    if isinstance(data.get("ctx_len"), int):
        # What SAELens' activation store uses by default when it re-reads activations.
        meta["context_size"] = data["ctx_len"]
    if isinstance(data.get("dataset"), str):
        meta["dataset_path"] = data["dataset"]
    sae_cfg: dict[str, Any] = {
        "architecture": "topk" if cfg.activation == "topk" else "jumprelu",
        "d_in": cfg.d_in,
        "d_sae": cfg.num_latents,
        "dtype": str(tensors["W_enc"].dtype).removeprefix("torch."),
        "device": "cpu",
        # Also at the top level, as SAELens < 6 configs have them.
        "model_name": meta["model_name"],
        "hook_name": meta["hook_name"],
        "hook_head_index": None,
        **{k: meta[k] for k in ("context_size", "dataset_path") if k in meta},
        "activation_fn": "topk" if cfg.activation == "topk" else "relu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",  # the scale is folded into the weights
        "finetuning_scaling_factor": False,
        "reshape_activations": "hook_z" if hook.endswith("attn.hook_z") else "none",
        "metadata": meta,
    }
    if cfg.activation == "topk":
        sae_cfg["k"] = cfg.k
        sae_cfg["activation_fn_kwargs"] = {"k": cfg.k}
    folder.mkdir(parents=True, exist_ok=True)
    _write_safetensors(folder / "sae_weights.safetensors", tensors)
    _write_json(folder / "cfg.json", sae_cfg)
    return folder
