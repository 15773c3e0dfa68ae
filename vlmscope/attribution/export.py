"""Attribution graphs out of memory: viewer JSON, raw safetensors, image-patch heatmaps.

`to_json` writes the layout of circuit-tracer's `create_graph_files` (which the Neuronpedia
frontend reads), so a text-only graph opens in tools researchers already use; image patches,
special tokens and the images themselves are additions that those tools ignore. `save_raw` keeps
the whole unpruned graph (no pickle) so that pruning and scores can be redone later, and
`patch_influence` / `save_heatmap_png` / `concentration` answer "which part of the picture drove
this answer".
"""

from __future__ import annotations

import base64
import io
import json
import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from vlmscope.attribution.graph import (
    Graph,
    LogitTarget,
    PruneResult,
    graph_scores,
    influence,
    normalize_rows,
    prune,
)
from vlmscope.files import write_atomically, write_text_atomically

SCHEMA_VERSION = 1
RAW_FORMAT = "vlmscope.graph"
RAW_VERSION = 1
#: safetensors metadata key holding the non-tensor part of a raw graph (JSON).
RAW_KEY = "vlmscope_graph"

FEATURE = "cross layer transcoder"
ERROR = "mlp reconstruction error"
EMBEDDING = "embedding"
IMAGE_PATCH = "image patch"
LOGIT = "logit"

PathLike = str | os.PathLike[str]


# --- node ids (circuit-tracer's frontend/graph_models.py conventions) -----------------------------
def _cantor(x: int, y: int) -> int:
    """circuit-tracer's `feature` field of a CLT node: one integer for (layer, feature)."""
    return (x + y) * (x + y + 1) // 2 + y


def feature_node_id(layer: int, feature: int, pos: int) -> str:
    return f"{layer}_{feature}_{pos}"


def error_node_id(layer: int, pos: int) -> str:
    """`{layer}_-1_{pos}`: circuit-tracer's fixed format (the older `0_{layer}_{pos}` collided
    with layer-0 features)."""
    return f"{layer}_-1_{pos}"


def input_node_id(token_id: int, pos: int) -> str:
    return f"E_{token_id}_{pos}"


def logit_node_id(n_layers: int, token_id: int, pos: int) -> str:
    return f"{n_layers + 1}_{token_id}_{pos}"


def _num(x: float | Tensor | None) -> float | None:
    """A JSON-safe float (NaN and inf become null: browsers' JSON.parse rejects them)."""
    if x is None:
        return None
    v = float(x)
    return v if math.isfinite(v) else None


def _node(
    node_id: str,
    feature: int,
    layer: str,
    ctx_idx: int,
    feature_type: str,
    js_node_id: str,
    *,
    influence: float | None = None,
    activation: float | None = None,
    token_prob: float = 0.0,
    is_target_logit: bool = False,
    clerp: str = "",
) -> dict[str, Any]:
    return {
        "node_id": node_id,
        "feature": feature,
        "layer": layer,
        "ctx_idx": ctx_idx,
        "feature_type": feature_type,
        "token_prob": token_prob,
        "is_target_logit": is_target_logit,
        "run_idx": 0,
        "reverse_ctx_idx": 0,
        "jsNodeId": js_node_id,
        "clerp": clerp,
        "influence": influence,
        "activation": activation,
    }


# --- image layout ---------------------------------------------------------------------------------
def image_grids(graph: Graph) -> dict[int, dict[int, tuple[int, int]]]:
    """Image index -> view -> (rows, cols) of its patch grid, read from the patch map.

    Row-separator tokens (col -1) and tokens outside the grid (row -1) do not count.
    """
    out: dict[int, dict[int, tuple[int, int]]] = {}
    for pos in _grid_positions(graph):
        img, view, r, c = (int(v) for v in graph.patch_map[pos])
        rows, cols = out.setdefault(img, {}).get(view, (0, 0))
        out[img][view] = (max(rows, r + 1), max(cols, c + 1))
    return {i: dict(sorted(v.items())) for i, v in sorted(out.items())}


