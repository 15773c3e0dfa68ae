"""The compact graph form the page opens (viewer/compact.py), decoded here by hand from its byte
layout and compared with the graph JSON it came from; and its endpoint on the server."""

from __future__ import annotations

import json
import math
import struct
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.viewer.test_server import Client, serve
from vlmscope.viewer.compact import NODE_FIELDS, CompactCache, compact_graph
from vlmscope.viewer.server import ViewerConfig


def decode(data: bytes) -> tuple[dict[str, Any], list[tuple[int, int, float]]]:
    """The layout the module docstring states, read with struct only."""
    assert data[:4] == b"VGC1"
    (j,) = struct.unpack_from("<I", data, 4)
    head = json.loads(data[8 : 8 + j])
    off = 8 + j + (-(8 + j) % 4)
    n = head["compact"]["links"]
    assert len(data) == off + 12 * n
    src = struct.unpack_from(f"<{n}i", data, off)
    dst = struct.unpack_from(f"<{n}i", data, off + 4 * n)
    w = struct.unpack_from(f"<{n}f", data, off + 8 * n)
    return head, list(zip(src, dst, w, strict=True))


def graph(n_links: int = 50, seed: int = 0) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    nodes = [
        {"node_id": f"n{i}", "feature": i, "layer": str(i % 3), "ctx_idx": i % 4,
         "feature_type": "cross layer transcoder", "influence": float(rng.random()),
         "jsNodeId": f"{i}-0", "clerp": f"c{i}"}
        for i in range(12)
    ]  # fmt: skip
    links = [
        {"source": f"n{a}", "target": f"n{b}", "weight": float(rng.normal())}
        for a, b in rng.integers(0, 12, size=(n_links, 2))
    ]
    meta = {"slug": "g", "prompt_tokens": ["a", "b", "c", "d"], "node_threshold": 0.8}
    return {"metadata": meta, "qParams": {"pinnedIds": []}, "nodes": nodes, "links": links}


def test_links_round_trip_strongest_first() -> None:
    g = graph()
    head, links = decode(compact_graph(g))
    ids = [n["node_id"] for n in head["nodes"]]
    got = [(ids[s], ids[t], w) for s, t, w in links]
    want = sorted(
        ((x["source"], x["target"], x["weight"]) for x in g["links"]),
        key=lambda x: -abs(x[2]),
    )
    assert [(s, t) for s, t, _ in got] == [(s, t) for s, t, _ in want]
    # float32 on the wire: within its rounding of the JSON's float64.
    assert all(abs(a[2] - b[2]) <= 6e-8 * abs(b[2]) for a, b in zip(got, want, strict=True))
    assert head["compact"] == {"links": len(g["links"]), "dropped": 0}
    # Everything but the links travels as JSON, nodes cut to the fields the page reads.
    assert head["metadata"] == g["metadata"] and head["qParams"] == g["qParams"]
    assert "links" not in head
    assert head["nodes"] == [{k: n[k] for k in NODE_FIELDS if k in n} for n in g["nodes"]]
    assert "jsNodeId" not in head["nodes"][0] and head["nodes"][0]["clerp"] == "c0"


def test_bad_links_are_dropped_and_counted() -> None:
    g = graph(n_links=5)
    g["links"] += [
        {"source": "n0", "target": "nowhere", "weight": 1.0},
        {"source": "n0", "target": "n1"},
        {"source": "n0", "target": "n1", "weight": "x"},
        {"source": "n0", "target": "n1", "weight": math.nan},
        {"source": "n0", "target": "n1", "weight": math.inf},
        "not a link",
    ]
    head, links = decode(compact_graph(g))
    assert head["compact"] == {"links": 5, "dropped": 6} and len(links) == 5


def test_numeric_ids_match_as_strings() -> None:
    g = {"nodes": [{"node_id": 7}, {"node_id": "8"}],
         "links": [{"source": 7, "target": 8, "weight": 0.5}]}  # fmt: skip
    head, links = decode(compact_graph(g))
    assert links == [(0, 1, 0.5)] and head["compact"]["dropped"] == 0


def test_empty_graph() -> None:
    head, links = decode(compact_graph({"nodes": [], "links": []}))
    assert head["nodes"] == [] and links == []


@pytest.fixture
def client(tmp_path: Path) -> Any:
    (tmp_path / "g.json").write_text(json.dumps(graph()))
    (tmp_path / "broken.json").write_text('{"nodes": [')
    (tmp_path / "nan.json").write_text(
        '{"nodes": [{"node_id": "a", "influence": NaN}], "links": []}'
    )
    for c in serve(ViewerConfig(graphs=tmp_path, port=0, max_graph_bytes=50_000)):
        yield c, tmp_path


def test_endpoint_serves_the_file_and_follows_rewrites(client: tuple[Client, Path]) -> None:
    c, folder = client
    status, headers, data = c.request("GET", "/api/graphs/g/compact")
    assert status == 200 and headers["content-type"] == "application/octet-stream"
    assert data == compact_graph(json.loads((folder / "g.json").read_text()))
    g2 = graph(n_links=7, seed=1)
    (folder / "g.json").write_text(json.dumps(g2))  # a rewritten graph is compacted again
    _, _, data = c.request("GET", "/api/graphs/g/compact")
    assert decode(data)[0]["compact"]["links"] == 7


def test_endpoint_refuses_what_the_json_endpoint_refuses(client: tuple[Client, Path]) -> None:
    c, folder = client
    status, body = c.get("/api/graphs/broken/compact")
    assert status == 422 and "broken.json is not valid JSON" in body["error"]
    status, body = c.get("/api/graphs/nan/compact")
    assert status == 422 and "nan.json" in body["error"] and "NaN" in body["error"]
    status, body = c.get("/api/graphs/..%2fx/compact")
    assert status == 400
    (folder / "huge.json").write_text(json.dumps({"nodes": [], "links": [0] * 40_000}))
    status, body = c.get("/api/graphs/huge/compact")
    assert status == 413 and "--max-graph-mb" in body["error"]
    assert c.get("/api/graphs/g/compact")[0] == 200  # still serving


def test_cache_compacts_a_file_once_for_concurrent_requests(tmp_path: Path) -> None:
    path = tmp_path / "g.json"
    path.write_text(json.dumps(graph()))
    calls = []

    def parse() -> dict[str, Any]:
        calls.append(1)
        time.sleep(0.2)  # long enough for the other request to arrive meanwhile
        return json.loads(path.read_text())

    cache, out = CompactCache(), []
    threads = [threading.Thread(target=lambda: out.append(cache.get(path, parse)))
               for _ in range(3)]  # fmt: skip
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len(out) == 3 and len(set(out)) == 1
    assert out[0] == compact_graph(json.loads(path.read_text()))
