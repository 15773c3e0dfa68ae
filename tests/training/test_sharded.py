"""Sharded checkpoints (training/sharded.py): each rank writes its own shard, a resume reads at
any world size, and the final dictionaries are written without gathering on rank 0.

Resumes across world sizes are compared with an uninterrupted run of the new world size,
bit for bit. That is meaningful because --distribute-modules trains each unit on the global
batch in one process's row order (test_distributed.py), so runs with the same global batch
(world x --batch-size: 1 x 6, 2 x 3, 3 x 2) train the same weights, whatever the layout; the
trainer refuses a resume with another --batch-size, so the test removes the saved
train_config.json that records it. Constant learning rate, so that a run stopped at step 2
took the same steps as the first two of one going to 4.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from vlmscope.training.bundle import DictionaryBundle
from vlmscope.training.checkpoint import file_crc32
from vlmscope.training.distributed import Layout
from vlmscope.training.errors import CheckpointError
from vlmscope.training.sharded import read_checkpoint_state

from .test_distributed import ArraySource, assert_close, clt_config, config, run_ranks

FLAT = {"lr_warmup_fraction": 0.0, "lr_decay_fraction": 0.0, "distribute_modules": True}
GLOBAL = 6  # rows per step, whatever the world size
TOTAL = 60


def train(tmp: Path, world: int, name: str, steps: int, kind: str = "transcoder",
          resume: bool = False) -> Path:  # fmt: skip
    """`steps` Adam steps of run `name` on `world` ranks (one process when 1), global batch 6."""
    batch = GLOBAL // world
    if kind == "clt":  # JumpReLU, skip connection, every later layer a target, no norm rows
        cfg = clt_config(tmp, name, batch, "jumprelu", max_steps=steps, resume=resume, **FLAT)
    else:
        cfg = config(tmp, name, batch, kind, max_steps=steps, resume=resume, **FLAT)
    if resume:  # the global batch is the same; the saved --batch-size would refuse it
        (tmp / name / "train_config.json").unlink()
    results = run_ranks(world, tmp / f"ranks-{name}-{world}-{steps}", cfg, TOTAL, sgd=False)
    assert all(r["ok"] for r in results), results
    return tmp / name


def final(run: Path) -> dict[str, torch.Tensor]:
    return dict(DictionaryBundle.load(run / "dictionaries").state_dict())


def shards_of(run: Path) -> list[str]:
    return sorted(p.name for p in (run / "checkpoint").glob("shard-*.safetensors"))


def test_resume_at_another_world_size_equals_an_uninterrupted_run(tmp_path: Path) -> None:
    """Per-layer transcoders 1 -> 2, 2 -> 3 and 2 -> 1 ranks: optimiser state, counters and
    weights carry over, and the run ends bit for bit as one that never stopped."""
    refs = {w: final(train(tmp_path, w, f"ref{w}", 4)) for w in (1, 2, 3)}
    for a, b in [(1, 2), (2, 3), (2, 1)]:
        run = train(tmp_path, a, f"from{a}to{b}", 2)
        assert shards_of(run) == [f"shard-{r}-of-{a}.safetensors" for r in range(a)]
        train(tmp_path, b, f"from{a}to{b}", 4, resume=True)
        assert shards_of(run) == [f"shard-{r}-of-{b}.safetensors" for r in range(b)]
        assert_close(final(run), refs[b], atol=0)
        state = json.loads((run / "checkpoint" / "state.json").read_text())
        assert state["train_state"]["step"] == 4 and state["world_size"] == b


def test_a_clt_checkpoint_re_splits_at_any_world_size_bit_for_bit(tmp_path: Path) -> None:
    """A CLT's W_dec_s is held by target, so each layout cuts it differently: 2 ranks hold
    layer 0's columns as {0, 1 | 2}, 3 ranks as {0 | 1 | 2}, one process whole. Resumed at
    step 2 of 2 (restore, then write) on 3 ranks, then 1, then 2, the checkpoint's tensors,
    optimiser state included, stay those the 2 ranks wrote, bit for bit. (Training on with
    another world size is not compared bit for bit: the gradient copies of a source's codes
    come back from another set of ranks and are summed in another order.)"""
    run = train(tmp_path, 2, "clt", 2, "clt")
    before = read_checkpoint_state(run / "checkpoint", optimizer=True)
    assert "clt.layers.0.W_dec#2" in json.loads((run / "checkpoint" / "state.json").read_text())[
        "shards"]["shard-1-of-2.safetensors"]  # fmt: skip
    for world in (3, 1, 2):
        train(tmp_path, world, "clt", 2, "clt", resume=True)
        assert shards_of(run) == [f"shard-{r}-of-{world}.safetensors" for r in range(world)]
        assert_close(read_checkpoint_state(run / "checkpoint", optimizer=True), before, atol=0)


def test_a_corrupt_or_missing_shard_is_refused_naming_it_and_leaves_the_run(
    tmp_path: Path,
) -> None:
    run = train(tmp_path, 2, "bad", 2)
    ckpt = run / "checkpoint"
    shard = ckpt / "shard-1-of-2.safetensors"
    raw = bytearray(shard.read_bytes())
    raw[-3] ^= 0x10  # a byte of the last tensor's data: the file still parses
    shard.write_bytes(bytes(raw))
    load_file(str(shard))
    before = {p.name: p.read_bytes() for p in ckpt.iterdir()}
    one = config(tmp_path, "bad", GLOBAL, "transcoder", max_steps=4, resume=True, **FLAT)
    (run / "train_config.json").unlink()
    listing = sorted(p.name for p in run.iterdir())
    with pytest.raises(CheckpointError, match=r"shard-1-of-2\.safetensors fails its checksum"):
        Trainer_(one)
    two = config(tmp_path, "bad", 3, "transcoder", max_steps=4, resume=True, **FLAT)
    for r in run_ranks(2, tmp_path / "ranks-bad", two, TOTAL, sgd=False):  # verified by rank 1
        assert r["ok"] is False and "shard-1-of-2.safetensors fails its checksum" in r["error"]
    assert {p.name: p.read_bytes() for p in ckpt.iterdir()} == before  # untouched
    assert sorted(p.name for p in run.iterdir()) == listing
    shard.unlink()
    with pytest.raises(CheckpointError, match=r"shard-1-of-2\.safetensors is missing"):
        Trainer_(one)


def Trainer_(cfg: Any) -> None:
    from vlmscope.training.trainer import Trainer

    source = ArraySource(TOTAL, cfg.batch_size, Layout())
    Trainer(cfg, progress=False, source=source, layout=Layout()).close()  # type: ignore[arg-type]


def to_whole_bundle_layout(run: Path) -> None:
    """Rewrite a checkpoint in the layout written before sharding: dictionaries/ (the bundle
    format), optimizer.safetensors, rng.safetensors and state.json without an index."""
    ckpt = run / "checkpoint"
    tensors = read_checkpoint_state(ckpt, optimizer=True)
    bundle = DictionaryBundle.load(run / "dictionaries")  # the bindings; weights replaced
    bundle.load_state_dict({k: v for k, v in tensors.items() if not k.startswith("state.")})
    bundle.save(ckpt / "dictionaries")
    save_file({k: v for k, v in tensors.items() if k.startswith("state.")},
              str(ckpt / "optimizer.safetensors"))  # fmt: skip
    for shard in ckpt.glob("shard-*.safetensors"):
        shard.unlink()
    state = json.loads((ckpt / "state.json").read_text())
    del state["shards"], state["dictionaries"]
    state["crc32"] = {n: file_crc32(ckpt / n) for n in ("optimizer.safetensors", "rng.safetensors")}
    (ckpt / "state.json").write_text(json.dumps(state))


@pytest.mark.parametrize(("kind", "world"), [("transcoder", 1), ("clt", 2)])
def test_whole_bundle_checkpoints_still_load(tmp_path: Path, kind: str, world: int) -> None:
    """A checkpoint in the old layout resumes (a CLT's whole W_dec cut into each rank's
    columns) and the run ends as an uninterrupted one; its next checkpoint is sharded."""
    ref = final(train(tmp_path, world, "ref", 4, kind))
    run = train(tmp_path, world, "old", 2, kind)
    to_whole_bundle_layout(run)
    train(tmp_path, world, "old", 4, kind, resume=True)
    assert_close(final(run), ref, atol=0)
    assert shards_of(run) and not (run / "checkpoint" / "dictionaries").exists()


@pytest.mark.parametrize("kind", ["clt", "transcoder"])
def test_final_dictionaries_of_two_ranks_are_those_one_process_writes(
    tmp_path: Path, kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The trained weights, in files byte for byte those one process writes: the CLT's layer
    files streamed by their layer's owner (W_dec in blocks of 2 rows, with checksum blocks of
    1000 bytes, so both cut mid-tensor)."""
    import vlmscope.dictionaries.io as dio
    import vlmscope.training.sharded as sharded

    monkeypatch.setattr(dio, "CHECKSUM_BLOCK", 1000)
    monkeypatch.setattr(sharded, "STREAM_BLOCK", 2 * 3 * 16 * 4)  # 2 rows of W_dec_0
    run = train(tmp_path, 2, "two", 2, kind)
    bundle = DictionaryBundle.load(run / "dictionaries")
    # the weights: those of the last checkpoint (Adam: no averaging), whose decoder columns
    # each owner wrote on its own and which are read back by name
    assert_close(dict(bundle.state_dict()), read_checkpoint_state(run / "checkpoint"), atol=0)
    bundle.save(tmp_path / "one")  # the files: what one process holding them writes
    ours = sorted(p.relative_to(run / "dictionaries") for p in (run / "dictionaries").rglob("*"))
    theirs = sorted(p.relative_to(tmp_path / "one") for p in (tmp_path / "one").rglob("*"))
    assert ours == theirs
    for rel in ours:
        if (tmp_path / "one" / rel).is_file():
            assert (run / "dictionaries" / rel).read_bytes() == (
                tmp_path / "one" / rel
            ).read_bytes()
    if kind == "clt":  # W_dec_0 (40 x 3 x 16 floats) spans several checksum blocks
        cfg = json.loads((run / "dictionaries" / "config.json").read_text())
        assert len(cfg["checksums"]["layer_0.safetensors"]["tensors"]["W_dec"]) == 8