def _grid_positions(graph: Graph) -> list[int]:
    pm = graph.patch_map
    if len(pm) == 0:
        return []
    is_image = torch.tensor([k == "image" for k in graph.input_kinds], dtype=torch.bool)
    ok = is_image & (pm[:, 0] >= 0) & (pm[:, 1] >= 0) & (pm[:, 2] >= 0) & (pm[:, 3] >= 0)
    return ok.nonzero().squeeze(1).tolist()


def _png_data_uri(image: Image.Image) -> str:
    if image.mode not in {"1", "L", "LA", "P", "RGB", "RGBA"}:  # e.g. CMYK: no PNG for that
        image = image.convert("RGB")
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _image_entries(
    graph: Graph,
    image_paths: Sequence[PathLike] | None,
    images: Sequence[Image.Image] | None,
) -> list[dict[str, Any]]:
    grids = image_grids(graph)
    used = sorted(
        {int(graph.patch_map[p, 0]) for p, k in enumerate(graph.input_kinds) if k == "image"} - {-1}
    )
    if image_paths is not None and images is not None:
        raise ValueError("pass image_paths or images, not both")
    given = image_paths if image_paths is not None else images
    n = max([*used, -1]) + 1
    if given is not None and len(given) != n:
        raise ValueError(f"the graph has {n} image(s) but {len(given)} were given")
    out = []
    for i in range(n):
        entry: dict[str, Any] = {"index": i, "width": None, "height": None}
        if image_paths is not None:
            path = Path(image_paths[i])
            try:
                with Image.open(path) as im:
                    entry["width"], entry["height"] = im.size
            except (OSError, ValueError) as e:
                raise ValueError(f"cannot read image {path}: {e}") from e
            entry["path"] = str(path)
        elif images is not None:
            entry["width"], entry["height"] = images[i].size
            entry["data"] = _png_data_uri(images[i])
        entry["grid"] = {str(v): list(rc) for v, rc in grids.get(i, {}).items()}
        out.append(entry)
    return out


