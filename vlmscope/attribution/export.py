"""Attribution graphs out of memory: viewer JSON, raw safetensors, image-patch heatmaps.

`to_json` writes the layout of circuit-tracer's `create_graph_files` (which its local frontend
and Neuronpedia read), and `write_graph_files` writes it as that frontend's folder does:
`DIR/<slug>.json` plus the `DIR/graph-metadata.json` index. Node ids follow circuit-tracer 0.5.0's
`frontend/graph_models.py` (features `{layer}_{feature}_{pos}`, inputs `E_{token}_{pos}`, logits
`{n_layers + 1}_{token}_{pos}`) except error nodes: 0.5.0 writes `0_{layer}_{pos}`, which is also
the id of layer 0's feature number `layer` at that position, so when that feature is in a graph
two nodes share an id and links naming it are ambiguous (both frontends key nodes by id). They
are `{layer}_error_{pos}` here, the form later circuit-tracer forks use. Image patches
are `embedding` nodes (the type that frontend always keeps and labels on its x-axis) whose prompt
token is a readable label (`img0 r1c2`) and which carry their (image, view, row, col); images,
signed patch effects and special-token flags are additions that other tools ignore. `save_raw`
keeps the whole unpruned graph (no pickle) so that pruning and scores can be redone later, and
`patch_influence` / `concentration` answer "which part of the picture drove this answer" (the
signed heatmaps are in `attribution/heatmap.py`).
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import math
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
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
from vlmscope.files import lock_folder, write_atomically, write_text_atomically

SCHEMA_VERSION = 1
#: circuit-tracer's index of the graphs in a folder (its `add_graph_metadata`).
GRAPH_INDEX = "graph-metadata.json"
#: the fields of circuit-tracer's `Metadata` model: what its index lists for each graph.
INDEX_FIELDS = ("slug", "scan", "transcoder_list", "prompt_tokens", "prompt", "node_threshold",
                "schema_version")  # fmt: skip
_SLUG = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
RAW_FORMAT = "vlmscope.graph"
RAW_VERSION = 1
#: safetensors metadata key holding the non-tensor part of a raw graph (JSON).
RAW_KEY = "vlmscope_graph"

FEATURE = "cross layer transcoder"
ERROR = "mlp reconstruction error"
EMBEDDING = "embedding"
LOGIT = "logit"

PathLike = str | os.PathLike[str]


# --- node ids (circuit-tracer's frontend/graph_models.py conventions) -----------------------------
def _cantor(x: int, y: int) -> int:
    """circuit-tracer's `feature` field of a CLT node: one integer for (layer, feature)."""
    return (x + y) * (x + y + 1) // 2 + y


def feature_node_id(layer: int, feature: int, pos: int) -> str:
    return f"{layer}_{feature}_{pos}"


