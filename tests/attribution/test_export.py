"""Graph export: viewer JSON layout, raw round trip, patch influence, heatmaps, the CLI."""

from __future__ import annotations

import argparse
import base64
import io
import json
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from tests.attribution.test_graph import hand_graph
from tests.conftest import random_image
from tests.replacement.test_model import random_clt, vlm_for
from vlmscope.attribution.cli import add_attribute_arguments, run_attribute_command
from vlmscope.attribution.export import (
    INDEX_FIELDS,
    center_crop_box,
    concentration,
    image_grids,
    load_raw,
    patch_influence,
    prompt_labels,
    public_model_name,
    save_json,
    save_raw,
    store_image,
    to_json,
    write_graph_files,
)
from vlmscope.attribution.graph import Graph, LogitTarget, prune
from vlmscope.attribution.heatmap import save_heatmap_png


def image_graph() -> Graph:
    """One layer, 6 positions: <s>, image 0 (view 0: (0,0), (0,1), a row separator),
    image 1 (view 1: (1,0)), a text token; one feature f0 at position 5, one logit.

    Nodes: f0 | e(0,0..5) = 1..6 | in0..in5 = 7..12 | L = 13. The logit reads f0 (10) and every
    input (1, 2, 3, 4, 5, 5), so with a one-hot logit weight input p has influence w_p / 30 (plus
    f0's 1/3, split evenly between in5 and e(0,5)).
    """
    a = torch.zeros(14, 14)
    a[13, 0] = 10.0
    a[13, 7:13] = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 5.0])
    a[0, 12], a[0, 6] = 2.0, -2.0
    pm = torch.full((6, 4), -1, dtype=torch.long)
    pm[1], pm[2], pm[3], pm[4] = (
        torch.tensor([0, 0, 0, 0]),
        torch.tensor([0, 0, 0, 1]),
        torch.tensor([0, 0, 0, -1]),
        torch.tensor([1, 1, 1, 0]),
    )
    return Graph(
        adjacency=a,
        features=torch.tensor([[0, 5, 7]]),
        activations=torch.tensor([2.0]),
        n_layers=1,
        input_ids=torch.tensor([1, 4, 4, 4, 4, 20]),
        input_kinds=["special", "image", "image", "image", "image", "text"],
        patch_map=pm,
        logit_targets=[LogitTarget(30, " red", 0.75)],
        input_tokens=["<s>", "<image>", "<image>", "<image>", "<image>", " red"],
        metadata={"model": "hand", "family": "test", "hooks": {"reads": ["a"], "writes": ["b"]}},
    )


def hand_image_graph() -> Graph:
    """The hand-computed graph with its two inputs relabelled as image 0's patches (0,0), (0,1)."""
    pm = torch.tensor([[0, 0, 0, 0], [0, 0, 0, 1]])
    return replace(hand_graph(), input_kinds=["image", "image"], patch_map=pm)


def check_structure(data: dict[str, Any], graph: Graph) -> None:
    """Invariants of every exported graph (circuit-tracer layout plus our image fields)."""
    assert set(data) >= {"metadata", "qParams", "nodes", "links"}
    meta = data["metadata"]
    for key in ("slug", "scan", "prompt_tokens", "prompt", "node_threshold", "schema_version"):
        assert key in meta
    assert meta["prompt_tokens"] == prompt_labels(graph)
    assert data["qParams"] == {
        "pinnedIds": [],
        "supernodes": [],
        "linkType": "both",
        "clickedId": "",
        "sg_pos": "",
    }
    ids = [n["node_id"] for n in data["nodes"]]
    assert len(ids) == len(set(ids))
    for link in data["links"]:
        assert link["source"] in ids and link["target"] in ids
    by_pos = {n["ctx_idx"]: n for n in data["nodes"] if n["layer"] == "E"}
    assert sorted(by_pos) == list(range(graph.n_pos))  # every input is written
    for pos, n in by_pos.items():
        kind = graph.input_kinds[pos]
        assert n["node_id"] == f"E_{int(graph.input_ids[pos])}_{pos}"
        assert n["feature_type"] == "embedding"  # image patches too: circuit-tracer keeps those
        assert n.get("special", False) == (kind == "special")
        if kind == "image":
            img, view, r, c = graph.patch_map[pos].tolist()
            assert n["image"] == {"index": img, "view": view, "row": r, "col": c}
            assert meta["prompt_tokens"][pos] == n["clerp"]
            assert n["clerp"].startswith(f"img{img} ")
        else:
            assert meta["prompt_tokens"][pos] == graph.input_tokens[pos]
    # circuit-tracer's frontend hides non-input nodes whose influence exceeds node_threshold.
    for n in data["nodes"]:
        if n["layer"] != "E" and n["feature_type"] != "logit":
            assert n["influence"] <= meta["node_threshold"]
    logits = [n for n in data["nodes"] if n["feature_type"] == "logit"]
    assert [n["feature"] for n in logits] == [t.token_id for t in graph.logit_targets]
    assert [n["is_target_logit"] for n in logits] == [i == 0 for i in range(len(logits))]


