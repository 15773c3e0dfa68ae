"""row_topk_indices against torch.topk: the same values on every path (rows sorted whole,
stripes over one or two levels, sorts in row chunks over threads or one call, torch for ties,
NaN, other dtypes and small inputs)."""

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


def _levels(f: int, k: int) -> int:
    """Stripe levels the selection goes through for rows of f (0: sorted whole)."""
    if f <= topk.SORT_WIDTH:
        return 0
    b = topk._stripe_width(f, k)
    return 1 + max(_levels(f // b, k), _levels(b * k, k))


@pytest.mark.parametrize(
    ("n", "f", "k", "levels"),
    [
        (200, 512, 32, 0),  # sorted whole
        (300, 1024, 32, 1),  # stripes of 4: 256 maxima, 128 candidates
        (40, 3000, 17, 1),  # a stripe length that is not a power of two
        (33, 2048, 1, 1),
        (130, 8192, 64, 2),  # 1,024 maxima (stripes of 8): stripes again
        (8, 1 << 15, 32, 2),  # 1,024 maxima and 1,024 candidates: stripes again
        (5, 40, 7, 0),  # below the numpy threshold: torch.topk
    ],
)
def test_row_topk_selects_what_torch_topk_selects(
    n: int, f: int, k: int, levels: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(torch, "get_num_threads", lambda: 3)  # chunked even on one core
    monkeypatch.setattr(topk, "_MIN_PARALLEL", 1 << 10)
    monkeypatch.setattr(topk, "_MIN_NUMPY", 1 << 12)  # every case but the last on numpy's path
    assert _levels(f, k) == levels
    calls = []
    columns = topk._columns
    monkeypatch.setattr(topk, "_columns", lambda x, k: calls.append(x.shape) or columns(x, k))
    for i, x in enumerate(_rows(n, f, n + f + k)):
        got = topk.row_topk_indices(x, k)
        assert got.shape == (n, k) and got.dtype == torch.int64
        assert torch.equal(_selected_values(x, got), x.topk(k, dim=1).values)
        assert all(len(set(row.tolist())) == k for row in got)
        if i == 0 and n * f >= topk._MIN_NUMPY:  # continuous values: no fallback to torch
            assert topk._columns(x.contiguous(), k) is not None
    assert bool(calls) == (n * f >= topk._MIN_NUMPY)


def test_ties_at_the_kth_value_fall_back_to_torch() -> None:
    """Tied values make some row's count differ from k, in a row sorted whole or among the
    stripe maxima; the batch then gets torch's answer, which `_columns` declines to guess."""
    x = torch.randn(128, 1024)
    x[5, :40] = 9.0  # 40 entries tied above the rest of row 5, in 40 different stripes
    assert topk._columns(x, 32) is None
    narrow = torch.randn(300, 400)
    narrow[7, 100:110] = narrow[7].topk(5).values[-1]  # the 5th largest, ten more times
    assert topk._columns(narrow, 5) is None
    for t, k in ((x, 32), (narrow, 5)):
        got = topk.row_topk_indices(t, k)
        assert torch.equal(_selected_values(t, got), t.topk(k, dim=1).values)


def test_a_row_over_k_and_a_row_under_k_do_not_pass_as_k_each() -> None:
    """n * k entries in all, but row 3 with k - 1 (a NaN, which no comparison keeps) and row 9
    with k + 1 (a tie at the k-th value): the total alone would accept it."""
    x = torch.randn(200, 400)
    x[3, 0] = float("nan")
    x[9, 1] = x[9].topk(32).values[-1]
    mask = x.numpy() >= topk._kth_largest(x.numpy(), 32)[:, None]
    assert mask.sum() == 200 * 32 and mask[3].sum() == 31 and mask[9].sum() == 33
    assert topk._exactly_k(mask, 32) is None
    got = topk.row_topk_indices(x, 32)
    assert 0 in got[3].tolist()  # torch's answer: NaN counts as the largest
    assert torch.equal(_selected_values(x[4:], got[4:]), x[4:].topk(32, dim=1).values)


def test_stripes_find_a_rows_largest_packed_into_few_stripes() -> None:
    """All of a row's k largest entries in k / b stripes (columns s, s + m, ...): a selection
    that kept one candidate per stripe, or fewer than k stripes, would miss most of them. And
    the k largest side by side, one per stripe."""
    n, f, k = 64, 4096, 32
    block = topk._stripe_width(f, k)
    m = f // block
    assert block >= 2 and k % block == 0
    x = torch.randn(n, f) * 0.01
    want = []
    for r in range(n):
        stripes = [(r + 7 * j) % m for j in range(k // block)]  # k / b stripes, all b entries
        cols = sorted(s + i * m for s in stripes for i in range(block))
        if r % 2:  # side by side instead
            cols = list(range((r % 5) * block, (r % 5) * block + k))
        x[r, cols] = 10.0 + torch.arange(k, dtype=torch.float32)
        want.append(cols)
    got = topk._columns(x, k)
    assert got is not None
    for r in range(n):
        assert got[r].tolist() == want[r]  # in increasing column order


@pytest.mark.parametrize("k", [1, 8, 32])
def test_stripe_width_narrows_every_level(k: int) -> None:
    for f in [513, 600, 1024, 3000, 4097, 8192, 1 << 15, 65_536]:
        b = topk._stripe_width(f, k)
        if b >= 2:
            assert f % b == 0 and f // b > k and b * k < f


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
    monkeypatch.setattr(topk, "_MIN_PARALLEL", 1 << 10)
    monkeypatch.setattr(topk, "_pool", None)
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


@pytest.mark.parametrize(("n_allowed", "k"), [(1, 1), (40, 16), (700, 32)])
def test_topk_among_the_allowed_columns_is_the_masked_topk(n_allowed: int, k: int) -> None:
    """AuxK's selection: the same values as torch's topk over rows masked to -inf outside the
    allowed columns, and only allowed positions."""
    gen = torch.Generator().manual_seed(n_allowed)
    x = torch.randn(300, 1024, generator=gen)
    allowed = torch.zeros(1024, dtype=torch.bool)
    allowed[torch.randperm(1024, generator=gen)[:n_allowed]] = True
    got = topk.topk_among(x, allowed, k)
    assert got.shape == (300, k) and bool(allowed[got].all())
    masked = x.masked_fill(~allowed, -torch.inf)
    assert torch.equal(_selected_values(x, got), masked.topk(k, dim=1).values)
