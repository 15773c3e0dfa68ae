"""sparse_decode (embedding_bag) against the dense scatter+matmul reference and by hand; the
sparse weight gradients (SparsePattern) against dense products and embedding_bag's backward."""

from __future__ import annotations

import gc

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vlmscope.dictionaries import kernels
from vlmscope.dictionaries.clt import CrossLayerTranscoder
from vlmscope.dictionaries.coder import SparseCoder
from vlmscope.dictionaries.config import SparseCoderConfig
from vlmscope.dictionaries.kernels import (
    SparsePattern,
    centred_linear,
    dense_decode,
    gathered_pre,
    pattern_for,
    sparse_decode,
)


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


def _dense_reference(
    x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, c: torch.Tensor | None, idx: torch.Tensor
) -> torch.Tensor:
    """Plain autograd: the dense pre-activations, then the kept entries."""
    xc = x if c is None else x - c
    return (xc @ w.T + b).gather(1, idx)


@pytest.mark.parametrize("centred", [True, False])
@pytest.mark.parametrize("input_grad", [True, False])
def test_gathered_pre_matches_autograd_through_the_dense_pre(
    centred: bool, input_grad: bool
) -> None:
    gen = torch.Generator().manual_seed(3)
    n, d, f, k = 9, 6, 40, 5
    x0 = torch.randn(n, d, generator=gen, dtype=torch.float64)
    w0 = torch.randn(f, d, generator=gen, dtype=torch.float64)
    b0 = torch.randn(f, generator=gen, dtype=torch.float64)
    c0 = torch.randn(d, generator=gen, dtype=torch.float64) if centred else None
    idx = torch.stack([torch.randperm(f, generator=gen)[:k] for _ in range(n)])
    upstream = torch.randn(n, k, generator=gen, dtype=torch.float64)

    grads = []
    for sparse in (True, False):
        x = x0.clone().requires_grad_(input_grad)
        w, b = w0.clone().requires_grad_(), b0.clone().requires_grad_()
        c = None if c0 is None else c0.clone().requires_grad_()
        if sparse:
            with torch.no_grad():
                pre = (x if c is None else x - c) @ w.T + b
            out = gathered_pre(x, w, b, c, idx, pre)
        else:
            out = _dense_reference(x, w, b, c, idx)
        (out * upstream).sum().backward()
        grads.append((out.detach(), x.grad, w.grad, b.grad, None if c is None else c.grad))
    for got, want in zip(*grads, strict=True):
        if want is None:
            assert got is None
        else:
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_gathered_pre_b_dec_gradient_is_minus_the_bias_gradient_times_w() -> None:
    # The analytic identity behind skipping the input gradient, checked by hand on 2 latents.
    x = torch.tensor([[1.0, 2.0], [3.0, -1.0]])
    w = torch.tensor([[1.0, 0.0], [1.0, 1.0]], requires_grad=True)
    b = torch.zeros(2, requires_grad=True)
    c = torch.tensor([0.5, 0.5], requires_grad=True)
    idx = torch.tensor([[1], [0]])
    pre = (x - c.detach()) @ w.detach().T
    out = gathered_pre(x, w, b, c, idx, pre)
    # Row 0 keeps latent 1: (1 - .5) + (2 - .5) = 2; row 1 keeps latent 0: 3 - .5 = 2.5.
    assert out.squeeze(1).tolist() == [2.0, 2.5]
    out.sum().backward()
    assert b.grad is not None and c.grad is not None and w.grad is not None
    assert b.grad.tolist() == [1.0, 1.0]
    assert c.grad.tolist() == [-2.0, -1.0]  # -(w[0] + w[1])
    assert w.grad.tolist() == [[2.5, -1.5], [0.5, 1.5]]


@pytest.mark.parametrize("input_grad", [True, False])
def test_centred_linear_matches_autograd(input_grad: bool) -> None:
    gen = torch.Generator().manual_seed(4)
    x0 = torch.randn(7, 5, generator=gen, dtype=torch.float64)
    w0 = torch.randn(11, 5, generator=gen, dtype=torch.float64)
    b0 = torch.randn(11, generator=gen, dtype=torch.float64)
    c0 = torch.randn(5, generator=gen, dtype=torch.float64)
    upstream = torch.randn(7, 11, generator=gen, dtype=torch.float64)
    grads = []
    for fn in (centred_linear, lambda x, w, b, c: (x - c) @ w.T + b):
        x = x0.clone().requires_grad_(input_grad)
        w, b, c = (t.clone().requires_grad_() for t in (w0, b0, c0))
        out = fn(x, w, b, c)
        (out * upstream).sum().backward()
        grads.append((out.detach(), x.grad, w.grad, b.grad, c.grad))
    for got, want in zip(*grads, strict=True):
        if want is None:
            assert got is None
        else:
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


