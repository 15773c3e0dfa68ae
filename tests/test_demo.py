"""The demo end to end on the shipped toy VLM, at the quick budget: the pipeline's claims hold."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from vlmscope.demo import GROUNDING_SUMMARY, DemoBudget, grounding_benchmark, run_demo
from vlmscope.models.hooked import HookedVLM
from vlmscope.models.toy import toy_path


def test_quick_demo_on_the_toy_vlm(tmp_path: Path) -> None:
    summary = run_demo("toy", tmp_path / "demo", device="cpu", budget=DemoBudget.quick())
    # Same latent budget and L0: the cross-layer transcoder reconstructs better (Anthropic's
    # comparison), measured on held-out shapes-world questions.
    nmse = summary["heldout_nmse"]
    assert nmse["clt"] < nmse["transcoders"]
    att = summary["attribution"]
    assert att["top_logit"] == att["answer"]
    # The image's influence on the answer sits on the circle's patches: they are 4 of the 64
    # (uniform 6.2%) and get over four times their share even from the quick budget's
    # dictionaries (nMSE near 0.5: about 34%; the full demo's 61%).
    assert att["circle_concentration"] > 4 * att["uniform_share"]
    # ...and beside the one example, the benchmark's mean for its question type
    shipped = json.loads(GROUNDING_SUMMARY.read_text())
    assert att["benchmark_mean"] == shipped["by_type"]["colour"]["effect_clt"]["mean"]
    for name in ("circle-colour.json", "circle-colour.safetensors", "circle-colour.heatmap.png",
                 "graph-metadata.json"):  # fmt: skip
        assert (tmp_path / "demo" / "attribution" / name).exists()
    graph = json.loads((tmp_path / "demo" / "attribution" / "circle-colour.json").read_text())
    assert graph["metadata"]["scan"] == "toy"  # as `vlmscope attribute --model toy` names it
    assert (tmp_path / "demo" / "summary.json").exists()
    assert (tmp_path / "demo" / "features" / "index.json").exists()
    assert summary["features"]["alive"] > 0


def test_demo_keeps_other_files_in_its_output_folder(tmp_path: Path) -> None:
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    earlier = out / "runs" / "clt"  # an earlier demo's run: would block a new run of that name
    earlier.mkdir(parents=True)
    (earlier / "train_config.json").write_text("{}")
    run_demo("toy", out, device="cpu", budget=DemoBudget.quick())
    assert (out / "notes.txt").read_text() == "keep me"
    assert (out / "summary.json").exists() and (earlier / "dictionaries").is_dir()


def test_the_benchmark_mean_is_quoted_for_the_shipped_toy_only(zoo_path: Any) -> None:
    shipped = json.loads(GROUNDING_SUMMARY.read_text())
    toy = HookedVLM.from_pretrained(toy_path(), device="cpu")
    got = grounding_benchmark(toy, "shape", "effect_plt")
    assert got == shipped["by_type"]["shape"]["effect_plt"] and got["n"] > 0
    other = HookedVLM.from_pretrained(zoo_path("llava"), device="cpu")
    assert grounding_benchmark(other, "colour", "effect_clt") is None


def test_a_summary_of_other_weights_is_not_quoted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A toy retrained into the shipped folder must not be given the shipped toy's figures:
    the summary names the weights it was measured on by their SHA-256."""
    import vlmscope.demo as demo

    shipped = json.loads(GROUNDING_SUMMARY.read_text())
    toy = HookedVLM.from_pretrained(toy_path(), device="cpu")
    other = tmp_path / "grounding.json"
    other.write_text(json.dumps({**shipped, "weights_sha256": "0" * 64}))
    monkeypatch.setattr(demo, "GROUNDING_SUMMARY", other)
    assert grounding_benchmark(toy, "shape", "effect_plt") is None
