"""The intervention panel's endpoint: the model loads on first use, the clean run is the model's
own output, and ablating a feature moves the logits as `intervene` says."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.features.test_run import toy_setup
from tests.viewer.browser import running
from tests.viewer.test_server import Client
from vlmscope.attribution.export import store_image, write_graph_files
from vlmscope.viewer.server import ViewerConfig


def test_intervene_endpoint(tmp_path_factory: pytest.TempPathFactory) -> None:
    from vlmscope.attribution.attribute import attribute
    from vlmscope.demo import QUESTION, demo_image

    root = tmp_path_factory.mktemp("intervene")
    toy = toy_setup(root)
    vlm, graphs, image = toy["vlm"], root / "graphs", demo_image()
    inputs = vlm.prepare(QUESTION, images=[image])
    graph = attribute(vlm, str(toy["dicts"]), inputs, max_feature_nodes=8, batch_size=8)
    stored = [graphs / store_image(image, graphs)]
    write_graph_files(graph, graphs, "g", prompt_text=QUESTION, image_paths=stored,
                      relative_to=graphs)  # fmt: skip
    layer, pos, feat = (int(v) for v in graph.features[0])
    cfg = ViewerConfig(graphs=graphs, port=0, model="toy", dictionaries=str(toy["dicts"]))
    with running(cfg) as server:
        c = Client(server)
        assert server.intervener is None  # nothing loaded to look at graphs
        body: dict[str, Any] = {"slug": "g", "interventions": [
            {"layer": layer, "pos": pos, "feature": feat, "value": 0.0}]}  # fmt: skip
        status, r = c.post("/api/intervene", body)
        assert status == 403  # no token, no model run
        status, r = c.post("/api/intervene", body, server.cfg.token)
        assert status == 200, r
        # Clean: the replacement model with its errors held is the model itself.
        with torch.no_grad():
            p = torch.softmax(vlm.forward(inputs).logits[0, -1].float(), -1)
        top = p.topk(10)
        assert [t for t, _ in r["clean"]] == [vlm.tokenizer.decode([int(i)]) for i in top.indices]
        assert [q for _, q in r["clean"]] == pytest.approx(top.values.tolist(), abs=1e-4)
        assert r["intervened"] != r["clean"]  # ablating an explored feature moves something
        bad = {"slug": "g", "interventions": [{"layer": layer}]}
        status, r = c.post("/api/intervene", bad, server.cfg.token)
        assert status == 422 and "need layer, pos, feature, value" in r["error"]
    assert json.loads((graphs / "g.json").read_text())["metadata"]["prompt"] == QUESTION
    assert Path(graphs / "graph-metadata.json").exists()