# --- JSON -----------------------------------------------------------------------------------------
def to_json(
    graph: Graph,
    *,
    prune_result: PruneResult | None = None,
    node_threshold: float = 0.8,
    edge_threshold: float = 0.98,
    slug: str = "graph",
    prompt_text: str | None = None,
    image_paths: Sequence[PathLike] | None = None,
    images: Sequence[Image.Image] | None = None,
    scan: str | None = None,
) -> dict[str, Any]:
    """The pruned graph in circuit-tracer's frontend layout, plus image patches and images.

    Only nodes kept by the prune mask are written (inputs and logits always are), and only kept
    edges between written nodes. A node's `influence` is its cumulative influence fraction at its
    rank, as circuit-tracer writes it (the viewer's pruning slider reads that). Images are
    referenced by path (`image_paths`) or embedded as PNG data URIs (`images`).
    """
    pr = prune_result if prune_result is not None else prune(graph, node_threshold, edge_threshold)
    n_nodes = graph.adjacency.shape[0]
    if pr.node_mask.shape[0] != n_nodes or pr.edge_mask.shape != graph.adjacency.shape:
        raise ValueError("prune_result does not belong to this graph (its masks' shapes differ)")
    cum = pr.cumulative.tolist()
    acts = graph.activations.tolist()
    feats = graph.features.tolist()
    ids = graph.input_ids.tolist()
    nf, n_pos, n_layers = graph.n_features, graph.n_pos, graph.n_layers
    nodes: dict[int, dict[str, Any]] = {}
    always: set[int] = set()
    for idx in pr.node_mask.nonzero().squeeze(1).tolist():
        if idx < nf:
            layer, pos, f = (int(v) for v in feats[idx])
            nodes[idx] = _node(
                feature_node_id(layer, f, pos), _cantor(layer, f), str(layer), pos, FEATURE,
                f"{layer}_{f}-0", influence=_num(cum[idx]), activation=_num(acts[idx]),
            )  # fmt: skip
        elif idx < graph.input_slice.start:
            layer, pos = divmod(idx - nf, n_pos)
            nodes[idx] = _node(
                error_node_id(layer, pos), -1, str(layer), pos, ERROR, f"{layer}_-1-{pos}",
                influence=_num(cum[idx]),
            )  # fmt: skip
        elif idx < graph.logit_slice.start:
            pos = idx - graph.input_slice.start
            token = ids[pos] if pos < n_pos else -1  # a cross-attention vision feature
            nodes[idx] = _input_node(graph, pos, token, _num(cum[idx]))
            always.add(idx)
        else:
            k = idx - graph.logit_slice.start
            t = graph.logit_targets[k]
            p = float(t.probability)
            nodes[idx] = _node(
                logit_node_id(n_layers, t.token_id, n_pos - 1), t.token_id, str(n_layers + 1),
                n_pos - 1, LOGIT, f"L_{t.token_id}-{n_pos - 1}", token_prob=p,
                is_target_logit=k == 0, clerp=f'Output "{t.token}" (p={p:.3f})',
            )  # fmt: skip
            always.add(idx)
    dsts, srcs = pr.edge_mask.nonzero(as_tuple=True)
    weights = graph.adjacency[dsts, srcs].tolist()
    links = []
    connected: set[int] = set()
    for d, s, w in zip(dsts.tolist(), srcs.tolist(), weights, strict=True):
        if d in nodes and s in nodes:
            links.append(
                {"source": nodes[s]["node_id"], "target": nodes[d]["node_id"], "weight": w}
            )
            connected.update((d, s))
    written = [nodes[i] for i in sorted(nodes) if i in connected or i in always]
    replacement, completeness = graph_scores(graph)
    meta = graph.metadata
    tokens = graph.input_tokens or [str(i) for i in ids]
    out: dict[str, Any] = {
        "metadata": {
            "slug": slug,
            "scan": scan if scan is not None else str(meta.get("model") or "vlmscope"),
            "transcoder_list": [],
            "prompt_tokens": list(tokens),
            "prompt": prompt_text if prompt_text is not None else "".join(tokens),
            "node_threshold": node_threshold,
            "schema_version": SCHEMA_VERSION,
            "edge_threshold": edge_threshold,
            "model": meta.get("model"),
            "family": meta.get("family"),
            "dictionaries": meta.get("dictionaries"),
            "replacement_score": _num(replacement),
            "completeness_score": _num(completeness),
        },
        "qParams": {
            "pinnedIds": [],
            "supernodes": [],
            "linkType": "both",
            "clickedId": "",
            "sg_pos": "",
        },
        "nodes": written,
        "links": links,
    }
    entries = _image_entries(graph, image_paths, images)
    if entries:
        out["images"] = entries
    return out


def _input_node(graph: Graph, pos: int, token_id: int, infl: float | None) -> dict[str, Any]:
    """A token (`embedding`, flagged `special` for special tokens) or an image patch node."""
    kind = graph.input_kinds[pos] if pos < len(graph.input_kinds) else "text"
    node = _node(
        input_node_id(token_id, pos), pos, "E", pos,
        IMAGE_PATCH if kind == "image" else EMBEDDING, f"E_{token_id}-{pos}", influence=infl,
    )  # fmt: skip
    if kind == "image":
        img, view, r, c = (int(v) for v in graph.patch_map[pos])
        node["image"] = {"index": img, "view": view, "row": r, "col": c}
        where = f"row {r} separator" if c < 0 <= r else f"patch ({r}, {c})"
        node["clerp"] = f"image {img} view {view} {where}"
    elif kind == "special":
        node["special"] = True
    return node


