"""The viewer in a real browser (headless Chromium): open a graph, click a node, read its feature
card with an image crop, move the threshold, save a supernode, take screenshots.

The graph is a real attribution of the demo question on the toy VLM (random CLT, so it runs in
seconds) and the cards come from a real `vlmscope features` run. With VLMSCOPE_SCREENSHOTS=DIR
and VLMSCOPE_SCREENSHOT_DEMO=demo_out the same walk-through runs on `make demo`'s output and
writes the screenshots the README shows (docs/viewer-graph.png, docs/viewer-feature-card.png).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from tests.attribution.test_circuit_tracer_schema import (
    ct_error_node,
    ct_feature_node,
    ct_logit_node,
    ct_token_node,
)
from tests.features.test_run import toy_setup
from tests.viewer.browser import (
    browser_page,
    in_ci,
    missing_browser_reason,
    running,
    wait_for,
    wait_ready,
)
from vlmscope.attribution.export import store_image, write_graph_files
from vlmscope.features.store import FeatureStore
from vlmscope.viewer.server import ViewerConfig

REASON = missing_browser_reason()
if REASON is not None and in_ci():
    raise RuntimeError(f"browser tests must run in CI: {REASON}")
pytestmark = pytest.mark.skipif(REASON is not None, reason=REASON or "")


def ct_text_graph() -> dict[str, Any]:
    """A text-only graph as circuit-tracer 0.5.0 writes it (its own node constructors)."""
    nodes = [ct_token_node(0, 5), ct_token_node(1, 9), ct_feature_node(0, 1, 42),
             ct_error_node(0, 1), ct_logit_node(1, 7, 2)]  # fmt: skip
    for n in nodes:
        n.update(influence=0.5 if n["layer"] not in ("E", "3") else None, clerp="")
    ids = [n["node_id"] for n in nodes]
    links = [{"source": ids[0], "target": ids[2], "weight": 1.5},
             {"source": ids[1], "target": ids[2], "weight": -0.5},
             {"source": ids[2], "target": ids[4], "weight": 2.0},
             {"source": ids[3], "target": ids[4], "weight": 0.25}]  # fmt: skip
    meta = {"slug": "ct-text", "scan": "gemma-2-2b", "transcoder_list": [],
            "prompt_tokens": ["<bos>", " The"], "prompt": "The", "node_threshold": 0.8,
            "schema_version": 1}  # fmt: skip
    q = {"pinnedIds": [], "supernodes": [], "linkType": "both", "clickedId": "", "sg_pos": ""}
    return {"metadata": meta, "qParams": q, "nodes": nodes, "links": links}


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    demo = os.environ.get("VLMSCOPE_SCREENSHOT_DEMO")
    if demo:
        return {"graphs": Path(demo) / "attribution", "features": Path(demo) / "features",
                "slug": "circle-colour"}  # fmt: skip
    from vlmscope.attribution.attribute import attribute
    from vlmscope.demo import QUESTION, demo_image

    root = tmp_path_factory.mktemp("viewer")
    toy = toy_setup(root)
    graphs = root / "graphs"
    image = demo_image()
    inputs = toy["vlm"].prepare(QUESTION, images=[image])
    graph = attribute(toy["vlm"], str(toy["dicts"]), inputs, max_feature_nodes=40, batch_size=40)
    write_graph_files(graph, graphs, "circle", prompt_text=QUESTION, scan="toy",
                      image_paths=[graphs / store_image(image, graphs)],
                      relative_to=graphs)  # fmt: skip
    (graphs / "broken.json").write_text('{"nodes": [')
    (graphs / "ct-text.json").write_text(json.dumps(ct_text_graph()))
    return {"graphs": graphs, "features": toy["out"], "slug": "circle"}


def shots_dir(tmp: Path) -> Path:
    out = os.environ.get("VLMSCOPE_SCREENSHOTS")
    return Path(out) if out else tmp


def test_walk_through(site: dict[str, Any], tmp_path: Path) -> None:
    graphs, slug = site["graphs"], site["slug"]
    data = json.loads((graphs / f"{slug}.json").read_text())
    cfg = ViewerConfig(graphs=graphs, features=site["features"], port=0)
    shots = shots_dir(tmp_path)
    with running(cfg) as server, browser_page() as page:
        page.goto(server.url + f"&graph={slug}")
        wait_ready(page)
        assert page.evaluate("() => window.__vlmscope.error") is None, page.errors
        assert "token" not in page.url  # taken out of the address bar
        # Open: every node at the graph's own threshold is drawn.
        shown = page.evaluate("() => window.__vlmscope.shown")
        assert shown["nodes"] == len(data["nodes"])
        # The heatmap: the picture keeps its colours at patch centres (no tint).
        wait_for(page, "() => document.getElementById('image-canvas').dataset.drawn === '1'")
        entry = data["images"][0]
        rows, cols = entry["grid"]["0"]  # the centre of the top-left patch
        centre = page.evaluate(f"""() => {{ const c = document.getElementById('image-canvas');
            return [c.width, c.height, ...c.getContext('2d').getImageData(
                Math.floor(c.width / {2 * cols}), Math.floor(c.height / {2 * rows}), 1, 1).data];
            }}""")
        pic = Image.open(graphs / entry["path"]).convert("RGB")
        want = pic.getpixel((pic.width // (2 * cols), pic.height // (2 * rows)))
        assert tuple(centre[2:5]) == want
        # Click the feature node with the most influence whose card has an image example.
        feats = sorted((n for n in data["nodes"] if n["feature_type"] == "cross layer transcoder"),
                       key=lambda n: n["influence"])  # fmt: skip
        store = FeatureStore(site["features"])
        node = next(n for n in feats if _has_image_example(store, n))
        pos = page.evaluate(f"() => window.__vlmscope.nodePos('{node['node_id']}')")
        page.mouse.click(pos["x"], pos["y"])
        feat = node["node_id"].split("_")[1]
        wait_for(
            page, f"() => document.querySelector('#card[data-feature=\"{node['layer']}/{feat}\"]')"
        )
        wait_for(page, "() => document.querySelector('.example-crop[data-loaded=\"1\"]')")
        card_text = page.inner_text("#feature-card")
        assert f"Layer {node['layer']}, feature {feat}" in card_text and "promotes" in card_text
        page.screenshot(path=str(shots / "viewer-graph.png"))
        page.locator("#feature-panel").screenshot(path=str(shots / "viewer-feature-card.png"))
        # Threshold: the nodes shown are those circuit-tracer's rule keeps at 0.5.
        page.evaluate("""() => { const s = document.getElementById('node-threshold');
            s.value = 0.5; s.dispatchEvent(new Event('input')); }""")
        expect = sum(n["feature_type"] in ("embedding", "logit") or n["influence"] <= 0.5 + 1e-9
                     for n in data["nodes"])  # fmt: skip
        assert page.evaluate("() => window.__vlmscope.shown.nodes") == expect < len(data["nodes"])
        # Pin two nodes, group them into a labelled supernode, save: the file lands next to it.
        pinned = [node["node_id"], feats[0]["node_id"]]
        for nid in pinned:
            p = page.evaluate(f"() => window.__vlmscope.nodePos('{nid}')")
            if not p["visible"]:
                page.evaluate("""() => { const s = document.getElementById('node-threshold');
                    s.value = 1; s.dispatchEvent(new Event('input')); }""")
                p = page.evaluate(f"() => window.__vlmscope.nodePos('{nid}')")
            page.mouse.click(p["x"], p["y"])
            page.click("#pin-btn")
        for box in page.query_selector_all(".pin-check"):
            box.check()
        page.fill("#supernode-label", "circle detectors")
        page.click("#group-btn")
        page.click("#save-btn")
        wait_for(
            page, "() => document.getElementById('save-status').textContent.startsWith('saved')"
        )
        saved = json.loads((graphs / f"{slug}.annotations.json").read_text())
        assert saved["supernodes"] == [["circle detectors", *pinned]]
        assert saved["pinnedIds"] == pinned
        if os.environ.get("VLMSCOPE_SCREENSHOT_DEMO"):
            return
        # A malformed graph: a message in the page; the others still open.
        page.select_option("#graph-select", "broken")
        wait_ready(page)
        msg = page.inner_text("#message")
        assert "broken.json is not valid JSON" in msg
        # circuit-tracer's own text-only graph JSON opens too.
        page.select_option("#graph-select", "ct-text")
        wait_ready(page)
        assert page.evaluate("() => window.__vlmscope.error") is None
        assert page.evaluate("() => window.__vlmscope.shown") == {"nodes": 5, "edges": 4}
        # Choose one graph, then at once another, and let the first one's load end last: the
        # page shows (and would save pins for) the one chosen last.
        held: list[Any] = []
        page.route(f"**/api/graphs/{slug}/compact", lambda route: held.append(route))  # held
        page.evaluate(f"""() => {{ const s = document.getElementById('graph-select');
            for (const v of ['{slug}', 'ct-text']) {{
                s.value = v; s.dispatchEvent(new Event('change')); }} }}""")
        wait_ready(page)
        wait_for(page, "() => document.getElementById('graph-title').textContent === 'The'")
        assert len(held) == 1
        held[0].continue_()
        page.unroute(f"**/api/graphs/{slug}/compact")
        wait_for(
            page,
            f"""() => performance.getEntriesByType('resource').filter((e) =>
            e.name.includes('/api/graphs/{slug}/compact')).length >= 2""",
        )
        page.wait_for_timeout(300)  # the stale load's remaining steps, had it any
        assert page.inner_text("#graph-title") == "The"
        assert page.evaluate("() => window.__vlmscope.shown") == {"nodes": 5, "edges": 4}
        assert page.errors == []
        # No features folder: the graph still opens and the card says features are unavailable.
        with running(ViewerConfig(graphs=graphs, features=None, port=0)) as bare:
            page.goto(bare.url + f"&graph={slug}")
            wait_ready(page)
            pos = page.evaluate(f"() => window.__vlmscope.nodePos('{node['node_id']}')")
            page.mouse.click(pos["x"], pos["y"])
            wait_for(page, "() => document.querySelector('#feature-card .unavailable')")
            assert "features unavailable" in page.inner_text("#feature-card")
            assert page.evaluate("() => window.__vlmscope.shown.nodes") == len(data["nodes"])


def _has_image_example(store: FeatureStore, node: dict[str, Any]) -> bool:
    """Whether the feature's card (from the features run) shows an image crop."""
    card = store.card(str(node["layer"]), int(node["node_id"].split("_")[1]))
    return any("image" in e for e in card["examples"])
