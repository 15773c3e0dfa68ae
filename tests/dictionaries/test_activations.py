"""TopK, BatchTopK and JumpReLU against hand computations and sorted references."""

from __future__ import annotations

import math

import pytest
import torch

from vlmscope.dictionaries.activations import (
    ACTIVATIONS,
    BatchTopK,
    JumpReLU,
    SparseCodes,
    TopK,
    build_activation,
)
from vlmscope.dictionaries.config import SparseCoderConfig


def code_sets(codes: SparseCodes) -> list[dict[int, float]]:
    """Per row, {latent: value} of the active entries."""
    rows = []
    for vals, idx in zip(codes.values.tolist(), codes.indices.tolist(), strict=True):
        rows.append({i: v for v, i in zip(vals, idx, strict=True) if v != 0})
    return rows


def test_topk_keeps_exactly_the_k_largest_then_relu() -> None:
    gen = torch.Generator().manual_seed(0)
    pre = torch.randn(16, 32, generator=gen)
    pre[3] = -pre[3].abs() - 0.1  # a row with no positive pre-activation
    codes = TopK(32, k=5)(pre)
    assert codes.values.shape == codes.indices.shape == (16, 5)
    for row in range(16):
        ranked = sorted(range(32), key=lambda i: -pre[row, i].item())[:5]
        assert sorted(codes.indices[row].tolist()) == sorted(ranked)
        want = {i: max(pre[row, i].item(), 0.0) for i in ranked}
        got = dict(zip(codes.indices[row].tolist(), codes.values[row].tolist(), strict=True))
        assert got == pytest.approx(want)
    assert codes.l0()[3] == 0
    positive_rows = [r for r in range(16) if (pre[r].sort(descending=True).values[:5] > 0).all()]
    assert positive_rows and all(codes.l0()[r] == 5 for r in positive_rows)


def test_topk_gradient_reaches_only_kept_positive_entries() -> None:
    pre = torch.tensor([[3.0, -1.0, 2.0, 0.5], [-2.0, -3.0, -1.0, 1.0]], requires_grad=True)
    codes = TopK(4, k=2)(pre)
    codes.values.sum().backward()
    assert pre.grad is not None
    # Row 0 keeps 3.0 and 2.0; row 1 keeps 1.0 and -1.0, whose ReLU blocks the gradient.
    assert pre.grad.tolist() == [[1.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 1.0]]


def test_batchtopk_keeps_k_times_n_over_the_batch() -> None:
    gen = torch.Generator().manual_seed(1)
    pre = torch.randn(8, 16, generator=gen)
    pre[0] += 3.0  # row 0 dominates the batch: it must get more than k entries
    act = BatchTopK(16, k=3).train()
    codes = act(pre)
    flat = sorted(((pre[r, c].item(), r, c) for r in range(8) for c in range(16)), reverse=True)
    kept = flat[:24]
    assert all(value > 0 for value, _, _ in kept)
    want = [dict() for _ in range(8)]
    for value, r, c in kept:
        want[r][c] = value
    assert code_sets(codes) == [pytest.approx(w) for w in want]
    assert int(codes.l0().sum()) == 24
    assert codes.l0()[0] > 3
    assert codes.width == int(codes.l0().max())
    # One training step: the threshold estimate is the smallest kept activation.
    assert act.threshold.item() == pytest.approx(kept[-1][0])
    assert int(act.num_updates) == 1


def test_batchtopk_eval_before_training_raises() -> None:
    with pytest.raises(RuntimeError, match="threshold has not been estimated"):
        BatchTopK(8, k=2).eval()(torch.randn(4, 8))


@pytest.mark.parametrize("momentum", [0.0, 0.1])
def test_batchtopk_threshold_converges_on_a_stationary_distribution(momentum: float) -> None:
    # Pre-activations iid N(0, 1): keeping k of F per row keeps the top k/F quantile, so the
    # smallest kept value tends to the standard normal's (1 - k/F) quantile.
    n, f, k = 256, 512, 16
    act = BatchTopK(f, k=k, momentum=momentum).train()
    gen = torch.Generator().manual_seed(2)
    for _ in range(40):
        act(torch.randn(n, f, generator=gen))
    quantile = torch.special.ndtri(torch.tensor(1 - k / f, dtype=torch.float64)).item()
    assert act.threshold.item() == pytest.approx(quantile, abs=0.01)
    # Eval: a latent is active iff its pre-activation exceeds the threshold; about k per row.
    act.eval()
    pre = torch.randn(n, f, generator=gen)
    codes = act(pre)
    want = [{c: pre[r, c].item() for c in range(f) if pre[r, c] > act.threshold} for r in range(n)]
    assert code_sets(codes) == [pytest.approx(w) for w in want]
    assert codes.l0().float().mean().item() == pytest.approx(k, abs=1.0)


def test_batchtopk_plain_mean_is_the_mean_of_per_step_minima() -> None:
    act = BatchTopK(4, k=1).train()
    act(torch.tensor([[5.0, 1.0, 0.0, 0.0], [4.0, 3.0, 0.0, 0.0]]))  # keeps 5, 4 -> min 4
    act(torch.tensor([[2.0, 0.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]]))  # keeps 2, 1 -> min 1
    assert act.threshold.item() == pytest.approx(2.5)
    ema = BatchTopK(4, k=1, momentum=0.5).train()
    ema(torch.tensor([[5.0, 1.0, 0.0, 0.0], [4.0, 3.0, 0.0, 0.0]]))  # first step: 4
    ema(torch.tensor([[2.0, 0.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]]))  # 4 + 0.5 * (1 - 4)
    assert ema.threshold.item() == pytest.approx(2.5)
    ema(torch.tensor([[3.0, 0.0, 0.0, 0.0], [3.0, 0.0, 0.0, 0.0]]))  # 2.5 + 0.5 * 0.5
    assert ema.threshold.item() == pytest.approx(2.75)