# --- JSON -----------------------------------------------------------------------------------------
def test_json_keeps_only_pruned_nodes_and_their_edges() -> None:
    g = hand_graph()
    data = to_json(g, node_threshold=0.8, edge_threshold=0.98, slug="pets", prompt_text="the pet")
    check_structure(data, g)
    # At 0.8 the error nodes are pruned (see test_graph); all 8 remaining edges stay.
    ids = {n["node_id"] for n in data["nodes"]}
    assert ids == {"0_3_1", "1_5_1", "E_10_0", "E_11_1", "3_7_1", "3_8_1"}
    links = {(x["source"], x["target"]): x["weight"] for x in data["links"]}
    assert len(links) == 8
    assert links[("E_10_0", "0_3_1")] == 3.0 and links[("0_3_1", "3_7_1")] == 2.0
    f1 = next(n for n in data["nodes"] if n["node_id"] == "1_5_1")
    assert f1["feature_type"] == "cross layer transcoder"
    assert (f1["layer"], f1["ctx_idx"], f1["jsNodeId"], f1["activation"]) == ("1", 1, "1_5-0", 0.25)
    assert f1["feature"] == (1 + 5) * (1 + 5 + 1) // 2 + 5  # circuit-tracer's cantor pairing
    assert f1["influence"] == pytest.approx(83 / 172)  # cumulative share at its rank
    cat = next(n for n in data["nodes"] if n["node_id"] == "3_7_1")
    assert (cat["layer"], cat["jsNodeId"], cat["token_prob"]) == ("3", "L_7-1", 0.5)
    assert cat["clerp"] == 'Output " cat" (p=0.500)'
    meta = data["metadata"]
    assert (meta["slug"], meta["prompt"], meta["model"], meta["family"]) == (
        "pets",
        "the pet",
        "hand",
        "test",
    )
    assert meta["replacement_score"] == pytest.approx(70 / 96, abs=1e-6)
    assert meta["completeness_score"] == pytest.approx(242 / 268, abs=1e-6)
    assert "images" not in data


def test_json_error_nodes_use_circuit_tracer_ids() -> None:
    g = hand_graph()
    data = to_json(g, node_threshold=0.95, edge_threshold=1.0)
    check_structure(data, g)
    errors = {
        n["node_id"]: n for n in data["nodes"] if n["feature_type"] == "mlp reconstruction error"
    }
    # circuit-tracer 0.5.0's Node.error_node fields (jsNodeId {layer}_{pos}-0), but not its id
    # 0_{layer}_{pos}: that is layer 0's feature `layer` at `pos` too
    assert set(errors) == {"0_error_1", "1_error_1"}  # e(0,0), e(1,0): no influence, pruned
    e = errors["1_error_1"]
    assert (e["feature"], e["layer"], e["ctx_idx"], e["jsNodeId"]) == (-1, "1", 1, "1_1-0")
    links = {(x["source"], x["target"]) for x in data["links"]}
    assert ("0_error_1", "1_5_1") in links and ("1_error_1", "3_7_1") in links
    # Layer 0's feature 1 at position 1 has 0.5.0's error id for e(1, 1): both in one graph
    g.features[0] = torch.tensor([0, 1, 1])
    clash = to_json(g, node_threshold=0.95, edge_threshold=1.0)
    ids = [n["node_id"] for n in clash["nodes"]]
    assert len(ids) == len(set(ids)) and {"0_1_1", "1_error_1"} <= set(ids)
    logit = next(n["node_id"] for n in clash["nodes"] if n["feature_type"] == "logit")
    into = {x["source"]: x["weight"] for x in clash["links"] if x["target"] == logit}
    assert into["0_1_1"] == -into["1_error_1"] > 0  # A[L0, F0] = 2, A[L0, E11] = -2
    g = hand_graph()
    # A prune result passed in is used as is.
    pr = prune(g, 0.8, 0.98)
    assert to_json(g, prune_result=pr, node_threshold=0.8) == to_json(g, node_threshold=0.8)


def test_json_image_patches_and_images_section(tmp_path: Path) -> None:
    g = image_graph()
    pics = [random_image(32, 40, 1), random_image(24, 24, 2)]
    data = to_json(g, images=pics, slug="s")
    check_structure(data, g)
    sep = next(n for n in data["nodes"] if n["ctx_idx"] == 3)
    assert sep["image"] == {"index": 0, "view": 0, "row": 0, "col": -1}
    assert data["images"][0]["grid"] == {"0": [1, 2]}
    assert data["images"][1]["grid"] == {"1": [2, 1]}
    for entry, pic in zip(data["images"], pics, strict=True):
        assert (entry["width"], entry["height"]) == pic.size
        head, b64 = entry["data"].split(",", 1)
        assert head == "data:image/png;base64"
        decoded = Image.open(io.BytesIO(base64.b64decode(b64)))
        assert decoded.size == pic.size
        assert (np.asarray(decoded.convert("RGB")) == np.asarray(pic)).all()
    paths = []
    for i, pic in enumerate(pics):
        paths.append(tmp_path / f"{i}.png")
        pic.save(paths[-1])
    out = save_json(g, tmp_path / "g.json", image_paths=paths, slug="s")
    on_disk = json.loads(out.read_text())
    assert on_disk == to_json(g, image_paths=paths, slug="s")
    assert [(e["path"], e["width"], e["height"]) for e in on_disk["images"]] == [
        (str(paths[0]), 40, 32),
        (str(paths[1]), 24, 24),
    ]
    with pytest.raises(ValueError, match="2 image"):
        to_json(g, images=pics[:1])
    with pytest.raises(ValueError, match=r"missing\.png"):
        to_json(g, image_paths=[paths[0], tmp_path / "missing.png"])
    rel = to_json(g, image_paths=paths, slug="s", relative_to=tmp_path)
    assert [e["path"] for e in rel["images"]] == ["0.png", "1.png"]


