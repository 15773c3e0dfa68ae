"""CrossLayerTranscoder: the windowed sum over sources by hand, losses, equivalence with
per-layer transcoders, decoder norms, AuxK, errors."""

from __future__ import annotations

import pytest
import torch

from vlmscope.dictionaries.activations import SparseCodes
from vlmscope.dictionaries.clt import CrossLayerTranscoder
from vlmscope.dictionaries.coder import SparseCoder, fvu
from vlmscope.dictionaries.config import SparseCoderConfig


def make_clt(n_layers: int, n_targets: int, **kw: object) -> CrossLayerTranscoder:
    values = {"kind": "clt", "d_in": 3, "num_latents": 5, "k": 2, "n_layers": n_layers}
    values.update(n_targets=n_targets, **kw)
    return CrossLayerTranscoder(SparseCoderConfig(**values))  # type: ignore[arg-type]


def randomize(module: torch.nn.Module, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))


def hand_decode(
    clt: CrossLayerTranscoder, dense: list[torch.Tensor], window: int
) -> list[torch.Tensor]:
    """y_t = b_dec_t + sum over s <= t < s + window (and t < L) of dense_s @ W_dec_s[:, t - s]."""
    n_layers = len(dense)
    outs = []
    for t in range(n_layers):
        y = clt.layers[t].b_dec.detach().expand(dense[0].shape[0], -1).clone()
        for s in range(n_layers):
            if s <= t < s + window:
                y += dense[s] @ clt.layers[s].W_dec.detach()[:, t - s]
        outs.append(y)
    return outs


def test_decoder_shapes_follow_the_window() -> None:
    clt = make_clt(4, 2)
    assert [tuple(layer.W_dec.shape) for layer in clt.layers] == [
        (5, 2, 3),
        (5, 2, 3),
        (5, 2, 3),
        (5, 1, 3),
    ]
    full = make_clt(4, 0)
    assert [layer.W_dec.shape[1] for layer in full.layers] == [4, 3, 2, 1]
    wide = make_clt(4, 16)  # a window past the last layer is clamped to the layers that exist
    assert [layer.W_dec.shape[1] for layer in wide.layers] == [4, 3, 2, 1]
    assert clt.b_dec.shape == (4, 3)


@pytest.mark.parametrize(("n_targets", "window"), [(2, 2), (0, 4), (1, 1), (16, 4)])
def test_decode_sums_sources_within_the_window(n_targets: int, window: int) -> None:
    clt = make_clt(4, n_targets)
    randomize(clt)
    gen = torch.Generator().manual_seed(1)
    codes, dense = [], []
    for _ in range(4):
        values = torch.randn(6, 2, generator=gen)
        values[:, 1] *= torch.rand(6, generator=gen) > 0.5  # some zero padding
        indices = torch.stack([torch.randperm(5, generator=gen)[:2] for _ in range(6)])
        c = SparseCodes(values, indices, 5)
        codes.append(c)
        dense.append(c.to_dense())
    got = clt.decode(codes)
    for g, w in zip(got, hand_decode(clt, dense, window), strict=True):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=0)


@pytest.mark.parametrize(("n_targets", "window"), [(2, 2), (0, 4)])
def test_decode_gradients_equal_the_hand_decodes(n_targets: int, window: int) -> None:
    """Every target's gradient reaches each source's decoder slice and code values as in the
    dense sum by hand (the decode splits one product per source into its targets)."""
    clt = make_clt(4, n_targets)
    randomize(clt)
    gen = torch.Generator().manual_seed(2)
    values = [torch.randn(6, 2, generator=gen, requires_grad=True) for _ in range(4)]
    indices = [torch.stack([torch.randperm(5, generator=gen)[:2] for _ in range(6)])
               for _ in range(4)]  # fmt: skip
    weights = [torch.randn(6, 3, generator=gen) for _ in range(4)]  # a loss per target
    got = clt.decode([SparseCodes(v, i, 5) for v, i in zip(values, indices, strict=True)])
    sum((g * w).sum() for g, w in zip(got, weights, strict=True)).backward()

    ref_values = [v.detach().clone().requires_grad_() for v in values]
    ref_dec = [layer.W_dec.detach().clone().requires_grad_() for layer in clt.layers]
    loss = torch.zeros(())
    for t in range(4):
        for s in range(t + 1):
            if t < s + window:
                dense = torch.zeros(6, 5).scatter_add(1, indices[s], ref_values[s])
                loss = loss + ((dense @ ref_dec[s][:, t - s]) * weights[t]).sum()
    loss.backward()
    for s in range(4):
        torch.testing.assert_close(clt.layers[s].W_dec.grad, ref_dec[s].grad, atol=1e-5, rtol=0)
        torch.testing.assert_close(values[s].grad, ref_values[s].grad, atol=1e-5, rtol=0)


