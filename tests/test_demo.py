"""The demo end to end on the shipped toy VLM, at the quick budget: the pipeline's claims hold."""

from __future__ import annotations

from pathlib import Path

from vlmscope.demo import DemoBudget, run_demo


def test_quick_demo_on_the_toy_vlm(tmp_path: Path) -> None:
    summary = run_demo("toy", tmp_path / "demo", device="cpu", budget=DemoBudget.quick())
    # Same latent budget and L0: the cross-layer transcoder reconstructs better (Anthropic's
    # comparison), measured on held-out shapes-world questions.
    nmse = summary["heldout_nmse"]
    assert nmse["clt"] < nmse["transcoders"]
    att = summary["attribution"]
    assert att["top_logit"] == att["answer"]
    # Most of the image's influence on the answer sits on the circle's patch(es).
    assert att["circle_concentration"] > 0.5 > att["uniform_share"]
    for name in ("circle-colour.json", "circle-colour.safetensors", "circle-colour.heatmap.png",
                 "graph-metadata.json"):  # fmt: skip
        assert (tmp_path / "demo" / "attribution" / name).exists()
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
