"""`vlmscope attribute`'s input checks that need the model's processor; on a memory-mapped
CLT, the planned batch is reported and corrupt dictionaries end in one line naming the file and
tensor (nothing written)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from tests.attribution.test_export import cli_args, llava_setup, parse  # noqa: F401 (fixture)
from vlmscope.attribution.cli import input_warnings, run_attribute_command
from vlmscope.models.toy import toy_path


@pytest.fixture(scope="module")
def processor() -> Any:
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(toy_path())


def test_an_image_far_below_the_processor_resolution_is_warned_about(processor: Any) -> None:
    side = processor.image_processor.crop_size["height"]  # the toy's CLIP crop: 64 px
    tiny = Image.new("RGB", (1, 1))
    quarter = Image.new("RGB", (side // 4, side // 4))
    fine = Image.new("RGB", (side // 4 + 1, side))
    warned = input_warnings(processor, [tiny, fine, quarter], "What colour is the circle?")
    assert len(warned) == 2
    assert warned[0].startswith("image 0 is 1x1 px") and warned[1].startswith("image 2 is")


@pytest.mark.parametrize("family", ["qwen2_vl", "glm4v"])
def test_a_dynamic_resolution_processor_warns_only_about_images_it_upscales_4x(
    family: str, zoo_path: Any
) -> None:
    """Qwen-style size bounds are pixel counts (min_pixels, max_pixels): read as a side, a
    640x480 photo was warned about as resized up to 'about 3136 px' (found by review). The
    warning follows what the processor does: the processed grid's sides in pixels."""
    from transformers import AutoProcessor

    for processor in (AutoProcessor.from_pretrained(zoo_path(family)), _stock_qwen()):
        ip = processor.image_processor
        for w, h in ((640, 480), (100, 100), (12, 12), (5, 9)):
            img = Image.new("RGB", (w, h))
            grid = ip(images=[img], return_tensors="pt")["image_grid_thw"][0]
            side = int(min(grid[1:])) * int(ip.patch_size)  # processed, shorter side
            warned = input_warnings(processor, [img], "What colour is the circle?")
            assert bool(warned) == (side >= 4 * min(w, h)), (family, w, h, side, warned)
    # by hand: the stock processor enlarges an image below 56 x 56 = min_pixels to that area
    stock = _stock_qwen()
    assert input_warnings(stock, [Image.new("RGB", (640, 480))], "a") == []
    [tiny] = input_warnings(stock, [Image.new("RGB", (12, 12))], "a")
    assert "to about 56 px" in tiny


def _stock_qwen() -> Any:
    """A processor with Qwen2-VL's image processor at its defaults, as the hub's ships."""
    from types import SimpleNamespace

    from transformers import Qwen2VLImageProcessorPil

    return SimpleNamespace(image_processor=Qwen2VLImageProcessorPil(), image_token=None)


def test_a_prompt_with_fewer_placeholders_than_images_is_warned_about(processor: Any) -> None:
    img = Image.new("RGB", (64, 64))
    token = processor.image_token
    assert input_warnings(processor, [img, img], "What colour is the circle?") == []
    warned = input_warnings(processor, [img, img], f"{token} What colour is the circle?")
    assert len(warned) == 1 and "1 image placeholder(s)" in warned[0] and "2 image(s)" in warned[0]


def test_auto_batch_size_is_planned_and_reported(
    llava_setup: dict[str, Path],  # noqa: F811
    capsys: Any,
) -> None:
    s = llava_setup
    out = s["dir"] / "auto" / "graph.json"
    argv = cli_args(s, out, "--max-feature-nodes", "24")  # --batch-size auto by default
    assert run_attribute_command(parse(argv)) == 0
    printed = capsys.readouterr().out
    assert "batch size 24, offload none: planned peak" in printed
    assert out.exists()


def test_corrupt_dictionaries_are_one_line_naming_file_and_tensor(
    llava_setup: dict[str, Path],  # noqa: F811
    tmp_path: Path,
    capsys: Any,
) -> None:
    s = llava_setup
    dicts = Path(shutil.copytree(s["dicts"], tmp_path / "dicts"))
    file = dicts / "layer_1.safetensors"
    raw = bytearray(file.read_bytes())
    n = int.from_bytes(raw[:8], "little")
    lo, hi = json.loads(raw[8 : 8 + n])["W_enc"]["data_offsets"]
    raw[8 + n + (lo + hi) // 2] ^= 0x08
    file.write_bytes(bytes(raw))
    out = tmp_path / "run" / "graph.json"
    argv = [*cli_args(s, out, "--max-feature-nodes", "8")]
    argv[argv.index("--dictionaries") + 1] = str(dicts)
    assert run_attribute_command(parse(argv)) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0]
    assert "layer_1.safetensors: tensor 'W_enc'" in err[0] and "checksum" in err[0]
    assert not out.exists()
