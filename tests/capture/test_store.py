"""The activation store's files and reader, on synthetic tokens (no model): shard cutting,
metadata, checksums, capture-order and shuffled epochs, resume positions, ranks, the
IterableDataset."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open

from vlmscope.capture import (
    META,
    ActivationStore,
    StoreError,
    StoreWriter,
    build_manifest,
    bytes_per_token,
    recipe_bytes_per_token,
    write_manifest,
)

HOOKS = {"lm.blocks.0.hook_resid_mid": 6, "lm.blocks.0.mlp.hook_out": 6}
HOOK0 = "lm.blocks.0.hook_resid_mid"


def synthetic_store(
    folder: Path, n_samples: int = 23, shard_tokens: int = 17, seed: int = 0
) -> dict[str, torch.Tensor]:
    """Write a store of samples with 0-9 tokens each through StoreWriter, in batches of 3
    samples; return every token's tensors in capture order (the truth to read back)."""
    g = torch.Generator().manual_seed(seed)
    header: dict[str, Any] = {
        "model": {
            "name": "synthetic",
            "config_sha256": "0" * 64,
            "family": "llava",
            "dims": {"n_layers": 1, "d_model": 6},
        },
        "data": {
            "dataset": "synthetic",
            "split": "train",
            "seed": 0,
            "tokens": "all",
            "include_special_tokens": True,
        },
        "hooks": {h: {"width": w, "layer": 0} for h, w in HOOKS.items()},
        "dtype": "float32",
        "shard_tokens": shard_tokens,
        "sizes": {},
    }

    def on_shard(w: StoreWriter) -> None:
        write_manifest(folder, build_manifest(header, {0: {"shards": w.shards}}, False))

    writer = StoreWriter(folder, HOOKS, torch.float32, shard_tokens, on_shard=on_shard)
    parts: list[dict[str, torch.Tensor]] = []
    sample = 0
    while sample < n_samples:
        ids = list(range(sample, min(sample + 3, n_samples)))
        counts = torch.randint(0, 10, (len(ids),), generator=g).tolist()
        n = sum(counts)
        t = {h: torch.randn(n, w, generator=g) for h, w in HOOKS.items()}
        t["meta.sample"] = torch.tensor(
            [s for s, c in zip(ids, counts, strict=True) for _ in range(c)], dtype=torch.int64
        )
        t["meta.row"] = t["meta.sample"] * 2
        t["meta.position"] = torch.cat([torch.arange(c) for c in counts]).to(torch.int32)
        t["meta.token_id"] = torch.randint(0, 100, (n,), generator=g, dtype=torch.int32)
        t["meta.modality"] = torch.randint(0, 3, (n,), generator=g).to(torch.uint8)
        t["meta.patch"] = torch.randint(-1, 5, (n, 4), generator=g, dtype=torch.int32)
        writer.add(t, [(s, 2 * s, f"id{s}") for s in ids], {"sample": sample})
        parts.append(t)
        sample += len(ids)
    writer.finish()
    write_manifest(
        folder, build_manifest(header, {0: {"shards": writer.shards, "samples": n_samples}}, True)
    )
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


@pytest.fixture
def store(tmp_path: Path) -> tuple[ActivationStore, dict[str, torch.Tensor]]:
    truth = synthetic_store(tmp_path / "s")
    return ActivationStore(tmp_path / "s"), truth


def test_shards_hold_the_stream_in_order_with_metadata(
    store: tuple[ActivationStore, dict[str, torch.Tensor]],
) -> None:
    st, truth = store
    n = truth["meta.sample"].shape[0]
    assert st.n_tokens == n
    assert [s.tokens for s in st.shards[:-1]] == [17] * (len(st.shards) - 1)
    assert 0 < st.shards[-1].tokens <= 17
    read = [st.read(s) for s in st.shards]
    for k in [*HOOKS, *META]:
        assert torch.equal(torch.cat([r[k] for r in read]), truth[k]), k
    assert torch.equal(st.metadata()["meta.modality"], truth["meta.modality"])
    # The per-shard sample table gives each sample's dataset row and id.
    samples = st.samples(1)
    first = st.read(1, ["meta.sample"])["meta.sample"]
    assert [s for s, _, _ in samples] == torch.unique(first).tolist()
    assert all(row == 2 * s and rid == f"id{s}" for s, row, rid in samples)
    # Readable without vlmscope: plain safetensors with the hook names as tensor names.
    with safe_open(str(st.shards[0].path), "pt") as f:
        assert set(f.keys()) == {*HOOKS, *META}
    counts = torch.bincount(truth["meta.modality"].long(), minlength=3).tolist()
    assert sum(st.shards[i].modality_tokens["image"] for i in range(len(st.shards))) == counts[1]