def test_json_labels_image_tokens_for_circuit_tracer() -> None:
    data = to_json(image_graph(), images=[random_image(8, 8, 1), random_image(8, 8, 2)])
    assert data["metadata"]["prompt_tokens"] == [
        "<s>", "img0 r0c0", "img0 r0c1", "img0 r0 end", "img1 v1 r1c0", " red",
    ]  # fmt: skip


def test_json_patch_effects_are_signed_by_hand() -> None:
    """f0 now also reads patch (0,0) of image 0 with weight -2 and the logit reads it with +2:
    directly +2/30; through f0 (10/30 of the logit's input) times -2/6 of f0's: -1/9."""
    g = image_graph()
    g.adjacency[0, 7 + 1] = -2.0
    data = to_json(g, images=[random_image(8, 8, 1), random_image(8, 8, 2)])
    (effect0, effect1) = data["patch_effects"]
    assert (effect0["logit"], effect0["token"], effect0["probability"]) == ("2_30_5", " red", 0.75)
    assert (effect0["image"], effect0["view"], effect1["image"], effect1["view"]) == (0, 0, 1, 1)
    assert effect0["values"][0] == pytest.approx([2 / 30 - 1 / 9, 3 / 30], rel=1e-5)
    assert [v for (v,) in effect1["values"]] == pytest.approx([0.0, 5 / 30], rel=1e-5)
    # The unsigned influence of the same patch adds the path instead.
    assert float(patch_influence(g, 0)[0][0][0, 0]) == pytest.approx(2 / 30 + 1 / 9)


def test_public_model_name_drops_local_folders(tmp_path: Path) -> None:
    assert public_model_name(str(tmp_path / "models" / "shapes_llava")) == "shapes_llava"
    assert public_model_name("./my-model/") == "my-model"
    assert public_model_name("llava-hf/llava-1.5-7b-hf") == "llava-hf/llava-1.5-7b-hf"
    assert public_model_name(None) is None
    g = image_graph()
    g.metadata["model"] = str(tmp_path / "secret" / "toy")
    meta = to_json(g, images=[random_image(8, 8, 1), random_image(8, 8, 2)])["metadata"]
    assert (meta["scan"], meta["model"]) == ("toy", "toy")
    assert str(tmp_path) not in json.dumps(meta)
    g.metadata["dictionaries_trained_on"] = str(tmp_path / "secret" / "toy")
    raw = save_raw(g, tmp_path / "g.safetensors")
    assert str(tmp_path / "secret") not in raw.read_bytes().decode("latin-1")  # the header too
    assert load_raw(raw).metadata["model"] == "toy"


def test_store_image_keeps_each_picture_once(tmp_path: Path) -> None:
    a, b = random_image(8, 8, 1), random_image(8, 8, 2)
    ra, rb = store_image(a, tmp_path), store_image(b, tmp_path)
    assert store_image(a.copy(), tmp_path) == ra != rb
    assert sorted(p.name for p in (tmp_path / "images").iterdir()) == sorted(
        [Path(ra).name, Path(rb).name]
    )
    assert (np.asarray(Image.open(tmp_path / ra)) == np.asarray(a)).all()


