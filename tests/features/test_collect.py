"""FeatureCollector against a brute-force scan of every (sample, position, feature)."""

from __future__ import annotations

import torch

from vlmscope.features.collect import HIST_EDGES, Batch, FeatureCollector


def random_batches(n_batches: int, b: int, t: int, f: int, k: int, seed: int) -> list[Batch]:
    g = torch.Generator().manual_seed(seed)
    out, sample = [], 0
    for _ in range(n_batches):
        n = b * t
        scores = torch.rand(n, f, generator=g)
        idx = scores.topk(k, -1).indices
        vals = torch.rand(n, k, generator=g) * 10 ** torch.randint(-3, 3, (n, k), generator=g)
        vals[torch.rand(n, k, generator=g) < 0.2] = 0.0  # some codes are zero (JumpReLU)
        valid = torch.rand(n, generator=g) > 0.15
        cells = torch.full((n, 4), -1, dtype=torch.long)
        cells[::3] = torch.tensor([0, 0, 1, 2])
        out.append(
            Batch(vals, idx, valid, torch.randint(0, 50, (n,), generator=g), cells,
                  (sample + torch.arange(b)).repeat_interleave(t), torch.arange(t).repeat(b), t)
        )  # fmt: skip
        sample += b
    return out


def brute(batches: list[Batch], f: int, before: int, after: int) -> dict:
    """Dense [rows, F] activations, then every statistic the slow way."""
    dense, toks, valid, samples, pos = [], [], [], [], []
    for b in batches:
        d = torch.zeros(len(b.valid), f)
        d.scatter_add_(1, b.indices, b.values)
        d *= b.valid[:, None]
        dense.append(d), toks.append(b.token_ids), valid.append(b.valid)
        samples.append(b.sample), pos.append(b.position)
    d, tok, ok = torch.cat(dense), torch.cat(toks), torch.cat(valid)
    s, p = torch.cat(samples), torch.cat(pos)
    t = batches[0].seq_len
    res: dict = {"count": (d > 0).sum(0), "tokens": int(ok.sum()), "top": {}, "hist": []}
    for j in range(f):
        col = d[:, j]
        nz = col[col > 0]
        res["hist"].append(torch.bincount(torch.bucketize(torch.log10(nz), HIST_EDGES),
                                          minlength=len(HIST_EDGES) + 1))  # fmt: skip
        entries = []
        for row in (col > 0).nonzero().squeeze(1).tolist():
            win_a, win_t = [], []
            for off in range(-before, after + 1):
                q = row + off
                inside = 0 <= int(p[row]) + off < t and bool(ok[q])
                win_a.append(float(d[q, j]) if inside else 0.0)
                win_t.append(int(tok[q]) if inside else -1)
            entries.append((float(col[row]), int(s[row]), int(p[row]), win_a, win_t))
        res["top"][j] = sorted(entries, key=lambda e: -e[0])
    return res


def check_against_brute(batches: list[Batch], f: int, keep: int, before: int, after: int) -> None:
    c = FeatureCollector(f, k=keep, before=before, after=after)
    for b in batches:
        c.update(b)
    ref = brute(batches, f, before, after)
    assert c.tokens == ref["tokens"]
    assert torch.equal(c.count, ref["count"])
    top = c.ordered()
    for j in range(f):
        assert torch.equal(c.hist[j].long(), ref["hist"][j].long())
        want = ref["top"][j][:keep]
        got = [float(v) for v in top["top_act"][j, : len(want)]]
        assert got == [w[0] for w in want]  # the same K best activations, in order
        for r, w in enumerate(want):  # ties too: earlier tokens first, as a stable sort
            assert (int(top["top_sample"][j, r]), int(top["top_pos"][j, r])) == (w[1], w[2])
            want_act = torch.tensor(w[3]).half().float()
            torch.testing.assert_close(top["win_act"][j, r].float(), want_act)
            assert top["win_tok"][j, r].tolist() == w[4]
        assert bool((top["top_act"][j, len(want) :] == float("-inf")).all())


def test_collector_matches_brute_force() -> None:
    check_against_brute(random_batches(6, b=3, t=9, f=40, k=5, seed=0), 40, 4, 3, 2)


def test_collector_matches_brute_force_with_ties_over_a_long_stream() -> None:
    # Activations on a coarse grid whose top level rises over the stream: kept examples tie,
    # and later, larger ones evict some of a tied group (the latest-seen must go first).
    batches = random_batches(30, b=2, t=7, f=12, k=3, seed=4)
    g = torch.Generator().manual_seed(5)
    for i, b in enumerate(batches):
        level = torch.randint(1, 2 + i // 4, b.values.shape, generator=g).float()
        b.values = torch.where(b.values > 0, level, 0.0)
    check_against_brute(batches, 12, 5, 2, 1)


def test_state_round_trip_continues_identically() -> None:
    f = 12
    batches = random_batches(4, b=2, t=6, f=f, k=3, seed=1)
    whole = FeatureCollector(f, k=3, before=2, after=1)
    for b in batches:
        whole.update(b)
    first = FeatureCollector(f, k=3, before=2, after=1)
    for b in batches[:2]:
        first.update(b)
    resumed = FeatureCollector(f, k=3, before=2, after=1)
    resumed.load_state({k: v.clone() for k, v in first.state().items()})
    for b in batches[2:]:
        resumed.update(b)
    for name, t in whole.state().items():
        assert torch.equal(t, resumed.state()[name]), name
