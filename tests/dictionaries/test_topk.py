"""row_topk_indices against torch.topk: the same values on every path (blocked or not, numpy
in row chunks over threads or one call, torch for other dtypes), ties and NaN included."""

from __future__ import annotations

import multiprocessing

import pytest
import torch

from vlmscope.dictionaries import topk


def _selected_values(x: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    return x.gather(1, indices).sort(dim=1, descending=True).values


def _rows(n: int, f: int, seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [
        torch.randn(n, f, generator=gen),
        torch.randint(-20, 20, (n, f), generator=gen).float(),  # many ties at the k-th value
        torch.randn(n, f, generator=gen).relu() - 1.0,  # half of every row tied at -1
    ]


@pytest.mark.parametrize(
    ("n", "f", "k", "blocked"),
    [
        (64, 1024, 32, False),
        (300, 1024, 32, False),  # several row chunks
        (40, 3000, 17, True),  # a block width that is not a power of two
        (33, 2048, 1, True),
        (130, 8192, 64, True),
        (5, 40, 7, False),  # below the numpy threshold: torch.topk
    ],
)
def test_row_topk_selects_what_torch_topk_selects(
    n: int, f: int, k: int, blocked: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(torch, "get_num_threads", lambda: 3)  # chunked even on one core
    assert (f >= topk._BLOCKED_RATIO * k and topk._block_width(f, k) >= 2) == blocked
    for x in _rows(n, f, n + f + k):
        got = topk.row_topk_indices(x, k)
        assert got.shape == (n, k) and got.dtype == torch.int64
        assert torch.equal(_selected_values(x, got), x.topk(k, dim=1).values)
        assert all(len(set(row.tolist())) == k for row in got)


def test_blocked_selection_finds_a_rows_maxima_packed_into_few_stripes() -> None:
    """All of a row's k largest entries in k / b stripes (columns s, s + m, ...): a selection
    that kept one candidate per stripe, or fewer than k stripes, would miss most of them. And
    the k largest side by side, one per stripe."""
    n, f, k = 64, 4096, 32
    block = topk._block_width(f, k)
    m = f // block
    assert block >= 2 and f >= topk._BLOCKED_RATIO * k and k % block == 0
    x = torch.randn(n, f) * 0.01
    want = []
    for r in range(n):
        stripes = [(r + 7 * j) % m for j in range(k // block)]  # k / b stripes, all b entries
        cols = sorted(s + i * m for s in stripes for i in range(block))
        if r % 2:  # side by side instead
            cols = list(range((r % 5) * block, (r % 5) * block + k))
        x[r, cols] = 10.0 + torch.arange(k, dtype=torch.float32)
        want.append(cols)
    got = topk.row_topk_indices(x, k)
    for r in range(n):
        assert sorted(got[r].tolist()) == want[r]


@pytest.mark.parametrize("f", [1024, 4096])
def test_nan_counts_as_largest_like_torch(f: int) -> None:
    x = torch.randn(64, f)
    x[3, 700] = float("nan")
    got = topk.row_topk_indices(x, 32)
    assert 700 in got[3].tolist()
    assert 700 in x.topk(32, dim=1).indices[3].tolist()
    assert torch.equal(_selected_values(x[:3], got[:3]), x[:3].topk(32, dim=1).values)


def test_other_dtypes_and_autograd_inputs() -> None:
    x = torch.randn(64, 1024, requires_grad=True)
    got = topk.row_topk_indices(x, 16)  # detached inside: no numpy error for a grad tensor
    assert torch.equal(_selected_values(x.detach(), got), x.detach().topk(16, dim=1).values)
    half = torch.randn(64, 1024).bfloat16()
    assert torch.equal(
        _selected_values(half, topk.row_topk_indices(half, 16)), half.topk(16, dim=1).values
    )


def test_bad_arguments_are_named() -> None:
    with pytest.raises(ValueError, match="1 <= k <= F"):
        topk.row_topk_indices(torch.zeros(4, 8), 9)


def _select_in_child(queue: multiprocessing.Queue) -> None:
    x = torch.arange(300 * 1024, dtype=torch.float32).reshape(300, 1024)
    queue.put(sorted(topk.row_topk_indices(x, 2)[0].tolist()))


def test_selection_works_in_a_child_forked_after_the_pool_started(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A DataLoader worker forked after the thread pool ran must not wait on threads it does
    not have (the pool is dropped in the child and made again)."""
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    topk.row_topk_indices(torch.randn(300, 1024), 4)
    assert topk._pool is not None
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_select_in_child, args=(queue,))
    child.start()
    assert queue.get(timeout=60) == [1022, 1023]
    child.join(timeout=60)
    assert child.exitcode == 0


def test_tensors_off_the_cpu_keep_torchs_topk() -> None:
    """A tensor numpy cannot view (meta here; MPS and CUDA alike) goes to torch.topk."""
    x = torch.empty(64, 4096, device="meta")
    got = topk.row_topk_indices(x, 32)
    assert got.device.type == "meta" and got.shape == (64, 32)
