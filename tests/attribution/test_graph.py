"""Influence, pruning and scores on a graph small enough to work out by hand.

Node order: f0, f1 | e(0,0), e(0,1), e(1,0), e(1,1) | in0, in1 | L0, L1. Weights and
probabilities are chosen so that every influence is a dyadic fraction (exact in float32); the
derivations are in the comments, so a change of definition shows up as a wrong number here.
"""

from __future__ import annotations

import pytest
import torch

from vlmscope.attribution.graph import (
    Graph,
    LogitTarget,
    graph_scores,
    node_influence,
    normalize_rows,
    prune,
)

F0, F1, E00, E01, E10, E11, IN0, IN1, L0, L1 = range(10)


def hand_graph() -> Graph:
    """2 features, 2 layers x 2 positions of errors, 2 inputs, 2 logits (p = 1/2, 1/4)."""
    a = torch.zeros(10, 10)
    a[F0, IN0], a[F0, IN1] = 3.0, -1.0  # |row| normalised: 3/4, 1/4
    a[F1, F0], a[F1, E01], a[F1, IN1] = 2.0, 1.0, -1.0  # 1/2, 1/4, 1/4
    a[L0, F1], a[L0, F0], a[L0, E11] = 4.0, 2.0, -2.0  # 1/2, 1/4, 1/4
    a[L1, F1], a[L1, IN1] = 1.0, 3.0  # 1/4, 3/4
    return Graph(
        adjacency=a,
        features=torch.tensor([[0, 1, 3], [1, 1, 5]]),
        activations=torch.tensor([1.5, 0.25]),
        n_layers=2,
        input_ids=torch.tensor([10, 11]),
        input_kinds=["text", "text"],
        patch_map=torch.full((2, 4), -1, dtype=torch.long),
        logit_targets=[LogitTarget(7, " cat", 0.5), LogitTarget(8, " dog", 0.25)],
        input_tokens=["the", " pet"],
        metadata={"model": "hand", "family": "test"},
    )


# Influence = sum_k w A^k with w = (L0: 1/2, L1: 1/4):
#   k=1: f1 = 1/2*1/2 + 1/4*1/4 = 5/16, f0 = 1/8, e11 = 1/8, in1 = 3/16
#   k=2: from f1 (5/16): f0 5/32, e01 5/64, in1 5/64; from f0 (1/8): in0 3/32, in1 1/32
#   k=3: from f0 (5/32): in0 15/128, in1 5/128
EXPECTED = {
    F0: 1 / 8 + 5 / 32,  # 36/128
    F1: 5 / 16,  # 40/128
    E01: 5 / 64,  # 10/128
    E11: 1 / 8,  # 16/128
    IN0: 3 / 32 + 15 / 128,  # 27/128
    IN1: 3 / 16 + 5 / 64 + 1 / 32 + 5 / 128,  # 43/128
}


def test_node_influence_by_hand() -> None:
    g = hand_graph()
    infl = node_influence(g)
    want = torch.zeros(10)
    for i, v in EXPECTED.items():
        want[i] = v
    assert torch.equal(infl, want)  # dyadic: exact
    # Every unit of logit weight ends on a source node (inputs or errors).
    assert float(infl[[E01, E11, IN0, IN1]].sum()) == 0.75
    assert torch.equal(
        normalize_rows(g.adjacency)[F1, [F0, E01, IN1]], torch.tensor([0.5, 0.25, 0.25])
    )


def test_scores_by_hand() -> None:
    replacement, completeness = graph_scores(hand_graph())
    # Inputs 70/128 of the 96/128 that reaches inputs and errors.
    assert replacement == pytest.approx(70 / 96, abs=1e-6)
    # sum(infl + w) = 268/128; f1 loses 1/4 of 40/128 and L0 1/4 of 64/128 to errors.
    assert completeness == pytest.approx((268 - 10 - 16) / 268, abs=1e-6)


