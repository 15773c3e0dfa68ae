"""sparse_decode (embedding_bag) against the dense scatter+matmul reference and by hand."""

from __future__ import annotations

import pytest
import torch

from vlmscope.dictionaries.kernels import dense_decode, sparse_decode


def random_codes(
    n: int, k: int, f: int, gen: torch.Generator, pad: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Distinct indices per row; the last `pad` entries of every row are zero padding."""
    indices = torch.stack([torch.randperm(f, generator=gen)[:k] for _ in range(n)])
    values = torch.randn(n, k, generator=gen)
    if pad:
        values[:, k - pad :] = 0.0
    return values, indices


@pytest.mark.parametrize(("n", "k", "f", "d", "pad"), [(7, 5, 40, 6, 0), (16, 9, 64, 12, 4)])
def test_sparse_and_dense_decode_agree_in_values_and_gradients(
    n: int, k: int, f: int, d: int, pad: int
) -> None:
    gen = torch.Generator().manual_seed(n)
    values, indices = random_codes(n, k, f, gen, pad)
    w = torch.randn(f, d, generator=gen)
    upstream = torch.randn(n, d, generator=gen)

    results = []
    for fn in (sparse_decode, dense_decode):
        v = values.clone().requires_grad_(True)
        weight = w.clone().requires_grad_(True)
        out = fn(v, indices, weight)
        (out * upstream).sum().backward()
        results.append((out.detach(), v.grad, weight.grad))
    (out_s, gv_s, gw_s), (out_d, gv_d, gw_d) = results
    torch.testing.assert_close(out_s, out_d, atol=1e-5, rtol=0)
    torch.testing.assert_close(gv_s, gv_d, atol=1e-5, rtol=0)
    torch.testing.assert_close(gw_s, gw_d, atol=1e-5, rtol=0)
    # Padding entries contribute nothing to W_dec's gradient, but do get a value gradient.
    assert gv_s is not None and gw_s is not None
    if pad:
        assert (gv_s[:, k - pad :] != 0).any()
    used = torch.zeros(f, dtype=torch.bool)
    used[indices[values != 0]] = True
    assert (gw_s[~used] == 0).all()


def test_sparse_decode_by_hand() -> None:
    w = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 3.0]])
    values = torch.tensor([[2.0, 0.5], [0.0, -1.0]])
    indices = torch.tensor([[0, 2], [1, 2]])
    out = sparse_decode(values, indices, w)
    # Row 0: 2 * [1, 0] + 0.5 * [2, 3]; row 1: 0 * [0, 1] - [2, 3].
    torch.testing.assert_close(out, torch.tensor([[3.0, 1.5], [-2.0, -3.0]]))


def test_empty_codes_decode_to_zero() -> None:
    w = torch.randn(5, 3)
    empty = torch.zeros(4, 0)
    out = sparse_decode(empty, torch.zeros(4, 0, dtype=torch.long), w)
    assert out.shape == (4, 3) and (out == 0).all()


def test_bad_shapes_are_reported() -> None:
    w = torch.randn(5, 3)
    with pytest.raises(ValueError, match=r"must both be \[N, K\]"):
        sparse_decode(torch.zeros(2, 3), torch.zeros(2, 2, dtype=torch.long), w)
    with pytest.raises(TypeError, match="indices must be int64"):
        sparse_decode(torch.zeros(2, 2), torch.zeros(2, 2), w)
