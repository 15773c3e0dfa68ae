"""The frozen model sharded with FSDP2 over 2 gloo ranks gives the unsharded model's
activations (zoo llava, CPU), and bf16 autocast leaves the dictionaries' inputs float32."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file
from torch.distributed.tensor import DTensor

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
    # every weight sharded (the vision tower's in the root unit) and every tensor on the
    # mesh's device, where fully_shard moves a model loaded on the CPU (cpu under gloo)
    mesh_device = torch.device("cpu")
    unsharded = [n for n, p in vlm.model.named_parameters() if not isinstance(p, DTensor)]
    assert not unsharded, unsharded[:4]
    elsewhere = [n for n, t in [*vlm.model.named_parameters(), *vlm.model.named_buffers()]
                 if t.device != mesh_device]  # fmt: skip
    assert not elsewhere, elsewhere[:4]
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


def test_a_model_to_shard_loads_into_host_memory(
    tmp_path: Path, zoo_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--shard-model fsdp is for models larger than one GPU: each rank loads the whole model
    on the CPU and fully_shard moves its shard to the GPU (loading onto --device first ran out
    of memory before sharding). One process does not shard: the model goes to --device."""
    from vlmscope.training.config import parse_train_args
    from vlmscope.training.sources import LiveSource

    real = HookedVLM.from_pretrained.__func__  # type: ignore[attr-defined]
    asked: list[Any] = []

    def spy(cls: type, path: str, *, device: Any = None, **kw: Any) -> HookedVLM:
        asked.append(device)
        return real(cls, path, device="cpu", **kw)  # type: ignore[no-any-return]

    monkeypatch.setattr(HookedVLM, "from_pretrained", classmethod(spy))
    flags = [str(zoo_path("llava")), "shapes:8", "--max-steps", "1"]
    for world, shard in ((2, "fsdp"), (1, "fsdp"), (2, "none")):
        cfg = parse_train_args([*flags, "--shard-model", shard])
        cfg = dataclasses.replace(cfg, device="cuda:1")  # the spy loads on the CPU anyway
        src = LiveSource(cfg, Layout(rank=0, world=world))  # no group: bind_model joins none
        src.open_data()
        src.bind_model()
    assert asked == ["cpu", "cuda:1", "cuda:1"]


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


# --- whole training runs with --shard-model fsdp: every rank runs the same forwards ------------
def _train_rank(rank: int, world: int, port: int, job: dict[str, Any]) -> None:
    """One rank of a Trainer run on `job["flags"]`, plain SGD (float tolerance stays meaningful
    after a step, see test_distributed); writes its weights and rank{r}.json."""
    from vlmscope.training.config import parse_train_args
    from vlmscope.training.trainer import Trainer

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))  # fmt: skip
    torch.set_num_threads(1)
    out = Path(job["out"])
    try:
        cfg = parse_train_args(job["flags"])
        tr = Trainer(cfg, progress=False, layout=Layout.from_environment(cfg.dist_timeout))
        params = [p for g in tr.optimizer.param_groups for p in g["params"]]
        tr.optimizer = torch.optim.SGD(params, lr=cfg.lr)
        tr.fit()
        weights = {k: v.detach().contiguous() for k, v in tr.bundle.state_dict().items()}
        save_file(weights, str(out / f"rank{rank}.safetensors"))
        assert tr.vlm is not None
        # a unit left gathered holds plain tensors where its sharded DTensors were
        gathered = sorted({n.rsplit(".", 1)[0] for n, p in tr.vlm.model.named_parameters()
                           if not isinstance(p, DTensor)})  # fmt: skip
        (out / f"rank{rank}.json").write_text(json.dumps({"ok": True, "gathered": gathered}))
    except Exception as e:  # reported to the test, which shows it
        (out / f"rank{rank}.json").write_text(json.dumps({"ok": False, "error": repr(e)}))