def test_a_shard_that_cannot_be_written_stops_every_rank_and_keeps_the_last_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rank 1's disk fills at the step-4 checkpoint: both ranks raise the same CheckpointError
    naming rank 1, the step-2 checkpoint stays whole and no temporary folder is left."""
    import os

    import vlmscope.training.sharded as sharded

    real, calls = sharded.save_file, {"n": 0}

    def full_disk_on_rank_1(*a: Any, **k: Any) -> None:
        calls["n"] += 1  # rank 1 writes one file (its shard) per checkpoint
        if os.environ.get("RANK") == "1" and calls["n"] > 1:
            raise OSError(28, "No space left on device")
        real(*a, **k)

    monkeypatch.setattr(sharded, "save_file", full_disk_on_rank_1)  # the forked ranks too
    cfg = config(tmp_path, "full", 3, "transcoder", max_steps=4, save_every=2, **FLAT)
    results = run_ranks(2, tmp_path / "ranks-full", cfg, TOTAL, sgd=False)
    for r in results:
        assert r["ok"] is False, r
        assert r["error"].startswith(f"cannot write checkpoint under {tmp_path / 'full'} (rank 1:")
        assert "No space left on device" in r["error"] and "checkpoint is intact" in r["error"]
    ckpt = tmp_path / "full" / "checkpoint"
    assert json.loads((ckpt / "state.json").read_text())["train_state"]["step"] == 2
    assert read_checkpoint_state(ckpt) and shards_of(tmp_path / "full") == [
        "shard-0-of-2.safetensors", "shard-1-of-2.safetensors"]  # fmt: skip
    assert not list((tmp_path / "full").glob(".checkpoint*"))
