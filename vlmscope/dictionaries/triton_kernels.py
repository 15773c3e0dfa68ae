"""Triton kernels for the dictionary step: a fused TopK encoder and a sparse decoder.

Optional: `triton` is an extra (`pip install vlmscope[triton]`); `AVAILABLE` says whether it
imported. The kernels run on CUDA tensors, or on CPU tensors under the Triton interpreter
(`TRITON_INTERPRET=1`, how the tests check them against the torch references in kernels.py).
They are used only when asked for (`VLMSCOPE_TRITON=1` and CUDA inputs, see `enabled`): no
GPU was available to time them, so the torch paths stay the default until they are measured.
The interpreter accepts programs a GPU compiler rejects, so the tests also compile both kernels
ahead of time for sm_80 and sm_90 with the ptxas the triton wheel ships (no GPU needed).

Fused TopK encoder. pre = (x - c) W^T + b is computed tile by tile, [BM rows, BF latents] per
program, and each tile keeps only its own top K' = next power of two >= k entries per row; the
[N, F] pre-activations never exist in memory. A row's global top k is among the union of its
tiles' top k, so a final torch.topk over the [N, (F / BF) K'] candidates is exact. To select
indices with values, each candidate is packed into one int64 key: the float's bits mapped to
an order-preserving int32 (negative floats have their magnitude bits flipped) in the high 32
bits and the latent index in the low 32; sorting keys sorts values, and ties between equal
values go to the larger index. The backward is `kernels.gathered_pre`'s sparse one.

Sparse decoder. out[n] = sum_j v[n, j] W[idx[n, j]]: one program per (row, column tile) walks
the row's K entries, reading only those K rows of W. Its backward is embedding_bag's.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

try:
    import triton
    import triton.language as tl

    AVAILABLE = True
except ImportError:  # the optional extra is not installed
    AVAILABLE = False


def enabled(t: Tensor) -> bool:
    """Whether to use the Triton kernels for tensor `t` (opt-in: VLMSCOPE_TRITON=1, CUDA)."""
    return AVAILABLE and t.is_cuda and os.environ.get("VLMSCOPE_TRITON", "0") == "1"


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


if AVAILABLE:

    @triton.jit
    def _topk_encoder_kernel(
        X, W, B, C, KEYS,
        N, D, F,
        stride_xn, stride_wf, stride_kn,
        HAS_CENTRE: tl.constexpr, BM: tl.constexpr, BF: tl.constexpr, BK: tl.constexpr,
        K: tl.constexpr, PRECISION: tl.constexpr,
    ):  # fmt: skip
        pid_m = tl.program_id(0)
        pid_f = tl.program_id(1)
        rm = pid_m * BM + tl.arange(0, BM)
        rf = pid_f * BF + tl.arange(0, BF)
        acc = tl.zeros((BM, BF), dtype=tl.float32)
        for d0 in range(0, D, BK):
            rk = d0 + tl.arange(0, BK)
            x = tl.load(X + rm[:, None] * stride_xn + rk[None, :],
                        mask=(rm[:, None] < N) & (rk[None, :] < D), other=0.0)  # fmt: skip
            if HAS_CENTRE:  # rounded back to the input's dtype, as torch's x - c is
                c = tl.load(C + rk, mask=rk < D, other=0.0).to(tl.float32)
                x = (x.to(tl.float32) - c[None, :]).to(X.dtype.element_ty)
            w = tl.load(W + rf[:, None] * stride_wf + rk[None, :],
                        mask=(rf[:, None] < F) & (rk[None, :] < D), other=0.0)  # fmt: skip
            acc += tl.dot(x, tl.trans(w), input_precision=PRECISION)
        acc += tl.load(B + rf, mask=rf < F, other=0.0).to(tl.float32)[None, :]
        acc = tl.where(rf[None, :] < F, acc, float("-inf"))
        bits = acc.to(tl.int32, bitcast=True)
        ordered = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)
        keys = (ordered.to(tl.int64) << 32) | rf[None, :].to(tl.int64)
        top = tl.topk(keys, K, dim=1)
        rk_out = pid_f * K + tl.arange(0, K)
        tl.store(KEYS + rm[:, None] * stride_kn + rk_out[None, :], top, mask=rm[:, None] < N)

    @triton.jit
    def _sparse_decode_kernel(
        V, IDX, W, OUT,
        K, D,
        stride_vn, stride_wf, stride_on,
        BD: tl.constexpr,
    ):  # fmt: skip
        n = tl.program_id(0)
        rd = tl.program_id(1) * BD + tl.arange(0, BD)
        acc = tl.zeros((BD,), dtype=tl.float32)
        for j in range(0, K):
            i = tl.load(IDX + n * stride_vn + j)
            v = tl.load(V + n * stride_vn + j).to(tl.float32)
            w = tl.load(W + i * stride_wf + rd, mask=rd < D, other=0.0).to(tl.float32)
            acc += v * w
        tl.store(OUT + n * stride_on + rd, acc, mask=rd < D)


def _unpack(keys: Tensor) -> tuple[Tensor, Tensor]:
    """(values float32, indices int64) of packed int64 keys (see the module docstring)."""
    ordered = (keys >> 32).to(torch.int32)
    bits = torch.where(ordered >= 0, ordered, ordered ^ 0x7FFFFFFF)
    return bits.view(torch.float32), keys & 0xFFFFFFFF


def encoder_meta(
    k: int, dtype: torch.dtype, centred: bool, block_m: int = 32, block_f: int = 64,
    block_k: int = 32,
) -> dict[str, Any]:  # fmt: skip
    """The compile-time constants `topk_encode` launches the encoder kernel with (also what
    the tests compile ahead of time for a GPU): a tile keeps K' = next power of two >= k
    candidates, so it is at least K' wide. fp32 products are computed in fp32 ("ieee"): a GPU's
    tl.dot rounds fp32 inputs to TF32 by default (~1e-3 relative), where torch's matmul does
    not; bf16 and fp16 products run on tensor cores with fp32 accumulation."""
    kk = _next_pow2(k)
    precision = "ieee" if dtype == torch.float32 else "tf32"  # tf32: ignored for 16-bit inputs
    return {"HAS_CENTRE": centred, "BM": block_m, "BF": max(block_f, kk), "BK": block_k,
            "K": kk, "PRECISION": precision}  # fmt: skip


def topk_encode(
    x: Tensor, weight: Tensor, bias: Tensor, centre: Tensor | None, k: int,
    block_m: int = 32, block_f: int = 64, block_k: int = 32, num_warps: int = 4,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """(values [N, k] float32 pre-activations, indices [N, k] int64) of the k largest entries of
    each row of (x - centre) W^T + bias, without forming the [N, F] matrix. No autograd: wrap
    the values with `kernels.gathered_pre` for the sparse backward. Order within a row is
    unspecified. The product is in weight's dtype, as F.linear's (x and centre are cast).

    The tile (block_m rows x block_f latents, block_k inputs a step) and num_warps are the
    launch's; the defaults compile for sm_90 without register spills at k 32 (ptxas -v: 148
    registers). Which tile is fastest is for a GPU to say: benchmarks/gpu_session.py sweeps
    the candidates that compile without spills."""
    if not AVAILABLE:
        raise RuntimeError("topk_encode needs the optional `triton` package")
    n, d = x.shape
    f = weight.shape[0]
    if not 1 <= k <= f:
        raise ValueError(f"topk_encode: need 1 <= k <= {f}, got {k}")
    meta = encoder_meta(k, weight.dtype, centre is not None, block_m, block_f, block_k)
    x, weight, bias = x.to(weight.dtype).contiguous(), weight.contiguous(), bias.contiguous()
    tiles = triton.cdiv(f, meta["BF"])
    keys = torch.empty(n, tiles * meta["K"], dtype=torch.int64, device=x.device)
    c = centre.to(weight.dtype).contiguous() if centre is not None else bias
    grid = (triton.cdiv(n, block_m), tiles)
    _topk_encoder_kernel[grid](
        x, weight, bias, c, keys, n, d, f,
        x.stride(0), weight.stride(0), keys.stride(0), **meta, num_warps=num_warps,
    )  # fmt: skip
    best = keys.topk(k, dim=1, sorted=False).values
    return _unpack(best)


def sparse_decode(values: Tensor, indices: Tensor, weight: Tensor, block_d: int = 128) -> Tensor:
    """[N, D] = sum_j values[:, j, None] * weight[indices[:, j]] (float32 accumulation, output
    in weight's dtype); forward only, see `SparseDecode` for autograd."""
    if not AVAILABLE:
        raise RuntimeError("sparse_decode needs the optional `triton` package")
    n, k = values.shape
    d = weight.shape[1]
    values, indices, weight = values.contiguous(), indices.contiguous(), weight.contiguous()
    out = torch.empty(n, d, dtype=torch.float32, device=weight.device)
    if n and d:
        grid = (n, triton.cdiv(d, block_d))
        _sparse_decode_kernel[grid](
            values, indices, weight, out, k, d,
            values.stride(0), weight.stride(0), out.stride(0), BD=block_d,
        )  # fmt: skip
    return out.to(weight.dtype)


class SparseDecode(torch.autograd.Function):
    """Triton forward; backward as embedding_bag's (values: rows of W dotted with the output
    gradient; W: the output gradient scattered to the used rows)."""

    @staticmethod
    def forward(ctx: Any, values: Tensor, indices: Tensor, weight: Tensor) -> Tensor:
        ctx.save_for_backward(values, indices, weight)
        return sparse_decode(values, indices, weight)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, None, Tensor | None]:
        values, indices, weight = ctx.saved_tensors
        with torch.enable_grad():
            v = values.detach().requires_grad_(ctx.needs_input_grad[0])
            w = weight.detach().requires_grad_(ctx.needs_input_grad[2])
            out = F.embedding_bag(indices, w, per_sample_weights=v.to(w.dtype), mode="sum")
            wanted = [t for t in (v, w) if t.requires_grad]
            grads = iter(torch.autograd.grad(out, wanted, grad.to(out.dtype)))
        grad_v = next(grads) if v.requires_grad else None
        grad_w = next(grads) if w.requires_grad else None
        return grad_v, None, grad_w


