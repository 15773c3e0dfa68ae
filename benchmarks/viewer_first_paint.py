"""Time to first paint of `vlmscope serve` on a large graph in headless Chromium.

    python benchmarks/viewer_first_paint.py [--nodes 10000] [--edges 100000] [--runs 3]

Writes a synthetic graph in the vlmscope/circuit-tracer layout (features spread over 26
layers and 200 positions, error, input and logit nodes, random signed edges from lower to
higher layers), serves it on 127.0.0.1 and opens it in a fresh headless Chromium each run.
First paint is the page's own `performance.now()` in the animation frame after its first
draw: navigation, page load, graph download and decoding, layout, every node, the strongest
edges stroked and the first 10,000 (strongest) in the density image. "All edges" is the frame
after the density image holds every edge. Needs chromium (apt-get install chromium) and
playwright (the dev extra).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.viewer.browser import browser_page, running, wait_for, wait_ready
from vlmscope.viewer.server import ViewerConfig


def synthetic_graph(n_nodes: int, n_edges: int, n_layers: int = 26, n_pos: int = 200) -> dict:
    rng = random.Random(0)
    nodes = []
    for p in range(n_pos):
        nodes.append(
            {
                "node_id": f"E_{100 + p}_{p}",
                "feature": p,
                "layer": "E",
                "ctx_idx": p,
                "feature_type": "embedding",
                "jsNodeId": f"E_{100 + p}-{p}",
                "influence": rng.random(),
                "clerp": "",
            }
        )
    nodes.append(
        {
            "node_id": f"{n_layers + 1}_7_{n_pos - 1}",
            "feature": 7,
            "layer": str(n_layers + 1),
            "ctx_idx": n_pos - 1,
            "feature_type": "logit",
            "jsNodeId": f"L_7-{n_pos - 1}",
            "token_prob": 0.9,
            "is_target_logit": True,
            "clerp": 'Output " x" (p=0.900)',
        }
    )
    i = 0
    while len(nodes) < n_nodes:
        layer, pos = rng.randrange(n_layers), rng.randrange(n_pos)
        if i % 10 == 0:
            nodes.append(
                {
                    "node_id": f"0_{layer}_{pos}_{i}",
                    "feature": -1,
                    "layer": str(layer),
                    "ctx_idx": pos,
                    "feature_type": "mlp reconstruction error",
                    "jsNodeId": f"{layer}_{pos}-0",
                    "influence": rng.random() * 0.8,
                }
            )
        else:
            nodes.append(
                {
                    "node_id": f"{layer}_{i}_{pos}",
                    "feature": i,
                    "layer": str(layer),
                    "ctx_idx": pos,
                    "feature_type": "cross layer transcoder",
                    "jsNodeId": f"{layer}_{i}-0",
                    "influence": rng.random() * 0.8,
                    "activation": rng.random() * 10,
                }
            )
        i += 1

    def rank(n: dict) -> int:
        return -1 if n["layer"] == "E" else int(n["layer"])

    order = sorted(nodes, key=rank)
    links = []
    for _ in range(n_edges):
        a, b = sorted(rng.sample(range(len(order)), 2))
        links.append(
            {
                "source": order[a]["node_id"],
                "target": order[b]["node_id"],
                "weight": rng.gauss(0, 1),
            }
        )
    meta = {
        "slug": "big",
        "scan": "synthetic",
        "transcoder_list": [],
        "prompt_tokens": [f"t{p}" for p in range(n_pos)],
        "prompt": "synthetic",
        "node_threshold": 0.8,
        "schema_version": 1,
    }
    q = {"pinnedIds": [], "supernodes": [], "linkType": "both", "clickedId": "", "sg_pos": ""}
    return {"metadata": meta, "qParams": q, "nodes": nodes, "links": links}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nodes", type=int, default=10_000)
    ap.add_argument("--edges", type=int, default=100_000)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        text = json.dumps(synthetic_graph(args.nodes, args.edges), separators=(",", ":"))
        (folder / "big.json").write_text(text)
        rows = []
        with running(ViewerConfig(graphs=folder, port=0)) as server:
            for _ in range(args.runs):
                with browser_page() as page:
                    t0 = time.perf_counter()
                    page.goto(server.url + "&graph=big")
                    wait_ready(page, timeout=120)
                    wall = time.perf_counter() - t0
                    wait_for(page, "() => window.__vlmscope.edgesDone", timeout=120)
                    paint = page.evaluate("() => window.__vlmscope.firstPaintMs")
                    done = page.evaluate("() => window.__vlmscope.edgesMs")
                    shown = page.evaluate("() => window.__vlmscope.shown")
                    steps = page.evaluate(
                        "() => ['parsedMs', 'modelMs', 'layoutMs', 'drawMs', 'openMs']"
                        ".map(k => Math.round(window.__vlmscope[k]))"
                    )
                    print(
                        "open steps (ms since the graph request: parsed, model, layout, "
                        "drawn, painted); drawing (ms: edges, nodes):",
                        steps,
                        page.evaluate("() => window.__vlmscope.drawSteps"),
                    )
                    err = page.evaluate("() => window.__vlmscope.error")
                    if err:
                        raise SystemExit(f"the page failed: {err}")
                rows.append((paint / 1000, done / 1000, wall, shown))
    print(f"graph: {args.nodes} nodes, {args.edges} edges, {len(text) / 2**20:.1f} MiB JSON")
    print(
        f"{'run':>3} {'first paint (s)':>16} {'all edges (s)':>14} {'wall to ready (s)':>18} "
        f"{'nodes':>7} {'edges':>7}"
    )
    for i, (p, d, w, s) in enumerate(rows):
        print(f"{i:>3} {p:>16.3f} {d:>14.3f} {w:>18.3f} {s['nodes']:>7} {s['edges']:>7}")
    with browser_page() as page:  # how busy the CPU is: a fixed JS loop (~0.3 s when idle)
        page.set_content("<body></body>")
        ref = page.evaluate(
            "() => { const t0 = performance.now(); let s = 0;"
            " for (let i = 0; i < 7e7; i++) s += i * 0.5; return performance.now() - t0 + s * 0; }"
        )
    print(f"reference JS loop (7e7 float adds): {ref / 1000:.2f} s")
    for j, what in ((0, "first paint"), (1, "all edges drawn")):
        col = sorted(r[j] for r in rows)
        print(f"{what}: best {col[0]:.3f} s, median {col[len(col) // 2]:.3f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
