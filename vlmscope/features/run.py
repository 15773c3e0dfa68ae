"""`vlmscope features`: feature dashboards for every feature of a dictionary run.

Phases: check the output folder and the dictionaries (before the model loads); load the model;
stream the dataset through it (one forward per batch feeds every unit's encoder) into one
`FeatureCollector` per unit, saving each newly referenced image once; checkpoint every
`checkpoint_every` batches to DIR/.progress so an interrupted run resumes where it stopped; at
the end compute each feature's top output logits (its decoder writes, summed over the layers it
writes to, through the unembedding) and write the cards (see `features/store.py`).
"""

from __future__ import annotations

import json
import re
import shutil
import sys
import time
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from vlmscope.attribution.export import center_crop_box, patch_label, store_image
from vlmscope.dictionaries import SparseCodes
from vlmscope.features.collect import HIST_EDGES, Batch, FeatureCollector
from vlmscope.features.store import FORMAT, INDEX, VERSION, shard_name
from vlmscope.files import FolderLockedError, lock_folder, write_atomically, write_text_atomically

PROGRESS = ".progress"
_LAYER = re.compile(r"lm\.blocks\.(\d+)\.")


class FeaturesError(ValueError):
    """A bad argument, folder or checkpoint; the message names the culprit."""


@dataclass
class FeaturesOptions:
    """Settings of a run; those in `_SAME_ON_RESUME` must match to resume a checkpoint."""

    examples: int = 10
    before: int = 12
    after: int = 3
    batch_size: int = 8
    ctx_len: int = 256
    max_tokens: int = 0
    split: str = "train"
    seed: int = 0
    schema: str = "auto"
    image_root: str = ""
    columns: list[str] = field(default_factory=list)
    include_special_tokens: bool = False
    shard_size: int = 256
    top_logits: int = 10
    checkpoint_every: int = 50


_SAME_ON_RESUME = ("examples", "before", "after", "ctx_len", "split", "seed", "schema",
                   "include_special_tokens", "columns")  # fmt: skip


@dataclass
class FeaturesResult:
    out: Path
    tokens: int
    seconds: float
    units: list[dict[str, Any]]
    resumed_from_tokens: int = 0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else float("nan")


def unit_key(bundle: Any, i: int) -> str:
    """The key a graph's feature nodes use for unit i: the model layer of a transcoder or CLT
    layer (graphs number features by layer), the hook name of an SAE."""
    m = _LAYER.match(bundle.reads[i])
    return m.group(1) if m is not None and bundle.kind != "sae" else bundle.reads[i]


class _ImageCache:
    """The last images read from the dataset by row id, so the examples of a batch can save
    their sample's pictures (the batches carry processed pixels only)."""

    def __init__(self, size: int = 512) -> None:
        self.items: OrderedDict[str, list[Any]] = OrderedDict()
        self.size = size

    def wrap(self, records: Any) -> Iterator[Any]:
        for r in records:
            imgs = r.pictures()  # in token order, as the masks number them
            if imgs:
                self.items[r.row_id] = list(imgs)
                self.items.move_to_end(r.row_id)
                while len(self.items) > self.size:
                    self.items.popitem(last=False)
            yield r


def collect_features(
    model: str,
    dictionaries: str,
    dataset: str,
    out: str | Path,
    opts: FeaturesOptions | None = None,
    *,
    device: str | None = None,
    dtype: str | None = None,
    progress: bool = True,
    vlm: Any = None,
    overwrite: bool = False,
) -> FeaturesResult:
    """Run the phases above; returns where the cards are and how fast it went. A folder that
    holds a finished run's cards is refused unless `overwrite` (an unfinished one resumes)."""
    opts = opts or FeaturesOptions()
    out = Path(out)
    _check_options(opts)
    if out.exists() and not out.is_dir():
        raise FeaturesError(f"--out {out} is a file, not a folder")
    out.mkdir(parents=True, exist_ok=True)
    try:  # one writer per output folder, for the whole run
        lock = lock_folder(out, "features folder")
    except FolderLockedError as e:
        raise FeaturesError(f"{e} (another `vlmscope features` into this --out?)") from None
    try:
        finished = (out / INDEX).is_file() and not (out / PROGRESS / "state.json").exists()
        if finished and not overwrite:
            raise FeaturesError(
                f"--out {out} holds the cards of a finished run ({INDEX}); give another --out, "
                "or --overwrite to replace them"
            )
        return _collect(model, dictionaries, dataset, out, opts, device, dtype, progress, vlm)
    finally:
        lock.release()