_TRITON_TYPE = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def _compile(kernel: Any, types: dict[str, str], meta: dict[str, Any], arch: int,
             num_warps: int) -> Any:  # fmt: skip
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature = {**types, **dict.fromkeys(meta, "constexpr")}
    if set(signature) != set(kernel.arg_names):
        raise RuntimeError(f"compile: {kernel.arg_names} are the kernel's arguments")
    src = ASTSource(fn=kernel, signature=signature, constexprs=meta)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps})


def compile_encoder(
    arch: int, dtype: torch.dtype, k: int, block_m: int = 32, block_f: int = 64,
    block_k: int = 32, num_warps: int = 4,
) -> Any:  # fmt: skip
    """The fused encoder compiled ahead of time for CUDA compute capability `arch` (80, 90, ...)
    as `topk_encode` would launch it, without a GPU: Triton's compiler and the ptxas its wheel
    ships. For checks the interpreter cannot make: does it compile, how much shared memory and
    how many registers it takes, and which precision its product runs in (`asm["ttir"]`)."""
    t = _TRITON_TYPE[dtype]
    types = {"X": f"*{t}", "W": f"*{t}", "B": f"*{t}", "C": f"*{t}", "KEYS": "*i64"}
    types |= dict.fromkeys(["N", "D", "F", "stride_xn", "stride_wf", "stride_kn"], "i32")
    meta = encoder_meta(k, dtype, True, block_m, block_f, block_k)
    return _compile(_topk_encoder_kernel, types, meta, arch, num_warps)