def test_source_zero_does_not_reach_targets_beyond_its_window() -> None:
    clt = make_clt(4, 2)
    randomize(clt)
    active = SparseCodes(torch.tensor([[1.5]]), torch.tensor([[3]]), 5)
    silent = SparseCodes(torch.zeros(1, 1), torch.zeros(1, 1, dtype=torch.long), 5)
    out = clt.decode([active, silent, silent, silent])
    for t in (2, 3):
        assert torch.equal(out[t], clt.layers[t].b_dec.detach()[None])
    for t in (0, 1):
        want = clt.layers[t].b_dec.detach() + 1.5 * clt.layers[0].W_dec.detach()[3, t]
        torch.testing.assert_close(out[t], want[None])


def test_forward_encodes_each_layer_and_reports_per_layer_fvu() -> None:
    clt = make_clt(3, 2).eval()
    randomize(clt, seed=2)
    gen = torch.Generator().manual_seed(3)
    xs = [torch.randn(20, 3, generator=gen) for _ in range(3)]
    ys = [torch.randn(20, 3, generator=gen) for _ in range(3)]
    out = clt(xs, ys)
    dense = []
    for layer, x in zip(clt.layers, xs, strict=True):
        pre = x @ layer.W_enc.detach().T + layer.b_enc.detach()
        kth = pre.sort(dim=1, descending=True).values[:, 1:2]
        dense.append(torch.where(pre >= kth, pre.relu(), torch.zeros_like(pre)))
    for c, d in zip(out.codes, dense, strict=True):
        torch.testing.assert_close(c.to_dense(), d)
    want = hand_decode(clt, dense, 2)
    for r, w in zip(out.reconstruction, want, strict=True):
        torch.testing.assert_close(r, w, atol=1e-5, rtol=0)
    per_layer = torch.stack([fvu(y, w) for y, w in zip(ys, want, strict=True)])
    torch.testing.assert_close(out.fvu_per_layer, per_layer)
    assert out.fvu.item() == pytest.approx(per_layer.sum().item(), rel=1e-6)
    assert out.l0_per_layer.tolist() == [(d != 0).sum(1).float().mean().item() for d in dense]
    assert out.loss.item() == pytest.approx(out.fvu.item())  # eval: no AuxK, TopK: no penalty


def test_window_of_one_equals_independent_per_layer_transcoders() -> None:
    clt = make_clt(3, 1, skip_connection=True, activation="batchtopk").train()
    randomize(clt, seed=4)
    gen = torch.Generator().manual_seed(5)
    xs = [torch.randn(16, 3, generator=gen) for _ in range(3)]
    ys = [torch.randn(16, 3, generator=gen) for _ in range(3)]
    out = clt(xs, ys)
    for layer, x, y, r in zip(clt.layers, xs, ys, out.reconstruction, strict=True):
        tc_cfg = SparseCoderConfig(
            kind="transcoder", activation="batchtopk", d_in=3, num_latents=5, k=2,
            skip_connection=True,
        )  # fmt: skip
        tc = SparseCoder(tc_cfg).train()
        with torch.no_grad():
            tc.W_enc.copy_(layer.W_enc)
            tc.b_enc.copy_(layer.b_enc)
            tc.W_dec.copy_(layer.W_dec[:, 0])
            tc.b_dec.copy_(layer.b_dec)
            assert tc.W_skip is not None and layer.W_skip is not None
            tc.W_skip.copy_(layer.W_skip)
        torch.testing.assert_close(tc(x, y).reconstruction, r)


