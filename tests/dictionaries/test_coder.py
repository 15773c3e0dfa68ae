"""SparseCoder (SAE / transcoder): maps and losses against dense references and hand values,
init, decoder-norm upkeep, dead latents and AuxK, input checks."""

from __future__ import annotations

import math

import pytest
import torch

from vlmscope.dictionaries.activations import SparseCodes
from vlmscope.dictionaries.coder import (
    NonFiniteError,
    SparseCoder,
    check_finite,
    choose_centring,
    fvu,
    remove_parallel_grad_,
    update_dead_counter_,
)
from vlmscope.dictionaries.config import SparseCoderConfig


def randomize(coder: SparseCoder, seed: int = 0) -> None:
    """Non-trivial values for every parameter, so no term can hide behind a zero."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in coder.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)


def dense_topk_reference(coder: SparseCoder, x: torch.Tensor) -> torch.Tensor:
    """Reconstruction computed densely from the formulas in coder.py's docstring."""
    k = coder.cfg.k
    inp = x - coder.b_dec if coder.cfg.kind == "sae" else x
    pre = inp @ coder.W_enc.T + coder.b_enc
    kth = pre.sort(dim=1, descending=True).values[:, k - 1 : k]
    acts = torch.where(pre >= kth, pre.relu(), torch.zeros_like(pre))
    out = acts @ coder.W_dec + coder.b_dec
    if coder.W_skip is not None:
        out = out + x @ coder.W_skip.T
    return out


@pytest.mark.parametrize("kind", ["sae", "transcoder"])
def test_forward_matches_dense_reference_in_values_and_gradients(kind: str) -> None:
    skip = kind == "transcoder"
    cfg = SparseCoderConfig(kind=kind, d_in=6, num_latents=20, k=3, skip_connection=skip)
    coder = SparseCoder(cfg).eval()
    randomize(coder)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(10, 6, generator=gen)
    y = torch.randn(10, 6, generator=gen) if kind == "transcoder" else None
    target = x if y is None else y

    out = coder(x, y)
    want = dense_topk_reference(coder, x)
    torch.testing.assert_close(out.reconstruction, want, atol=1e-5, rtol=0)
    torch.testing.assert_close(coder.decode(coder.encode(x), x), want, atol=1e-5, rtol=0)
    assert out.l0.item() <= 3

    out.fvu.backward()
    sparse_grads = {n: p.grad.clone() for n, p in coder.named_parameters() if p.grad is not None}
    coder.zero_grad()
    fvu(target, dense_topk_reference(coder, x)).backward()
    dense_grads = {n: p.grad for n, p in coder.named_parameters() if p.grad is not None}
    assert sparse_grads.keys() == dense_grads.keys() == dict(coder.named_parameters()).keys()
    for name, grad in dense_grads.items():
        torch.testing.assert_close(sparse_grads[name], grad, atol=1e-5, rtol=0, msg=name)


def test_fvu_by_hand() -> None:
    target = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    recon = torch.tensor([[1.0, 3.0], [2.0, 4.0]])
    # SSE = 1 + 1; the mean is [2, 3], so SST = 1 + 1 + 1 + 1.
    assert fvu(target, recon).item() == pytest.approx(0.5)


def test_fvu_of_exact_reconstruction_is_zero() -> None:
    # Encoder rows [I; -I] and decoder rows [I; -I] with k = d: each coordinate is carried by
    # exactly one of +e_i, -e_i (the positive one), so the reconstruction is exact.
    d = 4
    cfg = SparseCoderConfig(d_in=d, num_latents=2 * d, k=d)
    coder = SparseCoder(cfg)
    eye = torch.eye(d)
    with torch.no_grad():
        coder.W_enc.copy_(torch.cat([eye, -eye]))
        coder.W_dec.copy_(torch.cat([eye, -eye]))
        coder.b_enc.zero_()
        coder.b_dec.zero_()
    x = torch.randn(32, d, generator=torch.Generator().manual_seed(0))
    out = coder(x)
    assert torch.equal(out.reconstruction, x)
    assert out.fvu.item() == 0.0
    assert out.l0.item() == d


