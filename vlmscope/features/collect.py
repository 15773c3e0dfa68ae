"""Streaming statistics of dictionary features: top-activating examples, density, histogram.

For one dictionary unit with F features and a stream of batches of sparse codes (each token
keeps its k active features), `FeatureCollector` keeps, per feature f:

- K example slots, holding the K largest activations seen so far with, for each, its sample
  number, position, cell in the image patch grid, and a window of C = before + 1 + after
  tokens around it: their token ids and f's activation on each (float16);
- n_f, the number of tokens where f > 0, and N, the number of tokens seen: density n_f / N;
- a histogram of log10 of f's nonzero activations over fixed bins (`HIST_EDGES`).

Memory is O(F * K * C) whatever the dataset's size: the bound is the examples kept.

Order. Examples are ranked by activation, descending; equal activations by stream order
(sample, then position), earlier first. This is the order of a stable sort of every
(token, f) pair of the stream by activation, so the K kept are exactly a brute-force scan's.

Update (cost proportional to the batch's nonzero codes, never to F * K * C):
1. Counts, maxima and histogram bins are scattered from the batch's nonzero (token, f, a)
   triples alone.
2. Threshold test: each feature's slots are unordered and tau_f is the smallest activation
   kept (-inf while a slot is empty). A triple is a candidate only if a > tau_f; once the
   slots have filled, almost every triple of a long stream fails this test and is dropped
   before anything is copied.
3. Merge, for the F' features with candidates only: their best K candidates (stable-sorted,
   so earlier tokens first among equals) are appended after their K kept examples (put in
   stream order), and one stable sort by activation of that [F', 2K] block gives the new top
   K. Kept examples that fall out free their slots; candidates that enter take them. Only those
   M slots are written, windows included.
4. Windows, for the M entrants only: the batch's nonzero codes sorted by (feature, row) put
   f's codes on the window's rows in one run, found by two binary searches, so no
   [M, C, k] comparison is built.

Slots are left unordered between batches; `ordered()` sorts them for output.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

#: log10 bin edges of the activation histogram: 1e-4 .. 1e4, 4 bins per decade.
HIST_EDGES = torch.linspace(-4.0, 4.0, 33)


@dataclass
class Batch:
    """One batch of one unit's codes, flattened to N = B * T token rows (padding included:
    `valid` says which rows count). Rows are B samples of T consecutive positions each."""

    values: Tensor  # [N, k] float
    indices: Tensor  # [N, k] long
    valid: Tensor  # [N] bool
    token_ids: Tensor  # [N] long
    cells: Tensor  # [N, 4] long: (image, view, row, col), -1 for non-image tokens
    sample: Tensor  # [N] long: global sample number of the row
    position: Tensor  # [N] long: position in its sample
    seq_len: int  # T


#: slot tensors, in the order `ordered()` returns them.
SLOTS = ("top_act", "top_sample", "top_pos", "top_cell", "win_act", "win_tok")


class FeatureCollector:
    """Top-K examples and activation statistics of F features (see the module docstring).

    Slot tensors are feature-major: [F, K, ...], one feature's K examples contiguous."""

    def __init__(self, n_features: int, k: int = 10, before: int = 12, after: int = 3) -> None:
        self.F, self.K, self.before, self.after = n_features, k, before, after
        self.C = c = before + 1 + after
        self.top_act = torch.full((n_features, k), float("-inf"))
        self.top_sample = torch.full((n_features, k), -1, dtype=torch.long)
        self.top_pos = torch.zeros((n_features, k), dtype=torch.int32)
        self.top_cell = torch.full((n_features, k, 4), -1, dtype=torch.int16)
        self.win_act = torch.zeros((n_features, k, c), dtype=torch.float16)
        self.win_tok = torch.full((n_features, k, c), -1, dtype=torch.int32)
        self.count = torch.zeros(n_features, dtype=torch.long)
        self.hist = torch.zeros((n_features, len(HIST_EDGES) + 1), dtype=torch.int32)
        self.max_act = torch.zeros(n_features)
        self.tokens = 0
        self.threshold = torch.full((n_features,), float("-inf"))  # tau_f, derived
        #: (sample, image) pairs of the examples the last update let in on image tokens.
        self.new_images: Tensor = torch.empty(0, 2, dtype=torch.long)

    # --- state (for checkpoints) ------------------------------------------------------------
    def state(self) -> dict[str, Tensor]:
        return {
            "top_act": self.top_act, "top_sample": self.top_sample, "top_pos": self.top_pos,
            "top_cell": self.top_cell, "win_act": self.win_act, "win_tok": self.win_tok,
            "count": self.count, "hist": self.hist, "max_act": self.max_act,
            "tokens": torch.tensor([self.tokens]),
        }  # fmt: skip

    def load_state(self, state: dict[str, Tensor]) -> None:
        for name, t in state.items():
            if name == "tokens":
                self.tokens = int(t[0])
                continue
            mine = getattr(self, name)
            if mine.shape != t.shape or mine.dtype != t.dtype:
                raise ValueError(
                    f"checkpoint tensor {name} is {tuple(t.shape)} {t.dtype}, expected "
                    f"{tuple(mine.shape)} {mine.dtype}: written with other settings"
                )
            mine.copy_(t)
        self.threshold = self.top_act.amin(1)

    # --- output -----------------------------------------------------------------------------
    def order(self, features: Tensor | None = None) -> Tensor:
        """[F', K] slot numbers of `features` (default all), best example first."""
        f = torch.arange(self.F) if features is None else features
        o = self._stream_order(f)
        act = self.top_act[f].gather(1, o)
        return o.gather(1, torch.argsort(act, dim=1, descending=True, stable=True))

    def ordered(self, features: Tensor | None = None) -> dict[str, Tensor]:
        """The slot tensors (`SLOTS`) of `features` (default all), each feature's examples
        best first; empty slots (activation -inf) last."""
        f = torch.arange(self.F) if features is None else features
        o = self.order(f)
        out = {}
        for name in SLOTS:
            t = getattr(self, name)[f]
            idx = o.view(*o.shape, *(1,) * (t.dim() - 2)).expand(*o.shape, *t.shape[2:])
            out[name] = t.gather(1, idx)
        return out

    # --- update -----------------------------------------------------------------------------
    @torch.no_grad()
    def update(self, b: Batch) -> None:
        vals = b.values.float().cpu().contiguous()
        idx = b.indices.cpu().long().contiguous()
        valid = b.valid.cpu()
        self.tokens += int(valid.sum())
        self.new_images = torch.empty(0, 2, dtype=torch.long)
        on = ((vals > 0) & valid[:, None]).view(-1).nonzero().squeeze(1)
        rows = on // vals.shape[1]
        f_on = idx.view(-1)[on]
        v_on = vals.view(-1)[on]
        if len(v_on) == 0:
            return
        # 1. Statistics, scattered from the nonzero triples only.
        self.count.index_add_(0, f_on, torch.ones_like(f_on))
        self.max_act.scatter_reduce_(0, f_on, v_on, "amax")
        bins = torch.bucketize(torch.log10(v_on), HIST_EDGES)
        nb = self.hist.shape[1]
        self.hist.view(-1).index_add_(0, f_on * nb + bins, torch.ones_like(bins, dtype=torch.int32))
        # 2. Threshold test: most triples of a long stream stop here.
        keep = v_on > self.threshold[f_on]
        rows, feats, v = rows[keep], f_on[keep], v_on[keep]
        if len(v) == 0:
            return
        # 3. Rank candidates within their feature: one stable sort of the key (feature, -a),
        # rows ascending (stream order) among ties. A positive float's bits order like it.
        key = feats * 2**31 + (2**31 - 1 - v.view(torch.int32).long())
        order = torch.sort(key, stable=True).indices
        rows, feats, v = rows[order], feats[order], v[order]
        uniq, counts = torch.unique_consecutive(feats, return_counts=True)
        starts = torch.cumsum(counts, 0) - counts
        rank = torch.arange(len(feats)) - torch.repeat_interleave(starts, counts)
        sel = rank < self.K
        rows, feats, v, rank = rows[sel], feats[sel], v[sel], rank[sel]
        col = torch.repeat_interleave(torch.arange(len(uniq)), counts.clamp(max=self.K))
        nf, K = len(uniq), self.K
        cand_act = torch.full((nf, K), float("-inf"))
        cand_row = torch.full((nf, K), -1, dtype=torch.long)
        cand_act[col, rank] = v
        cand_row[col, rank] = rows
        # Kept slots of those features in stream order, then the candidates; one stable sort.
        kept_slot = self._stream_order(uniq)  # [F', K]
        block = torch.cat([self.top_act[uniq].gather(1, kept_slot), cand_act], 1)
        rank2 = torch.argsort(block, dim=1, descending=True, stable=True)
        enters = rank2[:, :K] >= K  # [F', K] winners that are candidates
        if not bool(enters.any()):
            return
        leaves = rank2[:, K:] < K  # [F', K] kept examples that fall out
        # Pair, per feature, the j-th entrant with the j-th freed slot (equal counts per row).
        fi, wj = enters.nonzero(as_tuple=True)
        li, lj = leaves.nonzero(as_tuple=True)
        new_col = rank2[fi, wj] - K  # candidate rank
        freed = kept_slot[li, rank2[li, K + lj]]  # slot number of the leaver
        f_new = uniq[fi]
        r = cand_row[fi, new_col]
        flat = f_new * K + freed
        self.top_act.view(-1)[flat] = cand_act[fi, new_col]
        self.top_sample.view(-1)[flat] = b.sample.cpu()[r]
        self.top_pos.view(-1)[flat] = b.position.cpu()[r].to(torch.int32)
        cells = b.cells.cpu()[r]
        self.top_cell.view(-1, 4)[flat] = cells.to(torch.int16)
        # 4. Windows for the entrants only.
        w_act, w_tok = self._windows(b, vals, idx, valid, r, f_new)
        self.win_act.view(-1, self.C)[flat] = w_act
        self.win_tok.view(-1, self.C)[flat] = w_tok
        self.threshold[uniq] = self.top_act[uniq].amin(1)
        img = cells[:, 0] >= 0
        if bool(img.any()):
            pairs = torch.stack([b.sample.cpu()[r[img]], cells[img, 0].long()], 1)
            self.new_images = torch.unique(pairs, dim=0)

    def _stream_order(self, features: Tensor) -> Tensor:
        """[F', K] slot numbers of `features`, earliest example first (empty slots, sample
        -1, first: they hold -inf and sort last by activation anyway)."""
        stamp = self.top_sample[features] * 2**32 + self.top_pos[features].long()
        return torch.argsort(stamp, dim=1)

    def _windows(
        self, b: Batch, vals: Tensor, idx: Tensor, valid: Tensor, rows: Tensor, feats: Tensor
    ) -> tuple[Tensor, Tensor]:
        """f's activation and the token ids on the window around each of `rows` [M] (feature
        `feats` [M] each): [M, C] float16 and int32.

        The batch's nonzero codes are sorted by the key feature * N + row, so the codes of
        feature f on rows r - before .. r + after are one contiguous run, found with two binary
        searches per window (codes listing a feature twice on one row are summed, as a dense
        scatter would)."""
        n = len(valid)
        nz = (vals != 0).view(-1).nonzero().squeeze(1)
        keys, order = torch.sort(idx.view(-1)[nz] * n + nz // vals.shape[1])
        kv = vals.view(-1)[nz][order]
        keys, inv = torch.unique_consecutive(keys, return_inverse=True)
        summed = torch.zeros(len(keys)).index_add_(0, inv, kv)
        first = (rows - self.before).clamp(min=0)
        last = (rows + self.after).clamp(max=n - 1)
        lo = torch.searchsorted(keys, feats * n + first)
        hi = torch.searchsorted(keys, feats * n + last, right=True)
        counts = hi - lo
        owner = torch.repeat_interleave(torch.arange(len(rows)), counts)
        starts = torch.cumsum(counts, 0) - counts
        hit = lo[owner] + torch.arange(len(owner)) - starts[owner]
        col = keys[hit] - feats[owner] * n - rows[owner] + self.before
        act = torch.zeros(len(rows), self.C)
        act[owner, col] = summed[hit]
        offs = torch.arange(-self.before, self.after + 1)
        t = b.position.cpu()[rows][:, None] + offs  # position in the sample
        inside = (t >= 0) & (t < b.seq_len)
        nb = (rows[:, None] + offs).clamp(0, n - 1)  # same sample: rows are B x T
        inside &= valid[nb]
        act = act * inside
        tok = torch.where(inside, b.token_ids.cpu()[nb], -1)
        return act.to(torch.float16), tok.to(torch.int32)
