"""Every GPU figure vlmscope still lacks, as one prepared command for a short device lease.

vlmscope has been built and measured on CPUs only. When a session is lent a GPU (about 15
minutes in all, start-up included), this script is what to run, once, early:

    # on the device (`run`, timeout_s 600; schedulefree, the one dependency the device
    # image lacked, is no longer needed: signum is vlmscope's own since 2026-12-01):
    PYTHONPATH=$PWD PYTHONUNBUFFERED=1 python3 benchmarks/gpu_session.py --out $OUT

    python benchmarks/gpu_session.py --smoke   # here: every stage at toy sizes on the CPU

Stages, each in a child process with its own time limit so that one failure or hang costs
only its share (results accumulate in OUT/gpu_session.json, the log in OUT/*.log):
1. env: torch, CUDA, Triton and the device's name.
2. kernels (#15): the Triton fused TopK encoder and sparse decoder against torch at LLaVA-7B
   width (4,096 rows, d 4096, 32,768 latents, k 32, bf16): agreement with an fp32 dense
   reference and milliseconds per call of each path.
3. train (#15): `train_throughput.py --llava7b`: the dictionary step's tokens/s and MFU for
   SAE, transcoder and CLT, in bf16 and in float32 on TF32 tensor cores (what `vlmscope train`
   runs on CUDA), then the trainer end to end on the LLaVA-7B-shaped random model; once with
   the torch kernels, once with VLMSCOPE_TRITON=1.
4. attribution (#20): a 576-image-token prompt of about 1,000 positions on the LLaVA-7B-shaped
   model cut to N layers, with a random 32,768-feature CLT over them, `batch_size="auto"`:
   seconds, the batch chosen, and peak GPU memory against the planner's prediction for the
   same shapes. N = 2, then 4, while the budget lasts.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent


# --------------------------------------------------------------------------- stages (children)


def stage_env(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {"torch": torch.__version__, "cuda": torch.version.cuda,
                            "python": sys.version.split()[0]}  # fmt: skip
    with contextlib.suppress(ImportError):
        import triton

        info["triton"] = triton.__version__
    with contextlib.suppress(ImportError):
        import transformers

        info["transformers"] = transformers.__version__
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(device=props.name, memory_gb=props.total_memory / 1e9,
                    multiprocessors=props.multi_processor_count)  # fmt: skip
    return info


def _timer(device: Any) -> Any:
    """ms per call of fn(): CUDA events on a GPU, perf_counter on the CPU."""
    import torch

    def time_ms(fn: Any, reps: int) -> float:
        for _ in range(2):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(reps):
                fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end) / reps
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        return 1000 * (time.perf_counter() - t0) / reps

    return time_ms


ENCODER_TILES = [(32, 64, 32, 4), (64, 64, 32, 4), (64, 64, 64, 8), (64, 128, 32, 8),
                 (128, 64, 32, 8), (128, 128, 32, 8), (128, 128, 32, 16)]  # fmt: skip


def stage_kernels(args: argparse.Namespace) -> dict[str, Any]:
    """Triton against torch at one shape: exactness first, then time."""
    import torch
    import torch.nn.functional as F

    from vlmscope.dictionaries import triton_kernels as tk
    from vlmscope.dictionaries.kernels import dense_decode

    if not tk.AVAILABLE:
        return {"skipped": "triton is not installed"}
    cuda = torch.cuda.is_available() and not args.smoke
    device = torch.device("cuda" if cuda else "cpu")
    n, d, f, k = (4096, 4096, 32768, 32) if not args.smoke else (64, 32, 256, 8)
    dtype = torch.bfloat16 if cuda else torch.float32
    reps = 20 if cuda else 2
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(n, d, device=device, dtype=dtype, generator=gen)
    w = (torch.randn(f, d, device=device, dtype=dtype, generator=gen) / d**0.5).contiguous()
    b = torch.randn(f, device=device, dtype=dtype, generator=gen) * 0.1
    c = torch.randn(d, device=device, dtype=dtype, generator=gen) * 0.1
    time_ms = _timer(device)
    out: dict[str, Any] = {"device": str(device), "dtype": str(dtype), "n": n, "d": d, "f": f,
                           "k": k}  # fmt: skip

    # encoder: the k largest of (x - c) W^T + b per row
    ref = ((x - c).float() @ w.float().T + b.float()).topk(k, dim=1).values  # fp32 reference
    torch_vals = F.linear(x - c, w, b).topk(k, dim=1, sorted=False).values
    tri_vals, tri_idx = tk.topk_encode(x, w, b, c, k)
    kth = ref[:, -1:]
    # bf16 rounding may swap latents near the k-th value; the values must agree to rounding
    scale = ref.abs().max().item()

    def sorted_err(vals: Any) -> float:
        return (vals.float().sort(1).values - ref.sort(1).values).abs().max().item() / scale

    out["encoder_max_err_torch"] = sorted_err(torch_vals)
    out["encoder_max_err_triton"] = sorted_err(tri_vals)
    exact = ((x - c).float() @ w.float().T + b.float()).gather(1, tri_idx)
    out["encoder_triton_picks_above_kth"] = float((exact >= kth - 0.02 * scale).float().mean())
    out["encoder_ms_torch"] = time_ms(lambda: F.linear(x - c, w, b).topk(k, 1, sorted=False), reps)
    out["encoder_ms_triton"] = time_ms(lambda: tk.topk_encode(x, w, b, c, k), reps)
    # Tiles (block_m, block_f, block_k, num_warps) that compile for sm_90 at k 32 without
    # register spills (ptxas -v, checked without a GPU); the default is the first.
    tiles = ENCODER_TILES if cuda else ENCODER_TILES[:2]
    sweep: dict[str, Any] = {}
    for bm, bf, bk, warps in tiles:

        def call(bm: int = bm, bf: int = bf, bk: int = bk, warps: int = warps) -> Any:
            return tk.topk_encode(x, w, b, c, k, bm, bf, bk, num_warps=warps)

        try:  # picks of every tile against the default's: a tile must not change the answer
            same = (call()[1].sort(1).values == tri_idx.sort(1).values).all(1).float().mean()
            sweep[f"{bm}x{bf}x{bk}/w{warps}"] = {"ms": time_ms(call, reps),
                                                 "rows_same_picks": float(same)}  # fmt: skip
        except Exception as e:  # one tile failing to compile must not cost the others
            sweep[f"{bm}x{bf}x{bk}/w{warps}"] = {"error": f"{type(e).__name__}: {e}"[:300]}
    out["encoder_tiles"] = sweep

    # decoder: sum_j v[n, j] W[idx[n, j]]
    vals = torch.rand(n, k, device=device, generator=gen).to(dtype)
    idx = torch.randint(0, f, (n, k), device=device, generator=gen)
    dense = dense_decode(vals.float(), idx, w.float())
    scale = dense.abs().max().item()
    bag = F.embedding_bag(idx, w, per_sample_weights=vals, mode="sum")
    out["decoder_max_err_torch"] = (bag.float() - dense).abs().max().item() / scale
    tri_out = tk.sparse_decode(vals, idx, w).float()
    out["decoder_max_err_triton"] = (tri_out - dense).abs().max().item() / scale
    out["decoder_ms_torch"] = time_ms(
        lambda: F.embedding_bag(idx, w, per_sample_weights=vals, mode="sum"), reps
    )
    out["decoder_ms_triton"] = time_ms(lambda: tk.sparse_decode(vals, idx, w), reps)
    out["decoder_ms_dense_matmul"] = time_ms(lambda: dense_decode(vals, idx, w), reps)
    return out


def stage_attribution(args: argparse.Namespace) -> dict[str, Any]:
    """One attribution on the LLaVA-7B-shaped model cut to args.layers layers: time, batch,
    peak device memory, and the planner's prediction of that peak."""
    import numpy as np
    import torch
    from PIL import Image

    sys.path.insert(0, str(HERE))
    from attribution_memory import llava7b_config_dir
    from train_throughput import llava7b_random

    from vlmscope.attribution.attribute import attribute
    from vlmscope.dictionaries import SparseCoderConfig
    from vlmscope.plan.attribution import peak, plan, shape_from_config, with_counts
    from vlmscope.training.bundle import DictionaryBundle, mlp_out, resid_mid

    cuda = torch.cuda.is_available() and not args.smoke
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32  # CPUs without bf16 units emulate it
    n, d = args.layers, 4096
    latents, k = (32768, 32) if not args.smoke else (256, 8)
    work = Path(args.work)
    t0 = time.perf_counter()
    torch.manual_seed(0)
    cfg = SparseCoderConfig(kind="clt", d_in=d, num_latents=latents, k=k, n_layers=n)
    info = {"name": "llava7b-random", "family": "llava", "dims": {"d_model": d, "n_layers": n},
            "tokens": "all"}  # fmt: skip
    reads, writes = [resid_mid(i) for i in range(n)], [mlp_out(i) for i in range(n)]
    with torch.device(device):  # random weights are made where they are fast to make
        bundle = DictionaryBundle.create(cfg.with_dims(d, d, n_layers=n), reads, writes, d, d, info)
        bundle = bundle.to(dtype)
        with torch.no_grad():
            for layer in bundle.clt.layers:  # type: ignore[union-attr]
                layer.W_dec.normal_(0, 0.02)
    clt = work / f"clt-L{n}"
    bundle.to("cpu").save(clt)
    del bundle
    vlm = llava7b_random(n, 2 if args.smoke else 24, device, dtype)
    made_s = time.perf_counter() - t0
    img = Image.fromarray((np.random.default_rng(0).random((336, 336, 3)) * 255).astype("uint8"))
    words = max(0, args.positions - 600)
    inputs = vlm.prepare("describe the picture " * (1 + words // 3), images=[img])
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated() if cuda else 0
    t1 = time.perf_counter()
    g = attribute(vlm, str(clt), inputs, max_feature_nodes=args.max_feature_nodes,
                  batch_size="auto" if cuda else 8, logit_targets=[5])  # fmt: skip
    if cuda:
        torch.cuda.synchronize()
    secs = time.perf_counter() - t1
    measured = torch.cuda.max_memory_allocated() if cuda else None
    meta = g.metadata
    positions = int(inputs["input_ids"].shape[1])
    cfg_dir = llava7b_config_dir(work / f"config-L{n}", n, 2 if args.smoke else 24)
    shape = shape_from_config(cfg_dir, str(clt), positions, dtype=str(dtype).split(".")[1],
                              max_feature_nodes=args.max_feature_nodes, n_logits=1)  # fmt: skip
    if meta.get("active_per_layer"):
        shape = with_counts(shape, meta["active_per_layer"], meta["unique_per_layer"])
    batch = int(meta.get("batch_size", 8))
    predicted = peak(plan(shape, batch, None, device.type), shape)
    return {"layers": n, "positions": positions, "latents": latents, "k": k,
            "device": str(device), "build_s": made_s, "attribute_s": secs, "batch": batch,
            "peak_gb": None if measured is None else measured / 1e9, "before_gb": before / 1e9,
            "predicted_gb": predicted / 1e9,
            "error": None if measured is None else (predicted - measured) / measured,
            "features_explored": int(g.features.shape[0])}  # fmt: skip


STAGES = {"env": stage_env, "kernels": stage_kernels, "attribution": stage_attribution}


# --------------------------------------------------------------------------- driver


def run_child(args: argparse.Namespace, stage: str, limit: float, log: Path,
              extra: list[str] | None = None, env: dict[str, str] | None = None,
              cmd: list[str] | None = None) -> dict[str, Any]:  # fmt: skip
    """One stage in a child process, killed after `limit` seconds; its last stdout line is
    its JSON result (for this script's own stages)."""
    if cmd is None:
        cmd = [sys.executable, __file__, "--stage", stage, "--work", args.work,
               *(["--smoke"] if args.smoke else []), *(extra or [])]  # fmt: skip
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        try:
            proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=fh, text=True,
                                  timeout=max(1.0, limit), env={**os.environ, **(env or {})},
                                  cwd=ROOT)  # fmt: skip
        except subprocess.TimeoutExpired as e:
            out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
            fh.write(out)
            return {"error": f"stopped after {limit:.0f} s", "seconds": limit}
    fh_text = proc.stdout
    with open(log, "a") as fh:
        fh.write(fh_text)
    secs = time.perf_counter() - t0
    if proc.returncode != 0:
        return {"error": f"exit {proc.returncode}, see {log.name}", "seconds": secs}
    last = fh_text.strip().splitlines()[-1] if fh_text.strip() else "{}"
    try:
        result = json.loads(last)
    except json.JSONDecodeError:
        result = {"output": fh_text[-4000:]}
    return {**result, "seconds": secs} if isinstance(result, dict) else {"result": result}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--out", default=os.environ.get("OUT", "gpu-session"),
                   help="folder for gpu_session.json and the stage logs ($OUT)")  # fmt: skip
    p.add_argument("--budget-s", type=float, default=480.0,
                   help="seconds for all stages (attribution stops when spent)")  # fmt: skip
    p.add_argument("--smoke", action="store_true", help="toy sizes on the CPU (checks the script)")
    p.add_argument("--layers", type=int, nargs="+", default=[2, 4],
                   help="LM layers of the attribution runs, in order")  # fmt: skip
    p.add_argument("--positions", type=int, default=1000)
    p.add_argument("--max-feature-nodes", type=int, default=2048)
    p.add_argument("--work", default="/tmp/vlmscope-gpu-session")
    p.add_argument("--stage", default="", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.stage:
        sys.path.insert(0, str(ROOT))
        args.layers = args.layers[0]
        print(json.dumps(STAGES[args.stage](args)), flush=True)
        return
    out, work = Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    if args.smoke:
        args.positions, args.max_feature_nodes, args.layers = 600, 64, args.layers[:1]
    deadline = time.perf_counter() + args.budget_s
    results: dict[str, Any] = {}

    def left() -> float:
        return deadline - time.perf_counter()

    def record(name: str, value: dict[str, Any]) -> None:
        results[name] = value
        (out / "gpu_session.json").write_text(json.dumps(results, indent=1))
        print(f"== {name}: {json.dumps(value)}", flush=True)

    record("env", run_child(args, "env", 180, out / "env.log"))
    kernel_env = {"TRITON_INTERPRET": "1"} if args.smoke else {}
    record("kernels", run_child(args, "kernels", min(300, left()), out / "kernels.log",
                                env=kernel_env))  # fmt: skip
    tt = [sys.executable, str(HERE / "train_throughput.py"), "--llava7b", "--layers", "4",
          "--steps", "10", "--warmup", "3"]  # fmt: skip
    if args.smoke:
        tt += ["--allow-cpu", "--device", "cpu", "--lm-layers", "1", "--vision-layers", "1",
               "--layers", "1", "--latents", "256", "--tokens", "64", "--steps", "1",
               "--warmup", "1", "--batch-size", "1"]  # fmt: skip
    for label, env in (("train_torch", {}), ("train_triton", {"VLMSCOPE_TRITON": "1"})):
        if left() < 60:
            record(label, {"error": "no budget left"})
            continue
        limit = min(900 if args.smoke else 150, left())  # the smoke run is a CPU at d 4096
        record(label, run_child(args, label, limit, out / f"{label}.log", env=env, cmd=tt))
    for n in args.layers:
        if left() < 60:
            record(f"attribution_L{n}", {"error": "no budget left"})
            continue
        record(f"attribution_L{n}", run_child(
            args, "attribution", left(), out / f"attribution_L{n}.log",
            extra=["--layers", str(n), "--positions", str(args.positions),
                   "--max-feature-nodes", str(args.max_feature_nodes)]))  # fmt: skip
    print(f"results in {out / 'gpu_session.json'}; stage logs beside it")


if __name__ == "__main__":
    main()