def test_decoder_norm_spans_the_whole_window() -> None:
    clt = make_clt(3, 0, normalize_decoder=True)
    for layer in clt.layers:
        torch.testing.assert_close(layer.W_dec.flatten(1).norm(dim=1), torch.ones(5))
        with torch.no_grad():
            layer.W_dec.mul_(3.0)
        layer.W_dec.grad = torch.randn(layer.W_dec.shape)
    clt.set_decoder_norm_to_unit_norm()
    clt.remove_gradient_parallel_to_decoder_directions()
    for layer in clt.layers:
        w = layer.W_dec.detach().flatten(1)
        torch.testing.assert_close(w.norm(dim=1), torch.ones(5))
        g = layer.W_dec.grad.flatten(1)
        torch.testing.assert_close((g * w).sum(1), torch.zeros(5), atol=1e-6, rtol=0)


def test_training_step_reaches_every_parameter() -> None:
    clt = make_clt(
        3,
        2,
        skip_connection=True,
        activation="jumprelu",
        sparsity_coeff=0.1,
        jumprelu_bandwidth=0.5,
    )
    randomize(clt, seed=6)
    with torch.no_grad():
        for layer in clt.layers:
            layer.activation.log_threshold.fill_(-1.0)
    xs = [torch.randn(32, 3) for _ in range(3)]
    out = clt.train()(xs, [torch.randn(32, 3) for _ in range(3)])
    out.loss.backward()
    missing = [n for n, p in clt.named_parameters() if p.grad is None or not p.grad.any()]
    assert missing == []
    assert out.sparsity.item() > 0


def test_dead_counters_and_auxk_by_hand() -> None:
    clt = make_clt(2, 0, aux_k=2, dead_tokens_threshold=4).train()
    randomize(clt, seed=7)
    with torch.no_grad():
        clt.layers[0].num_tokens_since_fired.copy_(torch.tensor([4, 0, 0, 0, 0]))
        clt.layers[1].num_tokens_since_fired.copy_(torch.tensor([0, 0, 4, 4, 0]))
    gen = torch.Generator().manual_seed(8)
    xs = [torch.randn(6, 3, generator=gen) for _ in range(2)]
    ys = [torch.randn(6, 3, generator=gen) for _ in range(2)]
    out = clt(xs, ys)
    pres = [
        x @ layer.W_enc.detach().T + layer.b_enc.detach()
        for layer, x in zip(clt.layers, xs, strict=True)
    ]
    # Layer 0: its one dead latent (0) writes to targets 0 and 1; layer 1: both dead latents
    # (2 and 3, aux_k = 2) write to target 1.
    w0, w1 = clt.layers[0].W_dec.detach(), clt.layers[1].W_dec.detach()
    a0 = pres[0][:, 0:1].clamp_min(0)
    a12, a13 = pres[1][:, 2:3].clamp_min(0), pres[1][:, 3:4].clamp_min(0)
    e_hat = [a0 * w0[0, 0], a0 * w0[0, 1] + a12 * w1[2, 0] + a13 * w1[3, 0]]
    total = 0.0
    for t in range(2):
        residual = ys[t] - out.reconstruction[t].detach()
        sst = (ys[t] - ys[t].mean(0)).pow(2).sum()
        total += ((e_hat[t] - residual).pow(2).sum() / sst).item()
    scale = 3 / (2 * 2)  # 3 dead latents, aux_k = 2 per layer, 2 layers
    assert out.auxk.item() == pytest.approx(scale * total, rel=1e-5)
    fired = [set(c.indices[c.values != 0].tolist()) for c in out.codes]
    for layer, f in zip(clt.layers, fired, strict=True):
        counter = layer.num_tokens_since_fired  # updated in place by the forward
        assert all(counter[i] == 0 for i in f)
        assert all(counter[i] >= 6 for i in range(5) if i not in f)


