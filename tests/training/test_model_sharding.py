"""The frozen model sharded with FSDP2 over 2 gloo ranks gives the unsharded model's
activations (zoo llava, CPU), and bf16 autocast leaves the dictionaries' inputs float32."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from vlmscope.models.hooked import HookedVLM
from vlmscope.training.distributed import Layout, shard_frozen_model
from vlmscope.training.errors import TrainingError

from ..conftest import random_image
from .test_distributed import free_port, join_or_kill

NAMES = ["lm.blocks.0.hook_resid_mid", "lm.blocks.2.mlp.hook_out", "lm.blocks.1.attn.hook_z"]


def activations(vlm: HookedVLM) -> dict[str, torch.Tensor]:
    inputs = vlm.prepare(["Describe it please", "What shape?"],
                         images=[[random_image(40, 40, 1)], [random_image(40, 40, 2)]])  # fmt: skip
    _, cache = vlm.run_with_cache(inputs, names=NAMES, mask="all")
    return {n: cache[n].detach().contiguous() for n in NAMES}


def _rank(rank: int, world: int, port: int, model: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))  # fmt: skip
    torch.set_num_threads(1)
    layout = Layout.from_environment(60)
    vlm = HookedVLM.from_pretrained(model, device="cpu", dtype=torch.float32)
    vlm.model.requires_grad_(False)
    shard_frozen_model(vlm, layout)
    w = vlm.adapter.block(0).mlp.down_proj.weight  # type: ignore[union-attr]
    shard_rows = int(w.to_local().shape[0])  # a DTensor: this rank holds a slice
    acts = activations(vlm)
    acts["shard_rows"] = torch.tensor(shard_rows)
    save_file(acts, f"{out}/rank{rank}.safetensors")


def test_fsdp_sharded_model_gives_the_unsharded_activations(tmp_path: Path, zoo_path: Any) -> None:
    model = str(zoo_path("llava"))
    ctx = mp.start_processes(_rank, args=(2, free_port(), model, str(tmp_path)), nprocs=2,
                             join=False, start_method="fork")  # fmt: skip
    join_or_kill(ctx.processes)
    assert [p.exitcode for p in ctx.processes] == [0, 0]
    full = HookedVLM.from_pretrained(model, device="cpu", dtype=torch.float32)
    ref = activations(full)
    rows = full.adapter.block(0).mlp.down_proj.weight.shape[0]  # type: ignore[union-attr]
    for r in range(2):
        got = load_file(str(tmp_path / f"rank{r}.safetensors"))
        assert int(got.pop("shard_rows")) == rows // 2
        for n in NAMES:
            torch.testing.assert_close(got[n], ref[n], atol=1e-5, rtol=1e-5, msg=n)


def test_bf16_autocast_runs_the_model_and_hands_float32_to_the_dictionaries(
    tmp_path: Path, zoo_path: Any
) -> None:
    from vlmscope.training.config import parse_train_args
    from vlmscope.training.sources import LiveSource, TrainState

    vlm = HookedVLM.from_pretrained(zoo_path("llava"), device="cpu", dtype=torch.float32)
    got = {}
    for mode in ("off", "bf16"):
        cfg = parse_train_args([str(zoo_path("llava")), "shapes:8", "--sae.transcode",
                                "--batch-size", "2", "--autocast", mode])  # fmt: skip
        src = LiveSource(cfg)
        src.open_data()
        src.bind_model(vlm)
        got[mode] = next(src.batches(TrainState())).xs[1]
    assert got["bf16"].dtype == torch.float32
    diff = (got["bf16"] - got["off"]).abs().max().item()
    scale = got["off"].abs().max().item()
    assert 0 < diff < 0.05 * scale  # bf16 rounding: different, and close


def test_autocast_keeps_a_half_precision_model_in_its_own_dtype(
    tmp_path: Path, zoo_path: Any
) -> None:
    """Under bf16 autocast a float16 model's residual stream turns float32 (fp16 + bf16
    promote) while its matmuls run in bf16: activations neither eval nor attribute (which run
    the model as loaded) ever see. auto leaves a half-precision model alone; an explicit bf16
    on float16 is refused before anything runs."""
    from vlmscope.training.config import parse_train_args
    from vlmscope.training.sources import LiveSource, autocast_on

    vlm = HookedVLM.from_pretrained(zoo_path("llava"), device="cpu", dtype=torch.float16)
    ids = vlm.prepare(["a red circle"])
    names = ["lm.blocks.0.hook_resid_mid", "lm.blocks.1.hook_resid_post"]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, mixed = vlm.run_with_cache(ids, names=names)
    assert {t.dtype for t in mixed.values()} == {torch.float32}  # the mix autocast makes
    cuda = torch.device("cuda")
    assert autocast_on("auto", cuda, torch.float32)
    assert not autocast_on("auto", cuda, torch.float16)
    assert not autocast_on("auto", cuda, torch.bfloat16)
    assert not autocast_on("auto", torch.device("cpu"), torch.float32)
    cfg = parse_train_args([str(zoo_path("llava")), "shapes:8", "--sae.transcode",
                            "--autocast", "bf16", "--output-dir", str(tmp_path)])  # fmt: skip
    src = LiveSource(cfg)
    src.open_data()
    with pytest.raises(TrainingError, match="--autocast bf16 on a float16 model"):
        src.bind_model(vlm)