def save_json(graph: Graph, path: PathLike, **kwargs: Any) -> Path:
    """Write `to_json(graph, **kwargs)` to `path` (via a temporary file, so never torn)."""
    data = to_json(graph, **kwargs)
    return write_text_atomically(path, json.dumps(data, separators=(",", ":"), allow_nan=False))


# --- raw graph ------------------------------------------------------------------------------------
def save_raw(graph: Graph, path: PathLike) -> Path:
    """The whole graph in one safetensors file; strings and metadata go in its JSON header.

    `graph.metadata` must be JSON-serialisable (tuples come back as lists).
    """
    path = Path(path)
    tensors = {
        "adjacency": graph.adjacency,
        "features": graph.features,
        "activations": graph.activations,
        "input_ids": graph.input_ids,
        "patch_map": graph.patch_map,
        "logit_token_ids": torch.tensor(
            [t.token_id for t in graph.logit_targets], dtype=torch.long
        ),
        # float64 holds a Python float exactly.
        "logit_probabilities": torch.tensor(
            [float(t.probability) for t in graph.logit_targets], dtype=torch.float64
        ),
    }
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    info = {
        "format": RAW_FORMAT,
        "version": RAW_VERSION,
        "n_layers": graph.n_layers,
        "input_kinds": list(graph.input_kinds),
        "input_tokens": list(graph.input_tokens),
        "logit_tokens": [t.token for t in graph.logit_targets],
        "metadata": graph.metadata,
    }
    try:
        header = json.dumps(info)
    except TypeError as e:
        raise TypeError(f"graph.metadata must be JSON-serialisable to save it: {e}") from e
    meta = {"format": RAW_FORMAT, RAW_KEY: header}
    return write_atomically(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))


def load_raw(path: PathLike) -> Graph:
    """Read a file written by `save_raw` back into the same Graph."""
    path = Path(path)
    tensors: dict[str, Tensor] = {}
    with safe_open(str(path), framework="pt") as f:
        header = (f.metadata() or {}).get(RAW_KEY)
        if header is None:
            raise ValueError(f"{path} is not a vlmscope raw graph (no {RAW_KEY!r} metadata)")
        for k in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
            tensors[k] = f.get_tensor(k)
    info = json.loads(header)
    if info.get("version", 0) > RAW_VERSION:
        raise ValueError(f"{path}: raw graph version {info['version']} is newer than this vlmscope")
    targets = [
        LogitTarget(int(i), s, float(p))
        for i, s, p in zip(
            tensors["logit_token_ids"].tolist(),
            info["logit_tokens"],
            tensors["logit_probabilities"].tolist(),
            strict=True,
        )
    ]
    return Graph(
        adjacency=tensors["adjacency"],
        features=tensors["features"],
        activations=tensors["activations"],
        n_layers=int(info["n_layers"]),
        input_ids=tensors["input_ids"],
        input_kinds=list(info["input_kinds"]),
        patch_map=tensors["patch_map"],
        logit_targets=targets,
        input_tokens=list(info["input_tokens"]),
        metadata=dict(info["metadata"]),
    )


# --- image patches --------------------------------------------------------------------------------
def patch_influence(graph: Graph, logit_index: int | None = 0) -> dict[int, dict[int, Tensor]]:
    """Image index -> view -> [rows, cols] influence of each image patch on one logit.

    The graph's normalised influence with the logit weights one-hot on `logit_index` (or the
    target probabilities when None). Row separators and tokens off the grid are left out; two
    tokens on the same cell (none in the adapters today) add up.
    """
    w = torch.zeros(graph.adjacency.shape[0], dtype=graph.adjacency.dtype)
    if logit_index is None:
        w = graph.logit_weights()
    else:
        if not -graph.n_logits <= logit_index < graph.n_logits:
            raise IndexError(f"logit_index {logit_index} out of range for {graph.n_logits} logits")
        w[graph.logit_slice.start + logit_index % graph.n_logits] = 1
    grids = image_grids(graph)
    if not grids:
        return {}
    infl = influence(normalize_rows(graph.adjacency), w)[graph.input_slice]
    out: dict[int, dict[int, Tensor]] = {
        i: {v: torch.zeros(rc, dtype=infl.dtype) for v, rc in views.items()}
        for i, views in grids.items()
    }
    for pos in _grid_positions(graph):
        img, view, r, c = (int(v) for v in graph.patch_map[pos])
        out[img][view][r, c] += infl[pos]
    return out


