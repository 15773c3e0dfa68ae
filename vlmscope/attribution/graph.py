"""Attribution graphs: nodes, the adjacency of direct effects, pruning and scores.

Node order (as in circuit-tracer): [selected features, errors (layer-major, one per layer and
position), input nodes (one per position: text token or image patch; then, for cross-attention
VLMs, one per vision feature the cross-attention layers read), logits]. Row = target, column =
source: adjacency[t, s] is the direct effect of source s on target t.

Influence, pruning and the replacement / completeness scores follow the definitions of Ameisen
et al. (2025) as circuit-tracer computes them: rows of |A| are normalised to sum to 1, a node's
influence is its total weight on the logits (weighted by their probabilities) over all paths.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor


@dataclass
class LogitTarget:
    token_id: int
    token: str
    probability: float


@dataclass
class Graph:
    """An attribution graph over one prompt; see the module docstring for the node order."""

    adjacency: Tensor
    #: [n_features, 3] (model layer, position, feature index) of the selected feature nodes.
    features: Tensor
    activations: Tensor
    #: the model's LM layers (errors: one per layer and position, also where no dictionary is).
    n_layers: int
    input_ids: Tensor
    #: per input node: "text", "image" or "special" (positions first, then any vision
    #: features read by cross-attention, all "image").
    input_kinds: list[str]
    #: per input node: (image, view, row, col) for image patches, else (-1, -1, -1, -1).
    patch_map: Tensor
    logit_targets: list[LogitTarget]
    input_tokens: list[str] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)
    #: [n_nodes, n_inputs] or None: per target node (rows as in `adjacency`), the edge it would
    #: get from each input node if that node held a reference prompt's sources (e.g. a blank
    #: image's embeddings; `attribute(reference=...)`). adjacency's input columns minus these
    #: are the edges of the change from the reference to the prompt.
    reference_edges: Tensor | None = None

    @property
    def n_features(self) -> int:
        return len(self.features)

    @property
    def n_pos(self) -> int:
        return len(self.input_ids)

    @property
    def n_inputs(self) -> int:
        """Input nodes: one per position, plus cross-attention vision features (Mllama)."""
        return max(len(self.input_kinds), self.n_pos)

    @property
    def n_errors(self) -> int:
        return self.n_layers * self.n_pos

    @property
    def n_logits(self) -> int:
        return len(self.logit_targets)

    @property
    def error_slice(self) -> slice:
        return slice(self.n_features, self.n_features + self.n_errors)

    @property
    def input_slice(self) -> slice:
        start = self.n_features + self.n_errors
        return slice(start, start + self.n_inputs)

    @property
    def logit_slice(self) -> slice:
        start = self.n_features + self.n_errors + self.n_inputs
        return slice(start, start + self.n_logits)

    def logit_weights(self) -> Tensor:
        w = torch.zeros(self.adjacency.shape[0], dtype=self.adjacency.dtype)
        w[self.logit_slice] = torch.tensor([t.probability for t in self.logit_targets])
        return w

    def error_index(self, layer: int, position: int) -> int:
        return self.n_features + layer * self.n_pos + position

    def input_index(self, position: int) -> int:
        return self.input_slice.start + position

    def feature_index(self, layer: int, position: int, feature: int) -> int:
        hit = (
            (self.features[:, 0] == layer)
            & (self.features[:, 1] == position)
            & (self.features[:, 2] == feature)
        ).nonzero()
        if len(hit) == 0:
            raise KeyError(f"feature ({layer}, {position}, {feature}) is not a node of this graph")
        return int(hit[0, 0])


def normalize_rows(matrix: Tensor) -> Tensor:
    """|A| with each row scaled to sum to 1 (rows of zeros stay zero); one new matrix."""
    return _normalize_abs_(matrix.abs())


def _normalize_abs_(a: Tensor) -> Tensor:
    """Scale the rows of `a` (already >= 0) in place to sum to 1: no second matrix."""
    return a.div_(a.sum(dim=1, keepdim=True).clamp(min=1e-10))


class NonFiniteGraphError(ValueError):
    """An attribution graph holds NaN or Inf edges (from NaN/Inf weights or activations)."""


def check_finite_rows(rows: Tensor, nodes: Tensor, ctx: Any) -> None:
    """Raise NonFiniteGraphError naming the source node of the first NaN/Inf edge in `rows`
    (one backward's rows; `nodes` their target nodes), and where such values come from."""
    finite = torch.isfinite(rows)
    if bool(finite.all()):
        return
    r, c = (~finite).nonzero()[0].tolist()
    n_feat = len(ctx.features)
    seq = ctx.embeddings.shape[0]
    if c < n_feat:
        f = ctx.features
        unit = int(f.unit[c])
        source = (
            f"feature {int(f.feature[c])} at layer {int(f.layer[c])}, position "
            f"{int(f.position[c])}: check the dictionaries' W_dec of unit {unit} "
            f"({ctx.bundle.reads[unit]})"
        )
    elif c < n_feat + ctx.n_layers * seq:
        layer, pos = divmod(c - n_feat, seq)
        source = f"the error node of layer {layer}, position {pos}"
    elif c < n_feat + (ctx.n_layers + 1) * seq:
        source = f"the input node at position {c - n_feat - ctx.n_layers * seq}"
    else:  # past the positions: a vision feature cross-attention reads (Mllama)
        source = f"the cross-attention vision feature {c - n_feat - (ctx.n_layers + 1) * seq}"
    raise NonFiniteGraphError(
        f"{int((~finite).sum())} NaN/Inf edges in one backward pass (first: from {source}, "
        f"to node {int(nodes[r])}): NaN or Inf dictionary weights or model activations"
    )


def influence(normalized: Tensor, logit_weights: Tensor, max_iter: int = 10_000) -> Tensor:
    """Sum over path lengths k >= 1 of logit_weights @ A^k (A is a DAG, so the series ends)."""
    if not bool(torch.isfinite(normalized).all()):
        bad = (~torch.isfinite(normalized)).nonzero()[0].tolist()
        raise NonFiniteGraphError(
            f"the adjacency matrix holds {int((~torch.isfinite(normalized)).sum())} NaN/Inf "
            f"entries (first at row {bad[0]}, column {bad[1]}): a graph of NaN or Inf "
            "dictionary weights or activations; check the dictionaries the graph came from"
        )
    current = logit_weights @ normalized
    total = current.clone()
    for _ in range(max_iter):
        if not bool(current.any()):
            return total
        current = current @ normalized
        total += current
    raise RuntimeError("influence did not converge: the adjacency matrix has a cycle")


def node_influence(graph: Graph) -> Tensor:
    return influence(normalize_rows(graph.adjacency), graph.logit_weights())


def _threshold(scores: Tensor, keep: float) -> Tensor:
    """The smallest score among the top scores (all >= 0) that hold `keep` of the total.

    Sorted in place on a copy, without the int64 index tensor torch.sort also returns (twice
    the size of the scores: for the edge scores of a dense graph that was most of prune's
    memory); the running total covers only the positive scores (the zeros at the end add
    nothing to it)."""
    ordered = scores.clone()
    if ordered.device.type == "cpu" and ordered.dtype in (torch.float32, torch.float64):
        negated = ordered.neg_().numpy()
        negated.sort()  # ascending in place: descending of the scores
        positive = int(np.searchsorted(negated, negated.dtype.type(0)))  # no mask, no cast
        ordered.neg_()
    else:
        ordered = torch.sort(ordered, descending=True).values
        positive = int(torch.count_nonzero(ordered > 0))
    total = ordered.sum()
    if total <= 0:
        return ordered[0]
    cum = torch.cumsum(ordered[:positive], 0).div_(total)
    idx = int(torch.searchsorted(cum, torch.tensor(keep, dtype=cum.dtype)))
    return ordered[min(idx, len(ordered) - 1)]


@dataclass
class PruneResult:
    node_mask: Tensor
    edge_mask: Tensor
    #: per node, the cumulative influence fraction at its rank (sorted by influence).
    cumulative: Tensor


def prune(graph: Graph, node_threshold: float = 0.8, edge_threshold: float = 0.98) -> PruneResult:
    """Keep the nodes that carry `node_threshold` of the influence on the logits (input and
    logit nodes always stay), then the edges that carry `edge_threshold` of it; drop feature
    and error nodes left without outgoing edges, and features left without incoming ones."""
    for name, v in (("node_threshold", node_threshold), ("edge_threshold", edge_threshold)):
        if not 0.0 <= v <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {v}")
    a = graph.adjacency
    w = graph.logit_weights()
    # One work matrix, reused: |A| normalised, then the pruned |A| normalised, then the edge
    # scores (each step in place), so memory stays near one copy of the adjacency.
    work = normalize_rows(a)
    infl = influence(work, w)
    node_mask = infl >= _threshold(infl, node_threshold)
    fixed = graph.input_slice.start  # inputs and logits are always kept
    node_mask[fixed:] = True
    pruned = torch.abs(a, out=work)
    pruned[~node_mask] = 0
    pruned[:, ~node_mask] = 0
    nonzero = pruned != 0
    norm = _normalize_abs_(pruned)
    edge_scores = norm.mul_((influence(norm, w) + w)[:, None])
    edge_mask = edge_scores >= _threshold(edge_scores.flatten(), edge_threshold)
    del work, pruned, norm, edge_scores
    edge_mask &= nonzero
    del nonzero
    nf = graph.n_features
    while True:
        before = node_mask.clone()
        edge_mask[~node_mask] = False
        edge_mask[:, ~node_mask] = False
        node_mask[:fixed] &= edge_mask[:, :fixed].any(0)
        node_mask[:nf] &= edge_mask[:nf].any(1)
        if torch.equal(before, node_mask):
            break
    order = torch.argsort(infl, descending=True)
    cum = torch.zeros_like(infl)
    total = infl.sum()
    cum[order] = torch.cumsum(infl[order], 0) / (total if total > 0 else 1)
    return PruneResult(node_mask, edge_mask, cum)


def graph_scores(graph: Graph) -> tuple[float, float]:
    """(replacement score, completeness score).

    Replacement: of the influence that input nodes and error nodes have on the logits, the
    fraction held by the inputs (all-feature paths). Completeness: the influence-weighted
    fraction of every node's (normalised) inputs that do not come from error nodes.
    """
    norm = normalize_rows(graph.adjacency)
    w = graph.logit_weights()
    infl = influence(norm, w)
    inputs = infl[graph.input_slice].sum()
    errors = infl[graph.error_slice].sum()
    replacement = inputs / (inputs + errors).clamp(min=1e-30)
    non_error = 1 - norm[:, graph.error_slice].sum(dim=1)
    out = infl + w
    completeness = (non_error * out).sum() / out.sum()
    return float(replacement), float(completeness)