def test_fvu_of_predicting_the_mean_is_one() -> None:
    cfg = SparseCoderConfig(kind="transcoder", d_in=5, d_out=3, num_latents=10, k=2)
    coder = SparseCoder(cfg)
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 5, generator=gen), torch.randn(64, 3, generator=gen) * 3 + 1
    coder.init_from_data(x, y)  # b_dec = mean of y
    with torch.no_grad():
        coder.W_dec.zero_()  # the output is b_dec alone
    out = coder(x, y)
    torch.testing.assert_close(out.reconstruction, y.mean(0).expand(64, 3))
    assert out.fvu.item() == pytest.approx(1.0, abs=1e-6)


def test_sae_init_ties_encoder_to_decoder_with_unit_rows() -> None:
    coder = SparseCoder(SparseCoderConfig(d_in=8, num_latents=32, k=4))
    assert torch.equal(coder.W_enc, coder.W_dec)
    torch.testing.assert_close(coder.W_dec.norm(dim=1), torch.ones(32))
    x = torch.randn(100, 8) + 5
    coder.init_from_data(x)
    torch.testing.assert_close(coder.b_dec.detach(), x.mean(0))


def test_sae_init_fits_the_least_squares_encoder_scale() -> None:
    """After init_from_data the reconstruction of the centred sample is its least-squares
    multiple, so the residual is orthogonal to it (<xc - r, r> = 0 is the optimum of
    |xc - s r1|^2 over s), and the pre-activations are centred on the sample."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(256, 16, generator=gen) * torch.linspace(0.5, 2.0, 16) + 3
    torch.manual_seed(1)
    sae = SparseCoder(SparseCoderConfig(d_in=16, num_latents=64, k=4))
    sae.init_from_data(x)
    xc = x - sae.b_dec.detach()
    pre = xc @ sae.W_enc.detach().T + sae.b_enc.detach()
    torch.testing.assert_close(pre.mean(0), torch.zeros(64), atol=1e-5, rtol=0)
    assert sae.W_enc.detach().norm(dim=1).max() < 0.9  # shrunk: unit rows overshoot
    r = sae(x).reconstruction.detach() - sae.b_dec.detach()
    cos = float((xc - r).mul(r).sum() / (xc.norm() * r.norm()))
    assert abs(cos) < 1e-5


def _rows_alike_and_mixed(gen: torch.Generator, d: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows around one large mean, alike in norm (like text tokens of a residual stream), and
    the same rows mixed with rows 20x shorter (like a stream that also holds image tokens)."""
    mean = torch.zeros(d)
    mean[0] = 6.0
    alike = mean + torch.randn(1024, d, generator=gen)
    short = 0.3 * torch.randn(512, d, generator=gen)
    return alike, torch.cat([alike[:512], short])


def _topk_overlap(pre: torch.Tensor, k: int) -> float:
    """Mean share of top-k latents two rows have in common (1: every row picks the same)."""
    hot = torch.zeros_like(pre).scatter_(1, pre.topk(k, dim=1).indices, 1.0)
    return float((hot @ hot.T).mean() / k)


def test_init_centres_alike_rows_and_not_short_ones() -> None:
    """The init removes the mean from rows that share it, so their top-k is not the mean's
    for all; on a mix with much shorter rows, full centring would map every short row to about
    -mean and give them one shared top-k, and the init removes less of it."""
    gen = torch.Generator().manual_seed(0)
    alike, mixed = _rows_alike_and_mixed(gen)
    W = torch.randn(256, 32, generator=gen)
    W = W / W.norm(dim=1, keepdim=True)
    k = 8
    assert choose_centring(W, alike, alike.mean(0), k) == 1.0
    assert _topk_overlap(alike @ W.T, k) > 2 * _topk_overlap((alike - alike.mean(0)) @ W.T, k)
    share = choose_centring(W, mixed, mixed.mean(0), k)
    assert share < 1.0
    short = mixed[512:]
    assert _topk_overlap((short - mixed.mean(0)) @ W.T, k) > 2 * _topk_overlap(
        (short - share * mixed.mean(0)) @ W.T, k
    )
    assert choose_centring(W, mixed, mixed.mean(0), None) == 1.0  # no k (JumpReLU): centred