def test_prune_nodes_by_hand() -> None:
    g = hand_graph()
    # Sorted influence (of 172/128): in1 43, f1 40, f0 36, in0 27, e11 16, e01 10, zeros.
    # Cumulative: .25, .483, .692, .849, .942, 1.
    r = prune(g, node_threshold=0.8, edge_threshold=0.98)
    torch.testing.assert_close(
        r.cumulative[[IN1, F1, F0, IN0, E11, E01]],
        torch.tensor([43, 83, 119, 146, 162, 172]) / 172,
    )
    kept = set(r.node_mask.nonzero().squeeze(1).tolist())
    # 0.8 is reached at in0 (.849): the threshold is in0's influence; errors fall below it.
    assert kept == {F0, F1, IN0, IN1, L0, L1}
    # 0.95 is reached at e01: every node with influence > 0 stays, the zero errors go.
    r = prune(g, node_threshold=0.95, edge_threshold=1.0)
    assert set(r.node_mask.nonzero().squeeze(1).tolist()) == {F0, F1, E01, E11, IN0, IN1, L0, L1}
    assert int(r.edge_mask.sum()) == int((g.adjacency != 0).sum())
    # 0.4 is reached at f1: f0 goes; f1 stays through its edge from in1.
    r = prune(g, node_threshold=0.4, edge_threshold=1.0)
    assert set(r.node_mask.nonzero().squeeze(1).tolist()) == {F1, IN0, IN1, L0, L1}
    assert set(map(tuple, r.edge_mask.nonzero().tolist())) == {
        (F1, IN1),
        (L0, F1),
        (L1, F1),
        (L1, IN1),
    }


# Edges after node pruning at 0.8 (errors removed), normalised rows:
#   f0 <- in0 3/4, in1 1/4;  f1 <- f0 2/3, in1 1/3;  L0 <- f1 2/3, f0 1/3;  L1 <- f1 1/4, in1 3/4
# Influence there (x144): f1 57, f0 62; plus w: L0 72, L1 36. Edge score = norm * (infl + w):
#   L0<-f1 48, f0<-in0 46.5, f1<-f0 38, L1<-in1 27, L0<-f0 24, f1<-in1 19, f0<-in1 15.5,
#   L1<-f1 9 (total 227; cumulative .211 .416 .584 .703 .808 .892 .960 1).
ALL_EDGES = {(L0, F1), (F0, IN0), (F1, F0), (L1, IN1), (L0, F0), (F1, IN1), (F0, IN1), (L1, F1)}


@pytest.mark.parametrize(
    ("edge_threshold", "dropped"),
    [
        (0.98, set()),
        (0.9, {(L1, F1)}),
        (0.8, {(F1, IN1), (F0, IN1), (L1, F1)}),
        (0.5, {(L1, IN1), (L0, F0), (F1, IN1), (F0, IN1), (L1, F1)}),
    ],
)
def test_prune_edges_by_hand(edge_threshold: float, dropped: set[tuple[int, int]]) -> None:
    r = prune(hand_graph(), node_threshold=0.8, edge_threshold=edge_threshold)
    assert set(map(tuple, r.edge_mask.nonzero().tolist())) == ALL_EDGES - dropped
    assert r.node_mask[[F0, F1]].all()


def test_prune_cascades_through_nodes_left_without_edges() -> None:
    # 0.3 keeps only L0<-f1 and f0<-in0: f1 has no input edge, so it goes, then L0<-f1 goes,
    # then f0 has no output edge, so it goes too: nothing but inputs and logits is left.
    r = prune(hand_graph(), node_threshold=0.8, edge_threshold=0.3)
    assert set(r.node_mask.nonzero().squeeze(1).tolist()) == {IN0, IN1, L0, L1}
    assert not r.edge_mask.any()


def test_prune_rejects_thresholds_outside_unit_interval() -> None:
    with pytest.raises(ValueError, match="node_threshold"):
        prune(hand_graph(), node_threshold=1.5)
