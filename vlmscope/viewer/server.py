"""`vlmscope serve`: a local web app over graph JSON files and feature dashboards.

The server reads exported files only (no model is loaded to look at graphs); the intervention
panel is the one exception and loads the model on its first use. It uses the standard library's
threaded HTTP server: one request failing never stops the others.

Security, beyond circuit-tracer's server (which binds every interface and serves any path):
- it binds 127.0.0.1 unless told otherwise, and a non-loopback `--host` prints a warning;
- requests whose Host header is not the loopback address it serves are refused (a web page
  that rebinds its own DNS name to 127.0.0.1 cannot read the graphs);
- only files under `--graphs` and `--features` are served (see `viewer/files.py`: traversal,
  hidden files and symlinks out of the folders are refused), plus the app's own static files;
- request bodies and URLs are capped, graph files too;
- write endpoints (saving pins and supernodes, interventions) need the random per-session
  token printed at start (`X-Vlmscope-Token` header), as Jupyter does, so another local user
  or a web page cannot write; responses forbid framing, sniffing and referrers.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import secrets
import sys
import threading
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib.resources import files
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from vlmscope.files import write_text_atomically
from vlmscope.viewer.compact import CompactCache
from vlmscope.viewer.files import (
    ANNOTATIONS_SUFFIX,
    Refused,
    check_annotations,
    check_slug,
    list_graphs,
    load_graph,
    read_annotations,
    read_graph,
    safe_child,
)

TOKEN_HEADER = "X-Vlmscope-Token"
STATIC = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/app.css": ("app.css", "text/css; charset=utf-8"),
}
TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".webp": "image/webp"}
MAX_URL = 4096
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
    "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
)


@dataclass
class ViewerConfig:
    """What `vlmscope serve` serves and how (see `add_serve_arguments` for each field)."""

    graphs: Path | None = None
    features: Path | None = None
    host: str = "127.0.0.1"
    port: int = 8765
    max_graph_bytes: int = 256 * 2**20
    max_body_bytes: int = 2**20
    model: str | None = None
    dictionaries: str | None = None
    device: str | None = None
    token: str = field(default_factory=lambda: secrets.token_urlsafe(24))


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class ViewerServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, cfg: ViewerConfig) -> None:
        self.cfg = cfg
        self.features = None
        if cfg.features is not None and cfg.features.is_dir():
            from vlmscope.features.store import FeatureStore

            self.features = FeatureStore(cfg.features)
        self.intervener: Any = None
        self.compact = CompactCache()
        self._intervener_lock = threading.Lock()
        super().__init__((cfg.host, cfg.port), Handler)
        if cfg.graphs is not None and cfg.graphs.is_dir():
            threading.Thread(target=self._warm, daemon=True, name="compact-graphs").start()

    def _warm(self) -> None:
        """Compact the first graph of the list, the one the page opens unless told otherwise,
        while the browser starts (a 100k-edge graph takes about a second); a request that
        comes first waits for the same work. Only one: a folder of huge graphs is not all
        parsed at start."""
        folder, cap = self.cfg.graphs, self.cfg.max_graph_bytes
        assert folder is not None
        try:
            graphs = list_graphs(folder)
        except OSError:
            return
        slugs = [g["slug"] for g in graphs if g.get("slug") and g.get("exists")]
        for slug in slugs[:1]:
            try:
                path = safe_child(folder, f"{slug}.json")
                if path.stat().st_size <= cap:
                    self.compact.get(path, lambda s=slug: load_graph(folder, s, cap)[2])
            except Exception:  # a bad graph is reported when it is opened, not here
                continue

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        shown = f"[{host}]" if ":" in str(host) else host
        return f"http://{shown}:{port}/?token={self.cfg.token}"

    def get_intervener(self) -> Any:
        """The model for interventions, loaded on first use (None when not configured)."""
        if self.cfg.model is None or self.cfg.dictionaries is None:
            return None
        with self._intervener_lock:
            if self.intervener is None:
                from vlmscope.viewer.intervene import Intervener

                self.intervener = Intervener(self.cfg.model, self.cfg.dictionaries, self.cfg.device)
            return self.intervener


class Handler(BaseHTTPRequestHandler):
    server: ViewerServer
    server_version = "vlmscope-viewer"
    sys_version = ""
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass  # quiet: a terminal full of GET lines hides the URL and the warnings

    # --- plumbing ---------------------------------------------------------------------------
    def _send(self, status: int, body: bytes, ctype: str, extra: dict[str, str] | None = None):
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("X-Frame-Options", "DENY")
        self.send_header("Referrer-Policy", "no-referrer")
        self.send_header("Content-Security-Policy", CSP)
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, obj: Any) -> None:
        body = json.dumps(obj, separators=(",", ":"), allow_nan=False).encode()
        self._send(status, body, "application/json")

    def _error(self, status: int, message: str) -> None:
        self._json(status, {"error": message})

    def _host_ok(self) -> bool:
        """Loopback servers answer only requests addressed to a loopback name (DNS rebinding)."""
        if not is_loopback(self.server.cfg.host):
            return True
        host = self.headers.get("Host", "")
        name = urlsplit(f"//{host}").hostname or ""
        return is_loopback(name)

    def _token_ok(self) -> bool:
        given = self.headers.get(TOKEN_HEADER, "")
        return hmac.compare_digest(given.encode(), self.server.cfg.token.encode())

    def _route(self, write: bool) -> None:
        try:
            if len(self.path) > MAX_URL:
                raise Refused(414, "URL too long")
            if not self._host_ok():
                raise Refused(403, "refused: the Host header is not this loopback server")
            if write and not self._token_ok():
                raise Refused(403, f"refused: writing needs the session token ({TOKEN_HEADER})")
            path = urlsplit(self.path).path
            parts = [unquote(p) for p in path.split("/")[1:]]
            handler = self._post if write else self._get
            handler(path, parts)
        except Refused as e:
            self.close_connection |= write  # its body may be unread: never parse it as a request
            self._error(e.status, e.message)
        except (BrokenPipeError, ConnectionResetError):
            pass
        except Exception as e:  # the server stays up; the page shows the message
            traceback.print_exc(file=sys.stderr)
            self.close_connection |= write
            self._error(500, f"{type(e).__name__}: {e}")

    def do_GET(self) -> None:
        self._route(write=False)

    def do_HEAD(self) -> None:
        self._route(write=False)

    def do_POST(self) -> None:
        self._route(write=True)

    def do_PUT(self) -> None:
        self._error(405, "method not allowed")

    do_DELETE = do_PATCH = do_PUT

    def _body(self) -> Any:
        try:
            n = int(self.headers.get("Content-Length", ""))
        except ValueError:
            raise Refused(411, "a Content-Length header is required") from None
        if n < 0 or n > self.server.cfg.max_body_bytes:
            self.close_connection = True
            raise Refused(413, f"request body over {self.server.cfg.max_body_bytes} bytes")
        try:
            return json.loads(self.rfile.read(n), parse_constant=_not_json)
        except (ValueError, UnicodeDecodeError) as e:
            raise Refused(400, f"request body is not JSON: {e}") from None

    def _graph_folder(self) -> Path:
        folder = self.server.cfg.graphs
        if folder is None:
            raise Refused(404, "no graph folder: start the viewer with --graphs DIR")
        return folder

    # --- reads ------------------------------------------------------------------------------
    def _get(self, path: str, parts: list[str]) -> None:
        if path in STATIC:
            name, ctype = STATIC[path]
            self._send(200, _static(name), ctype)
        elif parts == ["api", "info"]:
            cfg = self.server.cfg
            self._json(
                200,
                {
                    "graphs": cfg.graphs is not None,
                    "features": self.server.features is not None
                    and self.server.features.index is not None,
                    "features_message": _features_message(cfg)
                    or (self.server.features.problem if self.server.features else ""),
                    "interventions": cfg.model is not None and cfg.dictionaries is not None,
                    "model": cfg.model,
                    "max_graph_bytes": cfg.max_graph_bytes,
                },
            )
        elif parts == ["api", "graphs"]:
            folder = self.server.cfg.graphs
            self._json(200, {"graphs": list_graphs(folder) if folder is not None else []})
        elif len(parts) == 3 and parts[:2] == ["api", "graphs"]:
            data = read_graph(self._graph_folder(), parts[2], self.server.cfg.max_graph_bytes)
            self._send(200, data, "application/json")
        elif len(parts) == 4 and parts[:2] == ["api", "graphs"] and parts[3] == "compact":
            folder, slug, cap = self._graph_folder(), parts[2], self.server.cfg.max_graph_bytes
            path = safe_child(folder, f"{check_slug(slug)}.json")
            try:
                data = self.server.compact.get(path, lambda: load_graph(folder, slug, cap)[2])
            except ValueError as e:  # json.dumps(allow_nan=False): not JSON a browser reads
                raise Refused(422, f"{slug}.json holds NaN or Infinity: {e}") from None
            self._send(200, data, "application/octet-stream")
        elif len(parts) == 4 and parts[:2] == ["api", "graphs"] and parts[3] == "annotations":
            self._json(200, read_annotations(self._graph_folder(), parts[2]))
        elif len(parts) >= 3 and parts[:2] == ["api", "graph-files"]:
            self._file(self._graph_folder(), "/".join(parts[2:]))
        elif len(parts) == 4 and parts[:2] == ["api", "features"]:
            self._json(200, self._feature(parts[2], parts[3]))
        elif len(parts) >= 3 and parts[:2] == ["api", "feature-files"]:
            if self.server.features is None:
                raise Refused(404, _features_message(self.server.cfg))
            self._file(self.server.features.folder, "/".join(parts[2:]))
        elif path == "/favicon.ico":
            self._send(204, b"", "image/x-icon")
        else:
            raise Refused(404, f"no such page {path[:80]!r}")

    def _file(self, root: Path, rel: str) -> None:
        target = safe_child(root, rel)
        ctype = TYPES.get(target.suffix.lower())
        if ctype is None:
            raise Refused(403, f"refused: only images are served from here, not {target.name!r}")
        self._send(200, target.read_bytes(), ctype)

    def _feature(self, layer: str, index: str) -> dict[str, Any]:
        store = self.server.features
        if store is None:
            raise Refused(404, _features_message(self.server.cfg))
        if not index.isdigit() or len(index) > 12:
            raise Refused(400, f"bad feature index {index[:20]!r}")
        from vlmscope.features.store import FeatureUnavailable

        try:
            return store.card(layer, int(index))
        except FeatureUnavailable as e:
            raise Refused(404, str(e)) from None

    # --- writes -----------------------------------------------------------------------------
    def _post(self, path: str, parts: list[str]) -> None:
        if len(parts) == 4 and parts[:2] == ["api", "graphs"] and parts[3] == "annotations":
            folder = self._graph_folder()
            slug = check_slug(parts[2])
            safe_child(folder, f"{slug}.json")  # the graph must exist, under the folder
            obj = check_annotations(self._body())
            target = folder / f"{slug}{ANNOTATIONS_SUFFIX}"
            if target.is_symlink():
                raise Refused(403, f"refused: {target.name} is a symlink")
            write_text_atomically(target, json.dumps(obj, indent=1))
            self._json(200, {"saved": target.name, **obj})
        elif parts == ["api", "intervene"]:
            body = self._body()
            if not isinstance(body, dict):
                raise Refused(400, "the request body must be a JSON object")
            intervener = self.server.get_intervener()
            if intervener is None:
                raise Refused(404, "no model: start the viewer with --model and --dictionaries")
            slug = check_slug(str(body.get("slug", "")))
            graph = json.loads(
                read_graph(self._graph_folder(), slug, self.server.cfg.max_graph_bytes)
            )
            self._json(200, intervener.run(graph, self._graph_folder(), body.get("interventions")))
        else:
            raise Refused(404, f"no such endpoint {path[:80]!r}")


def _not_json(name: str) -> Any:
    """json.loads reads NaN and Infinity, which JSON has not; a request holding them is bad."""
    raise ValueError(f"{name} is not a JSON number")


def _features_message(cfg: ViewerConfig) -> str:
    if cfg.features is None:
        return "features unavailable: start the viewer with --features DIR"
    if not cfg.features.is_dir():
        return f"features unavailable: no folder {cfg.features}"
    return ""


@lru_cache(maxsize=8)
def _static(name: str) -> bytes:
    return files("vlmscope.viewer").joinpath("static", name).read_bytes()


def host_warning(host: str) -> str | None:
    """The warning printed for a bind address other than loopback (None for loopback)."""
    if is_loopback(host):
        return None
    return (
        f"warning: serving on {host}, not the loopback address: anyone who can reach this "
        "machine on that address can read the graphs (writes still need the token)"
    )


def make_server(cfg: ViewerConfig, warn: Callable[[str], None] | None = None) -> ViewerServer:
    """A bound (not yet serving) viewer; warns when it listens beyond this machine."""
    text = host_warning(cfg.host)
    if text is not None:
        (warn or _stderr)(text)
    return ViewerServer(cfg)


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr)