@pytest.mark.parametrize("kind", ["sae", "transcoder"])
def test_init_pre_activations_remove_the_chosen_share_of_the_mean(kind: str) -> None:
    """After init_from_data a transcoder's pre-activations are W_enc (x - a mean(x)) with a
    the share `choose_centring` picks; an SAE's stay fully centred (a = 1, through b_dec and
    b_enc) on the same rows, where the share picked would be less."""
    gen = torch.Generator().manual_seed(1)
    _, x = _rows_alike_and_mixed(gen)
    torch.manual_seed(2)
    coder = SparseCoder(SparseCoderConfig(kind=kind, d_in=32, num_latents=256, k=8))
    share = choose_centring(coder.W_enc.detach(), x, x.mean(0), 8)  # before: SAE rescales W_enc
    assert share < 1.0
    coder.init_from_data(x, x if kind == "transcoder" else None)
    W, b = coder.W_enc.detach(), coder.b_enc.detach()
    inp = x - coder.b_dec.detach() if kind == "sae" else x
    want = x - (1.0 if kind == "sae" else share) * x.mean(0)
    torch.testing.assert_close(inp @ W.T + b, want @ W.T, atol=1e-4, rtol=1e-4)


def test_transcoder_init_solves_the_ridge_decoder_of_its_first_codes() -> None:
    """init_from_data sets a transcoder's decoder to the ridge least-squares map from the
    sample's codes to its centred target, (C^T C + r I)^-1 C^T t in the primal form solved here
    by hand in float64 (the init solves the dual), r the mean squared code norm; it beats the
    zero decoder on the sample, and latents that did not fire keep zero rows."""
    cfg = SparseCoderConfig(kind="transcoder", d_in=12, d_out=6, num_latents=96, k=4)
    coder = SparseCoder(cfg)
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(80, 12, generator=gen)
    y = torch.tanh(x @ torch.randn(12, 6, generator=gen)) + 2
    coder.init_from_data(x, y)
    c = coder.encode(x).to_dense().double()  # the codes the init read (no normalisation)
    t = y.double() - coder.b_dec.detach().double()
    ridge = (c * c).sum(1).mean()
    want = torch.linalg.solve(c.T @ c + ridge * torch.eye(96, dtype=torch.float64), c.T @ t)
    torch.testing.assert_close(coder.W_dec.detach().double(), want, atol=2e-5, rtol=1e-4)
    silent = c.abs().sum(0) == 0
    assert silent.any() and (coder.W_dec.detach()[silent] == 0).all()
    assert coder(x, y).fvu.item() < 0.9 * fvu(t, torch.zeros_like(t)).item()


def test_transcoder_init() -> None:
    cfg = SparseCoderConfig(kind="transcoder", d_in=8, d_out=4, num_latents=32, k=4)
    coder = SparseCoder(cfg)
    torch.testing.assert_close(coder.W_enc.norm(dim=1), torch.ones(32))
    assert (coder.W_dec == 0).all()
    normed = SparseCoder(SparseCoderConfig(**{**cfg.to_dict(), "normalize_decoder": True}))
    torch.testing.assert_close(normed.W_dec.norm(dim=1), torch.ones(32))