def concentration(heat: Tensor, label_patches: Iterable[Sequence[int]] | Tensor) -> float:
    """Share of the (non-negative) patch influence that falls on the labelled patches.

    `label_patches` is a list of (row, col) (as the shapes world stores them) or a boolean mask
    of heat's shape. 0.0 when the heat map is all zero.
    """
    h = torch.as_tensor(heat, dtype=torch.float64).clamp(min=0)
    if isinstance(label_patches, Tensor) and label_patches.dtype == torch.bool:
        if label_patches.shape != h.shape:
            raise ValueError(f"mask shape {tuple(label_patches.shape)} != heat {tuple(h.shape)}")
        mask = label_patches
    else:
        mask = torch.zeros(h.shape, dtype=torch.bool)
        for rc in label_patches:
            r, c = (int(v) for v in rc)
            if not (0 <= r < h.shape[0] and 0 <= c < h.shape[1]):
                raise ValueError(f"label patch ({r}, {c}) is outside the {tuple(h.shape)} grid")
            mask[r, c] = True
    total = float(h.sum())
    return float(h[mask].sum()) / total if total > 0 else 0.0


#: (position, RGB) stops of the heat colour map: dark purple -> red -> orange -> pale yellow.
_STOPS = [
    (0.0, (20, 11, 52)),
    (0.35, (120, 28, 109)),
    (0.6, (212, 72, 66)),
    (0.8, (250, 150, 20)),
    (1.0, (252, 255, 164)),
]


