"""`vlmscope capture` on a zoo VLM: what it stores against plain PyTorch hooks on the HF
model, resume after kill -9 and after a full disk, bad records, refusing to overwrite."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.training.test_trainer import llava_rows_with_bad_ones
from vlmscope.capture import ActivationStore
from vlmscope.cli import build_parser, main
from vlmscope.models.hooked import HookedVLM
from vlmscope.training.capture import CaptureConfig, capture, config_from_capture_args
from vlmscope.training.errors import TrainingError

DATA = "shapes:24"


def capture_config(out: Path, model: Path, extra: str = "", data: str = DATA) -> CaptureConfig:
    """Shards of 0.12 MB hold 78 tokens, about one batch of two samples: a capture stopped at
    its third shard has written the first batch whole, so a resume has something to skip."""
    argv = f"capture {model} {data} --out {out} --batch-size 2 --shard-mb 0.12 {extra}"
    return config_from_capture_args(build_parser().parse_args(argv.split()))


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, zoo_path: Any, llava: HookedVLM) -> Path:
    """An uninterrupted capture, the store the interrupted ones must equal."""
    out = tmp_path_factory.mktemp("ref") / "store"
    capture(capture_config(out, zoo_path("llava"), "--max-tokens 0"), llava, progress=False)
    return out


def files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_the_store_holds_what_the_model_computes(
    tmp_path: Path, zoo_path: Any, llava: HookedVLM
) -> None:
    """Activations against plain forward (pre-)hooks on the HF modules, metadata against the
    processor's ids, the image token id and the patch grid."""
    cfg = capture_config(
        tmp_path / "s",
        zoo_path("llava"),
        "--layers 0 2 --include-special-tokens --max-tokens 0 --batch-size 3",
    )
    res = capture(cfg, llava, progress=False)
    st = ActivationStore(res.folder)
    assert list(st.hooks) == [
        "lm.blocks.0.hook_resid_mid",
        "lm.blocks.0.mlp.hook_out",
        "lm.blocks.2.hook_resid_mid",
        "lm.blocks.2.mlp.hook_out",
    ]
    assert st.complete and len(st.shards) > 2 and st.manifest["samples"] == 24
    stored = {
        k: torch.cat([st.read(s)[k] for s in st.shards])
        for k in [
            *st.hooks,
            "meta.sample",
            "meta.position",
            "meta.token_id",
            "meta.modality",
            "meta.patch",
            "meta.row",
        ]
    }

    from vlmscope.data.processing import SampleEncoder, batches
    from vlmscope.training.sources import open_training_data

    data = open_training_data(cfg.run)
    enc = SampleEncoder(llava.processor, cfg.run.ctx_len, llava.adapter.image_token_ids())
    layers = llava.model.model.language_model.layers
    got: dict[str, list[torch.Tensor]] = {h: [] for h in st.hooks}
    ids, positions = [], []
    for batch in batches((enc.encode(r) for r in data), 3, llava.tokenizer.pad_token_id):
        seen: dict[str, torch.Tensor] = {}
        hooks = []
        for i in (0, 2):
            hooks.append(
                layers[i].post_attention_layernorm.register_forward_pre_hook(
                    lambda _m, a, i=i, seen=seen: seen.__setitem__(
                        f"lm.blocks.{i}.hook_resid_mid", a[0]
                    )
                )
            )
            hooks.append(
                layers[i].mlp.register_forward_hook(
                    lambda _m, _a, o, i=i, seen=seen: seen.__setitem__(
                        f"lm.blocks.{i}.mlp.hook_out", o
                    )
                )
            )
        with torch.no_grad():
            llava.model(**batch.inputs, use_cache=False)
        for h in hooks:
            h.remove()
        valid = batch.inputs["attention_mask"].bool()
        for name in got:
            got[name].append(seen[name][valid])
        ids.append(batch.inputs["input_ids"][valid])
        positions.append(valid.nonzero()[:, 1])
    for name in got:
        torch.testing.assert_close(stored[name], torch.cat(got[name]), rtol=0, atol=0)
    token_ids = torch.cat(ids)
    assert torch.equal(stored["meta.token_id"].long(), token_ids)
    assert torch.equal(stored["meta.position"].long(), torch.cat(positions))
    image_id = llava.model.config.image_token_id
    assert torch.equal(stored["meta.modality"] == 1, token_ids == image_id)
    bos = llava.tokenizer.bos_token_id
    assert bool((stored["meta.modality"][token_ids == bos] == 2).all())
    # Every sample's image tokens walk its patch grid row by row (image 0, view 0).
    for s in range(24):
        patch = stored["meta.patch"][(stored["meta.sample"] == s) & (stored["meta.modality"] == 1)]
        side = int(len(patch) ** 0.5)
        assert side * side == len(patch) > 0
        grid = torch.stack(
            [torch.arange(side).repeat_interleave(side), torch.arange(side).repeat(side)], 1
        )
        assert torch.equal(patch[:, :2], torch.zeros_like(patch[:, :2]))
        assert torch.equal(patch[:, 2:].long(), grid)
    assert bool((stored["meta.patch"][stored["meta.modality"] != 1] == -1).all())
    assert torch.equal(stored["meta.row"], stored["meta.sample"])  # no bad rows here


