"""The compact form of a graph the page opens: one binary response instead of the graph JSON.

A graph of 10,000 nodes and 100,000 edges is about 9 MiB of JSON, 80% of it the `links`
objects; parsing them and building one object per edge is most of what a browser spends before
it can draw. The server parses the file once (cached while the file is unchanged) and sends:

    bytes 0-3    b"VGC1"
    bytes 4-7    J, uint32 little-endian
    J bytes      UTF-8 JSON: the graph without `links`, nodes cut to the fields the page
                 reads, plus "compact": {"links": n, "dropped": d}
    padding      zero bytes up to a multiple of 4
    int32[n]     source node of each link (index into `nodes`)
    int32[n]     target node of each link
    float32[n]   weight of each link

Links are sorted by |weight|, largest first (ties in file order), so the page can draw the
strongest first and the rest later. Links naming a node the graph lacks, or with a weight that
is not a finite number, are dropped and counted in `dropped`.
"""

from __future__ import annotations

import json
import struct
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np

MAGIC = b"VGC1"
#: node fields the page reads; others (jsNodeId, feature, ...) stay in the JSON file.
NODE_FIELDS = ("node_id", "feature", "feature_type", "layer", "ctx_idx", "influence",
               "activation", "image", "special", "token_prob", "clerp")  # fmt: skip


def compact_graph(graph: dict[str, Any]) -> bytes:
    """The binary form above of a parsed graph (with `nodes` and `links` lists)."""
    nodes = [
        {k: n[k] for k in NODE_FIELDS if k in n} for n in graph["nodes"] if isinstance(n, dict)
    ]
    index = {str(n.get("node_id")): i for i, n in enumerate(nodes)}
    links = graph["links"]
    try:  # the common case, in bulk: every link a dict naming known string ids
        src = np.fromiter((index[x["source"]] for x in links), np.int64, len(links))
        dst = np.fromiter((index[x["target"]] for x in links), np.int64, len(links))
        weights = np.fromiter((x["weight"] for x in links), np.float64, len(links))
    except (KeyError, TypeError, ValueError):
        src, dst, weights = _checked_links(links, index)
    keep = np.isfinite(weights)
    dropped = len(links) - int(keep.sum())
    src, dst, weights = src[keep], dst[keep], weights[keep]
    order = np.argsort(-np.abs(weights), kind="stable")
    head = {k: v for k, v in graph.items() if k not in ("links", "nodes")}
    head["nodes"] = nodes
    head["compact"] = {"links": len(order), "dropped": dropped}
    text = json.dumps(head, separators=(",", ":"), allow_nan=False).encode()
    pad = b"\0" * (-(8 + len(text)) % 4)
    arrays = (
        src[order].astype("<i4").tobytes(),
        dst[order].astype("<i4").tobytes(),
        weights[order].astype("<f4").tobytes(),
    )
    return b"".join((MAGIC, struct.pack("<I", len(text)), text, pad, *arrays))


def _checked_links(
    links: list[Any], index: dict[str, int]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Link by link: ids compared as strings; a link that is not a dict, names a node the
    graph lacks or has no numeric weight gets a NaN weight (dropped by the caller)."""
    src = np.zeros(len(links), np.int64)
    dst = np.zeros(len(links), np.int64)
    weights = np.full(len(links), np.nan)
    for i, link in enumerate(links):
        try:
            src[i], dst[i] = index[str(link["source"])], index[str(link["target"])]
            weights[i] = float(link["weight"])
        except (KeyError, TypeError, ValueError):
            continue
    return src, dst, weights


class CompactCache:
    """Compact forms of the last few graphs, keyed by file and its size and modification time
    (a rewritten graph is compacted again). A file being compacted is compacted once: other
    requests for it wait for that result."""

    def __init__(self, size: int = 4) -> None:
        self._items: OrderedDict[tuple[str, int, int], bytes] = OrderedDict()
        self._busy: dict[tuple[str, int, int], threading.Lock] = {}
        self.size = size
        self._lock = threading.Lock()

    def get(self, path: Path, parse: Any) -> bytes:
        """`path`'s compact form; `parse()` gives the parsed graph when it is not cached."""
        st = path.stat()
        key = (str(path), st.st_size, st.st_mtime_ns)
        with self._lock:
            hit = self._items.get(key)
            if hit is not None:
                self._items.move_to_end(key)
                return hit
            gate = self._busy.setdefault(key, threading.Lock())
        with gate:
            with self._lock:
                hit = self._items.get(key)
            if hit is not None:
                return hit
            try:
                data = compact_graph(parse())
            finally:
                with self._lock:
                    self._busy.pop(key, None)
            with self._lock:
                self._items[key] = data
                while len(self._items) > self.size:
                    self._items.popitem(last=False)
        return data
