"""Graph files against circuit-tracer 0.5.0's own graph-file classes.

circuit-tracer cannot be imported next to vlmscope (it pins transformers <= 4.57.3, vlmscope
needs 5.x), so this file keeps a faithful copy of `circuit_tracer/frontend/graph_models.py`
(0.5.0): the field names, types and defaults of Metadata, QParams, Node and Link, and the node
ids its `Node.feature_node / error_node / token_node / logit_node` build. The same check with
the real pydantic classes runs in a separate environment:
`benchmarks/peers/circuit_tracer_graph_files.py` (see benchmarks/README.md).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from tests.attribution.test_export import image_graph
from tests.attribution.test_graph import hand_graph
from tests.conftest import random_image
from vlmscope.attribution.export import to_json, write_graph_files
from vlmscope.attribution.graph import prune

# --- circuit-tracer 0.5.0, frontend/graph_models.py (fields: (type, required)) ----------------
CT_METADATA = {"slug": (str, True), "scan": (str, True), "transcoder_list": (list, True),
               "prompt_tokens": (list, True), "prompt": (str, True),
               "node_threshold": ((float, type(None)), False),
               "schema_version": ((int, type(None)), False)}  # fmt: skip
CT_QPARAMS = {"pinnedIds": (list, True), "supernodes": (list, True), "linkType": (str, True),
              "clickedId": (str, True), "sg_pos": (str, True)}  # fmt: skip
CT_NODE = {"node_id": (str, True), "feature": (int, True), "layer": (str, True),
           "ctx_idx": (int, True), "feature_type": (str, True), "token_prob": (float, False),
           "is_target_logit": (bool, False), "run_idx": (int, False),
           "reverse_ctx_idx": (int, False), "jsNodeId": (str, True), "clerp": (str, False),
           "influence": ((float, type(None)), False),
           "activation": ((float, type(None)), False)}  # fmt: skip
CT_LINK = {"source": (str, True), "target": (str, True), "weight": (float, True)}


def ct_cantor(x: int, y: int) -> int:
    return (x + y) * (x + y + 1) // 2 + y


def ct_feature_node(layer: int, pos: int, feat: int) -> dict[str, Any]:
    return {"node_id": f"{layer}_{feat}_{pos}", "feature": ct_cantor(layer, feat),
            "layer": str(layer), "ctx_idx": pos, "feature_type": "cross layer transcoder",
            "jsNodeId": f"{layer}_{feat}-0"}  # fmt: skip


def ct_error_node(layer: int, pos: int) -> dict[str, Any]:
    return {"node_id": f"0_{layer}_{pos}", "feature": -1, "layer": str(layer), "ctx_idx": pos,
            "feature_type": "mlp reconstruction error", "jsNodeId": f"{layer}_{pos}-0"}  # fmt: skip


def ct_token_node(pos: int, vocab: int) -> dict[str, Any]:
    return {"node_id": f"E_{vocab}_{pos}", "feature": pos, "layer": "E", "ctx_idx": pos,
            "feature_type": "embedding", "jsNodeId": f"E_{vocab}-{pos}"}  # fmt: skip


def ct_logit_node(pos: int, vocab: int, n_layers: int) -> dict[str, Any]:
    return {"node_id": f"{n_layers + 1}_{vocab}_{pos}", "feature": vocab,
            "layer": str(n_layers + 1), "ctx_idx": pos, "feature_type": "logit",
            "jsNodeId": f"L_{vocab}-{pos}"}  # fmt: skip


def check_fields(obj: dict[str, Any], fields: dict[str, Any], what: str) -> None:
    for name, (types, required) in fields.items():
        if name not in obj:
            assert not required, f"{what}: missing required field {name}"
            continue
        value = obj[name]
        ok = isinstance(value, types) or (types is float and isinstance(value, int))
        assert ok and not (types is int and isinstance(value, bool)), (what, name, value)


def check_ct_model(data: dict[str, Any]) -> None:
    """What circuit-tracer's `Model(**data)` validates, plus its links' node references."""
    check_fields(data["metadata"], CT_METADATA, "metadata")
    check_fields(data["qParams"], CT_QPARAMS, "qParams")
    for n in data["nodes"]:
        check_fields(n, CT_NODE, n.get("node_id", "node"))
    ids = {n["node_id"] for n in data["nodes"]}
    for link in data["links"]:
        check_fields(link, CT_LINK, "link")
        assert link["source"] in ids and link["target"] in ids


def test_every_node_type_uses_circuit_tracers_ids() -> None:
    g = hand_graph()
    data = to_json(g, node_threshold=1.0, edge_threshold=1.0)
    check_ct_model(data)
    expected: dict[str, dict[str, Any]] = {}
    for layer, pos, feat in g.features.tolist():
        expected[f"{layer}_{feat}_{pos}"] = ct_feature_node(layer, pos, feat)
    for layer in range(g.n_layers):
        for pos in range(g.n_pos):  # 0.5.0's fields; the id that no feature can also have
            expected[f"{layer}_error_{pos}"] = {
                **ct_error_node(layer, pos),
                "node_id": f"{layer}_error_{pos}",
            }
    for pos, vocab in enumerate(g.input_ids.tolist()):
        expected[f"E_{vocab}_{pos}"] = ct_token_node(pos, vocab)
    for t in g.logit_targets:
        node = ct_logit_node(g.n_pos - 1, t.token_id, g.n_layers)
        expected[node["node_id"]] = node
    written = {n["node_id"]: n for n in data["nodes"]}
    assert set(written) <= set(expected)
    assert {n["feature_type"] for n in written.values()} == {
        "cross layer transcoder", "mlp reconstruction error", "embedding", "logit",
    }  # fmt: skip
    for node_id, n in written.items():
        for key, value in expected[node_id].items():
            assert n[key] == value, (node_id, key)


def test_image_patches_pass_circuit_tracers_default_filter() -> None:
    """circuit-tracer's frontend keeps `embedding` nodes always and others only when their
    influence is at most the graph's node_threshold: every written node must survive it."""
    g = image_graph()
    g.adjacency[0, 8] = -2.0
    pics = [random_image(8, 8, 1), random_image(8, 8, 2)]
    data = to_json(g, images=pics, node_threshold=0.3)
    check_ct_model(data)
    th = data["metadata"]["node_threshold"]
    kept = [n for n in data["nodes"] if n["feature_type"] in ("embedding", "logit")
            or n["influence"] <= th]  # fmt: skip
    assert kept == data["nodes"]
    patches = [n for n in data["nodes"] if "image" in n]
    n_image = sum(k == "image" for k in g.input_kinds)
    assert len(patches) == n_image and all(n["feature_type"] == "embedding" for n in patches)
    labels = data["metadata"]["prompt_tokens"]
    assert all(labels[n["ctx_idx"]].startswith("img") for n in patches)
    pruned = prune(g, 0.3, 0.98)
    assert int(pruned.node_mask[: g.n_features].sum()) >= 1


def test_graph_folder_is_what_create_graph_files_writes(tmp_path: Path) -> None:
    g = hand_graph()
    write_graph_files(g, tmp_path, "pets", scan="hand-model", prompt_text="the pet")
    index = json.loads((tmp_path / "graph-metadata.json").read_text())
    (entry,) = index["graphs"]
    check_fields(entry, CT_METADATA, "graph-metadata entry")
    assert set(entry) == set(CT_METADATA)
    assert (entry["slug"], entry["scan"]) == ("pets", "hand-model")
    check_ct_model(json.loads((tmp_path / "pets.json").read_text()))
    assert torch.equal(g.adjacency, hand_graph().adjacency)  # export does not touch the graph
