"""The viewer's server: what it serves, what it refuses, and that bad input never stops it."""

from __future__ import annotations

import http.client
import json
import os
import re
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from tests.attribution.test_export import image_graph
from tests.conftest import random_image
from vlmscope.attribution.export import store_image, write_graph_files
from vlmscope.viewer.server import (
    TOKEN_HEADER,
    ViewerConfig,
    ViewerServer,
    host_warning,
    make_server,
)


class Client:
    """Raw HTTP to the test server: paths go out exactly as written (no normalising)."""

    def __init__(self, server: ViewerServer) -> None:
        self.server = server
        self.port = server.server_address[1]

    def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, dict[str, str], bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=20)
        hdrs = {"Host": f"127.0.0.1:{self.port}", **(headers or {})}
        conn.request(method, path, body=body, headers=hdrs)
        r = conn.getresponse()
        data = r.read()
        conn.close()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, data

    def get(self, path: str, **kw: Any) -> tuple[int, Any]:
        status, _, data = self.request("GET", path, **kw)
        try:
            return status, json.loads(data)
        except ValueError:
            return status, data

    def post(self, path: str, obj: Any, token: str | None = None) -> tuple[int, Any]:
        headers = {"Content-Type": "application/json"}
        if token is not None:
            headers[TOKEN_HEADER] = token
        status, _, data = self.request("POST", path, json.dumps(obj).encode(), headers)
        return status, json.loads(data)


def serve(cfg: ViewerConfig) -> Iterator[Client]:
    server = make_server(cfg)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield Client(server)
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def site(tmp_path: Path) -> Iterator[tuple[Client, Path, Path]]:
    graphs = tmp_path / "graphs"
    pic = random_image(8, 8, 1)
    g = image_graph()
    write_graph_files(g, graphs, "good", images=None,
                      image_paths=[graphs / store_image(pic, graphs),
                                   graphs / store_image(random_image(8, 8, 2), graphs)],
                      relative_to=graphs)  # fmt: skip
    (graphs / "broken.json").write_text('{"nodes": [1, 2,, 3]}')
    (graphs / "notgraph.json").write_text("[1, 2, 3]")
    outside = tmp_path / "secret"
    outside.mkdir()
    Image.new("RGB", (4, 4)).save(outside / "private.png")
    (outside / "other.json").write_text(json.dumps({"nodes": [], "links": []}))
    os.symlink(outside / "private.png", graphs / "images" / "link.png")
    os.symlink(outside / "other.json", graphs / "escape.json")
    cfg = ViewerConfig(graphs=graphs, features=tmp_path / "no-features", port=0,
                       max_graph_bytes=50_000, max_body_bytes=4096)  # fmt: skip
    for client in serve(cfg):
        yield client, graphs, outside


def test_serves_the_page_graphs_and_their_images(site: tuple[Client, Path, Path]) -> None:
    c, graphs, _ = site
    status, headers, body = c.request("GET", "/")
    assert status == 200 and b"vlmscope viewer" in body
    assert "default-src 'none'" in headers["content-security-policy"]
    assert headers["x-content-type-options"] == "nosniff"
    status, listing = c.get("/api/graphs")
    assert status == 200
    slugs = [g["slug"] for g in listing["graphs"]]
    assert slugs[0] == "good" and {"broken", "notgraph", "escape"} <= set(slugs)
    status, data = c.get("/api/graphs/good")
    assert status == 200 and data == json.loads((graphs / "good.json").read_text())
    rel = data["images"][0]["path"]
    status, _, png = c.request("GET", f"/api/graph-files/{rel}")
    assert status == 200 and png == (graphs / rel).read_bytes()


@pytest.mark.parametrize(
    "path",
    [
        "/api/graph-files/../secret/private.png",
        "/api/graph-files/%2e%2e/secret/private.png",
        "/api/graph-files/images/..%2f..%2fsecret%2fprivate.png",
        "/api/graph-files/%2Ftmp%2Fx.png",
        "/api/graph-files/images/link.png",  # a symlink out of the folder
        "/api/graph-files/good.json",  # only images come from there
        "/api/graph-files/.hidden.png",
        "/api/graphs/..%2fsecret%2fother",
        "/api/graphs/escape",  # a graph file that is a symlink out of the folder
        "/api/graphs/good%00",
    ],
)
def test_traversal_and_symlinks_out_are_refused(site: tuple[Client, Path, Path], path: str) -> None:
    c, _, _ = site
    status, body = c.get(path)
    assert status in (400, 403), (status, body)
    assert isinstance(body, dict) and set(body) == {"error"}  # a message, never the file