def make_jumprelu(threshold: float, bandwidth: float, n: int) -> JumpReLU:
    return JumpReLU(n, init_threshold=threshold, bandwidth=bandwidth)


def test_jumprelu_threshold_gradient_matches_the_rectangle_kernel() -> None:
    # t = 0.5, eps = 0.1: the kernel window is |z - t| < 0.05, i.e. z in (0.45, 0.55).
    act = make_jumprelu(0.5, 0.1, 5).train()
    pre = torch.tensor([[0.40, 0.52, 0.80, 0.47, 0.56]], requires_grad=True)
    weights = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    codes = act(pre)
    # Outputs z * H(z - t); the candidate 0.47 (below t, inside the window) is kept with value 0.
    assert code_sets(codes) == [pytest.approx({1: 0.52, 2: 0.80, 4: 0.56})]
    assert 3 in codes.indices[0].tolist()
    loss = (codes.values * weights[codes.indices]).sum()
    loss.backward()
    # dL/dt_i = -(t / eps) * K((z_i - t) / eps) * dL/dy_i = -5 * w_i inside the window.
    # The parameter is log t, so dL/dlog t = t * dL/dt.
    t = 0.5
    want_dt = torch.tensor([0.0, -5.0 * 2, 0.0, -5.0 * 4, 0.0])
    assert act.log_threshold.grad is not None
    torch.testing.assert_close(act.log_threshold.grad, t * want_dt)
    # The input gets the plain gradient of the active entries, no straight-through term.
    assert pre.grad is not None
    torch.testing.assert_close(pre.grad, torch.tensor([[0.0, 2.0, 3.0, 0.0, 5.0]]))


def test_jumprelu_l0_penalty_gradient() -> None:
    act = make_jumprelu(0.5, 0.1, 5).train()
    pre = torch.tensor(
        [[0.40, 0.52, 0.80, 0.47, 0.56], [0.53, 0.10, 0.60, 0.20, 0.30]], requires_grad=True
    )
    l0 = act.sparsity_loss(pre)
    assert l0.item() == pytest.approx((3 + 2) / 2)
    l0.backward()
    # d mean_n L0_n / dt_i = -(1 / eps) * (number of rows with z_ni in the window) / N.
    in_window = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0])  # 0.53 (row 1), 0.52 and 0.47 (row 0)
    want_dt = -(1 / 0.1) * in_window / 2
    assert act.log_threshold.grad is not None
    torch.testing.assert_close(act.log_threshold.grad, 0.5 * want_dt)
    assert pre.grad is not None and (pre.grad == 0).all()


def test_jumprelu_eval_keeps_only_active_entries() -> None:
    act = make_jumprelu(0.5, 0.1, 5).eval()
    codes = act(torch.tensor([[0.40, 0.52, 0.80, 0.47, 0.56], [0.0, 0.0, 0.0, 0.0, 0.0]]))
    assert code_sets(codes) == [pytest.approx({1: 0.52, 2: 0.80, 4: 0.56}), {}]
    assert codes.width == 3
    assert act.export_threshold().tolist() == pytest.approx([0.5] * 5)


def test_sparse_codes_dense_round_trip_and_distinct_indices() -> None:
    dense = torch.tensor([[0.0, 2.0, 0.0, 1.0], [3.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    codes = SparseCodes.from_dense(dense)
    assert codes.width == 2
    torch.testing.assert_close(codes.to_dense(), dense)
    for row in codes.indices.tolist():
        assert len(set(row)) == len(row)
    assert codes.l0().tolist() == [2, 1, 0]
    with pytest.raises(ValueError, match="must both be"):
        SparseCodes(torch.zeros(2, 3), torch.zeros(2, 2, dtype=torch.long), 4)


def test_registry_builds_from_config() -> None:
    assert set(ACTIVATIONS) == {"topk", "batchtopk", "jumprelu"}
    cfg = SparseCoderConfig(d_in=4, num_latents=12, k=3)
    topk = build_activation(cfg)
    assert isinstance(topk, TopK) and (topk.k, topk.num_latents) == (3, 12)
    btk = build_activation(
        SparseCoderConfig(d_in=4, activation="batchtopk", threshold_momentum=0.2)
    )
    assert isinstance(btk, BatchTopK) and btk.momentum == 0.2
    jr = build_activation(
        SparseCoderConfig(
            d_in=4,
            activation="jumprelu",
            sparsity_coeff=1.0,
            jumprelu_init_threshold=0.25,
            jumprelu_bandwidth=0.05,
        )
    )
    assert isinstance(jr, JumpReLU) and jr.bandwidth == 0.05
    assert jr.threshold[0].item() == pytest.approx(0.25)
    assert math.isclose(jr.log_threshold[0].item(), math.log(0.25), rel_tol=1e-6)


def test_wrong_width_is_reported() -> None:
    with pytest.raises(ValueError, match=r"must be \[N, 8\], got \(2, 7\)"):
        TopK(8, k=2)(torch.zeros(2, 7))
