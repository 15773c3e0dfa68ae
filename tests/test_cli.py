"""The CLI end to end, in process: models table and the demo on zoo models."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from vlmscope.cli import main
from vlmscope.models.hook_points import HOOK_POINTS
from vlmscope.models.registry import families


def test_models_lists_families_hooks_and_flags(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    for fam in families():
        assert f"\n{fam} " in out
    for p in HOOK_POINTS:
        assert p.template in out
    assert "strict_residual_stream" in out


@pytest.mark.parametrize("model", ["llava", "qwen2_vl", "llama"])
def test_demo_prints_shapes_and_mask(
    model: str, zoo_path: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["demo", "--inspect", "--model", str(zoo_path(model)), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "lm.blocks.0.hook_resid_post" in out
    assert "token mask:" in out
    if model != "llama":
        assert "[IMG x" in out and "patch map:" in out
        assert "projector.hook_out" in out


def test_help_and_a_mistyped_command_answer_without_importing_torch() -> None:
    """The subcommands' modules import torch (seconds); `vlmscope --help` and an unknown
    command need none of them, and `train --help` still lists the train flags."""
    code = (
        "import sys\n"
        "from vlmscope.cli import main\n"
        "for argv in (['--help'], ['trian']):\n"
        "    try:\n"
        "        main(argv)\n"
        "    except SystemExit:\n"
        "        pass\n"
        "print('torch' in sys.modules)\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip().splitlines()[-1] == "False"
    assert "train" in res.stdout and "attribute" in res.stdout  # the commands are listed
    helped = subprocess.run(
        [sys.executable, "-m", "vlmscope", "train", "--help"], capture_output=True, text=True
    )
    assert helped.returncode == 0 and "--sae.n_targets" in helped.stdout


def test_unknown_subcommand_is_an_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["bogus"])
    assert e.value.code == 2


def test_zoo_save_names_the_zoo_for_an_unknown_entry(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["zoo", "save", "nosuch", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err
    assert "no zoo model 'nosuch'" in err and "llava" in err
    assert not (tmp_path / "m").exists()


def test_train_strict_stops_at_a_bad_record_without_a_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = [
        {"id": "ok", "image": "present.png",
         "conversations": [{"from": "human", "value": "<image>\nWhat colour?"},
                           {"from": "gpt", "value": "red"}]},
        {"id": "gone", "image": "missing.png",
         "conversations": [{"from": "human", "value": "<image>\nWhat shape?"},
                           {"from": "gpt", "value": "circle"}]},
    ]  # fmt: skip
    Image.new("RGB", (64, 64), "red").save(tmp_path / "present.png")
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    argv = ["train", "toy", str(data), "--image-root", str(tmp_path), "--strict", "--max-steps",
            "4", "--batch-size", "1", "--output-dir", str(tmp_path / "ck")]  # fmt: skip
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "vlmscope train: error:" in err and "missing.png" in err


def test_zoo_shapes_image_writes_the_scene_it_describes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from vlmscope.data import shapes

    out = tmp_path / "shapes.png"
    assert main(["zoo", "shapes-image", str(out), "--shape", "square"]) == 0
    sample = shapes.example_with_one("square")
    assert sum(o.shape == "square" for o in sample.objects) == 1
    with Image.open(out) as im:  # the pixels of the sample it names, not just any picture
        assert list(im.convert("RGB").getdata()) == list(sample.image.convert("RGB").getdata())
    assert sample.caption in capsys.readouterr().out


def test_vlmscopes_own_warnings_are_one_line_named_by_the_command(
    tmp_path: Path, zoo_path: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """A warning of vlmscope's reads like its errors (`vlmscope train: WARNING: ...`), not as
    Python's `/path/sources.py:551: UserWarning: ...` with a line of source under it; others'
    warnings keep Python's form, and the command leaves warnings as it found them."""
    import warnings

    from tests.training.test_sources import mllama_rows

    data = mllama_rows(tmp_path, [False, False, True, True])  # the text batch is left out
    before = warnings.showwarning
    flags = "--sae.kind clt --max-steps 1 --batch-size 2 --sae.k 4"
    argv = ["train", str(zoo_path("mllama")), str(data), *flags.split(), "--output-dir",
            str(tmp_path / "ck")]  # fmt: skip
    assert main(argv) == 0
    assert warnings.showwarning is before
    err = capsys.readouterr().err
    [line] = [x for x in err.splitlines() if "left out" in x]
    assert line.startswith("vlmscope train: WARNING: mllama: a batch without images")
    assert "UserWarning" not in err
    # torch's own warnings point at the vlmscope line that called it: still torch's
    from vlmscope import VlmscopeWarning
    from vlmscope.cli import _own_warnings

    others: list[Any] = []
    show = _own_warnings("train", lambda *a: others.append(a))
    sources = str(Path(__file__).parents[1] / "vlmscope" / "training" / "sources.py")
    show("not writable", UserWarning, sources, 1)
    show("left out", VlmscopeWarning, sources, 1)
    assert [a[0] for a in others] == ["not writable"]
    assert capsys.readouterr().err == "vlmscope train: WARNING: left out\n"