def test_graph_files_and_their_index(tmp_path: Path) -> None:
    """As circuit-tracer's create_graph_files: DIR/slug.json, and graph-metadata.json listing
    each slug once with the fields of its Metadata model."""
    g = hand_graph()
    path, meta = write_graph_files(g, tmp_path, "pets", prompt_text="the pet", scan="hand")
    assert path == tmp_path / "pets.json"
    assert json.loads(path.read_text()) == to_json(g, slug="pets", prompt_text="the pet",
                                                   scan="hand")  # fmt: skip
    index = json.loads((tmp_path / "graph-metadata.json").read_text())
    assert index == {"graphs": [{k: meta[k] for k in INDEX_FIELDS}]}
    write_graph_files(g, tmp_path, "other", prompt_text="again")
    write_graph_files(g, tmp_path, "pets", prompt_text="the pet, redone")
    index = json.loads((tmp_path / "graph-metadata.json").read_text())
    assert [(x["slug"], x["prompt"]) for x in index["graphs"]] == [
        ("other", "again"),
        ("pets", "the pet, redone"),
    ]
    for bad in ("../x", "a/b", "", ".hidden", "x" * 200):
        with pytest.raises(ValueError, match="slug"):
            write_graph_files(g, tmp_path, bad)
    (tmp_path / "graph-metadata.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"graph-metadata\.json"):
        write_graph_files(g, tmp_path, "third")
    assert not (tmp_path / "third.json").exists()  # nothing written past a corrupt index


# --- raw ------------------------------------------------------------------------------------------
def assert_same_graph(a: Graph, b: Graph) -> None:
    for name in ("adjacency", "features", "activations", "input_ids", "patch_map"):
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype and torch.equal(x, y), name
    assert a.n_layers == b.n_layers
    assert a.input_kinds == b.input_kinds and a.input_tokens == b.input_tokens
    assert a.logit_targets == b.logit_targets
    assert a.metadata == b.metadata
    ref_a, ref_b = a.reference_edges, b.reference_edges
    assert (ref_a is None and ref_b is None) or torch.equal(ref_a, ref_b)  # type: ignore[arg-type]


def image_graph_with_reference() -> Graph:
    """`image_graph` with reference edges (as `attribute(reference="blank")` adds)."""
    g = image_graph()
    g.reference_edges = torch.randn(g.adjacency.shape[0], g.n_inputs)
    return g


@pytest.mark.parametrize("make", [hand_graph, image_graph, image_graph_with_reference])
def test_raw_round_trip_is_exact(make: Any, tmp_path: Path) -> None:
    g = make()
    g.logit_targets[0] = LogitTarget(g.logit_targets[0].token_id, "\x16 odd\n", 0.1361197680234909)
    g.adjacency[0, -1] = 1e-30  # a value JSON text would round
    back = load_raw(save_raw(g, tmp_path / "g.safetensors"))
    assert_same_graph(g, back)
    assert [p.name for p in tmp_path.iterdir()] == ["g.safetensors"]  # no temporary left


def test_load_raw_rejects_other_safetensors(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(tmp_path / "w.safetensors"))
    with pytest.raises(ValueError, match="not a vlmscope raw graph"):
        load_raw(tmp_path / "w.safetensors")


# --- patch influence, heatmaps, concentration -----------------------------------------------------
def test_patch_influence_by_hand() -> None:
    g = hand_image_graph()
    # One-hot on L0: in0 = 3/16 + 3/16, in1 = 1/8 + 1/16 + 1/16 (see test_graph's derivation).
    assert torch.equal(patch_influence(g, 0)[0][0], torch.tensor([[0.375, 0.25]]))
    assert torch.equal(patch_influence(g, 1)[0][0], torch.tensor([[0.09375, 0.84375]]))
    assert torch.equal(patch_influence(g, -1)[0][0], torch.tensor([[0.09375, 0.84375]]))
    # None weights the logits by probability (1/2, 1/4): the graph's own node influence.
    assert torch.equal(patch_influence(g, None)[0][0], torch.tensor([[27 / 128, 43 / 128]]))
    with pytest.raises(IndexError):
        patch_influence(g, 2)
    assert patch_influence(hand_graph()) == {}  # no image tokens


def test_patch_influence_layout_skips_separators() -> None:
    g = image_graph()
    assert image_grids(g) == {0: {0: (1, 2)}, 1: {1: (2, 1)}}
    heat = patch_influence(g, 0)
    assert set(heat) == {0, 1} and set(heat[0]) == {0} and set(heat[1]) == {1}
    torch.testing.assert_close(heat[0][0], torch.tensor([[2 / 30, 3 / 30]]))  # not the 4/30
    torch.testing.assert_close(heat[1][1], torch.tensor([[0.0], [5 / 30]]))
    torch.testing.assert_close(patch_influence(g, None)[1][1], 0.75 * heat[1][1])


def test_center_crop_box_matches_clip_preprocessing() -> None:
    proc = SimpleNamespace(
        do_center_crop=True,
        do_resize=True,
        crop_size={"height": 32, "width": 32},
        size={"shortest_edge": 32},
    )
    assert center_crop_box((40, 32), proc) == (4.0, 0.0, 36.0, 32.0)
    assert center_crop_box((80, 64), proc) == (8.0, 0.0, 72.0, 64.0)
    assert center_crop_box((40, 32), SimpleNamespace(do_center_crop=False)) is None


def test_concentration() -> None:
    heat = torch.tensor([[1.0, 3.0], [-2.0, 0.0]])  # negative influence counts as 0
    assert concentration(heat, [(0, 1)]) == 0.75
    assert concentration(heat, [[0, 1], [0, 1], (1, 0)]) == 0.75  # shapes-world lists, repeats
    assert concentration(heat, torch.tensor([[True, False], [False, False]])) == 0.25
    assert concentration(torch.zeros(2, 2), [(0, 0)]) == 0.0
    with pytest.raises(ValueError, match="outside"):
        concentration(heat, [(2, 0)])
    heat = patch_influence(hand_image_graph(), 0)[0][0]
    assert concentration(heat, [(0, 0)]) == 0.6  # 0.375 / 0.625


# --- CLI ------------------------------------------------------------------------------------------
def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_attribute_arguments(p)
    return p.parse_args(argv)


@pytest.fixture(scope="module")
def llava_setup(zoo_path: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("attribute-cli")
    vlm = vlm_for("llava", zoo_path)
    random_clt(vlm, n_targets=2, seed=1).save(folder / "dicts")
    random_image(32, 40, 7).save(folder / "img.png")
    (folder / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    return {"model": zoo_path("llava"), "dicts": folder / "dicts", "dir": folder}


def cli_args(s: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return [
        "--model", str(s["model"]), "--dictionaries", str(s["dicts"]),
        "--prompt", "what colour is the circle", "--out", str(out), *extra,
    ]  # fmt: skip


def test_cli_writes_json_raw_and_heatmap(llava_setup: dict[str, Path], capsys: Any) -> None:
    s = llava_setup
    out = s["dir"] / "run" / "graph.json"
    img = str(s["dir"] / "img.png")
    argv = cli_args(s, out, "--image", img, "--max-feature-nodes", "48", "--batch-size", "16")
    assert run_attribute_command(parse(argv)) == 0
    printed = capsys.readouterr().out
    assert "replacement score" in printed and "completeness score" in printed
    data = json.loads(out.read_text())
    raw = load_raw(out.with_suffix(".safetensors"))
    check_structure(data, raw)
    assert raw.n_features == 48
    assert data["metadata"]["family"] == "llava"
    # The image is copied next to the graph, once, and referenced relatively: no local path.
    stored = data["images"][0]["path"]
    assert stored.startswith("images/") and (out.parent / stored).is_file()
    wrote = printed.split("\nWrote ", 1)[1].strip().split(", ")
    assert wrote == [str(out), str(out.with_suffix(".safetensors")), str(out.parent / stored),
                     str(out.with_suffix(".heatmap.png"))]  # fmt: skip
    assert (np.asarray(Image.open(out.parent / stored)) == np.asarray(Image.open(img))).all()
    assert str(s["dir"]) not in out.read_text()
    assert data["metadata"]["scan"] == Path(s["model"]).name  # folder name, not path
    assert data["images"][0]["grid"] == {"0": [4, 4]}
    patches = [n for n in data["nodes"] if "image" in n]
    assert len(patches) == 16 and all(n["feature_type"] == "embedding" for n in patches)
    # The raw file alone rebuilds the same viewer JSON.
    again = to_json(
        raw,
        slug="graph",
        prompt_text="what colour is the circle",
        image_paths=[out.parent / stored],
        relative_to=out.parent,
        scan=Path(s["model"]).name,
    )
    assert again == data
    assert Image.open(s["dir"] / "run" / "graph.heatmap.png").format == "PNG"


def test_cli_graph_dir_and_slug(llava_setup: dict[str, Path], capsys: Any) -> None:
    s = llava_setup
    gdir = s["dir"] / "graphs"
    base = ["--model", str(s["model"]), "--dictionaries", str(s["dicts"]), "--prompt", "hi"]
    few = ["--image", str(s["dir"] / "img.png"), "--max-feature-nodes", "8"]
    argv = [*base, *few, "--graph-dir", str(gdir), "--slug", "first"]
    assert run_attribute_command(parse(argv)) == 0
    names = sorted(p.name for p in gdir.iterdir())
    assert names == ["first.heatmap.png", "first.json", "first.safetensors",
                     "graph-metadata.json", "images"]  # fmt: skip
    assert [
        g["slug"] for g in json.loads((gdir / "graph-metadata.json").read_text())["graphs"]
    ] == ["first"]
    for extra, why in (
        (["--graph-dir", str(gdir)], "needs --slug"),
        (["--graph-dir", str(gdir), "--slug", "x", "--out", "g.json"], "not both"),
        (["--graph-dir", str(gdir), "--slug", "../up"], "--slug"),
    ):
        capsys.readouterr()
        assert run_attribute_command(parse([*base, *extra])) == 2
        assert why in capsys.readouterr().err


def test_cli_an_output_path_it_cannot_write_fails_before_any_work(
    llava_setup: dict[str, Path], tmp_path: Path, capsys: Any
) -> None:
    s = llava_setup
    (tmp_path / "afile").write_text("not a folder")
    for out in (tmp_path / "afile" / "sub" / "g.json", tmp_path / "afile" / "g.json"):
        assert run_attribute_command(parse(cli_args(s, out))) == 2
        err = capsys.readouterr()
        assert f"--out: cannot write {out}: {tmp_path / 'afile'} is a file, not a folder" in err.err
        assert "logit" not in err.out.lower(), "it stopped before loading the model"
    argv = cli_args(s, tmp_path / "g.json")
    argv[1] = str(tmp_path / "no-model")  # a path, not a hub name: not "Repo id must be ..."
    assert run_attribute_command(parse(argv)) == 1
    assert f"model path '{tmp_path / 'no-model'}' does not exist" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("name", "why"), [("missing.png", "no such file"), ("bad.png", "cannot read")]
)
def test_cli_bad_image_is_a_clear_error(
    llava_setup: dict[str, Path], capsys: Any, name: str, why: str
) -> None:
    s = llava_setup
    out = s["dir"] / f"bad-{name}" / "graph.json"
    rc = run_attribute_command(parse(cli_args(s, out, "--image", str(s["dir"] / name))))
    assert rc == 2
    err = capsys.readouterr().err
    assert why in err and name in err
    assert not out.parent.exists()  # nothing was loaded or written


def test_cli_text_only_model(zoo_path: Any, tmp_path: Path, capsys: Any) -> None:
    vlm = vlm_for("llama", zoo_path)
    random_clt(vlm, seed=2).save(tmp_path / "dicts")
    s = {"model": zoo_path("llama"), "dicts": tmp_path / "dicts"}
    out = tmp_path / "text" / "g.json"
    assert run_attribute_command(parse(cli_args(s, out, "--max-feature-nodes", "16"))) == 0
    assert sorted(p.name for p in out.parent.iterdir()) == ["g.json", "g.safetensors"]
    data = json.loads(out.read_text())
    assert "images" not in data
    assert {n["feature_type"] for n in data["nodes"]} <= {
        "cross layer transcoder", "mlp reconstruction error", "embedding", "logit",
    }  # fmt: skip
    random_image(8, 8).save(tmp_path / "i.png")
    rc = run_attribute_command(parse(cli_args(s, out, "--image", str(tmp_path / "i.png"))))
    assert rc == 2 and "text-only" in capsys.readouterr().err


@pytest.mark.parametrize("make", ["empty", "sae"])
def test_cli_bad_dictionaries_fail_before_the_model_loads(
    llava_setup: dict[str, Path], tmp_path: Path, capsys: Any, monkeypatch: Any, make: str
) -> None:
    from vlmscope.dictionaries import SparseCoderConfig
    from vlmscope.models.hooked import HookedVLM
    from vlmscope.training.bundle import DictionaryBundle

    def no_load(*a: Any, **k: Any) -> Any:
        raise AssertionError("the model was loaded before the dictionaries were checked")

    monkeypatch.setattr(HookedVLM, "from_pretrained", no_load)
    dicts = tmp_path / "dicts"
    dicts.mkdir()
    if make == "sae":
        cfg = SparseCoderConfig(kind="sae", expansion_factor=2, k=4)
        hooks = ["lm.blocks.0.hook_resid_post"]
        DictionaryBundle.create(cfg, hooks, hooks, 64, 64, {"name": "x"}).save(dicts)
    s = {**llava_setup, "dicts": dicts}
    rc = run_attribute_command(parse(cli_args(s, tmp_path / "g.json")))
    err = capsys.readouterr().err
    assert rc == 2
    assert f"--dictionaries {dicts}" in err
    assert ("neither config.json" in err) if make == "empty" else ("holds SAEs" in err)


def test_cli_target_and_logit_flags(
    llava_setup: dict[str, Path], zoo_path: Any, capsys: Any
) -> None:
    """--max-n-logits / --desired-logit-prob reach attribute(); --target picks the logit the
    graph and the heatmap are about; a multi-token --target is refused."""
    s = llava_setup
    img = str(s["dir"] / "img.png")
    out = s["dir"] / "logits" / "g.json"
    few = ["--image", img, "--max-feature-nodes", "8"]
    flags = ["--max-n-logits", "3", "--desired-logit-prob", "1.0"]
    assert run_attribute_command(parse(cli_args(s, out, *few, *flags))) == 0
    top = load_raw(out.with_suffix(".safetensors")).logit_targets
    assert len(top) == 3  # p=1.0 is never reached by 3 tokens: the cap decides
    flags = ["--max-n-logits", "3", "--desired-logit-prob", "1e-6"]
    assert run_attribute_command(parse(cli_args(s, out, *few, *flags))) == 0
    assert len(load_raw(out.with_suffix(".safetensors")).logit_targets) == 1
    # A chosen word (one token) and the second most likely token's id.
    tok = vlm_for("llava", zoo_path).tokenizer
    one = [
        w
        for w in ("circle", "what", "the", "a")
        if len(tok.encode(w, add_special_tokens=False)) == 1
    ]
    text = next(w for w in one if tok.encode(w, add_special_tokens=False)[0] != top[0].token_id)
    (word,) = tok.encode(text, add_special_tokens=False)
    for target, tid in ((text, word), (str(top[1].token_id), top[1].token_id)):
        capsys.readouterr()
        assert run_attribute_command(parse(cli_args(s, out, *few, "--target", target))) == 0
        raw = load_raw(out.with_suffix(".safetensors"))
        assert [t.token_id for t in raw.logit_targets] == [tid]
        assert f"on {tok.decode([tid])!r}" in capsys.readouterr().out
        # The written heatmap is the one of the targeted logit.
        pic = Image.open(img)
        region = center_crop_box(pic.size, vlm_for("llava", zoo_path).processor.image_processor)
        want = save_heatmap_png(raw, pic, s["dir"] / "want.png", 0, region=region)
        assert Image.open(want).tobytes() == Image.open(out.with_suffix(".heatmap.png")).tobytes()
    rc = run_attribute_command(parse(cli_args(s, out, *few, "--target", "what colour is")))
    assert rc == 2 and "not one" in capsys.readouterr().err
    # --contrast: the competitors become logit nodes after the target, and the heatmap is the
    # target's effect against them; --reference blank keeps the reference edges in the raw
    # graph and the heatmap measures from them.
    vs = str(top[0].token_id)  # never the word (chosen above to differ from it)
    flags = ["--target", text, "--contrast", vs, "--reference", "blank"]
    assert run_attribute_command(parse(cli_args(s, out, *few, *flags))) == 0
    raw = load_raw(out.with_suffix(".safetensors"))
    assert [t.token_id for t in raw.logit_targets] == [word, top[0].token_id]
    assert raw.reference_edges is not None and raw.metadata["reference"] == "blank"
    want = save_heatmap_png(raw, pic, s["dir"] / "want.png", 0, region=region, against=[1])
    assert Image.open(want).tobytes() == Image.open(out.with_suffix(".heatmap.png")).tobytes()
    alone = save_heatmap_png(raw, pic, s["dir"] / "alone.png", 0, region=region)
    assert Image.open(alone).tobytes() != Image.open(want).tobytes()
    rc = run_attribute_command(parse(cli_args(s, out, *few, "--contrast", vs)))
    assert rc == 2 and "--contrast needs --target" in capsys.readouterr().err


# --- patch effect: the linear replacement model's change, measured by forward passes ----------
def linear_replacement_logits(vlm: Any, bundle: Any, inputs: Any, graph: Graph) -> Any:
    """A function embeddings [1, seq, d] -> target logits [n_logits], measured in the frozen
    local replacement model of `inputs`: attention patterns and norm scales replayed from the
    clean run, every MLP output held at its clean value except that each of the graph's
    features (all active ones) follows its pre-activation linearly (a = a_clean + delta pre,
    its decoders writing the difference). No gradient is taken."""
    from vlmscope.attribution.freeze import FreezeState, frozen

    clt = bundle.clt
    layers = [int(r.split(".")[2]) for r in bundle.reads]
    n_layers = vlm.adapter.n_layers
    state = FreezeState(mode="record")
    clean: dict[str, Any] = {}

    def grab(t: torch.Tensor, ctx: Any) -> None:
        clean[ctx.name] = t.detach().clone()

    names = ["lm.blocks.0.hook_resid_pre", *bundle.reads]
    names += [f"lm.blocks.{i}.mlp.hook_out" for i in range(n_layers)]
    with torch.no_grad(), frozen(vlm, state), vlm.hooks([(n, grab) for n in names]):
        vlm.forward(inputs)
    state.mode = "replay"
    tokens = torch.tensor([t.token_id for t in graph.logit_targets])

    def run(embed: torch.Tensor, injected: dict[int, torch.Tensor] | None = None) -> torch.Tensor:
        """`injected`: per model layer l, [1, seq, d] added to what enters layer l + 1 (to
        swap DeepStack's visual injections after l; empty for families without them)."""
        extra = {i: torch.zeros_like(clean[f"lm.blocks.{i}.mlp.hook_out"]) for i in layers}

        def emb(t: torch.Tensor, ctx: Any) -> torch.Tensor:
            return embed.to(t.dtype)

        def read(t: torch.Tensor, ctx: Any) -> None:
            layer = int(ctx.name.split(".")[2])
            s = layers.index(layer)
            unit = clt.layers[s]
            _, pos, f = graph.features[graph.features[:, 0] == layer].T
            d_mid = (t - clean[ctx.name])[0, pos]  # [n, d], one row per feature
            d_pre = (d_mid * unit.W_enc[f] * unit.input_scale).sum(-1)
            for j in range(min(unit.n_out, len(layers) - s)):
                out_scale = clt.layers[s + j].output_scale
                d_out = d_pre[:, None] * unit.W_dec[f, j] / out_scale
                extra[layers[s + j]][0].index_add_(0, pos, d_out)

        def write(t: torch.Tensor, ctx: Any) -> torch.Tensor:
            layer = int(ctx.name.split(".")[2])
            return clean[ctx.name] + extra.get(layer, 0)

        def inject(t: torch.Tensor, ctx: Any) -> torch.Tensor:
            return t + (injected or {})[int(ctx.layer) - 1].to(t.dtype)

        hooks = [("lm.blocks.0.hook_resid_pre", emb)] + [(r, read) for r in bundle.reads]
        hooks += [(f"lm.blocks.{i}.mlp.hook_out", write) for i in range(n_layers)]
        hooks += [(f"lm.blocks.{i + 1}.hook_resid_pre", inject) for i in injected or {}]
        with torch.no_grad(), frozen(vlm, state), vlm.hooks(hooks):
            logits = vlm.forward(inputs).logits[0, -1].double()
        return (logits - logits.mean())[tokens]  # the graph's logit nodes are demeaned

    return run, clean["lm.blocks.0.hook_resid_pre"]


def test_patch_effect_equals_the_measured_change_of_swapping_a_patch(zoo_path: Any) -> None:
    """patch_effect with every feature explored: swapping patch p's embedding for zero changes
    the frozen linear replacement model's logit by -effect[p]; for the blank image's embedding
    (reference edges) by -effect_from_blank[p]; and `against` takes the logits' difference."""
    from vlmscope.attribution.attribute import attribute
    from vlmscope.attribution.baselines import EMBED_HOOK, blank_inputs
    from vlmscope.attribution.export import patch_effect

    vlm = vlm_for("llava", zoo_path)
    bundle = random_clt(vlm, n_targets=2, seed=1)
    inputs = vlm.prepare("what colour is the circle", images=[random_image(32, 40, 7)])
    graph = attribute(vlm, bundle, inputs, batch_size=512, logit_targets=[5, 9],
                      reference="blank")  # fmt: skip
    assert graph.n_features == graph.metadata["n_active_features"]  # every path is in it
    run, x = linear_replacement_logits(vlm, bundle, inputs, graph)
    _, cache = vlm.run_with_cache(blank_inputs(inputs), EMBED_HOOK)
    x_blank = cache[EMBED_HOOK]
    base = run(x)
    effect = patch_effect(graph, 0, reference=False)[0][0]
    from_blank = patch_effect(graph, 0)[0][0]  # the graph has reference edges: the default
    versus = patch_effect(graph, 0, against=[1], reference=False)[0][0]
    image = [p for p in range(graph.n_pos) if graph.input_kinds[p] == "image"]
    checked = 0.0
    for p in image[:: max(1, (len(image) + 2) // 3)]:  # three patches, two forwards each
        img, view, r, c = graph.patch_map[p].tolist()
        if img != 0 or view != 0 or r < 0 or c < 0:
            continue
        zeroed, blanked = x.clone(), x.clone()
        zeroed[0, p] = 0
        blanked[0, p] = x_blank[0, p]
        d_zero, d_blank = run(zeroed) - base, run(blanked) - base
        scale = float(base.abs().max())
        torch.testing.assert_close(effect[r, c], -d_zero[0], atol=1e-4 * scale, rtol=1e-3)
        torch.testing.assert_close(from_blank[r, c], -d_blank[0], atol=1e-4 * scale, rtol=1e-3)
        torch.testing.assert_close(
            versus[r, c], -(d_zero[0] - d_zero[1]), atol=1e-4 * scale, rtol=1e-3
        )
        checked = max(checked, float(d_zero[0].abs()), float(d_blank[0].abs()))
    assert checked > 1e-3, "every swap left the logit unchanged: the test would catch nothing"
    # Dividing feature rows by the activation matters: the plain sum of signed edge products
    # (the benchmark's former "signed total effect") is not the effect.
    from vlmscope.attribution.graph import influence

    w = torch.zeros(graph.adjacency.shape[0], dtype=torch.float64)
    w[graph.logit_slice.start] = 1
    raw = influence(graph.adjacency.double(), w)[graph.input_slice]
    off = max(
        abs(float(raw[p]) - float(effect[tuple(graph.patch_map[p, 2:].tolist())])) for p in image
    )
    assert off > 0.1 * float(effect.abs().max())
    with pytest.raises(ValueError, match="no reference edges"):
        patch_effect(replace(graph, reference_edges=None), 0, reference=True)


def test_patch_effect_of_a_video_is_measured_from_the_blank_video(zoo_path: Any) -> None:
    """A Qwen2-VL video prompt with reference="blank": on each temporal patch (view), the
    effect from the blank video at patch p is the logit's change when p's embedding is swapped
    for the blank video's in the frozen linear replacement model."""
    from vlmscope.attribution.attribute import attribute
    from vlmscope.attribution.baselines import EMBED_HOOK, blank_inputs
    from vlmscope.attribution.export import patch_effect

    vlm = vlm_for("qwen2_vl", zoo_path)
    bundle = random_clt(vlm, n_targets=2, seed=1)
    frames = [random_image(32, 40, s) for s in range(3)]
    inputs = vlm.prepare("what happens in the video", videos=frames)
    graph = attribute(vlm, bundle, inputs, batch_size=512, logit_targets=[5], reference="blank")
    assert graph.n_features == graph.metadata["n_active_features"]  # every path is in it
    run, x = linear_replacement_logits(vlm, bundle, inputs, graph)
    _, cache = vlm.run_with_cache(blank_inputs(inputs), EMBED_HOOK)
    x_blank = cache[EMBED_HOOK]
    base = run(x)
    heat = patch_effect(graph, 0)[0]  # the video is image 0; its views the temporal patches
    assert sorted(heat) == [0, 1]
    video = [p for p in range(graph.n_pos) if graph.input_kinds[p] == "image"]
    scale, checked = float(base.abs().max()), {0: 0.0, 1: 0.0}
    for p in video[:: max(1, (len(video) + 3) // 4)]:  # four patches
        _, view, r, c = graph.patch_map[p].tolist()
        blanked = x.clone()
        blanked[0, p] = x_blank[0, p]
        d_blank = run(blanked) - base
        torch.testing.assert_close(heat[view][r, c], -d_blank[0], atol=1e-4 * scale, rtol=1e-3)
        checked[view] = max(checked[view], float(d_blank[0].abs()))
    assert min(checked.values()) > 1e-3, "a view's swaps changed nothing: nothing was checked"


def deepstack_injections(vlm: Any, inputs: Any) -> dict[int, torch.Tensor]:
    """Per layer l, what enters layer l + 1 besides layer l's output (DeepStack's visual
    features), measured from the hooks of an ordinary forward: [1, seq, d], nonzero only."""
    n_layers = vlm.adapter.n_layers
    post: dict[int, torch.Tensor] = {}
    out: dict[int, torch.Tensor] = {}

    def grab_post(t: torch.Tensor, ctx: Any) -> None:
        post[int(ctx.layer)] = t.detach().clone()

    def grab_pre(t: torch.Tensor, ctx: Any) -> None:
        d = t.detach() - post[int(ctx.layer) - 1]
        if bool(d.any()):
            out[int(ctx.layer) - 1] = d

    hooks = [(f"lm.blocks.{i}.hook_resid_post", grab_post) for i in range(n_layers)]
    hooks += [(f"lm.blocks.{i}.hook_resid_pre", grab_pre) for i in range(1, n_layers)]
    with torch.no_grad(), vlm.hooks(hooks):
        vlm.forward(inputs)
    return out


def test_patch_effect_from_a_blank_image_swaps_deepstack_injections_too(zoo_path: Any) -> None:
    """Qwen3-VL adds visual features to image positions after its first layers (DeepStack),
    and they belong to each position's input node. The effect from a blank image at patch p
    equals the logit change of swapping both p's embedding and p's injections for the blank
    image's in the frozen linear replacement model; the embedding alone is not enough."""
    from vlmscope.attribution.attribute import attribute
    from vlmscope.attribution.baselines import EMBED_HOOK, blank_inputs
    from vlmscope.attribution.export import patch_effect

    vlm = vlm_for("qwen3_vl", zoo_path)
    bundle = random_clt(vlm, n_targets=2, seed=1)
    inputs = vlm.prepare("what colour is the circle", images=[random_image(32, 40, 7)])
    graph = attribute(vlm, bundle, inputs, batch_size=512, logit_targets=[5], reference="blank")
    assert graph.n_features == graph.metadata["n_active_features"]  # every path is in it
    run, x = linear_replacement_logits(vlm, bundle, inputs, graph)
    blank = blank_inputs(inputs)
    _, cache = vlm.run_with_cache(blank, EMBED_HOOK)
    x_blank = cache[EMBED_HOOK]
    inj, inj_blank = deepstack_injections(vlm, inputs), deepstack_injections(vlm, blank)
    assert inj and set(inj) == set(inj_blank)  # the zoo model has DeepStack layers
    base = run(x)
    from_blank = patch_effect(graph, 0)[0][0]
    image = [p for p in range(graph.n_pos) if graph.input_kinds[p] == "image"]
    scale, missed = float(base.abs().max()), 0.0
    for p in image[:: max(1, (len(image) + 2) // 3)]:  # three patches
        img, view, r, c = graph.patch_map[p].tolist()
        if img != 0 or view != 0 or r < 0 or c < 0:
            continue
        swapped = x.clone()
        swapped[0, p] = x_blank[0, p]
        delta = {}
        for layer, d in inj.items():
            delta[layer] = torch.zeros_like(d)
            delta[layer][0, p] = inj_blank[layer][0, p] - d[0, p]
        d_both = run(swapped, delta) - base
        torch.testing.assert_close(from_blank[r, c], -d_both[0], atol=1e-4 * scale, rtol=1e-3)
        missed = max(missed, float((run(swapped) - base - d_both)[0].abs()))
    assert missed > 1e-3 * scale, "the injections changed nothing: the test would catch nothing"
