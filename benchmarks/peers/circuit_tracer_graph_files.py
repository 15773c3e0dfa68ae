"""Check a vlmscope graph folder with circuit-tracer 0.5.0 itself (run in circuit-tracer's venv).

    python benchmarks/peers/circuit_tracer_graph_files.py demo_out/attribution

For each graph in DIR/graph-metadata.json: validates DIR/<slug>.json with circuit-tracer's own
pydantic `Model` and the index entry with its `Metadata`; serves DIR with circuit-tracer's
`frontend.local_server.serve` and fetches both files the way its page does; then applies its
frontend's default prune filter (util-cg.js formatData: `embedding` and `logit` nodes always,
others when influence <= the graph's node_threshold) and counts the image patches kept.
Its page itself loads d3 and friends from public CDNs, so it cannot render offline here.
Prints a table. Does not import vlmscope (circuit-tracer pins transformers 4.x).
"""

from __future__ import annotations

import json
import sys
import urllib.request
from pathlib import Path

from circuit_tracer.frontend.graph_models import Metadata, Model
from circuit_tracer.frontend.local_server import serve


def main(folder: str) -> int:
    root = Path(folder)
    index = json.loads((root / "graph-metadata.json").read_text())
    server = serve(data_dir=str(root), port=8047)
    rows = []
    try:
        for entry in index["graphs"]:
            Metadata(**entry)
            slug = entry["slug"]
            with urllib.request.urlopen(f"http://127.0.0.1:8047/graph_data/{slug}.json") as r:
                served = json.loads(r.read())
            with urllib.request.urlopen("http://127.0.0.1:8047/data/graph-metadata.json") as r:
                listed = [g["slug"] for g in json.loads(r.read())["graphs"]]
            model = Model(**served)
            th = model.metadata.node_threshold
            shown = [
                n
                for n in model.nodes
                if n.feature_type in ("embedding", "logit")
                or (n.influence is not None and n.influence <= th)
            ]
            raw = {n["node_id"]: n for n in served["nodes"]}
            patches = [n for n in model.nodes if "image" in raw[n.node_id]]
            patches_shown = [n for n in shown if "image" in raw[n.node_id]]
            rows.append(
                (
                    slug,
                    slug in listed,
                    len(model.nodes),
                    len(shown),
                    len(patches),
                    len(patches_shown),
                    model.metadata.scan,
                )
            )
    finally:
        server.stop()
    print(f"{'slug':<24} {'listed':>6} {'nodes':>6} {'shown':>6} {'patches':>8} {'shown':>6}  scan")
    for slug, listed, n, s, p, ps, scan in rows:
        print(f"{slug:<24} {listed!s:>6} {n:>6} {s:>6} {p:>8} {ps:>6}  {scan}")
    ok = all(r[1] and r[2] == r[3] and r[4] == r[5] for r in rows)
    print("every node and every image patch passes circuit-tracer's default filter:", ok)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
