"""The frozen replay keeps nothing per copy, and where decoder rows and weights live (device,
host, disk) does not change a single edge."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from tests.conftest import random_image
from tests.replacement.test_model import random_clt, vlm_for
from vlmscope.attribution.attribute import attribute
from vlmscope.attribution.context import AttributionContext


def _context(zoo_path: Any, copies: int, family: str = "llama") -> tuple[AttributionContext, int]:
    vlm = vlm_for(family, zoo_path)
    bundle = random_clt(vlm, n_targets=2, seed=1)
    images = [random_image(32, 40, 7)] if vlm.adapter.capabilities.has_vision else None
    inputs = vlm.prepare("what colour is the circle and the square", images=images)
    n = inputs["input_ids"].shape[1]
    ctx = AttributionContext(vlm, bundle, inputs, torch.ones(n, dtype=torch.bool))
    ctx.record()
    saved: list[int] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        ctx.replay(copies)
    return ctx, sum(saved)


# Besides a plain decoder: Mllama's cross-attention vision features (a tapped source past the
# sequence), Cohere's parallel blocks and centring norms, Llama 4's mixture of experts and
# Phi-4's fused qkv projection (never run on an empty slice).
@pytest.mark.parametrize("family", ["llama", "mllama", "aya_vision", "llama4", "phi4_multimodal"])
def test_the_replay_graph_keeps_nothing_per_copy(zoo_path: Any, family: str) -> None:
    """Autograd saves the same tensors (weights, patterns, scales) for 1 copy and for 16: the
    batch costs transient activations only."""
    _, one = _context(zoo_path, 1, family)
    ctx, sixteen = _context(zoo_path, 16, family)
    assert one > 0
    assert sixteen == one
    # ... and the graph is still the model's: a logit row is not empty.
    w_u = ctx.vlm.adapter.unembed().weight.detach().float()
    rows = ctx.backward([(ctx.n_layers, ctx.embeddings.shape[0] - 1, w_u[5] - w_u.mean(0))])
    assert rows.abs().max() > 1e-3


def test_the_replay_forward_holds_one_layer_of_resid_mid(
    zoo_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When a layer's resid_mid is seeded, no earlier layer's is alive: the forward keeps one
    layer's activations per copy, not one per layer (the skip path reads its own layer's)."""
    import weakref

    from vlmscope.attribution import context

    ctx, _ = _context(zoo_path, 1)
    seen: list[weakref.ref[torch.Tensor]] = []
    alive_before: list[int] = []
    apply = context._Seed.apply

    def seed(x: torch.Tensor, fn: Any) -> torch.Tensor:
        alive_before.append(sum(r() is not None for r in seen))
        out = apply(x, fn)
        seen.append(weakref.ref(out))
        return out

    monkeypatch.setattr(context._Seed, "apply", seed)
    ctx.replay(4)
    assert len(alive_before) == ctx.n_units >= 3
    assert alive_before == [0] * ctx.n_units


def test_offload_and_decoder_placement_give_identical_edges(zoo_path: Any, tmp_path: Any) -> None:
    """Decoder rows cached on the device, in host memory or re-read from the memory-mapped
    dictionaries, weights offloaded to the host or to disk, edge rows in a memory-mapped
    file: bit-identical graphs, and the model's weights come back unchanged."""
    vlm = vlm_for("llama", zoo_path)
    random_clt(vlm, n_targets=2, seed=3).save(tmp_path / "clt")
    inputs = vlm.prepare("what colour is the circle and the square")
    before = {k: v.clone() for k, v in vlm.model.state_dict().items()}
    kw: dict[str, Any] = {"batch_size": 16, "max_feature_nodes": 40}
    base = attribute(vlm, tmp_path / "clt", inputs, **kw)
    for offload in ("cpu", "disk"):
        g = attribute(vlm, tmp_path / "clt", inputs, offload=offload, **kw)
        assert torch.equal(g.adjacency, base.adjacency), offload
    on_disk = attribute(vlm, tmp_path / "clt", inputs, rows_in_memory_gb=1e-9, **kw)
    assert torch.equal(on_disk.adjacency, base.adjacency)
    after = vlm.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.device.type == "cpu" and p.numel() > 0 for p in vlm.model.parameters())


def test_an_explicit_batch_is_capped_at_the_rows_whatever_the_offload(
    zoo_path: Any, tmp_path: Any
) -> None:
    """A --batch-size above the rows to compute replays only as many copies as rows, with the
    planner choosing the offload (the CLI default) as without it: at 100,000 copies the
    planner had refused 2 GB ("try --offload disk", after trying it)."""
    vlm = vlm_for("llama", zoo_path)
    random_clt(vlm, n_targets=2, seed=3).save(tmp_path / "clt")
    inputs = vlm.prepare("what colour is the circle and the square")
    kw: dict[str, Any] = {"batch_size": 100_000, "max_feature_nodes": 40}
    fixed = attribute(vlm, tmp_path / "clt", inputs, offload=None, **kw)
    auto = attribute(vlm, tmp_path / "clt", inputs, offload="auto", memory_gb=2, **kw)
    assert fixed.metadata["batch_size"] == auto.metadata["batch_size"] == 40  # 40 feature rows
    assert torch.equal(auto.adjacency, fixed.adjacency)


@pytest.mark.parametrize(
    ("error", "falls_back"),
    [
        (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), False),
        (RuntimeError("shape '[1, 0, 4, 8]' is invalid for input of size 0"), True),
    ],
)
def test_the_replay_falls_back_for_empty_queries_only(error: Exception, falls_back: bool) -> None:
    """A family whose attention refuses empty queries and keys gets them computed; running out
    of device memory (also a RuntimeError) is raised, not retried on the path that takes more
    memory with the skip then off for the rest of the graph."""
    calls: list[bool] = []

    class Replaying(AttributionContext):
        def __init__(self) -> None:  # only what replay() touches
            self._skip_qk, self.final = True, None

        def _replay(self, copies: int, skip_qk: bool) -> None:
            calls.append(skip_qk)
            if skip_qk:
                raise error

    ctx = Replaying()
    if falls_back:
        ctx.replay(4)
        assert calls == [True, False] and not ctx._skip_qk
    else:
        with pytest.raises(torch.OutOfMemoryError):
            ctx.replay(4)
        assert calls == [True] and ctx._skip_qk