def train_ranks(out: Path, flags: str, world: int) -> dict[str, torch.Tensor]:
    """Rank 0's dictionaries after a run of `flags` on `world` forked ranks (1: in-process);
    every rank must finish, within --dist-timeout of any mismatch, and a sharded model must
    end with no unit left gathered."""
    from .test_distributed import fork_ranks

    out.mkdir(parents=True)
    argv = [*flags.split(), "--output-dir", str(out), "--run-name", "run"]
    job = {"flags": argv, "out": str(out)}
    if world == 1:  # in this process: the variables a rank sets go when it is done (a
        # RANK / WORLD_SIZE left set makes accelerate, in later tests, start a process group)
        with mock.patch.dict(os.environ):
            _train_rank(0, 1, free_port(), job)
        reports = [json.loads((out / "rank0.json").read_text())]
    else:
        reports = fork_ranks(_train_rank, world, job, out)
    assert [r["ok"] for r in reports] == [True] * world, reports
    if "--shard-model fsdp" in flags:  # freed between forwards, not only sharded at the start
        assert [r["gathered"] for r in reports] == [[]] * world, reports
    return load_file(str(out / "rank0.safetensors"))


def same_weights(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    """The same tensors, to float tolerance (the ranks' sums run in another order)."""
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=1e-5, rtol=1e-5, msg=k)


def trains_as_data_parallel(tmp_path: Path, flags: str) -> None:
    """2 ranks with `flags --shard-model fsdp` train what unsharded data parallelism does."""
    sharded = train_ranks(tmp_path / "fsdp", f"{flags} --shard-model fsdp", 2)
    same_weights(sharded, train_ranks(tmp_path / "ddp", flags, 2))


def chat_rows(folder: Path, images: list[str | None]) -> Path:
    """A LLaVA-style dataset: row i has image images[i] (None: a text-only row; a missing
    file: a row the reader rejects)."""
    from PIL import Image

    Image.new("RGB", (40, 32), "red").save(folder / "red.png")
    rows = []
    for i, im in enumerate(images):
        turns = [{"from": "human", "value": ("<image>\n" if im else "") + f"What is {i}?"},
                 {"from": "gpt", "value": f"It is {i}."}]  # fmt: skip
        rows.append({"id": str(i), "conversations": turns, **({"image": im} if im else {})})
    data = folder / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return data


FSDP_FLAGS = ("--batch-size 1 --max-steps 2 --lr 0.01 --tokens all --layers 0 --dist-timeout 15 "
              "--sae.expansion-factor 2 --sae.k 4")  # fmt: skip


def test_an_sae_trains_on_a_sharded_model(tmp_path: Path, zoo_path: Any) -> None:
    """The SAE's hook width is read off a probe forward: on a sharded model every rank runs it
    (rank 0 alone deadlocked in the FSDP all-gathers while the others waited to agree)."""
    data = chat_rows(tmp_path, [None] * 4)
    flags = f"{zoo_path('llava')} {data} {FSDP_FLAGS}"
    trains_as_data_parallel(tmp_path, flags)


def test_ranks_with_and_without_images_train_the_one_process_dictionaries(
    tmp_path: Path, zoo_path: Any
) -> None:
    """Rank 0's rows have images, rank 1's none: HF LLaVA skips the vision tower without
    pixel_values, so the tower must not be FSDP units of its own. The result is one process's
    on the global batches."""
    data = chat_rows(tmp_path, ["red.png", None, "red.png", None])
    flags = f"{zoo_path('llava')} {data} {FSDP_FLAGS} --sae.transcode"
    sharded = train_ranks(tmp_path / "fsdp", f"{flags} --shard-model fsdp", 2)
    one = train_ranks(tmp_path / "one", flags.replace("--batch-size 1", "--batch-size 2"), 1)
    same_weights(sharded, one)


def test_mllama_ranks_with_and_without_images_train_as_data_parallel(
    tmp_path: Path, zoo_path: Any
) -> None:
    """Mllama's language model skips its cross-attention layers for a batch without images,
    so a rank without images ran fewer units' all-gathers than one with (a hang on NCCL, a
    size mismatch on gloo): those layers belong to the root unit. Layer 2 is read, past the
    zoo model's cross-attention layer 1. (Compared with unsharded ranks, not one process: in
    a batch with an image HF runs the cross-attention layers on a text row too, which moves
    its activations.)"""
    data = chat_rows(tmp_path, ["red.png", None, "red.png", None])
    flags = f"{zoo_path('mllama')} {data} {FSDP_FLAGS} --sae.transcode"
    trains_as_data_parallel(tmp_path, flags.replace("--layers 0", "--layers 2"))


