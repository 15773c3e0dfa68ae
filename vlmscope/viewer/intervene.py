"""The viewer's intervention panel: set or ablate features of a graph's prompt, see the logits.

The model and dictionaries load on the first request (looking at graphs needs neither). The
prompt and images come from the graph JSON itself, so the run is the one the graph explains.
"""

from __future__ import annotations

import base64
import io
import threading
from pathlib import Path
from typing import Any

from vlmscope.viewer.files import Refused, safe_child

MAX_INTERVENTIONS = 256


class Intervener:
    """A ReplacementModel held for the viewer's process; one intervention runs at a time."""

    def __init__(self, model: str, dictionaries: str, device: str | None = None) -> None:
        from vlmscope.models.hooked import HookedVLM
        from vlmscope.replacement.model import ReplacementModel
        from vlmscope.training.trainer import resolve_model_path

        self.name = model
        vlm = HookedVLM.from_pretrained(resolve_model_path(model), device=device)
        self.rm = ReplacementModel(vlm, dictionaries)
        self._lock = threading.Lock()

    def run(self, graph: dict[str, Any], folder: Path, items: Any) -> dict[str, Any]:
        """Top next-token probabilities of the graph's prompt, clean and with `items` applied:
        [{"layer", "pos", "feature", "value"}, ...] (value 0 ablates)."""
        import torch

        from vlmscope.attribution.interventions import intervene

        if not isinstance(items, list) or not 0 < len(items) <= MAX_INTERVENTIONS:
            raise Refused(422, f"interventions must be a list of 1..{MAX_INTERVENTIONS} items")
        parsed = []
        for it in items:
            try:
                parsed.append(
                    (int(it["layer"]), int(it["pos"]), int(it["feature"]), float(it["value"]))
                )
            except (KeyError, TypeError, ValueError):
                raise Refused(
                    422, f"bad intervention {str(it)[:80]}: need layer, pos, feature, value"
                ) from None
        prompt = str(graph.get("metadata", {}).get("prompt", ""))
        images = [_image(e, folder) for e in graph.get("images", [])]
        vlm = self.rm.vlm
        with self._lock:
            inputs = vlm.prepare(prompt, images=images or None)
            try:
                res = intervene(self.rm, inputs, parsed)
            except ValueError as e:
                raise Refused(422, str(e)) from None
        tok = vlm.tokenizer

        def top(logits: Any) -> list[list[Any]]:
            p = torch.softmax(logits[0, -1].float(), -1)
            v, i = p.topk(10)
            return [[tok.decode([int(t)]), float(x)] for x, t in zip(v, i, strict=True)]

        return {"clean": top(res.clean_logits), "intervened": top(res.logits)}


def _image(entry: dict[str, Any], folder: Path) -> Any:
    from PIL import Image

    from vlmscope.data.sources import to_rgb

    if "data" in entry:
        head, _, b64 = str(entry["data"]).partition(",")
        if not head.startswith("data:image/"):
            raise Refused(422, "an embedded image is not a data URI")
        return to_rgb(Image.open(io.BytesIO(base64.b64decode(b64))))
    path = safe_child(folder, str(entry.get("path", "")))
    with Image.open(path) as im:
        return to_rgb(im)