def colormap(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1] -> uint8 RGB, interpolating linearly between `_STOPS` (no matplotlib)."""
    v = np.clip(np.nan_to_num(values.astype(np.float64)), 0.0, 1.0)
    xs = [s[0] for s in _STOPS]
    rgb = [np.interp(v, xs, [s[1][ch] for s in _STOPS]) for ch in range(3)]
    return np.stack(rgb, axis=-1).round().astype(np.uint8)


def center_crop_box(image_size: tuple[int, int], image_processor: Any) -> tuple[float, ...] | None:
    """Box (x0, y0, x1, y1) of the original image that a resize-shortest-edge + center-crop
    processor (CLIP, LLaVA-1.5) keeps, so the heat grid lands on the pixels the model saw.
    None when the processor does not crop (the grid then covers the whole image)."""
    if not getattr(image_processor, "do_center_crop", False):
        return None
    crop = getattr(image_processor, "crop_size", None)
    size = getattr(image_processor, "size", None)
    ch, cw = _field(crop, "height"), _field(crop, "width")
    short = _field(size, "shortest_edge")
    if ch is None or cw is None or short is None:
        return None
    w, h = image_size
    if not getattr(image_processor, "do_resize", True):
        s = 1.0
    else:
        s = short / min(w, h)
    rw, rh = w * s, h * s
    x0, y0 = max((rw - cw) / 2, 0.0), max((rh - ch) / 2, 0.0)
    x1, y1 = min(x0 + cw, rw), min(y0 + ch, rh)
    return (x0 / s, y0 / s, x1 / s, y1 / s)


def _field(size: Any, key: str) -> Any:
    """A key of a processor size (a dict, or transformers' SizeDict)."""
    if size is None:
        return None
    return size.get(key) if isinstance(size, dict) else getattr(size, key, None)


def render_heatmap(
    image: Image.Image,
    heat: Tensor,
    *,
    region: Sequence[float] | None = None,
    scale: int = 1,
    alpha: float = 0.7,
    caption: str | None = None,
) -> Image.Image:
    """The image (upscaled by `scale`) with `heat` [rows, cols] blended over `region` (default:
    the whole image): colour and opacity grow with the patch's share of the maximum."""
    base = image.convert("RGB")
    if scale != 1:
        base = base.resize((base.width * scale, base.height * scale), Image.Resampling.NEAREST)
    x0, y0, x1, y1 = (
        (0.0, 0.0, float(image.width), float(image.height)) if region is None else region
    )
    box = [round(x0 * scale), round(y0 * scale), round(x1 * scale), round(y1 * scale)]
    if box[0] < 0 or box[1] < 0 or box[2] > base.width or box[3] > base.height:
        raise ValueError(f"region {tuple(region or ())} is outside the {image.size} image")
    bw, bh = max(box[2] - box[0], 1), max(box[3] - box[1], 1)
    h = heat.detach().double().clamp(min=0).numpy()
    top = float(h.max()) if h.size else 0.0
    norm = (h / top if top > 0 else h).astype(np.float32)
    cells = Image.fromarray(norm).resize((bw, bh), Image.Resampling.NEAREST)  # mode "F"
    v = np.asarray(cells, dtype=np.float64)
    out = np.asarray(base, dtype=np.float64).copy()
    patch = out[box[1] : box[1] + bh, box[0] : box[0] + bw]
    a = (alpha * v)[..., None][: patch.shape[0], : patch.shape[1]]
    col = colormap(v).astype(np.float64)[: patch.shape[0], : patch.shape[1]]
    patch[:] = patch * (1 - a) + col * a
    result = Image.fromarray(out.round().clip(0, 255).astype(np.uint8))
    if caption:
        _draw_caption(result, caption)
    return result


def _draw_caption(image: Image.Image, text: str) -> None:
    """A small caption on a dark band along the top edge (skipped on very small images)."""
    if image.height < 24 or image.width < 48:
        return
    text = "".join(ch if ch.isprintable() else "?" for ch in text)
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    _, _, x1, y1 = draw.textbbox((3, 2), text, font=font)
    draw.rectangle((0, 0, min(x1 + 3, image.width), y1 + 2), fill=(0, 0, 0))
    draw.text((3, 2), text, fill=(255, 255, 255), font=font)


def save_heatmap_png(
    graph: Graph,
    image: Image.Image | PathLike,
    path: PathLike,
    logit_index: int | None = 0,
    view: int = 0,
    *,
    image_index: int = 0,
    region: Sequence[float] | None = None,
    scale: int = 1,
    caption: bool = True,
) -> Path:
    """PNG of `image` with the patch influence on one logit overlaid (one view of one image).

    View 0 is the whole (base) image; tiled / high-resolution views (>= 1) are stitched grids
    that also cover the whole image. `region` narrows where the grid lands (see
    `center_crop_box`); the caption names the logit and its probability.
    """
    heat = patch_influence(graph, logit_index).get(image_index, {})
    if view not in heat:
        raise ValueError(
            f"image {image_index} has no view {view} in this graph (views: {sorted(heat)})"
        )
    img = Image.open(image) if isinstance(image, str | os.PathLike) else image
    text = None
    if caption and graph.logit_targets:
        t = graph.logit_targets[logit_index if logit_index is not None else 0]
        which = "all logits" if logit_index is None else f'"{t.token}" p={t.probability:.2f}'
        text = f"-> {which}"
    png = render_heatmap(img, heat[view], region=region, scale=scale, caption=text)
    return write_atomically(path, lambda tmp: png.save(tmp, format="PNG"))


def top_patches(heat: Tensor, k: int = 3) -> list[tuple[int, int, float]]:
    """The k cells of a [rows, cols] heat map with the most influence, as (row, col, value)."""
    flat = heat.flatten()
    idx = torch.argsort(flat, descending=True)[:k].tolist()
    return [(i // heat.shape[1], i % heat.shape[1], float(flat[i])) for i in idx]