def _collect(
    model: str,
    dictionaries: str,
    dataset: str,
    out: Path,
    opts: FeaturesOptions,
    device: str | None,
    dtype: str | None,
    progress: bool,
    vlm: Any,
) -> FeaturesResult:
    from vlmscope.data.processing import SampleEncoder, SkipCounter, batches, encode_stream
    from vlmscope.models.hooked import HookedVLM
    from vlmscope.training.bundle import DictionaryBundle, ModelMismatchError
    from vlmscope.training.config import TrainConfig
    from vlmscope.training.trainer import open_training_data, resolve_model_path

    try:
        bundle = DictionaryBundle.load(dictionaries)
    except (OSError, ValueError) as e:
        raise FeaturesError(f"DICTIONARIES {dictionaries}: {e}") from e
    settings = {"model": model, "dictionaries": str(dictionaries), "dataset": dataset,
                **{k: getattr(opts, k) for k in _SAME_ON_RESUME}}  # fmt: skip
    state = _load_progress(out, settings, bundle)
    if vlm is None:
        try:
            path = resolve_model_path(model)
            vlm = HookedVLM.from_pretrained(path, device=device, dtype=dtype)
        except (OSError, ValueError) as e:
            raise FeaturesError(f"cannot load model {model!r}: {e}") from e
    try:
        bundle.check_model(vlm.adapter)
    except ModelMismatchError as e:
        raise FeaturesError(str(e)) from None
    bundle = bundle.to(vlm.device).eval()
    n_units = len(bundle.units)
    n_feats = bundle.cfg.num_latents
    collectors = [FeatureCollector(n_feats, opts.examples, opts.before, opts.after)
                  for _ in range(n_units)]  # fmt: skip
    rows, samples, image_refs = 0, 0, {}
    if state is not None:
        tensors, info = state
        for i, c in enumerate(collectors):
            c.load_state(
                {k.split("/", 1)[1]: v for k, v in tensors.items() if k.startswith(f"{i}/")}
            )
        rows, samples, image_refs = info["rows"], info["samples"], info["image_refs"]
    start_tokens = collectors[0].tokens
    cfg = TrainConfig(model=model, dataset=dataset, split=opts.split, seed=opts.seed,
                      schema=opts.schema, image_root=opts.image_root, columns=opts.columns,
                      max_steps=1)  # fmt: skip
    try:
        data = open_training_data(cfg)
    except (OSError, ValueError, ImportError, RuntimeError) as e:
        raise FeaturesError(f"cannot open dataset {dataset!r}: {e}") from e
    if rows:
        data = data.skip(rows)
    cache = _ImageCache()
    encoder = SampleEncoder(
        vlm.processor,
        opts.ctx_len,
        vlm.adapter.image_token_ids(),
        videos=vlm.adapter.capabilities.video,
    )
    pad = vlm.tokenizer.pad_token_id
    stream = encode_stream(cache.wrap(data), encoder, SkipCounter())
    proc = getattr(vlm.processor, "image_processor", None)
    bar = tqdm(total=opts.max_tokens or None, initial=start_tokens, unit="tok", unit_scale=True,
               disable=not progress, desc="features")  # fmt: skip
    t0 = time.perf_counter()
    n_batches = left_out = 0
    with torch.no_grad():
        for batch in batches(stream, opts.batch_size, pad if pad is not None else 0,
                             masks=vlm.masks):  # fmt: skip
            if opts.max_tokens and collectors[0].tokens >= opts.max_tokens:
                break
            last = batch.positions[-1] if batch.positions else -1
            after = last + 1 if last >= 0 else rows  # the dataset row to resume from
            if vlm.skipped_hooks(batch.inputs, bundle.reads):
                left_out += 1  # no activations where the model skips layers (Mllama's
                rows = after  # cross-attention layers without an image)
                continue
            batch = batch.to(vlm.device)
            masks = batch.masks
            counted = masks.select("all", include_special=opts.include_special_tokens)
            _, acts = vlm.run_with_cache(batch.inputs, names=bundle.reads, masks=masks)
            b, t = counted.shape
            ids = batch.inputs["input_ids"].cpu().reshape(-1)
            cells = masks.patch_map.cpu().reshape(-1, 4)
            cells = torch.where(masks.image.cpu().reshape(-1, 1), cells, -1)
            sample = (samples + torch.arange(b)).repeat_interleave(t)
            position = torch.arange(t).repeat(b)
            for i, name in enumerate(bundle.reads):
                x = acts[name].reshape(b * t, -1).float()
                codes: SparseCodes = bundle.encode_unit(i, x)
                collectors[i].update(
                    Batch(
                        codes.values,
                        codes.indices,
                        counted.cpu().reshape(-1),
                        ids,
                        cells,
                        sample,
                        position,
                        t,
                    )
                )
            _save_new_images(out, collectors, samples, batch, cache, image_refs, proc)
            samples += b
            rows = after
            n_batches += 1
            bar.update(int(counted.sum()))
            if n_batches % opts.checkpoint_every == 0:
                _save_progress(out, settings, collectors, rows, samples, image_refs)
    bar.close()
    seconds = time.perf_counter() - t0
    if left_out:
        print(vlm.left_out_note(left_out), file=sys.stderr)
    if collectors[0].tokens == 0:
        raise FeaturesError(f"dataset {dataset!r} gave no tokens to collect features on")
    units = _write_cards(out, vlm, bundle, collectors, image_refs, opts, settings)
    shutil.rmtree(out / PROGRESS, ignore_errors=True)
    return FeaturesResult(out, collectors[0].tokens - start_tokens, seconds, units, start_tokens)


