"""`vlmscope features` on the toy VLM: cards match a recomputation, images stored once, resume."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from tests.replacement.test_model import random_clt
from vlmscope.features import run as run_mod
from vlmscope.features.run import FeaturesError, FeaturesOptions, collect_features
from vlmscope.features.store import FeatureStore, FeatureUnavailable
from vlmscope.models.hooked import HookedVLM
from vlmscope.models.toy import toy_path

# Two toy prompts (about 85 tokens each) per batch, so 400 tokens take several checkpoints.
OPTS = dict(max_tokens=400, batch_size=2, checkpoint_every=1, examples=4, shard_size=100)
_CACHE: dict[str, Any] = {}


def toy_setup(root: Path) -> dict[str, Any]:
    """The toy VLM, a random CLT on it and one complete features run (shared by the viewer's
    browser test)."""
    if "out" not in _CACHE:
        vlm = HookedVLM.from_pretrained(str(toy_path()), device="cpu", dtype=torch.float32)
        random_clt(vlm, n_targets=2, seed=3).save(root / "dicts")
        out = root / "features"
        res = collect_features("toy", str(root / "dicts"), "shapes:64", out,
                               FeaturesOptions(**OPTS), vlm=vlm, progress=False)  # fmt: skip
        _CACHE.update(vlm=vlm, dicts=root / "dicts", out=out, res=res)
    return _CACHE


@pytest.fixture(scope="module")
def toy(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return toy_setup(tmp_path_factory.mktemp("features"))


def test_cards_match_a_recomputation(toy: dict[str, Any]) -> None:
    from vlmscope.data.processing import SampleEncoder
    from vlmscope.training.bundle import DictionaryBundle
    from vlmscope.training.config import TrainConfig
    from vlmscope.training.trainer import open_training_data

    vlm, out = toy["vlm"], toy["out"]
    index = json.loads((out / "index.json").read_text())
    assert [u["key"] for u in index["units"]] == ["0", "1", "2", "3"]
    assert index["tokens"] >= 400
    store = FeatureStore(out)
    bundle = DictionaryBundle.load(toy["dicts"])
    data = open_training_data(TrainConfig(model="toy", dataset="shapes:64", max_steps=1))
    records = list(itertools.islice(iter(data), 64))
    enc = SampleEncoder(vlm.processor, 256, vlm.adapter.image_token_ids())
    px = vlm.model.config.vision_config.patch_size
    checked = 0
    runs: dict[int, Any] = {}

    def cached(s: int) -> Any:  # one forward per sample, every read hook
        if s not in runs:
            runs[s] = vlm.run_with_cache(enc.encode(records[s]).tensors, names=bundle.reads)[1]
        return runs[s]

    for layer in (1, 3):
        cards = [store.card(str(layer), f) for f in range(0, 256, 29)]
        for card in cards:
            assert 0 <= card["density"] <= 1 and sum(card["histogram"]["counts"]) == card["count"]
            assert len(card["top_logits"]["positive"]) == 10
            acts = [e["activation"] for e in card["examples"]]
            assert acts == sorted(acts, reverse=True)
            for ex in card["examples"][:2]:
                # Independent truth: run that sample alone and encode the token again.
                cache = cached(ex["sample"])
                x = cache[bundle.reads[layer]][0, ex["position"]].float()[None]
                with torch.no_grad():
                    codes = bundle.encode_unit(layer, x)
                hit = codes.values[0][codes.indices[0] == card["index"]]
                assert float(hit.sum()) == pytest.approx(ex["activation"], rel=1e-4, abs=1e-4)
                assert ex["acts"][ex["focus"]] == pytest.approx(ex["activation"], rel=2e-3)
                if "image" in ex:
                    pic = records[ex["sample"]].images[0]
                    stored = Image.open(out / ex["image"]["file"])
                    assert (np.asarray(stored) == np.asarray(pic.convert("RGB"))).all()
                    _, _, r, c = ex["image"]["cell"]
                    assert ex["image"]["box"] == [px * c, px * r, px * c + px, px * r + px]
                checked += 1
    assert checked > 6
    # Each picture once: as many files as distinct images referenced, no orphan left.
    files = {p.name for p in (out / "images").iterdir()}
    used = set()
    for u in index["units"]:
        for shard in (out / u["folder"]).iterdir():
            for card in json.loads(shard.read_text())["features"]:
                used |= {Path(e["image"]["file"]).name for e in card["examples"] if "image" in e}
    assert files == used


def test_interrupted_run_resumes_to_the_same_cards(
    toy: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = run_mod._save_new_images
    calls = {"n": 0}

    def crash_on_second(*a: Any, **k: Any) -> None:
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        real(*a, **k)

    out = tmp_path / "resumed"
    monkeypatch.setattr(run_mod, "_save_new_images", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        collect_features("toy", str(toy["dicts"]), "shapes:64", out, FeaturesOptions(**OPTS),
                         vlm=toy["vlm"], progress=False)  # fmt: skip
    assert (out / ".progress" / "state.json").exists() and not (out / "index.json").exists()
    monkeypatch.setattr(run_mod, "_save_new_images", real)
    with pytest.raises(FeaturesError, match="other settings"):
        collect_features("toy", str(toy["dicts"]), "shapes:64", out,
                         FeaturesOptions(**{**OPTS, "examples": 5}), vlm=toy["vlm"],
                         progress=False)  # fmt: skip
    res = collect_features("toy", str(toy["dicts"]), "shapes:64", out, FeaturesOptions(**OPTS),
                           vlm=toy["vlm"], progress=False)  # fmt: skip
    assert res.resumed_from_tokens > 0 and not (out / ".progress").exists()
    whole = toy["out"]
    for u in json.loads((whole / "index.json").read_text())["units"]:
        for shard in sorted((whole / u["folder"]).iterdir()):
            assert json.loads(shard.read_text()) == json.loads(
                (out / u["folder"] / shard.name).read_text()
            ), shard
    assert sorted(p.name for p in (out / "images").iterdir()) == sorted(
        p.name for p in (whole / "images").iterdir()
    )


def test_bad_input_names_the_culprit(toy: dict[str, Any], tmp_path: Path, zoo_path: Any) -> None:
    finished = toy["out"]
    before = {p: p.read_bytes() for p in finished.rglob("*") if p.is_file()}
    with pytest.raises(FeaturesError, match=r"holds the cards of a finished run.*--overwrite"):
        collect_features("toy", str(toy["dicts"]), "shapes:64", finished,
                         FeaturesOptions(**OPTS), vlm=toy["vlm"], progress=False)  # fmt: skip
    assert before == {p: p.read_bytes() for p in finished.rglob("*") if p.is_file()}
    other = HookedVLM.from_pretrained(str(zoo_path("llava")), device="cpu")  # d_model 64
    with pytest.raises(FeaturesError, match=r"dictionaries trained on .* do not match"):
        collect_features("toy", str(toy["dicts"]), "shapes:64", tmp_path / "o",
                         vlm=other, progress=False)  # fmt: skip
    with pytest.raises(FeaturesError, match="DICTIONARIES"):
        collect_features("toy", str(tmp_path / "nope"), "shapes:64", tmp_path / "o",
                         vlm=toy["vlm"], progress=False)  # fmt: skip
    (tmp_path / "file").write_text("x")
    with pytest.raises(FeaturesError, match="is a file"):
        collect_features("toy", str(toy["dicts"]), "shapes:64", tmp_path / "file",
                         vlm=toy["vlm"], progress=False)  # fmt: skip
    with pytest.raises(FeaturesError, match="--examples"):
        collect_features("toy", str(toy["dicts"]), "shapes:64", tmp_path / "o",
                         FeaturesOptions(examples=0), vlm=toy["vlm"], progress=False)  # fmt: skip


def test_a_unit_folder_that_links_out_of_the_features_folder_is_refused(
    toy: dict[str, Any], tmp_path: Path
) -> None:
    import shutil

    copy = tmp_path / "features"
    shutil.copytree(toy["out"], copy)
    store = FeatureStore(copy)
    unit = next(iter(store.units.values()))
    good = store.card(str(unit["key"]), 0)
    outside = tmp_path / "outside"
    shutil.move(str(copy / unit["folder"]), outside)  # same cards, now outside the folder
    (copy / unit["folder"]).symlink_to(outside, target_is_directory=True)
    with pytest.raises(FeatureUnavailable, match="leads out of the features folder"):
        FeatureStore(copy).card(str(unit["key"]), 0)
    (copy / unit["folder"]).unlink()
    shutil.move(str(outside), copy / unit["folder"])
    assert FeatureStore(copy).card(str(unit["key"]), 0) == good


def test_mllama_batches_without_images_are_left_out(
    tmp_path: Path, zoo_path: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """Transformers runs no cross-attention layer for a batch without images, whose hooks a
    CLT over every layer reads: collecting stopped there. Such a batch is left out and said
    to be; the cards are those of the image rows alone."""
    from tests.training.test_sources import mllama_rows

    vlm = HookedVLM.from_pretrained(zoo_path("mllama"), device="cpu", dtype=torch.float32)
    random_clt(vlm, seed=1).save(tmp_path / "dicts")
    mixed = mllama_rows(tmp_path, [False, False, True, True])
    only = mixed.with_name("image_rows.jsonl")
    only.write_text("".join(mixed.read_text().splitlines(keepends=True)[2:]))
    cards = []
    for name, data in (("mixed", mixed), ("only", only)):
        res = collect_features(str(zoo_path("mllama")), str(tmp_path / "dicts"), str(data),
                               tmp_path / name, FeaturesOptions(batch_size=2), vlm=vlm,
                               progress=False)  # fmt: skip
        index = json.loads((res.out / "index.json").read_text())
        cards.append((res.tokens, index["tokens"], index["units"]))
    assert "1 batch(es) left out" in capsys.readouterr().err
    assert cards[0] == cards[1] and cards[0][0] > 0


def test_a_videos_frames_are_boxed_in_its_processed_region_like_its_first() -> None:
    """A video's views are its frames, each centre-cropped as the first (the stored
    picture); only image tiles and high-resolution views cover the whole picture. By hand:
    a 40 x 32 frame cropped to x 4..36, a 2 x 2 grid."""
    ref = {"region": [4, 0, 36, 32], "width": 40, "height": 32, "grids": {"0": [2, 2], "1": [2, 2]}}
    assert run_mod._box(ref, 0, 1, 0) == [4.0, 16.0, 20.0, 32.0]
    assert run_mod._box(ref, 1, 1, 0) == [0.0, 16.0, 20.0, 32.0]  # a tile: the whole picture
    assert run_mod._box({**ref, "video": True}, 1, 1, 0) == [4.0, 16.0, 20.0, 32.0]