def test_mean_norm_scales_inputs_and_returns_caller_units() -> None:
    cfg = SparseCoderConfig(
        kind="transcoder", d_in=6, d_out=4, num_latents=16, k=3, normalize_activations="mean_norm"
    )
    coder = SparseCoder(cfg)
    gen = torch.Generator().manual_seed(3)
    x, y = torch.randn(50, 6, generator=gen) * 7, torch.randn(50, 4, generator=gen) * 0.2
    with pytest.raises(RuntimeError, match="call init_from_data"):
        coder(x, y)
    coder.init_from_data(x, y)
    s_in, s_out = coder.input_scale.item(), coder.output_scale.item()
    assert (x * s_in).norm(dim=1).mean().item() == pytest.approx(math.sqrt(6), rel=1e-5)
    assert (y * s_out).norm(dim=1).mean().item() == pytest.approx(math.sqrt(4), rel=1e-5)
    randomize(coder, seed=4)
    pre = coder.pre_activations(x)
    torch.testing.assert_close(pre, (x * s_in) @ coder.W_enc.T + coder.b_enc)
    codes = coder.encode(x)
    want = (codes.to_dense() @ coder.W_dec + coder.b_dec) / s_out
    torch.testing.assert_close(coder.decode(codes), want)
    out = coder(x, y)
    torch.testing.assert_close(out.reconstruction, want)
    # The loss lives in the normalised space; FVU is a ratio, so it equals the raw-unit FVU.
    assert out.fvu.item() == pytest.approx(fvu(y, want).item(), rel=1e-5)
    # The scales are read from the device once per value (each read is a host sync on a GPU),
    # and again once they change in place: an unset scale loaded later is still refused.
    reads = []
    real = torch.Tensor.__bool__

    def counted(t: torch.Tensor) -> bool:
        reads.append(t.numel())
        return real(t)

    coder.check_inputs = False  # its NaN check of x and y reads too (a trainer's source checks)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.Tensor, "__bool__", counted)
        coder(x, y)
        assert reads == []  # both scales were read by the forwards above
        with torch.no_grad():
            coder.output_scale.fill_(0.0)
        with pytest.raises(RuntimeError, match="call init_from_data"):
            coder(x, y)


def test_decoder_norm_helpers() -> None:
    coder = SparseCoder(SparseCoderConfig(d_in=5, num_latents=12, k=2))
    with torch.no_grad():
        coder.W_dec.mul_(torch.linspace(0.5, 3.0, 12)[:, None])
    directions = coder.W_dec.detach() / coder.W_dec.detach().norm(dim=1, keepdim=True)
    coder.set_decoder_norm_to_unit_norm()
    torch.testing.assert_close(coder.W_dec.norm(dim=1), torch.ones(12))
    torch.testing.assert_close(coder.W_dec.detach(), directions)

    grad = torch.randn(12, 5)
    coder.W_dec.grad = grad.clone()
    coder.remove_gradient_parallel_to_decoder_directions()
    w = coder.W_dec.detach()
    want = grad - (grad * w).sum(dim=1, keepdim=True) * w
    torch.testing.assert_close(coder.W_dec.grad, want)
    torch.testing.assert_close(
        (coder.W_dec.grad * w).sum(dim=1), torch.zeros(12), atol=1e-6, rtol=0
    )


def test_parallel_gradient_removed_along_rows_of_any_norm() -> None:
    """Rows not at unit norm (an Adam step moved them, or a caller's own weights): the
    component along each row's direction goes, whatever its length; a zero row, which has no
    direction, keeps its gradient."""
    gen = torch.Generator().manual_seed(3)
    w = (
        torch.randn(6, 2, 4, generator=gen)
        * torch.tensor([0.1, 1.0, 7.0, 0.5, 2.0, 0.0])[:, None, None]
    )
    weight = torch.nn.Parameter(w.clone())
    grad = torch.randn(6, 2, 4, generator=gen)
    weight.grad = grad.clone()
    remove_parallel_grad_(weight)
    rows, g = w.flatten(1), grad.flatten(1)
    unit = rows / rows.norm(dim=1, keepdim=True).clamp_min(1e-12)
    want = g - (g * unit).sum(dim=1, keepdim=True) * unit
    torch.testing.assert_close(weight.grad.flatten(1), want)
    assert torch.equal(weight.grad[5], grad[5])