def _check_options(opts: FeaturesOptions) -> None:
    for name in ("examples", "batch_size", "ctx_len", "shard_size", "checkpoint_every"):
        if getattr(opts, name) < 1:
            raise FeaturesError(f"--{name.replace('_', '-')} must be >= 1")
    for name in ("before", "after", "max_tokens", "top_logits"):
        if getattr(opts, name) < 0:
            raise FeaturesError(f"--{name.replace('_', '-')} must be >= 0")


def _save_new_images(
    out: Path,
    collectors: list[FeatureCollector],
    first: int,
    batch: Any,
    cache: _ImageCache,
    refs: dict[str, Any],
    proc: Any,
) -> None:
    """Store the pictures of this batch's samples that kept examples now point at (once)."""
    wanted: set[tuple[int, int]] = set()
    for c in collectors:
        wanted.update(tuple(p) for p in c.new_images.tolist())
    pm = batch.masks.patch_map.cpu()
    img_mask = batch.masks.image.cpu()
    for s, img in sorted(wanted):
        key = f"{s}/{img}"
        if key in refs:
            continue
        b = s - first
        pics = cache.items.get(batch.row_ids[b], [])
        if img >= len(pics):
            continue  # the reader's images are gone (not expected): the card shows text only
        pic, video = pics[img]
        cells = pm[b][img_mask[b] & (pm[b, :, 0] == img)]
        grids = {}
        for view in cells[:, 1].unique().tolist():
            v = cells[(cells[:, 1] == view) & (cells[:, 2] >= 0) & (cells[:, 3] >= 0)]
            if len(v):
                grids[str(view)] = [int(v[:, 2].max()) + 1, int(v[:, 3].max()) + 1]
        region = center_crop_box(pic.size, proc) if proc is not None else None
        refs[key] = {
            "file": store_image(pic, out),
            "width": pic.width,
            "height": pic.height,
            "region": list(region) if region is not None else [0, 0, pic.width, pic.height],
            "grids": grids,
            **({"video": True} if video else {}),  # every view a frame, cropped alike
        }


def _box(ref: dict[str, Any], view: int, row: int, col: int) -> list[float] | None:
    """Pixel box (x0, y0, x1, y1) of a patch cell in the stored image (tiles and high-
    resolution views are taken to cover the whole image, as the heatmaps do; a video's views
    are its frames, each processed as the first, which is the stored picture)."""
    grid = ref["grids"].get(str(view))
    if grid is None or row < 0 or col < 0:
        return None
    whole = [0, 0, ref["width"], ref["height"]]
    x0, y0, x1, y1 = ref["region"] if view == 0 or ref.get("video") else whole
    ch, cw = (y1 - y0) / grid[0], (x1 - x0) / grid[1]
    return [x0 + col * cw, y0 + row * ch, x0 + (col + 1) * cw, y0 + (row + 1) * ch]


