"""The feature-dashboard folder `vlmscope features` writes and `vlmscope serve` reads.

    DIR/index.json                 format, model, dictionaries, data, tokens seen, and per unit:
                                   key (the model layer for transcoders / CLTs, the hook name
                                   for SAEs), hook, number of features, shard size, folder
    DIR/<key>/features-<start>.json  the cards of features start .. start + shard size - 1
    DIR/images/<hash>.png          each image once, referenced by the examples that show it
    DIR/.progress/                 checkpoint of an unfinished run (removed when it completes)

A card: {index, key, density, count, max_activation, histogram: {log10_edges, counts},
top_logits: {positive: [[token, value]...], negative: [...]}, examples: [{activation, sample,
position, tokens: [...], acts: [...], focus, image?: {file, width, height, box, cell, label}}]}.
"""

from __future__ import annotations

import json
import os
import re
import threading
from pathlib import Path
from typing import Any

FORMAT = "vlmscope.features"
VERSION = 1
INDEX = "index.json"
_FOLDER = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,200}")


class FeatureUnavailable(LookupError):
    """No card for that request: no index, no such layer or feature (message says which)."""


def shard_name(start: int) -> str:
    return f"features-{start:07d}.json"


class FeatureStore:
    """Reads feature cards from a `vlmscope features` folder, a shard at a time (cached)."""

    def __init__(self, folder: Path, cache_shards: int = 16) -> None:
        self.folder = Path(folder)
        self._lock = threading.Lock()
        self._cache: dict[Path, list[dict[str, Any]]] = {}
        self._cache_size = cache_shards
        try:
            index = json.loads((self.folder / INDEX).read_text(encoding="utf-8"))
        except FileNotFoundError:
            index = None
        except (OSError, ValueError) as e:
            index = None
            self.problem = f"features unavailable: cannot read {INDEX}: {e}"
        else:
            self.problem = (
                ""
                if index is not None
                else "features unavailable: the folder has no index.json (run `vlmscope "
                "features` to completion first)"
            )
        self.index = index
        self.units = {str(u["key"]): u for u in (index or {}).get("units", [])}

    def card(self, key: str, feature: int) -> dict[str, Any]:
        if self.index is None:
            raise FeatureUnavailable(self.problem)
        unit = self.units.get(key)
        if unit is None:
            have = ", ".join(self.units) or "none"
            raise FeatureUnavailable(f"no features for layer {key[:40]!r} (have: {have})")
        n, size = int(unit["n_features"]), int(unit["shard_size"])
        if not 0 <= feature < n:
            raise FeatureUnavailable(f"layer {key} has features 0..{n - 1}, not {feature}")
        start = feature // size * size
        if not _FOLDER.fullmatch(str(unit["folder"])):
            raise FeatureUnavailable(f"{INDEX}: bad unit folder {str(unit['folder'])[:40]!r}")
        path = self.folder / str(unit["folder"]) / shard_name(start)
        if not path.is_file() or path.is_symlink():
            raise FeatureUnavailable(f"missing shard {path.relative_to(self.folder)}")
        # the shard itself is no link, but its unit folder could be one that leads out
        if Path(os.path.realpath(self.folder)) not in Path(os.path.realpath(path)).parents:
            raise FeatureUnavailable(
                f"refused shard {path.relative_to(self.folder)}: it leads out of the features "
                "folder"
            )
        with self._lock:
            cards = self._cache.get(path)
            if cards is None:
                cards = json.loads(path.read_text(encoding="utf-8"))["features"]
                if len(self._cache) >= self._cache_size:
                    self._cache.pop(next(iter(self._cache)))
                self._cache[path] = cards
        return cards[feature - start]
