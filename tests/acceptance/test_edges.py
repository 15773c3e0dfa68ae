"""The new kinds of block keep attribution exact: every sampled edge equals the effect measured
in the frozen model, for parallel (Cohere) blocks, whose CLT reads the layer input, and for
mixture-of-experts blocks, replaced whole, as for the families the attribution tests cover.
(Cross-attention inputs: tests/attribution/test_cross_inputs.py.)"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from tests.attribution.test_attribute import check_every_edge, prompt
from tests.replacement.test_model import random_clt
from vlmscope.models.hooked import HookedVLM


@pytest.mark.parametrize("name", ["aya_vision", "llama4"])
def test_every_edge_equals_a_measured_effect(name: str, load: Callable[..., HookedVLM]) -> None:
    vlm = load(name)
    check_every_edge(vlm, random_clt(vlm, n_targets=2, seed=1), prompt(vlm, name))