# --- checkpoints ----------------------------------------------------------------------------------
def _save_progress(
    out: Path,
    settings: dict[str, Any],
    collectors: list[FeatureCollector],
    rows: int,
    samples: int,
    refs: dict[str, Any],
) -> None:
    folder = out / PROGRESS
    tensors = {f"{i}/{k}": v.contiguous() for i, c in enumerate(collectors)
               for k, v in c.state().items()}  # fmt: skip
    stamp = str(time.time_ns())
    meta = {"stamp": stamp}
    write_atomically(
        folder / "state.safetensors", lambda tmp: save_file(tensors, str(tmp), metadata=meta)
    )
    info = {"settings": settings, "rows": rows, "samples": samples, "image_refs": refs,
            "stamp": stamp}  # fmt: skip
    write_text_atomically(folder / "state.json", json.dumps(info))


def _load_progress(
    out: Path, settings: dict[str, Any], bundle: Any
) -> tuple[dict[str, Any], dict[str, Any]] | None:
    folder = out / PROGRESS
    if not (folder / "state.json").exists():
        return None
    try:
        info = json.loads((folder / "state.json").read_text())
        from safetensors import safe_open

        with safe_open(str(folder / "state.safetensors"), framework="pt") as f:
            stamp = (f.metadata() or {}).get("stamp")
        tensors = load_file(str(folder / "state.safetensors"))
    except (OSError, ValueError) as e:
        raise FeaturesError(
            f"{folder} holds an unreadable checkpoint ({e}); delete it to start over"
        ) from e
    if stamp != info.get("stamp"):
        raise FeaturesError(f"{folder}: state.json and state.safetensors are from different saves")
    saved = info.get("settings", {})
    diff = [f"{k}: {saved.get(k)!r} -> {v!r}" for k, v in settings.items() if saved.get(k) != v]
    if diff:
        raise FeaturesError(
            f"{out} holds an unfinished run with other settings ({'; '.join(diff)}); use the "
            f"same settings to resume it, or another --out"
        )
    if (
        tensors.get("0/top_act") is not None
        and tensors["0/top_act"].shape[0] != bundle.cfg.num_latents
    ):
        raise FeaturesError(f"{folder}: checkpoint is for another dictionary width")
    return tensors, info


# --- cards ----------------------------------------------------------------------------------------
@torch.no_grad()
def write_directions(bundle: Any, i: int, device: Any) -> torch.Tensor:
    """[F, d] what each feature of unit i adds to the residual stream at activation 1, summed
    over every layer it writes to (decode of a one-hot code minus decode of no code, so the
    dictionaries' normalisation scales are applied as in a forward pass)."""
    n = bundle.cfg.num_latents
    total = None
    one = SparseCodes(torch.ones(n, 1, device=device), torch.arange(n, device=device)[:, None], n)
    zero = SparseCodes(torch.zeros(n, 1, device=device), one.indices, n)
    targets = range(i, len(bundle.units)) if bundle.clt is not None else [i]
    d_in = bundle.cfg.d_in
    x = torch.zeros(n, d_in, device=device)
    for t in targets:
        if bundle.clt is not None:
            layer = bundle.clt.layers[i]
            if t - i >= layer.W_dec.shape[1]:
                break
        codes = {s: (one if s == i else zero) for s in range(t + 1)}
        d = bundle.decode_unit(t, codes, x) - bundle.decode_unit(t, {s: zero for s in codes}, x)
        total = d if total is None else total + d
    assert total is not None
    return total.float()


def _top_logits(vlm: Any, bundle: Any, i: int, k: int) -> tuple[torch.Tensor, ...] | None:
    writes = bundle.writes[i]
    if not re.search(r"hook_resid_|mlp\.hook_out|attn\.hook_out", writes) or k == 0:
        return None  # not a residual-stream write: no direct path to the logits
    w_u = vlm.adapter.unembed().weight.detach().float()
    dirs = write_directions(bundle, i, w_u.device)
    pos_v, pos_i, neg_v, neg_i = [], [], [], []
    for s in range(0, len(dirs), 1024):
        logits = dirs[s : s + 1024] @ w_u.T
        logits = logits - logits.mean(-1, keepdim=True)
        kk = min(k, logits.shape[1])
        p = logits.topk(kk, -1)
        q = (-logits).topk(kk, -1)
        pos_v.append(p.values.cpu()), pos_i.append(p.indices.cpu())
        neg_v.append(-q.values.cpu()), neg_i.append(q.indices.cpu())
    return torch.cat(pos_v), torch.cat(pos_i), torch.cat(neg_v), torch.cat(neg_i)