def test_resume_after_a_full_disk_and_after_kill_9_equals_the_uninterrupted_store(
    tmp_path: Path,
    zoo_path: Any,
    llava: HookedVLM,
    reference: Path,
    monkeypatch: Any,
    capsys: pytest.CaptureFixture[str],
) -> None:
    import vlmscope.capture.writer as writer_mod

    real = writer_mod.save_file
    calls = {"n": 0}

    def fills_the_disk(tensors: Any, path: str, metadata: Any = None) -> None:
        calls["n"] += 1
        if calls["n"] == 3:
            Path(path).write_bytes(b"half a shard")
            raise OSError(errno.ENOSPC, "No space left on device")
        real(tensors, path, metadata=metadata)

    out = tmp_path / "full"
    cfg = capture_config(out, zoo_path("llava"), "--max-tokens 0")
    monkeypatch.setattr(writer_mod, "save_file", fills_the_disk)
    with pytest.raises(
        TrainingError,
        match=r"shard-r0000-000002\.safetensors.*No space left.*the "
        r"2 complete shards .* intact.*--resume",
    ):
        capture(cfg, llava, progress=False)
    monkeypatch.setattr(writer_mod, "save_file", real)
    manifest = json.loads((out / "manifest.json").read_text())
    assert not manifest["complete"] and len(manifest["shards"]) == 2
    assert sorted(p.name for p in out.iterdir()) == [
        "manifest.json",
        "shard-r0000-000000.safetensors",
        "shard-r0000-000001.safetensors",
    ]
    for s in ActivationStore(out).shards:
        ActivationStore(out).check(s)  # the complete shards are whole
    with pytest.raises(TrainingError, match=r"unfinished capture.*--resume"):
        capture(cfg, llava, progress=False)
    resumed = capture(
        capture_config(out, zoo_path("llava"), "--max-tokens 0 --resume"), llava, progress=False
    )
    assert 0 < resumed.new_tokens < resumed.manifest["tokens"]
    assert files(out) == files(reference)  # byte for byte, manifest included

    # kill -9 in the middle, from the command line.
    killed = tmp_path / "killed"
    argv = [
        sys.executable,
        "-m",
        "vlmscope",
        "capture",
        str(zoo_path("llava")),
        DATA,
        "--out",
        str(killed),
        "--batch-size",
        "2",
        "--shard-mb",
        "0.12",
        "--max-tokens",
        "0",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    seen = 0
    while proc.poll() is None and time.time() < deadline:
        try:
            seen = len(json.loads((killed / "manifest.json").read_text())["shards"])
        except (OSError, ValueError):
            seen = 0
        if seen >= 1:
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the capture ended before it could be killed"
    assert not json.loads((killed / "manifest.json").read_text())["complete"]
    assert main([*argv[3:], "--resume"]) == 0  # the same command line, in this process
    out_text = capsys.readouterr().out
    assert "tokens/s" in out_text and "bytes per token" in out_text
    assert files(killed) == files(reference)


def test_bad_records_are_counted_and_strict_stops(
    tmp_path: Path, zoo_path: Any, llava: HookedVLM, capsys: pytest.CaptureFixture[str]
) -> None:
    from PIL import Image

    Image.new("RGB", (40, 32), "red").save(tmp_path / "good.png")
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    turns = [{"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": "red"}]
    # the last row is bad too: read after the last batch, it is counted as the data ends
    images = ["good.png", "missing.png", "good.png", "corrupt.png", "good.png", "missing.png"]
    rows = [{"id": f"r{i}", "image": im, "conversations": turns} for i, im in enumerate(images)]
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    argv = f"capture {zoo_path('llava')} {data} --out {tmp_path / 's'} --batch-size 2".split()
    res = capture(config_from_capture_args(build_parser().parse_args(argv)), llava, progress=False)
    writer = res.manifest["writers"]["0"]
    assert writer["skips"] == {"missing_image": 2, "corrupt_image": 1}
    assert res.skips.counts == writer["skips"]
    assert res.manifest["samples"] == 3
    rows_stored = ActivationStore(res.folder).metadata()["meta.row"].unique().tolist()
    assert rows_stored == [0, 2, 4]  # dataset rows, the bad ones counted
    assert main([*argv[:4], str(tmp_path / "strict"), "--strict", *argv[5:]]) == 1
    err = capsys.readouterr().err
    assert "vlmscope capture: error:" in err and "missing.png" in err


def test_a_capture_stopped_by_its_budget_counts_the_bad_rows_before_where_it_stopped(
    tmp_path: Path, zoo_path: Any, llava: HookedVLM
) -> None:
    """--workers 2 read rows past the last batch stored; the skip counts are those of the
    rows the capture consumed, as without workers."""
    data, bad = llava_rows_with_bad_ones(tmp_path)
    counted = []
    for workers in (0, 1):
        argv = (f"capture {zoo_path('llava')} {data} --out {tmp_path / f's{workers}'} "
                f"--batch-size 2 --max-tokens 150 --workers {workers}").split()  # fmt: skip
        res = capture(config_from_capture_args(build_parser().parse_args(argv)), llava,
                      progress=False)  # fmt: skip
        last = int(ActivationStore(res.folder).metadata()["meta.row"].max())
        assert max(bad) > last  # the budget stopped the capture before the last bad row
        truth = sum(p < last for p in bad)
        assert sum(res.manifest["writers"]["0"]["skips"].values()) == truth > 0
        counted.append(res.manifest["writers"]["0"]["skips"])
    assert counted[0] == counted[1]


def test_an_existing_folder_or_other_settings_are_refused(
    tmp_path: Path, zoo_path: Any, llava: HookedVLM, reference: Path
) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(TrainingError, match=r"not empty and holds no store.*notes\.txt"):
        capture(capture_config(tmp_path, zoo_path("llava")), llava, progress=False)
    with pytest.raises(TrainingError, match="already holds a complete store"):
        capture(capture_config(reference, zoo_path("llava")), llava, progress=False)
    unfinished = tmp_path / "u"
    unfinished.mkdir()
    manifest = json.loads((reference / "manifest.json").read_text())
    (unfinished / "manifest.json").write_text(
        json.dumps({**manifest, "complete": False, "shards": [], "writers": {}})
    )
    cfg = capture_config(unfinished, zoo_path("llava"), "--resume --ctx-len 64 --dtype bfloat16")
    with pytest.raises(
        TrainingError,
        match=r"--resume with settings that differ.*dtype: "
        r"'float32' -> 'bfloat16'.*--ctx-len: 2048 -> 64",
    ):
        capture(cfg, llava, progress=False)


# --- several processes (torchrun's environment, gloo) ------------------------------------------
_MODEL: list[HookedVLM] = []  # the parent's model, inherited by the forked ranks


def _capture_rank(rank: int, world: int, port: int, job: dict[str, Any]) -> None:
    """One rank of `vlmscope capture`; writes its result (or error) as JSON."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))  # fmt: skip
    torch.set_num_threads(1)
    if job["die_at_shard"] and rank == world - 1:  # kill -9 while writing that shard
        import vlmscope.capture.writer as writer_mod

        real, calls = writer_mod.save_file, [0]

        def dying(tensors: Any, path: str, metadata: Any = None) -> None:
            calls[0] += 1
            if calls[0] == job["die_at_shard"]:
                os.kill(os.getpid(), signal.SIGKILL)
            real(tensors, path, metadata=metadata)

        writer_mod.save_file = dying
    out = Path(job["report"])
    try:
        cfg = capture_config(Path(job["out"]), job["model"], job["flags"], job["data"])
        res = capture(cfg, _MODEL[0], progress=False)
        (out / f"rank{rank}.json").write_text(json.dumps({"ok": True, "new": res.new_tokens}))
    except Exception as e:
        (out / f"rank{rank}.json").write_text(json.dumps({"ok": False, "error": str(e)}))


def capture_ranks(world: int, store: Path, report: Path, model: Path, llava: HookedVLM,
                  flags: str = "--max-tokens 0", die_at_shard: int = 0, data: str = DATA,
                  ) -> list[dict[str, Any]]:  # fmt: skip
    from .test_distributed import fork_ranks

    report.mkdir(parents=True, exist_ok=True)
    _MODEL[:] = [llava]
    job = {"out": str(store), "report": str(report), "model": str(model), "flags": flags,
           "die_at_shard": die_at_shard, "data": data}  # fmt: skip
    return fork_ranks(_capture_rank, world, job, report)


def test_two_ranks_capture_the_one_process_store(
    tmp_path: Path, zoo_path: Any, llava: HookedVLM, reference: Path
) -> None:
    """Each rank captures its block of the data into its own shards; read back, the store is
    the one-process store: the same tokens in the same order, the same sample indices and
    metadata, the same activations. A rank killed with -9 stops the other; the manifest stays
    incomplete, another world size cannot resume it, and --resume with
    2 ranks finishes the very files of an uninterrupted 2-rank capture."""
    model = zoo_path("llava")
    two = tmp_path / "two"
    assert all(r["ok"] for r in capture_ranks(2, two, tmp_path / "a", model, llava))
    st, ref = ActivationStore(two), ActivationStore(reference)
    assert st.complete and {s.rank for s in st.shards} == {0, 1}
    assert not list(two.glob("writer-*"))  # the ranks' progress files are merged and gone
    for key in ("tokens", "samples", "modality_tokens"):
        assert st.manifest[key] == ref.manifest[key], key
    a, b = st.metadata(), ref.metadata()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    for h in ref.hooks:
        got = torch.cat([st.read(s, [h])[h] for s in st.shards])
        want = torch.cat([ref.read(s, [h])[h] for s in ref.shards])
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5, msg=h)
    assert {x for s in st.shards for x in st.samples(s)} == {  # (sample, row, row id)
        x for s in ref.shards for x in ref.samples(s)
    }

    killed = tmp_path / "killed"
    res = capture_ranks(2, killed, tmp_path / "b", model, llava, die_at_shard=2)
    assert res[1]["ok"] is None and res[0]["ok"] is False, res
    assert "another rank died" in res[0]["error"]
    assert not json.loads((killed / "manifest.json").read_text())["complete"]
    with pytest.raises(TrainingError, match=r"started with 2.*--nproc_per_node 2"):
        capture(capture_config(killed, model, "--max-tokens 0 --resume"), llava, progress=False)
    again = capture_ranks(2, killed, tmp_path / "c", model, llava, "--max-tokens 0 --resume")
    assert all(r["ok"] for r in again), again
    assert 0 < again[1]["new"] < st.manifest["tokens"]
    assert files(killed) == files(two)  # byte for byte, manifest included


@pytest.mark.parametrize(
    ("total", "batch", "world"), [(24, 2, 2), (25, 4, 3), (3, 4, 2), (0, 2, 2)]
)
def test_rank_blocks_are_whole_batches_that_cover_the_rows_once(
    total: int, batch: int, world: int
) -> None:
    from vlmscope.training.capture_ranks import rank_rows

    blocks = [rank_rows(total, batch, r, world) for r in range(world)]
    assert [lo for lo, _ in blocks] == [0, *[hi for _, hi in blocks[:-1]]]  # contiguous, in order
    assert blocks[-1][1] == total
    assert all(lo % batch == 0 and (hi % batch == 0 or hi == total) for lo, hi in blocks)
    sizes = [-(-(hi - lo) // batch) for lo, hi in blocks]  # batches per rank
    assert max(sizes) - min(sizes) <= 1


def test_mllama_batches_without_images_are_left_out(tmp_path: Path, zoo_path: Any) -> None:
    """Capture's hook widths came from a text prompt, on which transformers runs no
    cross-attention layer (1 and 3 in the zoo model): every Mllama capture of those layers
    stopped before its first batch. A batch without images is left out; the store holds what
    the image rows alone give."""
    from tests.training.test_sources import mllama_rows

    vlm = HookedVLM.from_pretrained(zoo_path("mllama"), device="cpu", dtype=torch.float32)
    mixed = mllama_rows(tmp_path, [False, False, True, True])
    only = mixed.with_name("image_rows.jsonl")
    only.write_text("".join(mixed.read_text().splitlines(keepends=True)[2:]))
    stores = []
    for name, data in (("mixed", mixed), ("only", only)):
        argv = f"capture {zoo_path('mllama')} {data} --out {tmp_path / name} --batch-size 2"
        with pytest.warns(UserWarning, match="left out") if name == "mixed" else nullcontext():
            res = capture(config_from_capture_args(build_parser().parse_args(argv.split())), vlm,
                          progress=False)  # fmt: skip
        store = ActivationStore(res.folder)
        assert res.manifest["samples"] == 2
        hooks = [h for h in store.hooks if h.startswith(("lm.blocks.1.", "lm.blocks.3."))]
        assert hooks  # the cross-attention layers' hooks are stored
        hooks.append("meta.sample")
        parts = [store.read(i, hooks) for i in range(len(store.shards))]
        stores.append({h: torch.cat([p[h] for p in parts]) for h in hooks})
    for h, t in stores[1].items():
        assert torch.equal(stores[0][h], t), h


def test_ranks_whose_first_block_gives_nothing_capture_what_one_process_does(
    tmp_path: Path, zoo_path: Any
) -> None:
    """Each rank captures its block of the rows; rank 0 checked its block as if it were a
    whole pass, so a capture whose first rows give no tokens (here Mllama rows without images,
    whose batches skip the cross-attention layer read) stopped on 2 ranks and not in one
    process. The ranks now check the pass together: the store is the one-process store."""
    from tests.training.test_sources import mllama_rows

    model = zoo_path("mllama")
    vlm = HookedVLM.from_pretrained(model, device="cpu", dtype=torch.float32)
    data = str(mllama_rows(tmp_path, [False] * 4 + [True] * 4))
    one = capture(capture_config(tmp_path / "one", model, "--layers 1", data), vlm,
                  progress=False)  # fmt: skip
    reports = capture_ranks(2, tmp_path / "two", tmp_path / "r", model, vlm, "--layers 1",
                            data=data)  # fmt: skip
    assert all(r["ok"] for r in reports), reports
    two = ActivationStore(tmp_path / "two")
    assert two.manifest["samples"] == one.manifest["samples"] == 4
    assert two.manifest["tokens"] == one.manifest["tokens"] > 0
