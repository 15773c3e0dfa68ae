"""ReplacementModel against the original model and hand-built dictionaries."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.conftest import random_image
from vlmscope.dictionaries import SparseCoderConfig
from vlmscope.models import zoo
from vlmscope.models.hooked import HookedVLM
from vlmscope.replacement.model import ReplacementModel
from vlmscope.training.bundle import DictionaryBundle, ModelMismatchError, mlp_out, resid_mid

_VLMS: dict[str, HookedVLM] = {}


def vlm_for(name: str, zoo_path: Any) -> HookedVLM:
    if name not in _VLMS:
        _VLMS[name] = HookedVLM.from_pretrained(zoo_path(name), device="cpu", dtype=torch.float32)
    return _VLMS[name]


def random_clt(
    vlm: HookedVLM,
    n_targets: int = 0,
    seed: int = 0,
    layers: Sequence[int] | None = None,
    **config: Any,
) -> DictionaryBundle:
    """A CLT with random (untrained) weights: reconstructions far from the truth. `layers`:
    the LM layers it covers (default: all), as `vlmscope train --layers` makes them; `config`:
    SparseCoderConfig fields other than the defaults here (expansion 2, TopK k = 4)."""
    torch.manual_seed(seed)
    a = vlm.adapter
    config = {"expansion_factor": 2, "k": 4, **config}
    cfg = SparseCoderConfig(kind="clt", n_targets=n_targets, **config)
    layers = list(range(a.n_layers)) if layers is None else list(layers)
    info = {"name": "test", "family": a.family, "dims": a.dims(), "tokens": "all", "layers": layers}
    b = DictionaryBundle.create(cfg, [resid_mid(i) for i in layers], [mlp_out(i) for i in layers],
                                a.d_model, a.d_model, info)  # fmt: skip
    with torch.no_grad():
        for layer in b.clt.layers:  # type: ignore[union-attr]
            layer.W_dec.normal_(0, 0.3)
            layer.b_dec.normal_(0, 0.1)
    return b


def inputs_for(vlm: HookedVLM, name: str) -> Any:
    if not zoo.spec(name).multimodal:
        return vlm.prepare(["what colour is the circle", "how many squares are there"])
    return vlm.prepare(
        ["what colour is the circle", "how many squares"],
        images=[[random_image(32, 40, 1)], [random_image(32, 32, 2), random_image(40, 32, 3)]],
    )


@pytest.mark.parametrize("name", zoo.names())
def test_error_terms_reproduce_the_original(name: str, zoo_path: Any) -> None:
    vlm = vlm_for(name, zoo_path)
    inputs = inputs_for(vlm, name)
    clean = vlm.forward(inputs).logits
    bundle = random_clt(vlm)
    replaced = ReplacementModel(vlm, bundle).forward(inputs).logits
    assert (replaced - clean).abs().max() > 1e-2  # the random CLT really changes the model
    exact = ReplacementModel(vlm, bundle, error_terms=True).forward(inputs).logits
    torch.testing.assert_close(exact, clean, atol=1e-5, rtol=0)


def test_replacement_equals_hand_spliced_forward(zoo_path: Any) -> None:
    """Layer by layer by hand: encode resid_mid of the replaced run, write the CLT sum."""
    vlm = vlm_for("llava", zoo_path)
    inputs = inputs_for(vlm, "llava")
    bundle = random_clt(vlm, n_targets=2)
    rm = ReplacementModel(vlm, bundle, replace_tokens="all")
    got = rm.forward(inputs).logits
    clt = bundle.clt
    assert clt is not None
    codes: dict[int, Any] = {}

    def read(i: int) -> Any:
        def fn(t: torch.Tensor, ctx: Any) -> None:
            codes[i] = clt.encode([t.reshape(-1, t.shape[-1])] * clt.n_layers)[
                i
            ]  # full encode, take layer i

        return fn

    def write(i: int) -> Any:
        def fn(t: torch.Tensor, ctx: Any) -> torch.Tensor:
            y = bundle.clt.b_dec[i].clone()  # type: ignore[union-attr]
            out = torch.zeros(t.reshape(-1, t.shape[-1]).shape) + y
            for s in range(i + 1):
                if i - s < clt.layers[s].n_out:
                    out = out + codes[s].to_dense() @ clt.layers[s].W_dec[:, i - s]
            return out.reshape(t.shape)

        return fn

    n = vlm.adapter.n_layers
    hooks = [(resid_mid(i), read(i)) for i in range(n)] + [(mlp_out(i), write(i)) for i in range(n)]
    pad = ~vlm.masks(inputs).valid
    ref = vlm.run_with_hooks(inputs, hooks).logits
    torch.testing.assert_close(got[~pad], ref[~pad], atol=1e-5, rtol=1e-5)


def test_trained_tokens_keep_special_tokens_original(zoo_path: Any) -> None:
    vlm = vlm_for("llava", zoo_path)
    inputs = inputs_for(vlm, "llava")
    bundle = random_clt(vlm)
    rm = ReplacementModel(vlm, bundle)  # trained on "all" minus special tokens
    _, cache = rm.run_with_cache(inputs, names="lm.blocks.0.mlp.hook_out")
    _, clean = vlm.run_with_cache(inputs, names="lm.blocks.0.mlp.hook_out")
    special = vlm.masks(inputs).special
    x, y = cache["lm.blocks.0.mlp.hook_out"], clean["lm.blocks.0.mlp.hook_out"]
    assert torch.equal(x[special], y[special])
    assert (x[~special] - y[~special]).abs().max() > 1e-2


def test_capture_features_records_active_latents(zoo_path: Any) -> None:
    vlm = vlm_for("llava", zoo_path)
    inputs = inputs_for(vlm, "llava")
    bundle = random_clt(vlm)
    rm = ReplacementModel(vlm, bundle)
    # The replaced run's own resid_mid (earlier layers' MLP outputs are reconstructions).
    _, cache = rm.run_with_cache(inputs, names=resid_mid(1), capture_features=True)
    feats = rm.last_features
    assert feats is not None
    t = feats.table()
    b, s = inputs["input_ids"].shape
    # TopK k=4 per token per layer: every (unit, batch, position) has at most 4 features.
    assert len(t["value"]) <= 4 * b * s * vlm.adapter.n_layers
    assert (t["value"] > 0).all()
    x = cache[resid_mid(1)][1, 5]
    with torch.no_grad():
        codes = bundle.clt.encode_layer(1, x[None])  # type: ignore[union-attr]
    sel = (t["unit"] == 1) & (t["batch"] == 1) & (t["position"] == 5)
    want = {
        int(i): float(v) for i, v in zip(codes.indices[0], codes.values[0], strict=True) if v > 0
    }
    got = {int(i): float(v) for i, v in zip(t["feature"][sel], t["value"][sel], strict=True)}
    assert got.keys() == want.keys()
    for k in got:
        assert abs(got[k] - want[k]) < 1e-5


def test_capture_features_only_at_replaced_positions(zoo_path: Any) -> None:
    """A padded batch: nothing recorded at padding or BOS (not replaced), and the records are
    exactly the active latents of the original residuals at the replaced positions."""
    vlm = vlm_for("llava", zoo_path)
    inputs = inputs_for(vlm, "llava")
    masks = vlm.masks(inputs)
    assert bool(masks.pad.any()) and bool(masks.special.any())
    bundle = random_clt(vlm)
    rm = ReplacementModel(vlm, bundle, error_terms=True)  # residuals stay the original's
    rm.forward(inputs, capture_features=True)
    t = rm.last_features.table()  # type: ignore[union-attr]
    keep = masks.valid & ~masks.special  # trained on all tokens but special ones
    assert bool(keep[t["batch"], t["position"]].all())
    n = vlm.adapter.n_layers
    _, cache = vlm.run_with_cache(inputs, names=[resid_mid(i) for i in range(n)])
    want = set()
    clt = bundle.clt
    assert clt is not None
    with torch.no_grad():
        for i in range(n):
            x = cache[resid_mid(i)]
            codes = clt.encode_layer(i, x.reshape(-1, x.shape[-1]))
            rows, slot = (codes.values != 0).nonzero(as_tuple=True)
            for r, f in zip(rows.tolist(), codes.indices[rows, slot].tolist(), strict=True):
                b, p = divmod(r, x.shape[1])
                if keep[b, p]:
                    want.add((i, b, p, f))
    got = list(zip(*(t[k].tolist() for k in ("unit", "batch", "position", "feature")), strict=True))
    assert len(got) == len(want) > 0
    assert set(got) == want


@pytest.mark.parametrize("name", ["llava", "qwen2_vl"])
def test_generate_with_replacement(name: str, zoo_path: Any) -> None:
    vlm = vlm_for(name, zoo_path)
    inputs = vlm.prepare("what colour is the circle", images=[random_image(32, 32, 4)])
    bundle = random_clt(vlm)
    plain = vlm.model.generate(**inputs, max_new_tokens=4, do_sample=False)
    exact = ReplacementModel(vlm, bundle, error_terms=True).generate(
        inputs, max_new_tokens=4, do_sample=False
    )
    assert torch.equal(plain, exact)
    rm = ReplacementModel(vlm, bundle)
    out = rm.generate(inputs, max_new_tokens=4, do_sample=False, capture_features=True)
    assert out.shape == plain.shape
    # The replacement ran at every decoding step: features at the generated positions.
    n = inputs["input_ids"].shape[1]
    pos = rm.last_features.table()["position"]  # type: ignore[union-attr]
    assert set(range(n, n + 3)) <= set(pos.tolist())


def test_generation_refuses_right_padding(zoo_path: Any) -> None:
    """Right padding would make generation continue after the padding: a clear error."""
    from vlmscope.attribution.interventions import generate_with_interventions

    vlm = vlm_for("llava", zoo_path)
    prompts = ["what colour is the circle", "how many"]
    right = vlm.prepare(prompts, padding_side="right")
    assert not bool(right["attention_mask"][:, -1].all())
    rm = ReplacementModel(vlm, random_clt(vlm), error_terms=True)
    with pytest.raises(ValueError, match=r"left padding: prepare\(..., padding_side='left'\)"):
        rm.generate(right, max_new_tokens=2)
    with pytest.raises(ValueError, match="left padding"):
        generate_with_interventions(rm, right, [], max_new_tokens=2)
    left = vlm.prepare(prompts, padding_side="left")
    plain = vlm.model.generate(**left, max_new_tokens=3, do_sample=False)
    assert torch.equal(rm.generate(left, max_new_tokens=3, do_sample=False), plain)


def test_dictionaries_for_another_model(zoo_path: Any, tmp_path: Path) -> None:
    small = vlm_for("llava", zoo_path)
    bundle = random_clt(small)
    other = vlm_for("qwen2_vl", zoo_path)
    calls: list[int] = []
    h = other.model.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(ModelMismatchError, match="d_model"):
            ReplacementModel(other, bundle)
        bundle.save(tmp_path / "d")
        with pytest.raises(ModelMismatchError, match="family"):
            ReplacementModel(other, tmp_path / "d")
    finally:
        h.remove()
    assert calls == []
