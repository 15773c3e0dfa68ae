"""Moving what the frozen replay never runs off the device while attributing.

After recording, the replay runs only the language model's attention, norms and residual
stream (context.py): the MLPs (their outputs are recorded constants), the vision tower and
projector, the token embedding and the unembedding are not used again. `offloaded(vlm, "cpu")`
moves their parameters to host memory for the block; "disk" writes them to a temporary
safetensors file and frees them; both put every parameter back, bit for bit, on exit (also
after an exception). This is circuit-tracer's `offload` option; on LLaVA-1.5-7B the MLPs alone
are 8.7 GB of the 14 GB of bf16 weights.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from vlmscope.models.hooked import HookedVLM


def replay_unused_modules(vlm: HookedVLM) -> list[nn.Module]:
    """Modules the replay does not run: every LM MLP, the embedding and unembedding, and
    every top-level part of the model outside the language model (vision tower, projector)."""
    a = vlm.adapter
    lm = a.lm()
    out: list[nn.Module] = [a.part(i, "mlp") for i in range(a.n_layers)]
    out += [a.embedding(), a.unembed()]
    lm_params = {id(p) for p in lm.parameters()}
    for m in _outside(vlm.model, lm):
        if not {id(p) for p in m.parameters()} & lm_params:
            out.append(m)
    return out


def _outside(root: nn.Module, inner: nn.Module) -> Iterator[nn.Module]:
    """The largest submodules of `root` that neither are nor contain `inner`."""
    for child in root.children():
        if child is inner:
            continue
        if any(m is inner for m in child.modules()):
            yield from _outside(child, inner)
        else:
            yield child


def _unique_params(modules: list[nn.Module]) -> list[nn.Parameter]:
    seen: dict[int, nn.Parameter] = {}
    for m in modules:
        for p in m.parameters():
            seen.setdefault(id(p), p)
    return list(seen.values())


@contextlib.contextmanager
def offloaded(vlm: HookedVLM, where: str | None) -> Iterator[None]:
    """Within the block, the parameters of `replay_unused_modules` live on the host ("cpu")
    or on disk ("disk"); None changes nothing."""
    if where is None:
        yield
        return
    params = _unique_params(replay_unused_modules(vlm))
    params = [p for p in params if p.numel() > 0]
    homes = [(p.data.device, p.data.dtype) for p in params]
    with contextlib.ExitStack() as stack:
        if where == "cpu":
            kept: list[Any] = [p.data.to("cpu") for p in params]
        elif where == "disk":
            tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="vlmscope-off-")))
            path = tmp / "offloaded.safetensors"
            save_file({str(i): p.data.cpu().contiguous() for i, p in enumerate(params)}, path)
        else:
            raise ValueError(f"offload must be None, 'cpu' or 'disk', not {where!r}")
        for p in params:
            # One element seen through the parameter's shape: modules that still run (the MLPs,
            # on an empty slice of positions) see a weight of the right shape and device.
            p.data = torch.zeros((), dtype=p.dtype, device=p.device).expand(p.shape)
        try:
            yield
        finally:
            if where == "disk":
                loaded = load_file(str(path))
                kept = [loaded[str(i)] for i in range(len(params))]
            for p, data, (device, dtype) in zip(params, kept, homes, strict=True):
                p.data = data.to(device=device, dtype=dtype)