def error_node_id(layer: int, pos: int) -> str:
    """`{layer}_error_{pos}`: never a feature's id (circuit-tracer 0.5.0's `0_{layer}_{pos}`
    is layer 0's feature `layer` at `pos`; see the module docstring)."""
    return f"{layer}_error_{pos}"


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
    relative_to: PathLike | None = None,
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
            rel = None if relative_to is None else os.path.relpath(path, relative_to)
            entry["path"] = str(path) if rel is None else Path(rel).as_posix()
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
    relative_to: PathLike | None = None,
) -> dict[str, Any]:
    """The pruned graph in circuit-tracer's frontend layout, plus image patches and images.

    Only nodes kept by the prune mask are written (inputs and logits always are), and only kept
    edges between written nodes. A node's `influence` is its cumulative influence fraction at its
    rank, as circuit-tracer writes it (the viewer's pruning slider reads that). Images are
    referenced by path (`image_paths`, written relative to `relative_to` when given: the JSON's
    folder) or embedded as PNG data URIs (`images`). `scan` (default: the model's public name)
    is what circuit-tracer's graph list shows.
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
                error_node_id(layer, pos), -1, str(layer), pos, ERROR, f"{layer}_{pos}-0",
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
    model = public_model_name(meta.get("model"))
    # circuit-tracer's frontend shows a non-input node only when its cumulative influence is at
    # most the graph's node_threshold; the last node prune keeps sits just past the requested
    # share (0.80014 for 0.8), so the threshold written is the one the kept nodes satisfy.
    kept = [n["influence"] for n in written if n["layer"] != "E" and n["feature_type"] != LOGIT]
    effective = max([node_threshold, *[v for v in kept if v is not None]])
    out: dict[str, Any] = {
        "metadata": {
            "slug": slug,
            "scan": scan if scan is not None else (model or "vlmscope"),
            "transcoder_list": [],
            "prompt_tokens": prompt_labels(graph),
            "prompt": prompt_text if prompt_text is not None else "".join(graph.input_tokens),
            "node_threshold": effective,
            "schema_version": SCHEMA_VERSION,
            "requested_node_threshold": node_threshold,
            "edge_threshold": edge_threshold,
            "model": model,
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
    entries = _image_entries(graph, image_paths, images, relative_to)
    if entries:
        out["images"] = entries
        out["patch_effects"] = patch_effects(graph)
    return out


def public_model_name(name: object) -> str | None:
    """A model name fit to share: a hub id or zoo name as given, a local path by its folder name
    (a graph sent to a colleague should not carry the author's file system)."""
    if name is None:
        return None
    text = str(name).rstrip("/\\")
    local = os.path.isabs(text) or text.startswith((".", "~")) or Path(text).exists()
    return Path(text).name or text if local else text


def patch_label(image: int, view: int, row: int, col: int) -> str:
    """A short readable name of an image token: `img0 r1c2`, `img0 v1 r1c2` for tile / high-
    resolution views, `img0 r1 end` for a row separator and `img0` for tokens off the grid."""
    v = f" v{view}" if view > 0 else ""
    if row < 0:
        return f"img{image}{v}"
    if col < 0:
        return f"img{image}{v} r{row} end"
    return f"img{image}{v} r{row}c{col}"


def prompt_labels(graph: Graph) -> list[str]:
    """The prompt's tokens with each image token replaced by its `patch_label`, so a frontend
    that labels positions by token (circuit-tracer's) names every patch."""
    tokens = graph.input_tokens or [str(i) for i in graph.input_ids.tolist()]
    out = list(tokens)
    for pos, kind in enumerate(graph.input_kinds):
        if kind == "image":
            out[pos] = patch_label(*(int(v) for v in graph.patch_map[pos]))
    return out


def _input_node(graph: Graph, pos: int, token_id: int, infl: float | None) -> dict[str, Any]:
    """A text token, special token (flagged `special`) or image patch (with its `image` cell):
    all `embedding` nodes, as circuit-tracer's frontend expects of inputs."""
    kind = graph.input_kinds[pos] if pos < len(graph.input_kinds) else "text"
    node = _node(
        input_node_id(token_id, pos), pos, "E", pos, EMBEDDING, f"E_{token_id}-{pos}",
        influence=infl,
    )  # fmt: skip
    if kind == "image":
        img, view, r, c = (int(v) for v in graph.patch_map[pos])
        node["image"] = {"index": img, "view": view, "row": r, "col": c}
        node["clerp"] = patch_label(img, view, r, c)
    elif kind == "special":
        node["special"] = True
    return node


def patch_effects(graph: Graph, digits: int = 6) -> list[dict[str, Any]]:
    """Signed patch influence on each logit, per image and view (see `patch_influence`), for
    viewers that draw the heatmap themselves; values rounded to `digits` significant digits."""
    out = []
    n_layers, n_pos = graph.n_layers, graph.n_pos
    for k, t in enumerate(graph.logit_targets):
        for img, views in patch_influence(graph, k, signed=True).items():
            for view, heat in views.items():
                values = [[float(f"{v:.{digits}g}") for v in row] for row in heat.tolist()]
                out.append({
                    "logit": logit_node_id(n_layers, t.token_id, n_pos - 1),
                    "token": t.token,
                    "probability": float(t.probability),
                    "image": img,
                    "view": view,
                    "values": values,
                })  # fmt: skip
    return out


def save_json(graph: Graph, path: PathLike, **kwargs: Any) -> Path:
    """Write `to_json(graph, **kwargs)` to `path` (via a temporary file, so never torn)."""
    data = to_json(graph, **kwargs)
    return write_text_atomically(path, json.dumps(data, separators=(",", ":"), allow_nan=False))


def check_slug(slug: str) -> str:
    """`slug` if it is a safe file name (letters, digits, `.`, `_`, `-`; 128 at most)."""
    if not _SLUG.fullmatch(slug):
        raise ValueError(
            f"slug {slug!r} must be 1-128 letters, digits, '.', '_' or '-', starting with a "
            "letter or digit (it names the graph's file)"
        )
    return slug


def store_image(image: Image.Image, folder: PathLike) -> str:
    """Save `image` once under `folder/images/`, named by a hash of its pixels, and return that
    path relative to `folder` (`images/<hash>.png`): graphs and feature examples that show the
    same picture share one file."""
    rgb = image if image.mode in {"RGB", "RGBA", "L"} else image.convert("RGB")
    digest = hashlib.sha256(f"{rgb.mode}{rgb.size}".encode() + rgb.tobytes()).hexdigest()[:20]
    rel = f"images/{digest}.png"
    target = Path(folder) / rel
    if not target.is_file():
        write_atomically(target, lambda tmp: rgb.save(tmp, format="PNG"))
    return rel


#: seconds a graph writer waits for another to finish updating the folder's index
GRAPH_INDEX_WAIT_S = 60.0


def write_graph_files(
    graph: Graph, folder: PathLike, slug: str, **kwargs: Any
) -> tuple[Path, dict[str, Any]]:
    """`folder/<slug>.json` and its entry in `folder/graph-metadata.json`, as circuit-tracer's
    `create_graph_files` writes them, so `circuit-tracer start-server --graph_file_dir folder`
    (and `vlmscope serve --graphs folder`) list and open it. Other graphs in the index stay;
    an entry with the same slug is replaced. Returns the JSON path and the graph's metadata."""
    check_slug(slug)
    folder = Path(folder)
    index = folder / GRAPH_INDEX
    read_graph_index(index)  # a corrupt index fails before anything is written
    data = to_json(graph, slug=slug, **kwargs)
    text = json.dumps(data, separators=(",", ":"), allow_nan=False)
    entry = {k: data["metadata"][k] for k in INDEX_FIELDS}
    # One writer at a time: two runs updating the index at once would drop an entry. The
    # section is short, so a second writer waits for it; the graph is written inside it, so a
    # writer that gives up leaves no graph the index does not list.
    with lock_folder(folder, "graph folder", wait_s=GRAPH_INDEX_WAIT_S):
        path = write_text_atomically(folder / f"{slug}.json", text)
        graphs = [g for g in read_graph_index(index) if g.get("slug") != slug] + [entry]
        write_text_atomically(index, json.dumps({"graphs": graphs}, indent=2))
    return path, data["metadata"]


def read_graph_index(path: PathLike) -> list[dict[str, Any]]:
    """The `graphs` list of a circuit-tracer `graph-metadata.json` ([] when there is none)."""
    path = Path(path)
    if not path.exists():
        return []
    try:
        graphs = json.loads(path.read_text(encoding="utf-8"))["graphs"]
        if not isinstance(graphs, list) or not all(isinstance(g, dict) for g in graphs):
            raise TypeError("'graphs' is not a list of objects")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path} is not a graph index (graph-metadata.json): {e}") from e
    return graphs


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
    if graph.reference_edges is not None:
        tensors["reference_edges"] = graph.reference_edges
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    info = {
        "format": RAW_FORMAT,
        "version": RAW_VERSION,
        "n_layers": graph.n_layers,
        "input_kinds": list(graph.input_kinds),
        "input_tokens": list(graph.input_tokens),
        "logit_tokens": [t.token for t in graph.logit_targets],
        # model names as the JSON gives them: a file shared with a colleague carries no path
        # of the author's (a local model folder is named by its last part)
        "metadata": {
            **graph.metadata,
            **{
                k: public_model_name(graph.metadata[k])
                for k in ("model", "dictionaries_trained_on")
                if k in graph.metadata
            },
        },
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
        reference_edges=tensors.get("reference_edges"),
    )