@pytest.mark.parametrize(
    "flags",
    ["--sae.transcode", "--sae.transcode --loss-fn ce", "--tower vision"],
    ids=["fvu", "ce", "vision"],
)
def test_a_rank_whose_rows_all_failed_runs_the_others_forwards(
    tmp_path: Path, zoo_path: Any, flags: str
) -> None:
    """Rank 1's only row of the first window is rejected by the reader, and the run trains
    what unsharded data parallelism trains. Its stand-in forward stops where the others' stop
    (--loss-fn fvu ends at the last hook read, --tower vision where the language model
    starts); under --loss-fn ce the others also run a spliced forward and its backward through
    the sharded model, which it runs too at its zero share of the tokens."""
    data = chat_rows(tmp_path, ["red.png", "missing.png", None, "red.png"])
    flags = f"{zoo_path('llava')} {data} {FSDP_FLAGS} {flags}"
    trains_as_data_parallel(tmp_path, flags)


def test_projector_and_lm_hooks_stop_every_rank_at_one_layer(tmp_path: Path, zoo_path: Any) -> None:
    """A rank whose batch has no image never fires projector.hook_out; the forward must still
    stop where the ranks with images stop (it ran every layer: mismatched all-gathers)."""
    data = chat_rows(tmp_path, ["red.png", None, "red.png", None])
    flags = (f"{zoo_path('llava')} {data} {FSDP_FLAGS} "
             "--hookpoints projector.hook_out lm.blocks.0.hook_resid_post")  # fmt: skip
    trains_as_data_parallel(tmp_path, flags)


def test_a_bad_record_on_one_sharded_rank_stops_every_rank_with_it(
    tmp_path: Path, zoo_path: Any
) -> None:
    """Under --strict rank 1's missing image is an error before its forward; the others are
    in their forward's all-gathers, so it runs that forward first, and every rank stops with
    the record named (it waited for --dist-timeout and the record was lost)."""
    from .test_distributed import fork_ranks

    data = chat_rows(tmp_path, ["red.png", "missing.png", None, "red.png"])
    out = tmp_path / "o"
    out.mkdir()
    flags = f"{zoo_path('llava')} {data} {FSDP_FLAGS} --sae.transcode --strict --shard-model fsdp"
    argv = [*flags.split(), "--output-dir", str(out), "--run-name", "run"]
    reports = fork_ranks(_train_rank, 2, {"flags": argv, "out": str(out)}, out)
    for r in reports:
        assert not r["ok"] and "AgreedError" in r["error"], reports
        assert "missing_image" in r["error"] and "all 2 ranks stopped" in r["error"], reports


@pytest.mark.parametrize(
    ("family", "images"), [("llava", ["red.png", None, "red.png"]), ("paligemma", ["red.png"] * 3)]
)
def test_a_rank_without_rows_joins_the_spliced_batchtopk_selection(
    tmp_path: Path, zoo_path: Any, family: str, images: list[str | None]
) -> None:
    """Data parallel, unsharded: BatchTopK selects over all ranks inside the spliced ce loss,
    so a rank whose window is empty (3 rows on 2 ranks: the last window) must run it too; it
    waited for ever. The result is what one process trains on the same global batches.
    PaliGemma's processor refuses a prompt without an image: the stand-in brings one."""
    data = chat_rows(tmp_path, images)
    flags = (f"{zoo_path(family)} {data} {FSDP_FLAGS} --sae.transcode --loss-fn ce "
             "--sae.activation batchtopk")  # fmt: skip
    two = train_ranks(tmp_path / "two", flags, 2)
    one = train_ranks(tmp_path / "one", flags.replace("--batch-size 1", "--batch-size 2"), 1)
    same_weights(two, one)