def test_writes_need_the_session_token(site: tuple[Client, Path, Path]) -> None:
    c, graphs, _ = site
    ann = {"pinnedIds": ["E_4_1"], "supernodes": [["circle patches", "E_4_1", "E_4_2"]]}
    target = graphs / "good.annotations.json"
    for token in (None, "", "wrong-token"):
        status, body = c.post("/api/graphs/good/annotations", ann, token)
        assert status == 403 and "token" in body["error"]
        assert not target.exists()
    status, body = c.post("/api/graphs/good/annotations", ann, c.server.cfg.token)
    assert status == 200 and json.loads(target.read_text()) == ann
    assert c.get("/api/graphs/good/annotations") == (200, ann)
    # Bad bodies: wrong shape, too big, no graph of that name.
    status, body = c.post("/api/graphs/good/annotations", {"supernodes": "x"}, c.server.cfg.token)
    assert status == 422
    big = {"pinnedIds": ["x" * 100] * 100}
    status, body = c.post("/api/graphs/good/annotations", big, c.server.cfg.token)
    assert status == 413
    status, _ = c.post("/api/graphs/missing/annotations", ann, c.server.cfg.token)
    assert status == 404 and not (graphs / "missing.annotations.json").exists()
    assert json.loads(target.read_text()) == ann  # the saved file is intact


def test_a_refused_post_never_leaves_its_body_to_be_read_as_a_request(
    site: tuple[Client, Path, Path],
) -> None:
    """HTTP/1.1 keeps the connection open: a POST answered before its body is read (no token,
    no such graph) must close it, or the body is parsed as the next request line."""
    import socket

    c, _, _ = site
    body = b'{"pinnedIds":[],"supernodes":[]}'
    host = f"Host: 127.0.0.1:{c.port}\r\n"
    for token in ("", f"{TOKEN_HEADER}: {c.server.cfg.token}\r\n"):
        post = (
            f"POST /api/graphs/nosuch/annotations HTTP/1.1\r\n{host}{token}"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        )
        get = f"GET /api/info HTTP/1.1\r\n{host}\r\n"
        with socket.create_connection(("127.0.0.1", c.port), timeout=20) as sock:
            sock.sendall(post.encode() + body + get.encode())
            replies = b""
            while chunk := sock.recv(65536):
                replies += chunk
        statuses = re.findall(rb"HTTP/1\.[01] (\d{3})", replies)
        assert statuses in ([b"403"], [b"404"]), replies[:300]  # one answer, then closed
    # NaN and Infinity are not JSON, though Python's parser reads them
    status, _, data = c.request("POST", "/api/intervene", b'{"slug": NaN}',
                                {TOKEN_HEADER: c.server.cfg.token})  # fmt: skip
    assert status == 400 and b"NaN is not a JSON number" in data
    status, _, data = c.request("POST", "/api/intervene", b"[1]",
                                {TOKEN_HEADER: c.server.cfg.token})  # fmt: skip
    assert status == 400 and b"must be a JSON object" in data


def test_other_hosts_are_refused(site: tuple[Client, Path, Path]) -> None:
    """A page that rebinds its own name to 127.0.0.1 sends its own Host header."""
    c, _, _ = site
    status, body = c.get("/api/graphs", headers={"Host": f"evil.example:{c.port}"})
    assert status == 403 and "Host" in body["error"]
    assert c.get("/api/graphs", headers={"Host": f"localhost:{c.port}"})[0] == 200


def test_bad_graphs_give_a_message_and_the_server_stays_up(site: tuple[Client, Path, Path]) -> None:
    c, graphs, _ = site
    status, body = c.get("/api/graphs/broken")
    assert status == 422 and "broken.json is not valid JSON" in body["error"]
    assert "line 1 column" in body["error"]
    status, body = c.get("/api/graphs/notgraph")
    assert status == 422 and "not a graph" in body["error"]
    (graphs / "huge.json").write_text(json.dumps({"nodes": [], "links": [0] * 40_000}))
    status, body = c.get("/api/graphs/huge")
    assert status == 413 and "--max-graph-mb" in body["error"]
    status, _ = c.get("/api/graphs/good")
    assert status == 200  # still serving


def test_missing_features_folder_is_reported_not_fatal(site: tuple[Client, Path, Path]) -> None:
    c, _, _ = site
    status, info = c.get("/api/info")
    assert status == 200 and info["features"] is False
    assert "features unavailable" in info["features_message"]
    status, body = c.get("/api/features/0/3")
    assert status == 404 and "features unavailable" in body["error"]
    assert c.get("/api/graphs/good")[0] == 200


def test_loopback_by_default_and_a_warning_otherwise() -> None:
    assert ViewerConfig().host == "127.0.0.1"
    assert host_warning("127.0.0.1") is None and host_warning("localhost") is None
    assert host_warning("::1") is None
    text = host_warning("0.0.0.0")
    assert text is not None and "anyone who can reach" in text
    a, b = ViewerConfig(), ViewerConfig()
    assert a.token != b.token and len(a.token) >= 24


def test_patch_effects_reach_the_page_unchanged(site: tuple[Client, Path, Path]) -> None:
    """The page draws the heatmap from the graph's own signed patch effects."""
    c, _, _ = site
    _, data = c.get("/api/graphs/good")
    (first, _second) = data["patch_effects"]
    assert first["values"][0] == pytest.approx([v for v in image_graph_effects()[0]], rel=1e-5)


def image_graph_effects() -> list[list[float]]:
    from vlmscope.attribution.export import patch_influence

    return patch_influence(image_graph(), 0, signed=True)[0][0].to(torch.float64).tolist()