# --- image patches --------------------------------------------------------------------------------
def patch_influence(
    graph: Graph, logit_index: int | None = 0, *, signed: bool = False
) -> dict[int, dict[int, Tensor]]:
    """Image index -> view -> [rows, cols] influence of each image patch on one logit.

    The graph's normalised influence with the logit weights one-hot on `logit_index` (or the
    target probabilities when None). Row separators and tokens off the grid are left out; two
    tokens on the same cell (none in the adapters today) add up.

    `signed=True` keeps the sign of every edge: with A normalised by its rows' absolute sums,
    the patch's value is sum_k (w A^k)[patch], each path counted with the product of its edge
    signs. A patch that pushes the logit down is negative; |signed| <= the unsigned influence.
    """
    w = _logit_weights(graph, logit_index)
    if not image_grids(graph):
        return {}
    a = graph.adjacency
    norm = a / a.abs().sum(dim=1, keepdim=True).clamp(min=1e-10) if signed else normalize_rows(a)
    return _on_grids(graph, influence(norm, w)[graph.input_slice])


def _logit_weights(graph: Graph, logit_index: int | None) -> Tensor:
    """One-hot on `logit_index` over the graph's nodes, or the target probabilities (None)."""
    if logit_index is None:
        return graph.logit_weights()
    if not -graph.n_logits <= logit_index < graph.n_logits:
        raise IndexError(f"logit_index {logit_index} out of range for {graph.n_logits} logits")
    w = torch.zeros(graph.adjacency.shape[0], dtype=graph.adjacency.dtype)
    w[graph.logit_slice.start + logit_index % graph.n_logits] = 1
    return w


