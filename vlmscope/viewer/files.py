"""What the viewer may read and write: files under the folders it was given, nothing else.

Every path a request names is checked here, before any file is opened:
- a slug or relative path with `..`, an absolute path, a backslash, a NUL or a hidden component
  is refused outright;
- the path is resolved with symlinks followed and must still lie under its root, so a symlink
  that points out of the folder is refused like a traversal;
- graph files larger than the cap are refused before they are read.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from vlmscope.attribution.export import GRAPH_INDEX, read_graph_index

#: graph file names the viewer lists (as `vlmscope attribute --slug` accepts them).
SLUG = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
#: pins and supernodes of `<slug>.json` are saved next to it under this suffix.
ANNOTATIONS_SUFFIX = ".annotations.json"
_NOT_GRAPHS = (GRAPH_INDEX,)


class Refused(Exception):
    """A request the viewer will not serve; `status` is its HTTP status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def safe_child(root: Path, rel: str) -> Path:
    """`root/rel` if `rel` is a plain relative path that stays under `root` once symlinks are
    resolved; else Refused (403 for escapes, 404 for a file that is not there)."""
    if not rel or len(rel) > 1024 or "\x00" in rel or "\\" in rel or rel.startswith("/"):
        raise Refused(403, f"refused path {rel[:80]!r}")
    parts = rel.split("/")
    if any(p in ("", ".", "..") or p.startswith(".") for p in parts):
        raise Refused(403, f"refused path {rel[:80]!r}: no '..', hidden or empty parts")
    base = Path(os.path.realpath(root))
    target = Path(os.path.realpath(base.joinpath(*parts)))
    if target != base and base not in target.parents:
        raise Refused(403, f"refused path {rel[:80]!r}: it leads out of the served folder")
    if not target.is_file():
        raise Refused(404, f"no file {rel[:80]!r}")
    return target


def check_slug(slug: str) -> str:
    if not SLUG.fullmatch(slug) or slug.endswith(".json"):
        raise Refused(400, f"bad graph name {slug[:80]!r}")
    return slug


def list_graphs(folder: Path) -> list[dict[str, Any]]:
    """The graphs of a folder: those its graph-metadata.json lists (with their prompt and
    scan), then any other `<slug>.json` file, newest first. A corrupt index is reported as an
    entry with an `error` and does not hide the files."""
    out: list[dict[str, Any]] = []
    seen: set[str] = set()
    try:
        indexed = read_graph_index(folder / GRAPH_INDEX)
    except ValueError as e:
        out.append({"slug": None, "error": str(e).replace(str(folder), GRAPH_INDEX)})
        indexed = []
    for g in indexed:
        slug = str(g.get("slug", ""))
        if SLUG.fullmatch(slug) and slug not in seen:
            seen.add(slug)
            out.append(
                {
                    "slug": slug,
                    "prompt": str(g.get("prompt", "")),
                    "scan": str(g.get("scan", "")),
                    "exists": (folder / f"{slug}.json").is_file(),
                }
            )
    others = []
    for p in folder.glob("*.json"):
        slug = p.name[: -len(".json")]
        if p.name in _NOT_GRAPHS or p.name.endswith(ANNOTATIONS_SUFFIX) or slug in seen:
            continue
        if SLUG.fullmatch(slug):
            others.append((p.stat().st_mtime, slug))
    for _, slug in sorted(others, reverse=True):
        out.append({"slug": slug, "prompt": "", "scan": "", "exists": True})
    return out


def read_graph(folder: Path, slug: str, max_bytes: int) -> bytes:
    """The bytes of `folder/<slug>.json`, checked as `load_graph` does."""
    return load_graph(folder, slug, max_bytes)[1]


def load_graph(folder: Path, slug: str, max_bytes: int) -> tuple[Path, bytes, dict[str, Any]]:
    """The path, bytes and parsed content of `folder/<slug>.json`, checked: under the folder,
    at most `max_bytes`, and valid JSON with `nodes` and `links` lists (else Refused with a
    message naming the file and, for a syntax error, the line and column)."""
    path = safe_child(folder, f"{check_slug(slug)}.json")
    size = path.stat().st_size
    if size > max_bytes:
        raise Refused(
            413,
            f"{slug}.json is {size / 2**20:.1f} MiB, over the viewer's limit of "
            f"{max_bytes / 2**20:.0f} MiB (raise it with --max-graph-mb)",
        )
    data = path.read_bytes()
    try:
        parsed = json.loads(data)
    except UnicodeDecodeError as e:
        raise Refused(422, f"{slug}.json is not UTF-8 text: {e}") from None
    except json.JSONDecodeError as e:
        raise Refused(
            422, f"{slug}.json is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}"
        ) from None
    if not isinstance(parsed, dict):
        raise Refused(422, f"{slug}.json holds a {type(parsed).__name__}, not a graph object")
    for key in ("nodes", "links"):
        if not isinstance(parsed.get(key), list):
            raise Refused(422, f"{slug}.json has no '{key}' list: not an attribution graph")
    return path, data, parsed


def read_annotations(folder: Path, slug: str) -> dict[str, Any]:
    """Saved pins and supernodes of a graph (empty when none were saved)."""
    path = folder / f"{check_slug(slug)}{ANNOTATIONS_SUFFIX}"
    if not path.exists():
        return {"pinnedIds": [], "supernodes": []}
    target = safe_child(folder, path.name)
    try:
        return check_annotations(json.loads(target.read_text(encoding="utf-8")))
    except (ValueError, Refused) as e:
        msg = e.message if isinstance(e, Refused) else str(e)
        raise Refused(422, f"{path.name}: {msg}") from None


def check_annotations(obj: Any) -> dict[str, Any]:
    """Pins and supernodes in circuit-tracer's qParams form: `pinnedIds` [node id, ...] and
    `supernodes` [[label, node id, ...], ...]; anything else is refused (422)."""
    if not isinstance(obj, dict):
        raise Refused(422, "annotations must be an object")
    pins = obj.get("pinnedIds", [])
    sns = obj.get("supernodes", [])
    if not isinstance(pins, list) or not all(isinstance(p, str) and len(p) < 256 for p in pins):
        raise Refused(422, "pinnedIds must be a list of node ids")
    if not isinstance(sns, list) or not all(
        isinstance(s, list) and len(s) >= 2 and all(isinstance(x, str) and len(x) < 256 for x in s)
        for s in sns
    ):
        raise Refused(422, "supernodes must be a list of [label, node id, ...] lists")
    if len(pins) > 10_000 or len(sns) > 1_000:
        raise Refused(422, "too many pins or supernodes")
    return {"pinnedIds": pins, "supernodes": sns}
