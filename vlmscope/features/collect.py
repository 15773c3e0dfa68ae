"""Streaming statistics of dictionary features: top-activating examples, density, histogram.

For one dictionary unit with F features and a stream of batches of sparse codes (each token
keeps its k active features), `FeatureCollector` keeps, per feature f:

- the K largest activations seen so far with, for each, its sample number, position, cell in
  the image patch grid, and a window of C = before + 1 + after tokens around it: their token
  ids and f's activation on each (float16);
- n_f, the number of tokens where f > 0, and N, the number of tokens seen: density n_f / N;
- a histogram of log10 of f's nonzero activations over fixed bins (`HIST_EDGES`).

Memory is O(F * K * C) whatever the dataset's size: the bound is the examples kept.

Update (all features at once, no Python loop over features): the (token, feature, value)
triples of a batch that beat f's current K-th best are ranked within their feature; the best K
of them per feature fill a [K, F'] candidate block for the F' features that got any, which is
concatenated with the kept [K, F'] block and cut back to K by `topk` along the first axis.
Windows are gathered for the winners only: f's activation on token t' is the value stored
with index f among t''s k codes (0 when f is not among them).
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
    `valid` says which rows count)."""

    values: Tensor  # [N, k] float
    indices: Tensor  # [N, k] long
    valid: Tensor  # [N] bool
    token_ids: Tensor  # [N] long
    cells: Tensor  # [N, 4] long: (image, view, row, col), -1 for non-image tokens
    sample: Tensor  # [N] long: global sample number of the row
    position: Tensor  # [N] long: position in its sample
    seq_len: int  # T


class FeatureCollector:
    """Top-K examples and activation statistics of F features (see the module docstring)."""

    def __init__(self, n_features: int, k: int = 10, before: int = 12, after: int = 3) -> None:
        self.F, self.K, self.before, self.after = n_features, k, before, after
        c = before + 1 + after
        self.top_act = torch.full((k, n_features), float("-inf"))
        self.top_sample = torch.full((k, n_features), -1, dtype=torch.long)
        self.top_pos = torch.zeros((k, n_features), dtype=torch.int32)
        self.top_cell = torch.full((k, n_features, 4), -1, dtype=torch.int16)
        self.win_act = torch.zeros((k, n_features, c), dtype=torch.float16)
        self.win_tok = torch.full((k, n_features, c), -1, dtype=torch.int32)
        self.count = torch.zeros(n_features, dtype=torch.long)
        self.hist = torch.zeros((n_features, len(HIST_EDGES) + 1), dtype=torch.int32)
        self.max_act = torch.zeros(n_features)
        self.tokens = 0

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

    # --- update -----------------------------------------------------------------------------
    @torch.no_grad()
    def update(self, b: Batch) -> None:
        vals = b.values.float().cpu()
        idx = b.indices.cpu()
        valid = b.valid.cpu()
        vals = vals * valid[:, None]
        self.tokens += int(valid.sum())
        on = vals > 0
        f_on = idx[on]
        v_on = vals[on]
        self.count += torch.bincount(f_on, minlength=self.F)
        if len(v_on):
            self.max_act = torch.maximum(
                self.max_act, torch.zeros(self.F).scatter_reduce(0, f_on, v_on, "amax")
            )
            bins = torch.bucketize(torch.log10(v_on), HIST_EDGES)
            flat = torch.bincount(f_on * self.hist.shape[1] + bins, minlength=self.hist.numel())
            self.hist += flat.view_as(self.hist).to(torch.int32)
        # Candidates: (row, feature, value) above the feature's current K-th best.
        rows = on.nonzero()[:, 0]
        kth = self.top_act[-1]
        keep = v_on > kth[f_on]
        rows, feats, v = rows[keep], f_on[keep], v_on[keep]
        if len(v) == 0:
            return
        # Rank within feature: sort by feature, then value descending.
        order = torch.argsort(v, descending=True, stable=True)
        order = order[torch.argsort(feats[order], stable=True)]
        rows, feats, v = rows[order], feats[order], v[order]
        uniq, counts = torch.unique_consecutive(feats, return_counts=True)
        starts = torch.cumsum(counts, 0) - counts
        rank = torch.arange(len(feats)) - torch.repeat_interleave(starts, counts)
        sel = rank < self.K
        rows, feats, v, rank = rows[sel], feats[sel], v[sel], rank[sel]
        col = torch.searchsorted(uniq, feats)  # column of each candidate among F'
        nf = len(uniq)
        cand_act = torch.full((self.K, nf), float("-inf"))
        cand_row = torch.full((self.K, nf), -1, dtype=torch.long)
        cand_act[rank, col] = v
        cand_row[rank, col] = rows
        # Merge with the kept block and cut back to K.
        both = torch.cat([self.top_act[:, uniq], cand_act], 0)
        best, which = torch.topk(both, self.K, dim=0)
        from_new = which >= self.K
        if not bool(from_new.any()):
            return
        old_k = which.clamp(max=self.K - 1)
        new_k = (which - self.K).clamp(min=0)
        cols = uniq[None, :].expand(self.K, nf)

        def merge(kept: Tensor, fresh: Tensor) -> Tensor:
            old = kept[:, uniq][old_k, torch.arange(nf)[None, :].expand(self.K, nf)]
            shape = (-1,) + (1,) * (kept.dim() - 2)
            return torch.where(from_new.view(*from_new.shape, *shape[1:]), fresh, old)

        new_rows = cand_row[new_k, torch.arange(nf)[None, :].expand(self.K, nf)]  # [K, F']
        r = new_rows.clamp(min=0)
        self.top_act[:, uniq] = best
        self.top_sample[:, uniq] = merge(self.top_sample, b.sample[r])
        self.top_pos[:, uniq] = merge(self.top_pos, b.position[r].to(torch.int32))
        self.top_cell[:, uniq] = merge(self.top_cell, b.cells[r].to(torch.int16))
        # Windows only for the new winners (M of them), not for every kept slot.
        w_act, w_tok = self._windows(b, vals, idx, valid, r[from_new], cols[from_new])
        ar = torch.arange(nf)[None, :].expand(self.K, nf)
        for kept, fresh in ((self.win_act, w_act), (self.win_tok, w_tok)):
            block = kept[:, uniq][old_k, ar]
            block[from_new] = fresh
            kept[:, uniq] = block

    def _windows(
        self, b: Batch, vals: Tensor, idx: Tensor, valid: Tensor, rows: Tensor, feats: Tensor
    ) -> tuple[Tensor, Tensor]:
        """f's activation and the token ids on the window around each of `rows` [M] (feature
        `feats` [M] each): [M, C] float16 and int32."""
        offs = torch.arange(-self.before, self.after + 1)
        t = b.position.cpu()[rows][..., None] + offs  # position in the sample
        inside = (t >= 0) & (t < b.seq_len)
        nb = (rows[..., None] + offs).clamp(0, len(valid) - 1)  # same sample: rows are B x T
        inside &= valid[nb]
        match = idx[nb] == feats[..., None, None]  # [K, F', C, k]
        act = (vals[nb] * match).sum(-1) * inside
        tok = torch.where(inside, b.token_ids.cpu()[nb], -1)
        return act.to(torch.float16), tok.to(torch.int32)
