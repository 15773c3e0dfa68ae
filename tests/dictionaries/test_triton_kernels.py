"""The optional Triton kernels against the torch references, run by the Triton interpreter on
CPU (TRITON_INTERPRET=1); skipped where the `triton` extra is not installed.

Triton reads TRITON_INTERPRET when it is first imported, and other libraries in the suite may
import it first, so the kernel tests run in a child pytest with the variable set; in the main
run they show as skipped and `test_kernels_under_the_interpreter` reports for them.

The interpreter runs any program numpy can; a GPU compiler is stricter (layouts, shared memory,
types tl.dot accepts). Without a GPU, the main run compiles both kernels ahead of time for
sm_80 and sm_90 with the ptxas the triton wheel ships, at the constants `topk_encode` launches
with, and reads the compiled IR for what the interpreter cannot show: the precision of tl.dot."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch

from vlmscope.dictionaries.kernels import dense_decode, gathered_pre

pytest.importorskip("triton")
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
in_child = pytest.mark.skipif(
    not INTERPRETED, reason="runs in the child pytest of test_kernels_under_the_interpreter"
)


@pytest.mark.skipif(INTERPRETED, reason="this is the child run")
def test_kernels_under_the_interpreter() -> None:
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
    assert " passed" in res.stdout and "failed" not in res.stdout


@pytest.fixture(scope="module")
def tk() -> ModuleType:
    import vlmscope.dictionaries.triton_kernels as module

    return module


@in_child
@pytest.mark.parametrize(("n", "d", "f", "k", "centred"), [(20, 24, 100, 5, True)])
def test_fused_topk_encoder_matches_dense_topk(
    tk: ModuleType, n: int, d: int, f: int, k: int, centred: bool
) -> None:
    # fp32 only: the interpreter keeps bf16 as uint16 and its tl.dot multiplies those integers
    # (triton 3.9), so the bf16 product is checked compiled (below) and timed on a GPU
    gen = torch.Generator().manual_seed(f)
    x = torch.randn(n, d, generator=gen)
    w = torch.randn(f, d, generator=gen)
    b = torch.randn(f, generator=gen)
    c = torch.randn(d, generator=gen) if centred else None
    values, indices = tk.topk_encode(x, w, b, c, k, block_m=16, block_f=32, block_k=16)
    pre = (x if c is None else x - c) @ w.T + b
    want = pre.topk(k, dim=1)
    # The same latents per row (random data: no ties), and their pre-activations.
    got_sorted, order = values.sort(dim=1, descending=True)
    assert torch.equal(indices.gather(1, order), want.indices)
    torch.testing.assert_close(got_sorted, want.values, rtol=1e-5, atol=1e-5)
    # Negative pre-activations survive the packing (the int32 order of negative floats).
    assert (values < 0).any() or (want.values >= 0).all()
    # The sparse backward attaches to the kernel's output as to torch's.
    wr = w.clone().requires_grad_()
    gathered_pre(x, wr, b, c, indices, pre).sum().backward()
    assert (
        wr.grad is not None
        and torch.count_nonzero(wr.grad.abs().sum(1)) == indices.unique().numel()
    )


@in_child
def test_fused_topk_encoder_keeps_the_largest_when_all_are_negative(tk: ModuleType) -> None:
    x = torch.zeros(2, 16)
    b = -torch.arange(1.0, 33.0)  # pre = b: -1 > -2 > ... on every row
    values, indices = tk.topk_encode(x, torch.ones(32, 16), b, None, 3, 16, 16, 16)
    assert sorted(indices[0].tolist()) == [0, 1, 2]
    assert sorted(values[1].tolist()) == [-3.0, -2.0, -1.0]


@in_child
@pytest.mark.parametrize(("n", "k", "f", "d"), [(9, 4, 30, 200)])
def test_triton_sparse_decode_matches_dense_in_values_and_gradients(
    tk: ModuleType, n: int, k: int, f: int, d: int
) -> None:
    gen = torch.Generator().manual_seed(n)
    idx = torch.stack([torch.randperm(f, generator=gen)[:k] for _ in range(n)])
    v0, w0 = torch.randn(n, k, generator=gen), torch.randn(f, d, generator=gen)
    upstream = torch.randn(n, d, generator=gen)
    results = []
    for fn in (tk.SparseDecode.apply, dense_decode):
        v, w = v0.clone().requires_grad_(), w0.clone().requires_grad_()
        out = fn(v, idx, w)
        (out * upstream).sum().backward()
        results.append((out.detach(), v.grad, w.grad))
    for got, want in zip(*results, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


# Per-block shared memory a kernel may use (bytes): A100 (sm_80) 163 KB, H100/H200 (sm_90) 227 KB.
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}


@pytest.fixture(scope="module")
def ptxas(tk: ModuleType) -> None:
    import triton

    if not (Path(triton.__file__).parent / "backends" / "nvidia" / "bin").exists():
        pytest.skip("this triton build ships no CUDA backend to compile with")


def _dot_lines(compiled: Any) -> list[str]:
    return [line for line in compiled.asm["ttir"].splitlines() if "tt.dot " in line]


@pytest.mark.skipif(INTERPRETED, reason="compiles for a GPU, not interpreted")
@pytest.mark.parametrize(
    ("dtype", "arch", "k"),
    [(torch.bfloat16, 90, 32), (torch.float32, 90, 32), (torch.bfloat16, 80, 128)],
)
def test_fused_topk_encoder_compiles_for_the_gpu_in_the_inputs_precision(
    tk: ModuleType, ptxas: None, dtype: torch.dtype, arch: int, k: int
) -> None:
    compiled = tk.compile_encoder(arch, dtype, k)  # the defaults topk_encode launches with
    assert compiled.asm["cubin"] and compiled.metadata.shared <= SHARED_LIMIT[arch]
    (dot,) = _dot_lines(compiled)
    # the product's operands stay in the inputs' dtype: bf16 on tensor cores, fp32 in fp32
    # (an fp32 tl.dot defaults to TF32 on a GPU; the interpreter computes it in full fp32)
    operand = "bf16" if dtype == torch.bfloat16 else "f32"
    assert re.search(
        rf"tensor<\d+x\d+x{operand}> \* tensor<\d+x\d+x{operand}> -> tensor<\S+xf32>", dot
    )
    if dtype == torch.float32:
        assert "tf32" not in dot
    if (dtype, arch, k) == (torch.bfloat16, 90, 32):  # the LLaVA-7B setting gpu_session times
        assert tk.register_use(compiled, arch)["spill_bytes"] == 0


@pytest.mark.skipif(INTERPRETED, reason="compiles for a GPU, not interpreted")
def test_sparse_decoder_compiles_for_the_gpu(tk: ModuleType, ptxas: None) -> None:
    compiled = tk.compile_decoder(90, torch.bfloat16)
    assert compiled.asm["cubin"] and compiled.metadata.shared <= SHARED_LIMIT[90]
    assert tk.register_use(compiled, 90)["spill_bytes"] == 0
