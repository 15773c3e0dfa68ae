"""Interventions: no-op reproduces the model; set features match hand-computed effects."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from tests.attribution.test_attribute import prompt
from tests.replacement.test_model import random_clt, vlm_for
from vlmscope.attribution.attribute import attribute
from vlmscope.attribution.interventions import (
    ablate_on_image,
    generate_with_interventions,
    intervene,
    steer_on_image,
)
from vlmscope.replacement.model import ReplacementModel


def test_no_intervention_reproduces_the_model(zoo_path: Any) -> None:
    vlm = vlm_for("llava", zoo_path)
    inputs = prompt(vlm, "llava")
    rm = ReplacementModel(vlm, random_clt(vlm, seed=2))
    for freeze in (True, False):
        res = intervene(rm, inputs, [], freeze_attention=freeze)
        torch.testing.assert_close(res.logits, vlm.forward(inputs).logits, atol=1e-4, rtol=0)


def test_frozen_intervention_on_logits_matches_the_graph(zoo_path: Any) -> None:
    """With attention and norms frozen, setting a last-layer feature to 0 changes the demeaned
    target logits by minus its direct edges (nothing downstream can respond)."""
    vlm = vlm_for("llava", zoo_path)
    inputs = prompt(vlm, "llava")
    bundle = random_clt(vlm, seed=3)
    rm = ReplacementModel(vlm, bundle, replace_tokens="all")
    graph = attribute(rm, None, inputs, batch_size=16)
    # A last-layer feature at the last position: its decoder reaches the logits directly.
    last = graph.n_layers - 1
    at_end = (graph.features[:, 0] == last) & (graph.features[:, 1] == graph.n_pos - 1)
    j = int(at_end.nonzero()[0, 0])
    layer, pos, feat = graph.features[j].tolist()
    res = intervene(rm, inputs, [(layer, pos, feat, 0.0)], freeze_attention=True, freeze_norms=True)
    w_u = vlm.adapter.unembed().weight.detach()
    tg = torch.tensor([t.token_id for t in graph.logit_targets])

    def demeaned(logits: torch.Tensor) -> torch.Tensor:
        x = logits[0, -1]
        return (x - x.mean())[tg]

    # The model's logits are lm_head(final norm); demeaning over the vocabulary matches the
    # demeaned unembedding rows used as attribution targets.
    assert w_u.shape[0] == res.logits.shape[-1]
    change = demeaned(res.logits) - demeaned(res.clean_logits)
    edges = graph.adjacency[graph.logit_slice, j]
    torch.testing.assert_close(change, -edges, atol=1e-4, rtol=0)
    assert edges.abs().max() > 1e-3


def test_steering_and_ablation_on_image_positions(zoo_path: Any) -> None:
    vlm = vlm_for("llava", zoo_path)
    inputs = prompt(vlm, "llava")
    rm = ReplacementModel(vlm, random_clt(vlm, seed=4))
    steered = steer_on_image(rm, inputs, layer=0, feature=3, value=5.0)
    image = vlm.masks(inputs).image[0]
    t = steered.features.table()
    at = (t["unit"] == 0) & (t["feature"] == 3)
    assert set(t["position"][at].tolist()) == set(image.nonzero().squeeze(1).tolist())
    assert torch.allclose(t["value"][at], torch.tensor(5.0))
    assert (steered.logits - steered.clean_logits).abs().max() > 1e-3
    ablated = ablate_on_image(rm, inputs, layer=0, feature=3)
    t = ablated.features.table()
    assert not bool(((t["unit"] == 0) & (t["feature"] == 3)).any())


def test_generation_with_interventions(zoo_path: Any) -> None:
    vlm = vlm_for("llava", zoo_path)
    inputs = prompt(vlm, "llava")
    rm = ReplacementModel(vlm, random_clt(vlm, seed=5))
    plain = vlm.model.generate(**inputs, max_new_tokens=4, do_sample=False)
    same = generate_with_interventions(rm, inputs, [], max_new_tokens=4, do_sample=False)
    assert torch.equal(plain, same)
    steered = generate_with_interventions(
        rm, inputs, [(1, None, 7, 50.0)], max_new_tokens=4, do_sample=False
    )
    assert steered.shape == plain.shape


def test_positions_the_dictionaries_do_not_replace_are_refused(zoo_path: Any) -> None:
    """Out of range, negative, BOS: each a clear error naming the position and why."""
    vlm = vlm_for("llava", zoo_path)
    inputs = prompt(vlm, "llava")
    rm = ReplacementModel(vlm, random_clt(vlm, seed=6))  # trained without special tokens
    n = inputs["input_ids"].shape[1]
    assert bool(vlm.masks(inputs).special[0, 0])  # BOS
    cases = [
        (n, rf"position {n} is out of range: the prompt has {n} positions"),
        (-1, r"position -1 is negative"),
        (0, r"position 0 \(token '<s>'\) is not replaced .* special token"),
    ]
    for pos, msg in cases:
        with pytest.raises(ValueError, match=msg):
            intervene(rm, inputs, [(1, pos, 3, 10.0)])
    with pytest.raises(ValueError, match=rf"position {n + 4} is out of range.*plus 3 generated"):
        generate_with_interventions(rm, inputs, [(1, n + 4, 3, 10.0)], max_new_tokens=3)
    # Padding: the shorter prompt of a left-padded batch starts with padding.
    batch = vlm.prepare(["what colour", "what colour is the big circle"], padding_side="left")
    assert not bool(batch["attention_mask"][0, 0])
    with pytest.raises(ValueError, match=r"position 0 \(sample 0, .*padding"):
        intervene(rm, batch, [(1, 0, 3, 10.0)])
    # A replaced position and position None (every replaced position) still work.
    r = intervene(rm, inputs, [(1, n - 1, 3, 50.0)])
    assert (r.logits - r.clean_logits).abs().max() > 1e-3
    res = intervene(rm, inputs, [(1, None, 3, 50.0)])
    t = res.features.table()
    at = t["position"][(t["unit"] == 1) & (t["feature"] == 3)]
    assert 0 not in at.tolist() and len(at) == n - 1


def test_layers_are_model_layers_with_dictionaries_on_some_layers(zoo_path: Any) -> None:
    """With a CLT on layers 0 and 2, intervening on layer 2 sets unit 1; layer 1 is refused."""
    vlm = vlm_for("llava", zoo_path)
    inputs = prompt(vlm, "llava")
    rm = ReplacementModel(vlm, random_clt(vlm, seed=7, layers=[0, 2]))
    n = inputs["input_ids"].shape[1]
    t = intervene(rm, inputs, [(2, n - 1, 5, 9.0)]).features.table()
    hit = (t["unit"] == 1) & (t["position"] == n - 1) & (t["feature"] == 5)
    assert t["value"][hit].tolist() == [9.0]
    with pytest.raises(ValueError, match=r"layer 1: the dictionaries cover layers \[0, 2\]"):
        intervene(rm, inputs, [(1, n - 1, 5, 9.0)])


def test_a_feature_set_twice_takes_its_last_value_active_or_not(zoo_path: Any) -> None:
    """(all positions -> 2, then position p -> 5) sets 5 at p; an inactive feature set twice
    used to be appended twice, its two columns adding up in the decoder (7 at p)."""
    vlm = vlm_for("llama", zoo_path)
    inputs = vlm.prepare("what colour is the circle and the square")
    rm = ReplacementModel(vlm, random_clt(vlm, seed=3), replace_tokens="all")
    active = {tuple(f) for f in attribute(rm, None, inputs, batch_size=64).features.tolist()}
    layer, pos = 1, 5
    for feat in (next(f for (l_, p, f) in sorted(active) if (l_, p) == (layer, pos)),
                 next(f for f in range(10_000) if (layer, pos, f) not in active)):  # fmt: skip
        once = intervene(rm, inputs, [(layer, pos, feat, 5.0)], freeze_attention=True).logits
        twice = [(layer, pos, feat, 7.0), (layer, pos, feat, 5.0)]
        torch.testing.assert_close(intervene(rm, inputs, twice, freeze_attention=True).logits,
                                   once, atol=1e-5, rtol=0)  # fmt: skip
        everywhere_then_p = [(layer, None, feat, 2.0), (layer, pos, feat, 5.0)]
        both = intervene(rm, inputs, everywhere_then_p, freeze_attention=True).logits
        by_hand = [(layer, q, feat, 5.0 if q == pos else 2.0) for q in range(pos + 1)]
        want = intervene(rm, inputs, by_hand, freeze_attention=True).logits
        torch.testing.assert_close(both[:, : pos + 1], want[:, : pos + 1], atol=1e-5, rtol=0)