def compile_decoder(arch: int, dtype: torch.dtype, block_d: int = 128) -> Any:
    """The sparse decoder compiled ahead of time for `arch`, as `compile_encoder`."""
    t = _TRITON_TYPE[dtype]
    types = {"V": f"*{t}", "IDX": "*i64", "W": f"*{t}", "OUT": "*fp32"}
    types |= dict.fromkeys(["K", "D", "stride_vn", "stride_wf", "stride_on"], "i32")
    return _compile(_sparse_decode_kernel, types, {"BD": block_d}, arch, num_warps=4)


def register_use(compiled: Any, arch: int) -> dict[str, int]:
    """{"registers", "spill_bytes"} per thread of a compiled kernel, from `ptxas -v` (the same
    assembler Triton used). Spilled registers go to local memory: a slow kernel, not a wrong
    one."""
    bin_dir = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    # the wheel ships two assemblers; the newer reads the PTX versions Triton writes
    ptxas = next((p for p in (bin_dir / "ptxas-blackwell", bin_dir / "ptxas") if p.exists()), None)
    if ptxas is None:
        raise RuntimeError(f"no ptxas in {bin_dir}")
    suffix = "a" if arch >= 90 else ""  # Triton targets sm_90a for wgmma
    with tempfile.TemporaryDirectory() as tmp:
        ptx = Path(tmp) / "kernel.ptx"
        ptx.write_text(compiled.asm["ptx"])
        cmd = [str(ptxas), f"-arch=sm_{arch}{suffix}", "-v", str(ptx), "-o", f"{tmp}/kernel.o"]
        res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"ptxas failed: {res.stderr[-500:]}")
    regs = re.search(r"Used (\d+) registers", res.stderr)
    spills = re.search(r"(\d+) bytes spill stores", res.stderr)
    if regs is None or spills is None:
        raise RuntimeError(f"unexpected ptxas -v output: {res.stderr[-500:]}")
    return {"registers": int(regs.group(1)), "spill_bytes": int(spills.group(1))}