def train_steps(coder: SparseCoder, steps: int, renorm: bool, seed: int = 0) -> list[float]:
    """Trainer-style loop; returns max |row norm - 1| of the decoder after each step."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(coder.parameters(), lr=1e-2)
    deviations = []
    for _ in range(steps):
        out = coder(torch.randn(64, coder.cfg.d_in, generator=gen))
        opt.zero_grad()
        out.loss.backward()
        if renorm:
            coder.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        if renorm:
            coder.set_decoder_norm_to_unit_norm()
        deviations.append((coder.W_dec.norm(dim=1) - 1).abs().max().item())
    return deviations


def test_decoder_stays_unit_norm_during_training_and_drifts_without_upkeep() -> None:
    cfg = SparseCoderConfig(d_in=8, num_latents=32, k=4)
    torch.manual_seed(0)
    kept = train_steps(SparseCoder(cfg), 20, renorm=True)
    torch.manual_seed(0)
    drifted = train_steps(SparseCoder(cfg), 20, renorm=False)
    assert max(kept) < 1e-5
    assert drifted[-1] > 0.01


def test_dead_latent_counter_by_hand() -> None:
    cfg = SparseCoderConfig(d_in=4, num_latents=6, k=1, dead_tokens_threshold=5, aux_k_coeff=0.0)
    coder = SparseCoder(cfg).train()
    with torch.no_grad():
        coder.W_enc.copy_(torch.cat([torch.eye(4), -torch.eye(4)[:2]]))
        coder.b_enc.fill_(-1.0)
        coder.b_dec.zero_()
    x = torch.tensor(
        [[2.0, 0.0, 0.0, 0.0], [0.0, 0.0, 3.0, 0.0], [-4.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.5]]
    )
    out = coder(x)
    # Rows 0-2 fire latents 0, 2 and 4 (the -e_0 row); row 3's best pre-activation is
    # 0.5 - 1 < 0 (latent 3), kept by TopK with value 0: that is not firing.
    assert out.codes.indices[3].tolist() == [3] and out.codes.values[3].tolist() == [0.0]
    assert coder.num_tokens_since_fired.tolist() == [0, 4, 0, 4, 0, 4]
    coder(x[:1])
    assert coder.num_tokens_since_fired.tolist() == [0, 5, 1, 5, 1, 5]
    assert coder.dead_mask().tolist() == [False, True, False, True, False, True]
    coder.eval()(x)  # eval does not count
    assert coder.num_tokens_since_fired.tolist() == [0, 5, 1, 5, 1, 5]
    # Codes with int32 indices (a caller's own) count the same way.
    codes = SparseCodes(torch.tensor([[1.0, 0.0]]), torch.tensor([[1, 3]], dtype=torch.int32), 6)
    update_dead_counter_(coder.num_tokens_since_fired, codes, 2)
    assert coder.num_tokens_since_fired.tolist() == [2, 0, 3, 7, 3, 7]


def test_auxk_loss_by_hand() -> None:
    # Two dead latents and aux_k = 3: both are used, and the loss is scaled by 2 / 3.
    cfg = SparseCoderConfig(d_in=3, num_latents=6, k=1, aux_k=3, dead_tokens_threshold=10)
    coder = SparseCoder(cfg).train()
    randomize(coder, seed=5)
    with torch.no_grad():
        coder.num_tokens_since_fired.copy_(torch.tensor([0, 10, 10, 0, 0, 0]))
    x = torch.randn(8, 3, generator=torch.Generator().manual_seed(6))
    out = coder(x)
    pre = (x - coder.b_dec) @ coder.W_enc.T + coder.b_enc
    residual = x - out.reconstruction
    e_hat = pre[:, 1:2].clamp_min(0) * coder.W_dec[1] + pre[:, 2:3].clamp_min(0) * coder.W_dec[2]
    assert (pre[:, 1:3] > 0).any()
    sst = (x - x.mean(0)).pow(2).sum()
    want = 2 / 3 * (e_hat - residual).pow(2).sum() / sst
    assert out.auxk.item() == pytest.approx(want.item(), rel=1e-5)
    assert out.loss.item() == pytest.approx(out.fvu.item() + cfg.aux_k_coeff * out.auxk.item())
    assert coder.eval()(x).auxk.item() == 0.0


def _sparse_features(gen: torch.Generator, n: int, feats: torch.Tensor) -> torch.Tensor:
    active = (torch.rand(n, feats.shape[0], generator=gen) < 4 / feats.shape[0]).float()
    return (active * (torch.rand(n, feats.shape[0], generator=gen) + 0.5)) @ feats


def _dead_fraction_after_training(aux_k_coeff: float) -> float:
    """Train a TopK SAE with a high learning rate on sparse combinations of 1024 random
    directions in R^32 (more than its 512 latents can cover, so the residual keeps structure
    for revived latents to learn); return the fraction of latents that never fire on 4096
    fresh samples."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    feats = torch.randn(1024, 32, generator=gen)
    feats /= feats.norm(dim=1, keepdim=True)
    cfg = SparseCoderConfig(
        d_in=32, num_latents=512, k=4, aux_k=16, aux_k_coeff=aux_k_coeff, dead_tokens_threshold=2560
    )
    sae = SparseCoder(cfg)
    sae.init_from_data(_sparse_features(gen, 2048, feats))
    opt = torch.optim.Adam(sae.parameters(), lr=3e-2)
    for _ in range(100):
        out = sae(_sparse_features(gen, 256, feats))
        opt.zero_grad()
        out.loss.backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        sae.set_decoder_norm_to_unit_norm()
    with torch.no_grad():
        codes = sae.eval().encode(_sparse_features(gen, 4096, feats))
    fired = torch.zeros(512, dtype=torch.bool)
    fired[codes.indices[codes.values > 0]] = True
    return 1.0 - fired.float().mean().item()