# --------------------------------------------------------------------------- SparsePattern


@pytest.mark.parametrize("num_latents", [40, 70_000])  # one radix pass, and two (> 2^16)
@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
def test_sparse_pattern_products_equal_the_dense_ones(
    num_latents: int, index_dtype: torch.dtype
) -> None:
    gen = torch.Generator().manual_seed(num_latents)
    n, k, d = 9, 6, 5
    indices = torch.randint(0, num_latents, (n, k), generator=gen)
    indices[0, 1] = indices[0, 0]  # a repeated entry adds up (BatchTopK padding repeats)
    indices[1:4, 2] = indices[0, 3]  # a latent in several rows
    weights = torch.randn(n, k, generator=gen, dtype=torch.float64)
    rows = torch.randn(n, d, generator=gen, dtype=torch.float64)
    w = torch.randn(num_latents, d, generator=gen, dtype=torch.float64)
    pattern = SparsePattern(indices.to(index_dtype), num_latents)

    dense = torch.zeros(n, num_latents, dtype=torch.float64).scatter_add(1, indices, weights)
    torch.testing.assert_close(pattern.rows_grad(weights, rows), dense.T @ rows)
    torch.testing.assert_close(pattern.dots(rows, w), (rows @ w.T).gather(1, indices))


@pytest.mark.parametrize("bound", [1_024, 1 << 16, 70_000, 1 << 20])
def test_order_by_key_is_torchs_stable_sort(bound: int) -> None:
    keys = torch.randint(0, bound, (5_000,), generator=torch.Generator().manual_seed(bound))
    keys[:50] = bound - 1  # ties at the top key, where the high 16 bits are all set
    order = kernels._order_by_key(keys.numpy(), bound)
    assert order.dtype == np.int64
    assert torch.equal(torch.from_numpy(order), keys.sort(stable=True).indices)