def test_a_folder_without_manifest_torn_and_corrupted_shards(tmp_path: Path) -> None:
    truth = synthetic_store(tmp_path / "s")
    assert truth["meta.sample"].numel() > 0
    with pytest.raises(StoreError, match=r"not an activation store.*no manifest\.json"):
        ActivationStore(tmp_path)
    manifest = tmp_path / "s" / "manifest.json"
    saved = manifest.read_text()
    manifest.unlink()
    with pytest.raises(StoreError, match=r"shard files but no manifest"):
        ActivationStore(tmp_path / "s")
    manifest.write_text(saved)
    shard = tmp_path / "s" / "shard-r0000-000001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0xFF  # one flipped bit pattern inside an activation
    shard.write_bytes(bytes(data))
    st = ActivationStore(tmp_path / "s")
    st.read(0)  # the intact shard reads
    with pytest.raises(StoreError, match=r"shard .*shard-r0000-000001\.safetensors is corrupted"):
        st.read(1)
    shard.write_bytes(bytes(data[:-100]))
    with pytest.raises(StoreError, match=r"shard-r0000-000001\.safetensors is torn"):
        ActivationStore(tmp_path / "s")


def test_capture_order_batches_follow_samples_across_shards(
    store: tuple[ActivationStore, dict[str, torch.Tensor]],
) -> None:
    st, truth = store
    names = list(HOOKS)
    batches = list(st.batches(names, include_special=True, batch_samples=4, meta=["meta.sample"]))
    # Hand truth: every non-empty group of 4 consecutive samples, in order.
    groups = truth["meta.sample"] // 4
    expect = [g for g in torch.unique_consecutive(groups).tolist()]
    assert [int(b.tensors["meta.sample"][0]) // 4 for b in batches] == expect
    for b, g in zip(batches, expect, strict=True):
        sel = groups == g
        assert torch.equal(b.tensors[names[0]], truth[names[0]][sel])
    assert batches[-1].end == truth["meta.sample"].numel()
    # Modality selection: text tokens only.
    text = list(st.batches(names, tokens="text", batch_samples=4, meta=["meta.sample"]))
    got = torch.cat([b.tensors[names[1]] for b in text])
    assert torch.equal(got, truth[names[1]][truth["meta.modality"] == 0])
    # Resuming at a batch's end yields the rest, unchanged.
    rest = list(st.batches(names, include_special=True, batch_samples=4, start=batches[2].end))
    assert [b.end for b in rest] == [b.end for b in batches[3:]]
    assert torch.equal(rest[0].tensors[names[0]], batches[3].tensors[names[0]])


def test_shuffled_epochs_cover_every_token_once_within_the_buffer(
    store: tuple[ActivationStore, dict[str, torch.Tensor]],
) -> None:
    st, truth = store
    names = list(HOOKS)
    width = sum(HOOKS.values()) * 4
    buffer_mb = 40 * width / 2**20  # about two shards' tokens per window
    kw: dict[str, Any] = {
        "include_special": True,
        "batch_tokens": 7,
        "shuffle_buffer_mb": buffer_mb,
        "seed": 3,
        "meta": ["meta.position"],
    }

    def epoch(e: int, start: int = 0) -> list[Any]:
        return list(st.batches(names, epoch=e, start=start, **kw))

    e0, e1 = epoch(0), epoch(1)
    key = truth[names[0]][:, 0]  # random floats: identify tokens
    for batches in (e0, e1):
        got = torch.cat([b.tensors[names[0]][:, 0] for b in batches])
        assert torch.equal(got.sort().values, key.sort().values)
        assert all(b.n_tokens == 7 for b in batches[:-1])
        assert 7 <= batches[-1].n_tokens < 14  # the short tail joined the last batch
    order0 = torch.cat([b.tensors[names[0]][:, 0] for b in e0])
    order1 = torch.cat([b.tensors[names[0]][:, 0] for b in e1])
    assert not torch.equal(order0, order1) and not torch.equal(order0, key)
    assert [b.end for b in e0] == [*list(range(7, 7 * len(e0), 7)), key.numel()]
    # Same seed and epoch: same order; resumed mid-epoch: the same remaining batches.
    again = epoch(0, start=e0[3].end)
    for a, b in zip(again, e0[4:], strict=True):
        assert torch.equal(a.tensors[names[1]], b.tensors[names[1]])
    # Each window fits the buffer (or is a single shard).
    from vlmscope.capture.reader import _windows

    wins = _windows(st.shards, {0, 1, 2}, True, buffer_mb, width, 3, 0)
    assert len(wins) > 1
    assert all(len(w) == 1 or sum(s.tokens for s in w) * width <= buffer_mb * 2**20 for w in wins)


def test_ranks_read_disjoint_shards_and_the_iterable_dataset(
    store: tuple[ActivationStore, dict[str, torch.Tensor]],
) -> None:
    st, truth = store
    parts = [st.shards_for(r, 3) for r in range(3)]
    files = [s.path for p in parts for s in p]
    assert sorted(files) == sorted(s.path for s in st.shards) and len(set(files)) == len(files)
    ds = st.dataset(batch_tokens=5, shuffle_buffer_mb=0, include_special=True)
    from torch.utils.data import DataLoader

    items = list(DataLoader(ds, batch_size=None))
    assert set(items[0]) == {*HOOKS, *META}
    got = torch.cat([b["lm.blocks.0.mlp.hook_out"] for b in items])
    assert torch.equal(got, truth["lm.blocks.0.mlp.hook_out"])


def test_disk_sizes_per_token() -> None:
    widths = {f"lm.blocks.{i}.{h}": 4096 for i in range(32) for h in ("hook_resid_mid", "x")}
    ours = bytes_per_token(widths, torch.bfloat16)
    assert ours == 64 * 4096 * 2 + 8 + 8 + 4 + 4 + 1 + 16
    # Per-layer recipe: layer l stores x and min(16, 32 - l) MLP outputs: 32 + 16*16 + 136.
    assert recipe_bytes_per_token(32, 4096, torch.bfloat16, 16) == 424 * 4096 * 2


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("shuffled", [False, True])
def test_parts_of_every_batch_are_disjoint_and_make_up_the_whole_batch(
    store: tuple[ActivationStore, dict[str, torch.Tensor]], world: int, shuffled: bool
) -> None:
    """`part=(rank, world)`: each reader gets its share of every batch of the one stream (the
    same cursor on every part), and the shares together are the batch one reader gets.
    Capture order: rank r holds samples [r b, (r + 1) b) of each group of world x b."""
    st, truth = store
    names = list(HOOKS)
    kw: dict[str, Any] = {"include_special": True, "meta": ["meta.sample"], "seed": 5}
    kw |= {"batch_tokens": 9, "shuffle_buffer_mb": 40 * 48 / 2**20} if shuffled else {}
    kw |= {} if shuffled else {"batch_samples": 2 * world}
    whole = list(st.batches(names, **kw))
    parts = [list(st.batches(names, part=(r, world), **kw)) for r in range(world)]
    for p in parts:
        assert [b.end for b in p] == [b.end for b in whole]
        assert [b.n_global for b in p] == [b.n_tokens for b in whole]
    key = names[0]
    for i, b in enumerate(whole):
        shares = [p[i].tensors[key] for p in parts]
        got = torch.cat(shares)
        if shuffled and i < len(whole) - 1:  # a split of the batch's positions, in order
            assert torch.equal(got, b.tensors[key])
        elif shuffled:  # the tail joined to the last batch: each part's share of both
            assert torch.equal(got[:, 0].sort().values, b.tensors[key][:, 0].sort().values)
        else:  # each rank's samples, in order: the same rows as the whole batch
            assert torch.equal(got[:, 0].sort().values, b.tensors[key][:, 0].sort().values)
            for r, p in enumerate(parts):
                s = p[i].tensors["meta.sample"]
                assert bool(((s % (2 * world)) // 2 == r).all())
    # Resuming a part mid-epoch at a global cursor gives the rest of its shares.
    rest = list(st.batches(names, part=(1, world), start=whole[2].end, **kw))
    assert [b.end for b in rest] == [b.end for b in parts[1][3:]]
    for a, b in zip(rest, parts[1][3:], strict=True):
        assert torch.equal(a.tensors[key], b.tensors[key])
    assert sum(b.n_tokens for p in parts for b in p) == truth[key].shape[0]


def rewrite_shard(folder: Path, index: int, edit: Any) -> Path:
    """Apply `edit` to shard `index`'s tensors and write it back with the manifest's size and
    checksum updated, as a store written by another tool could be: it passes every byte check."""
    import json

    from safetensors.torch import load_file, save_file

    from vlmscope.capture.layout import sha256_file

    manifest = json.loads((folder / "manifest.json").read_text())
    entry = manifest["shards"][index]
    path = folder / entry["file"]
    with safe_open(str(path), "pt") as f:
        header = f.metadata()
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path), metadata=header)
    entry["bytes"], entry["sha256"] = path.stat().st_size, sha256_file(path)
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return path


@pytest.mark.parametrize(
    ("edit", "says"),
    [
        (lambda t: t.update({HOOK0: t[HOOK0][:, :4].contiguous()}), r"is \[17, 4\] F32, the "
         r"manifest says \[17, 6\] F32"),
        (lambda t: t.update({HOOK0: t[HOOK0][3:].contiguous()}), r"is \[14, 6\] F32"),
        (lambda t: t.update({HOOK0: t[HOOK0].double()}), r"is \[17, 6\] F64"),
        (lambda t: t.pop("meta.patch"), r"holds no tensor 'meta\.patch'"),
        (lambda t: t["meta.modality"].fill_(7), r"meta\.modality holds 17 of code 7"),
    ],
)  # fmt: skip
def test_a_shard_whose_tensors_disagree_with_the_manifest_is_named(
    tmp_path: Path, edit: Any, says: str
) -> None:
    synthetic_store(tmp_path / "s")
    path = rewrite_shard(tmp_path / "s", 1, edit)
    st = ActivationStore(tmp_path / "s")  # sizes and checksums agree with the manifest
    with pytest.raises(StoreError, match=rf"shard {path}.*{says}"):
        list(st.batches(list(HOOKS), batch_tokens=8))
    before = list(st.batches(list(HOOKS), batch_tokens=8, shards=st.shards[:1]))
    assert sum(b.n_tokens for b in before) == st.selected_tokens(shards=st.shards[:1]) > 0