def test_auxk_reduces_dead_latents() -> None:
    without = _dead_fraction_after_training(0.0)
    with_auxk = _dead_fraction_after_training(1 / 32)
    # Measured with seeds 0-5 in place of 0: 0.44-0.47 dead without AuxK, 0.23-0.31 with it.
    assert without > 0.35, "the setting must kill latents for the comparison to mean anything"
    assert with_auxk < without - 0.08


def test_jumprelu_loss_includes_the_l0_penalty() -> None:
    cfg = SparseCoderConfig(
        d_in=4, num_latents=8, activation="jumprelu", sparsity_coeff=0.1, jumprelu_bandwidth=0.1
    )
    coder = SparseCoder(cfg).train()
    x = torch.randn(16, 4, generator=torch.Generator().manual_seed(0))
    out = coder(x)
    pre = (x - coder.b_dec) @ coder.W_enc.T + coder.b_enc
    l0 = (pre > cfg.jumprelu_init_threshold).sum(1).float().mean().item()
    assert out.sparsity.item() == pytest.approx(l0)
    assert out.l0.item() == pytest.approx(l0)
    assert out.auxk.item() == 0.0  # nothing is dead yet
    assert out.loss.item() == pytest.approx(out.fvu.item() + 0.1 * l0)


def test_non_finite_inputs_raise() -> None:
    coder = SparseCoder(SparseCoderConfig(kind="transcoder", d_in=4, num_latents=8, k=2))
    x, y = torch.randn(3, 4), torch.randn(3, 4)
    bad = x.clone()
    bad[0, 1], bad[2, 2] = float("nan"), float("inf")
    with pytest.raises(NonFiniteError, match=r"^x has 1 NaN and 1 Inf values"):
        coder(bad, y)
    bad_y = y.clone()
    bad_y[1, 0] = float("-inf")
    with pytest.raises(NonFiniteError, match=r"^y has 0 NaN and 1 Inf values"):
        coder(x, bad_y)
    with pytest.raises(ValueError, match="init_from_data x"):
        coder.init_from_data(bad, y)
    coder.check_inputs = False  # the trainer may opt out of the per-step sync
    assert torch.isnan(coder(bad, y).reconstruction).any()
    check_finite("fine", x)
    # finite entries whose sum overflows are fine; +Inf and -Inf that cancel to NaN are not
    check_finite("large", torch.full((4, 4), 3e38))
    opposite = torch.tensor([float("inf"), float("-inf"), 1.0])
    with pytest.raises(NonFiniteError, match=r"^both has 0 NaN and 2 Inf values"):
        check_finite("both", opposite)