def _train_grads(module: torch.nn.Module, inputs: tuple) -> dict[str, torch.Tensor]:
    module.zero_grad(set_to_none=True)
    module(*inputs).loss.backward()
    return {name: p.grad.clone() for name, p in module.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("kind", ["sae", "transcoder", "clt"])
def test_one_sort_per_batch_serves_encoder_and_decoders(
    kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A step's weight gradients group each layer's codes once, shared by its encoder and every
    decoder reading them (a CLT source's targets), and equal embedding_bag's and sparse COO's."""
    torch.manual_seed(0)
    d, n = 8, 64
    if kind == "clt":
        module: torch.nn.Module = CrossLayerTranscoder(
            SparseCoderConfig(kind="clt", d_in=d, expansion_factor=4, k=3, n_layers=3)
        )
        xs, ys = [torch.randn(n, d) for _ in range(3)], [torch.randn(n, d) for _ in range(3)]
        module.init_from_data(xs, ys)
        inputs: tuple = (xs, ys)
    else:
        module = SparseCoder(SparseCoderConfig(kind=kind, d_in=d, expansion_factor=4, k=3))
        x, y = torch.randn(n, d), torch.randn(n, d)
        module.init_from_data(x, None if kind == "sae" else y)
        inputs = (x,) if kind == "sae" else (x, y)
    module.train()

    sorts = []
    order_by_key = kernels._order_by_key

    def counted(keys: np.ndarray, bound: int) -> np.ndarray:
        sorts.append(len(keys))
        return order_by_key(keys, bound)

    monkeypatch.setattr(kernels, "_order_by_key", counted)
    got = _train_grads(module, inputs)
    assert sorts == [n * 3] * (3 if kind == "clt" else 1)

    monkeypatch.setattr(kernels, "_pattern_backward", lambda weight: False)  # torch's kernels
    want = _train_grads(module, inputs)
    assert len(sorts) == (3 if kind == "clt" else 1)
    assert got.keys() == want.keys() and {"W_enc", "W_dec"} <= {n.split(".")[-1] for n in got}
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6)


def test_a_pattern_follows_in_place_edits_and_dies_with_its_graph() -> None:
    indices = torch.tensor([[0, 2], [1, 2]])
    first = pattern_for(indices, 3)
    assert pattern_for(indices, 3) is first  # the same codes: one pattern
    indices[0, 0] = 1  # edited in place: the old grouping would be wrong
    second = pattern_for(indices, 3)
    assert second is not first
    assert pattern_for(indices, 4) is not second  # another width is another matrix
    # Rows [[1, 2], [1, 2]] now: latents 1 and 2 each collect both unit rows, latent 0 none.
    grouped = second.rows_grad(torch.ones(2, 2), torch.eye(2))
    assert grouped.tolist() == [[0.0, 0.0], [1.0, 1.0], [1.0, 1.0]]

    w = torch.randn(3, 4, requires_grad=True)
    out = sparse_decode(torch.ones(2, 2), indices, w)
    held = pattern_for(indices, 3)
    assert out.grad_fn is not None
    del first, second, held, out
    gc.collect()
    assert all(ref() is None for ref in kernels._PATTERNS.values())  # nothing kept alive


def test_codes_edited_in_place_before_backward_are_refused() -> None:
    indices = torch.tensor([[0, 1]])
    w = torch.randn(3, 2, requires_grad=True)
    out = sparse_decode(torch.ones(1, 2), indices, w)
    indices[0, 0] = 2  # the backward would group the new indices, not those decoded
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()


def test_more_entries_per_row_than_latents_decode_and_differentiate() -> None:
    # A caller's own codes may repeat a latent more often than there are latents (K > F).
    values = torch.randn(3, 4, dtype=torch.float64)
    indices = torch.tensor([[0, 1, 0, 1], [1, 1, 1, 0], [0, 0, 0, 0]])
    w = torch.randn(2, 5, dtype=torch.float64)
    grads = []
    for fn in (sparse_decode, dense_decode):
        v, weight = values.clone().requires_grad_(), w.clone().requires_grad_()
        (fn(v, indices, weight) * torch.arange(15.0).view(3, 5)).sum().backward()
        grads.append((v.grad, weight.grad))
    for got, want in zip(*grads, strict=True):
        torch.testing.assert_close(got, want)


def test_gathered_pre_under_inference_mode_reads_the_kept_entries() -> None:
    with torch.inference_mode():
        x, w = torch.randn(5, 3), torch.randn(7, 3)
        pre = x @ w.T
        indices = pre.topk(2, dim=1).indices
        assert torch.equal(gathered_pre(x, w, None, None, indices, pre), pre.gather(1, indices))


def test_a_kept_graph_does_not_keep_the_sort_and_a_retained_one_runs_twice() -> None:
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(6, 4, generator=gen)
    w_enc = torch.randn(9, 4, generator=gen, requires_grad=True)
    w_dec = torch.randn(9, 4, generator=gen, requires_grad=True)
    with torch.no_grad():
        pre = x @ w_enc.T
    indices = pre.topk(3, dim=1).indices
    out = sparse_decode(gathered_pre(x, w_enc, None, None, indices, pre), indices, w_dec)
    loss = out.pow(2).sum()
    loss.backward(retain_graph=True)
    first = (w_enc.grad.clone(), w_dec.grad.clone())  # type: ignore[union-attr]
    gc.collect()
    assert all(ref() is None for ref in kernels._PATTERNS.values())  # `loss` still holds the graph
    w_enc.grad = w_dec.grad = None
    loss.backward()  # the retained graph groups its saved indices again
    torch.testing.assert_close((w_enc.grad, w_dec.grad), first)


# --------------------------------------------------------------------------- training_pre


@pytest.mark.parametrize("with_centre", [False, True])
@pytest.mark.parametrize("with_bias", [False, True])
def test_training_pre_is_the_centred_linear_map(with_centre: bool, with_bias: bool) -> None:
    """oneDNN's product (or the fallback) against a float64 reference of (x - c) W^T + b."""
    gen = torch.Generator().manual_seed(3)
    x, w = torch.randn(300, 96, generator=gen), torch.randn(700, 96, generator=gen)
    b = torch.randn(700, generator=gen) if with_bias else None
    c = torch.randn(96, generator=gen) if with_centre else None
    got = kernels.training_pre(x, w, b, c)
    xc = x.double() - (c.double() if c is not None else 0.0)
    want = xc @ w.double().T + (b.double() if b is not None else 0.0)
    assert got.dtype == torch.float32 and got.shape == (300, 700)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-4)


def test_training_pre_falls_back_to_f_linear_for_good(monkeypatch: pytest.MonkeyPatch) -> None:
    """A torch build whose oneDNN kernel fails (or is missing) gets F.linear, from then on."""
    calls = []

    def broken(*args: object) -> torch.Tensor:
        calls.append(1)
        raise RuntimeError("no oneDNN here")

    monkeypatch.setattr(kernels, "ONEDNN_PRE", True)
    monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", broken)
    x, w, b = torch.randn(8, 4), torch.randn(5, 4), torch.randn(5)
    for _ in range(2):
        assert torch.equal(kernels.training_pre(x, w, b, None), F.linear(x, w, b))
    assert calls == [1] and kernels.ONEDNN_PRE is False
    half = kernels.training_pre(x.double(), w.double(), b.double(), None)  # not float32
    assert half.dtype == torch.float64