def _write_cards(
    out: Path,
    vlm: Any,
    bundle: Any,
    collectors: list[FeatureCollector],
    refs: dict[str, Any],
    opts: FeaturesOptions,
    settings: dict[str, Any],
) -> list[dict[str, Any]]:
    tok = vlm.tokenizer
    names: dict[int, str] = {}

    def piece(t: int) -> str:
        if t not in names:
            names[t] = tok.decode([t])
        return names[t]

    units = []
    used_files: set[str] = set()
    for i, c in enumerate(collectors):
        key = unit_key(bundle, i)
        folder = re.sub(r"[^A-Za-z0-9._-]", "_", f"layer_{key}" if key.isdigit() else key)
        logits = _top_logits(vlm, bundle, i, opts.top_logits)
        n = c.F
        for start in range(0, n, opts.shard_size):
            cards = []
            stop = min(n, start + opts.shard_size)
            best_first = c.ordered(torch.arange(start, stop))
            for f in range(start, stop):
                card = _card(c, best_first, f - start, f, key, piece, refs, used_files, opts)
                if logits is not None:
                    pv, pi, nv, ni = logits
                    card["top_logits"] = {
                        "positive": _pairs(piece, pv[f], pi[f]),
                        "negative": _pairs(piece, nv[f], ni[f]),
                    }
                cards.append(card)
            text = json.dumps({"features": cards}, separators=(",", ":"), allow_nan=False)
            write_text_atomically(out / folder / shard_name(start), text)
        units.append({"key": key, "hook": bundle.reads[i], "writes": bundle.writes[i],
                      "n_features": n, "shard_size": opts.shard_size, "folder": folder,
                      "tokens": c.tokens,
                      "alive": int((c.count > 0).sum())})  # fmt: skip
    # Pictures only evicted examples pointed at are removed (ours only: names in refs).
    for ref in refs.values():
        if ref["file"] not in used_files:
            (out / ref["file"]).unlink(missing_ok=True)
    index = {"format": FORMAT, "version": VERSION, **settings,
             "model_name": bundle.model_info.get("name"), "kind": bundle.kind,
             "options": asdict(opts), "tokens": collectors[0].tokens,
             "histogram_log10_edges": HIST_EDGES.tolist(), "units": units}  # fmt: skip
    write_text_atomically(out / INDEX, json.dumps(index, indent=1))
    return units


def _pairs(piece: Any, values: torch.Tensor, ids: torch.Tensor) -> list[list[Any]]:
    return [[piece(int(t)), round(float(v), 4)] for v, t in zip(values, ids, strict=True)]


def _card(
    c: FeatureCollector,
    best_first: dict[str, torch.Tensor],
    j: int,
    f: int,
    key: str,
    piece: Any,
    refs: dict[str, Any],
    used: set[str],
    opts: FeaturesOptions,
) -> dict[str, Any]:
    """Feature f's card; `best_first` is `c.ordered(...)` of its shard, f at row j."""
    examples = []
    top = {name: t[j] for name, t in best_first.items()}
    for r in range(c.K):
        act = float(top["top_act"][r])
        if act == float("-inf"):
            break
        toks = top["win_tok"][r].tolist()
        vals = top["win_act"][r].float().tolist()
        keep = [j for j, t in enumerate(toks) if t >= 0]
        ex: dict[str, Any] = {
            "activation": round(act, 5),
            "sample": int(top["top_sample"][r]),
            "position": int(top["top_pos"][r]),
            "tokens": [piece(toks[j]) for j in keep],
            "acts": [round(vals[j], 4) for j in keep],
            "focus": keep.index(opts.before) if opts.before in keep else None,
        }
        img, view, row, col = (int(v) for v in top["top_cell"][r])
        ref = refs.get(f"{int(top['top_sample'][r])}/{img}") if img >= 0 else None
        if img >= 0:
            label = patch_label(img, view, row, col)
            if ex["focus"] is not None:
                ex["tokens"][ex["focus"]] = label
            if ref is not None:
                used.add(ref["file"])
                ex["image"] = {"file": ref["file"], "width": ref["width"],
                               "height": ref["height"], "box": _box(ref, view, row, col),
                               "cell": [img, view, row, col], "label": label}  # fmt: skip
        examples.append(ex)
    total = max(c.tokens, 1)
    return {
        "index": f,
        "key": key,
        "density": int(c.count[f]) / total,
        "count": int(c.count[f]),
        "max_activation": float(c.max_act[f]),
        "histogram": {"counts": c.hist[f].tolist()},
        "examples": examples,
    }