def test_shape_and_argument_errors() -> None:
    sae = SparseCoder(SparseCoderConfig(d_in=8, num_latents=16, k=2))
    with pytest.raises(ValueError, match=r"x must be \[N, 8\], got \(4, 7\)"):
        sae(torch.zeros(4, 7))
    with pytest.raises(ValueError, match="do not pass y"):
        sae(torch.zeros(4, 8), torch.zeros(4, 8))
    tc = SparseCoder(
        SparseCoderConfig(
            kind="transcoder", d_in=8, d_out=3, num_latents=16, k=2, skip_connection=True
        )
    )
    with pytest.raises(ValueError, match="needs the target y"):
        tc(torch.zeros(4, 8))
    with pytest.raises(ValueError, match=r"y must be \[N, 3\], got \(4, 8\)"):
        tc(torch.zeros(4, 8), torch.zeros(4, 8))
    with pytest.raises(ValueError, match="4 rows but y has 5"):
        tc(torch.zeros(4, 8), torch.zeros(5, 3))
    with pytest.raises(ValueError, match="skip connection; pass x"):
        tc.decode(tc.encode(torch.zeros(4, 8)))
    with pytest.raises(ValueError, match="use CrossLayerTranscoder"):
        SparseCoder(SparseCoderConfig(kind="clt", d_in=4, n_layers=2))
    with pytest.raises(ValueError, match="d_in not set"):
        SparseCoder(SparseCoderConfig())


def _train_grads(coder: torch.nn.Module, *args: torch.Tensor) -> dict[str, torch.Tensor]:
    coder.zero_grad(set_to_none=True)
    coder(*args).loss.backward()
    return {name: p.grad.clone() for name, p in coder.named_parameters() if p.grad is not None}


@pytest.mark.parametrize(
    ("kind", "activation"), [("sae", "topk"), ("sae", "batchtopk"), ("transcoder", "topk")]
)
def test_sparse_encoder_backward_equals_the_dense_one(kind: str, activation: str) -> None:
    """The training forward's sparse encoder gradient (no dense pre in autograd) against the
    same forward through the dense pre-activations, with AuxK on (dead latents) so its
    gathered entries carry gradient too."""
    cfg = SparseCoderConfig(
        kind=kind, activation=activation, d_in=6, num_latents=24, k=3, aux_k=4,
        dead_tokens_threshold=5, aux_k_coeff=0.5, skip_connection=kind == "transcoder",
    )  # fmt: skip
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(10, 6, generator=gen, dtype=torch.float64)
    y = None if kind == "sae" else torch.randn(10, 6, generator=gen, dtype=torch.float64)
    args = (x,) if y is None else (x, y)
    results = []
    for sparse in (True, False):
        coder = SparseCoder(cfg, dtype=torch.float64).train()
        randomize(coder, seed=9)
        coder.double()
        with torch.no_grad():
            coder.num_tokens_since_fired[::2] = 10  # half the latents are dead
        if not sparse:
            coder.activation.sparse_backward = False  # instance override: the dense path
        if activation == "batchtopk":
            coder.activation.track_statistics = False
        results.append(_train_grads(coder, *args))
    sparse_grads, dense_grads = results
    assert sparse_grads.keys() == dense_grads.keys() >= {"W_enc", "b_enc", "W_dec", "b_dec"}
    for name, want in dense_grads.items():
        assert want.abs().sum() > 0, name
        torch.testing.assert_close(sparse_grads[name], want, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize(
    ("kind", "activation"),
    [("sae", "topk"), ("transcoder", "topk"), ("transcoder", "jumprelu")],
)
def test_a_training_forward_without_rows_gives_every_parameter_a_zero_gradient(
    kind: str, activation: str
) -> None:
    """A data-parallel rank whose rows all failed trains on zero rows: DDP all-reduces a
    gradient bucket only once every parameter in it has one, so a parameter left without
    gradient (the encoder, before) stalls that rank while the others reduce."""
    cfg = SparseCoderConfig(kind=kind, activation=activation, d_in=6, num_latents=24, k=3,
                            sparsity_coeff=0.01 if activation == "jumprelu" else 0.0,
                            skip_connection=kind == "transcoder")  # fmt: skip
    coder = SparseCoder(cfg).train()
    randomize(coder)
    x = torch.zeros(0, 6)
    grads = _train_grads(coder, *((x,) if kind == "sae" else (x, torch.zeros(0, 6))))
    assert grads.keys() == {name for name, _ in coder.named_parameters()}
    for name, g in grads.items():
        assert not g.any(), name