def test_mean_norm_per_layer() -> None:
    clt = make_clt(2, 0, normalize_activations="mean_norm")
    gen = torch.Generator().manual_seed(9)
    xs = [torch.randn(40, 3, generator=gen) * 5, torch.randn(40, 3, generator=gen)]
    ys = [torch.randn(40, 3, generator=gen) * 0.1, torch.randn(40, 3, generator=gen) * 2]
    clt.init_from_data(xs, ys)
    for layer, x, y in zip(clt.layers, xs, ys, strict=True):
        assert (x * layer.input_scale).norm(dim=1).mean().item() == pytest.approx(3**0.5, rel=1e-5)
        assert (y * layer.output_scale).norm(dim=1).mean().item() == pytest.approx(3**0.5, rel=1e-5)
    randomize(clt, seed=10)
    codes = clt.encode(xs)
    dense = [c.to_dense() for c in codes]
    want = hand_decode(clt, dense, 2)
    for layer, got, w in zip(clt.layers, clt.decode(codes), want, strict=True):
        torch.testing.assert_close(got, w / layer.output_scale)


def test_errors() -> None:
    clt = make_clt(2, 0, skip_connection=True)
    x = torch.zeros(4, 3)
    with pytest.raises(ValueError, match="xs: expected 2 layers, got 1"):
        clt([x], [x, x])
    with pytest.raises(ValueError, match=r"ys\[1\] must be \[N, 3\], got \(4, 2\)"):
        clt([x, x], [x, torch.zeros(4, 2)])
    with pytest.raises(ValueError, match=r"xs\[1\] has 5 rows"):
        clt([x, torch.zeros(5, 3)], [x, x])
    with pytest.raises(ValueError, match="skip connections; pass xs"):
        clt.decode(clt.encode([x, x]))
    with pytest.raises(ValueError, match="needs kind='clt'"):
        CrossLayerTranscoder(SparseCoderConfig(d_in=3))
    with pytest.raises(ValueError, match="n_layers not set"):
        CrossLayerTranscoder(SparseCoderConfig(kind="clt", d_in=3))


def test_layer_by_layer_encode_decode_matches_full_decode() -> None:
    """encode_layer/decode_layer (used when a model runs layer by layer) equal encode/decode."""
    torch.manual_seed(3)
    cfg = SparseCoderConfig(
        kind="clt", d_in=6, num_latents=10, k=3, n_layers=4, n_targets=2, skip_connection=True
    )
    clt = CrossLayerTranscoder(cfg)
    with torch.no_grad():
        for layer in clt.layers:
            layer.W_dec.normal_()
            layer.b_dec.normal_()
            layer.W_skip.normal_()  # type: ignore[union-attr]
    xs = [torch.randn(5, 6) for _ in range(4)]
    full = clt.decode(clt.encode(xs), xs)
    codes = {}
    for t in range(4):
        codes[t] = clt.encode_layer(t, xs[t])
        torch.testing.assert_close(clt.decode_layer(t, codes, xs[t]), full[t])
    with pytest.raises(KeyError, match="source layer 0"):
        clt.decode_layer(1, {1: codes[1]}, xs[1])


def test_sparse_encoder_backward_equals_the_dense_one() -> None:
    """CLT training gradients (with AuxK on dead latents) through the sparse encoder backward
    against the same forward through dense pre-activations."""
    gen = torch.Generator().manual_seed(2)
    xs = [torch.randn(9, 3, generator=gen, dtype=torch.float64) for _ in range(3)]
    ys = [torch.randn(9, 3, generator=gen, dtype=torch.float64) for _ in range(3)]
    results = []
    for sparse in (True, False):
        clt = make_clt(3, 2, num_latents=12, aux_k=3, aux_k_coeff=0.5, dead_tokens_threshold=4)
        clt = clt.double().train()
        randomize(clt, seed=3)
        for layer in clt.layers:
            with torch.no_grad():
                layer.num_tokens_since_fired[1::2] = 10
            layer.activation.sparse_backward = sparse
        clt(xs, ys).loss.backward()
        results.append({n: p.grad.clone() for n, p in clt.named_parameters() if p.grad is not None})
    assert results[0].keys() == results[1].keys()
    for name, want in results[1].items():
        assert want.abs().sum() > 0, name
        torch.testing.assert_close(results[0][name], want, rtol=1e-9, atol=1e-12)