def _on_grids(graph: Graph, values: Tensor) -> dict[int, dict[int, Tensor]]:
    """Image index -> view -> [rows, cols] of per-input-node `values` (grid tokens only)."""
    out: dict[int, dict[int, Tensor]] = {
        i: {v: torch.zeros(rc, dtype=values.dtype) for v, rc in views.items()}
        for i, views in image_grids(graph).items()
    }
    for pos in _grid_positions(graph):
        img, view, r, c = (int(v) for v in graph.patch_map[pos])
        out[img][view][r, c] += values[pos]
    return out


def patch_effect(
    graph: Graph,
    logit_index: int | None = 0,
    *,
    against: Sequence[int] = (),
    reference: bool | None = None,
) -> dict[int, dict[int, Tensor]]:
    """Image index -> view -> [rows, cols] signed total effect of each image patch on one
    logit (or the probability-weighted logits when `logit_index` is None) through the graph;
    with `against` (indices of other logit targets: the answer's competitors), on that logit
    minus the mean of theirs.

    The graph is the local replacement model, linear from its sources once each explored
    feature's activation a is taken as linear in its pre-activation (da/dpre = 1 where a
    feature is active: TopK, ReLU, JumpReLU). An edge into a feature is a contribution to its
    pre-activation and an edge out of it carries the factor a, so the Jacobian of a path is the
    product of its edges with every feature row divided by that feature's activation:

        effect[p] = sum over paths p -> ... -> logit of prod(edges) / prod(a of the features)
                  = sum_d x_p[d] * d logit / d x_p[d]   (gradient x input, all features explored)

    With `reference` (default: True when the graph has `reference_edges`, from
    `attribute(reference="blank")`), the input edges are those of x_p - x'_p, the change from
    the reference prompt's embeddings: effect[p] is then exactly the logit's change in that
    linear model when patch p's embedding is swapped for the reference's (the blank image's),
    as integrated gradients from a blank image measure it in the real model.
    Unlike `patch_influence`, paths of opposite signs cancel; take abs() for a magnitude.

    A logit node is the token's logit minus the mean logit over the vocabulary. What every
    answer of the asked kind shares (any colour word after "What colour ...") is in it too,
    and patches the question does not ask about push it; `against` subtracts it (the
    grounding benchmark: 75% of the map on the asked-about object for the logit alone, 82%
    against the question type's other answers; 65% for `patch_influence`)."""
    w = _logit_weights(graph, logit_index).double()
    if against:
        if logit_index is None:
            raise ValueError("against needs one logit_index, not the weighted logits (None)")
        for j in against:
            w -= _logit_weights(graph, j).double() / len(against)
    if not image_grids(graph):
        return {}
    use_ref = graph.reference_edges is not None if reference is None else reference
    if use_ref and graph.reference_edges is None:
        raise ValueError(
            "this graph has no reference edges: attribute it with reference='blank' (CLI: "
            "--reference blank) or pass reference=False"
        )
    a = graph.adjacency.double()
    if use_ref:
        assert graph.reference_edges is not None
        a[:, graph.input_slice] -= graph.reference_edges.double()
    nf = graph.n_features
    act = graph.activations.double()
    a[:nf] /= torch.where(act != 0, act, torch.ones_like(act))[:, None]
    return _on_grids(graph, influence(a, w)[graph.input_slice])


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


def top_patches(heat: Tensor, k: int = 3) -> list[tuple[int, int, float]]:
    """The k cells of a [rows, cols] heat map with the most influence, as (row, col, value)."""
    flat = heat.flatten()
    idx = torch.argsort(flat, descending=True)[:k].tolist()
    return [(i // heat.shape[1], i % heat.shape[1], float(flat[i])) for i in idx]
