"""Training throughput of SAEs, transcoders and CLTs: dictionary step alone and end to end.

    python benchmarks/train_throughput.py                      # toy VLM on CPU
    python benchmarks/train_throughput.py --llava7b --layers 4  # LLaVA-7B-shaped, needs a GPU
    python benchmarks/train_throughput.py --pipeline --steps 30  # images vs text, same tokens
    python benchmarks/train_throughput.py --llava7b --allow-cpu --lm-layers 2 --vision-layers 2 \
        --layers 2 --steps 2 --warmup 1 --batch-size 1 --tokens 64 --latents 4096 --expansion 1 \
        --k 8   # smoke run on a CPU

Prints tokens/s, peak memory and the time split (model forward / encoder / decoder /
backward / optimizer) for each dictionary kind; on a GPU also the fraction of the chip's peak
bf16 matmul FLOP/s that the dictionary step reaches.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from vlmscope.dictionaries import CrossLayerTranscoder, SparseCoder, SparseCoderConfig
from vlmscope.dictionaries.kernels import sparse_decode
from vlmscope.models.hooked import HookedVLM

#: dense bf16 tensor-core peaks (no sparsity), used for the MFU column.
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}
#: dense TF32 tensor-core peaks: the MFU of float32 dictionaries as `vlmscope train` runs them
#: on CUDA (--tf32, the default)
PEAK_TFLOPS_TF32 = {"H100": 494.7, "H200": 494.7, "A100": 156.0}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def timed(
    device: torch.device, fn: Callable[[], object], split: dict[str, float], key: str
) -> object:
    sync(device)
    t = time.perf_counter()
    out = fn()
    sync(device)
    split[key] = split.get(key, 0.0) + time.perf_counter() - t
    return out


def build(kind: str, d: int, n_layers: int, latents: int, k: int, device: torch.device):  # type: ignore[no-untyped-def]
    if kind == "clt":
        cfg = SparseCoderConfig(kind="clt", d_in=d, num_latents=latents, k=k, n_layers=n_layers)
        return CrossLayerTranscoder(cfg, device=device)
    cfg = SparseCoderConfig(kind=kind, d_in=d, num_latents=latents, k=k)
    return torch.nn.ModuleList([SparseCoder(cfg, device=device) for _ in range(n_layers)])


def dictionary_step(
    kind: str, model: torch.nn.Module, xs: list[torch.Tensor], ys: list[torch.Tensor],
    opt: torch.optim.Optimizer, device: torch.device, split: dict[str, float],
) -> None:  # fmt: skip
    """One training step split into encoder / decoder / backward / optimizer time."""
    if kind == "clt":
        clt = model
        pres = timed(
            device,
            lambda: [clt._pre(layer, x) for layer, x in zip(clt.layers, xs, strict=True)],
            split,
            "encoder",
        )  # type: ignore[attr-defined]
        codes = timed(
            device,
            lambda: [layer.activation(p) for layer, p in zip(clt.layers, pres, strict=True)],
            split,
            "encoder",
        )  # type: ignore[arg-type]
        recon = timed(device, lambda: clt._decode_n(codes, None), split, "decoder")  # type: ignore[attr-defined]
    else:
        pres = timed(
            device,
            lambda: [c._pre(c._scale_in(x)) for c, x in zip(model, xs, strict=True)],
            split,
            "encoder",
        )  # type: ignore[attr-defined]
        codes = timed(
            device,
            lambda: [c.activation(p) for c, p in zip(model, pres, strict=True)],
            split,
            "encoder",
        )  # type: ignore[arg-type,attr-defined]
        recon = timed(
            device,
            lambda: [
                sparse_decode(cd.values, cd.indices, c.W_dec) + c.b_dec
                for c, cd in zip(model, codes, strict=True)
            ],  # type: ignore[arg-type,attr-defined]
            split,
            "decoder",
        )

    def backward() -> None:
        loss = sum(((r - y) ** 2).mean() for r, y in zip(recon, ys, strict=True))  # type: ignore[arg-type]
        loss.backward()  # type: ignore[union-attr]

    timed(device, backward, split, "backward")
    timed(device, lambda: (opt.step(), opt.zero_grad(set_to_none=True)), split, "optimizer")


def dictionary_flops(kind: str, n: int, d: int, latents: int, k: int, n_layers: int) -> float:
    """Matmul FLOPs of one step: encoder (dense, x3 for fwd+bwd) and decoder (k rows per token)."""
    enc = 3 * 2 * n * d * latents * n_layers
    targets = n_layers * (n_layers + 1) / 2 if kind == "clt" else n_layers
    dec = 3 * 2 * n * k * d * targets
    return float(enc + dec)


def bench_dictionaries(args: argparse.Namespace, device: torch.device, d: int) -> list[dict]:
    """The dictionary step alone, per kind: in bf16 on a GPU, and in float32 on TF32 tensor
    cores as the trainer runs it there; float32 on a CPU."""
    from vlmscope.training.trainer import tf32_matmuls

    cuda = device.type == "cuda"
    rows = []
    for dtype in (torch.bfloat16, torch.float32) if cuda else (torch.float32,):
        with tf32_matmuls(device, True):
            rows += _bench_dictionaries(args, device, d, dtype)
    return rows


def _bench_dictionaries(
    args: argparse.Namespace, device: torch.device, d: int, dtype: torch.dtype
) -> list[dict]:
    rows = []
    n = args.tokens
    for kind in ("sae", "transcoder", "clt"):
        torch.manual_seed(0)
        model = build(kind, d, args.layers, args.latents or 8 * d, args.k, device)
        model.to(dtype)
        xs = [torch.randn(n, d, device=device, dtype=dtype) for _ in range(args.layers)]
        ys = (
            xs
            if kind == "sae"
            else [torch.randn(n, d, device=device, dtype=dtype) for _ in range(args.layers)]
        )
        opt = torch.optim.Adam(model.parameters(), lr=1e-4)
        split: dict[str, float] = {}
        for _ in range(args.warmup):
            dictionary_step(kind, model, xs, ys, opt, device, {})
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        for _ in range(args.steps):
            dictionary_step(kind, model, xs, ys, opt, device, split)
        total = sum(split.values())
        row = {
            "kind": kind,
            "dtype": "bf16"
            if dtype == torch.bfloat16
            else "fp32+tf32"
            if device.type == "cuda"
            else "fp32",
            "tokens_per_s": n * args.steps / total,
            "peak_mb": peak_memory_mb(device),
            **{k: 1000 * v / args.steps for k, v in split.items()},
        }
        if device.type == "cuda":
            flops = dictionary_flops(kind, n, d, args.latents or 8 * d, args.k, args.layers)
            name = torch.cuda.get_device_name(device)
            peaks = PEAK_TFLOPS if dtype == torch.bfloat16 else PEAK_TFLOPS_TF32
            peak = next((v for key, v in peaks.items() if key in name), None)
            row["tflops"] = flops * args.steps / total / 1e12
            row["mfu"] = row["tflops"] / peak if peak else float("nan")
        rows.append(row)
    return rows


def bench_end_to_end(args: argparse.Namespace, vlm: HookedVLM, device: torch.device) -> list[dict]:
    """Model forward with hooks + dictionary step, as the trainer runs it."""
    from vlmscope.data.processing import SampleEncoder, batches
    from vlmscope.training.bundle import mlp_out, resid_mid
    from vlmscope.training.config import TrainConfig
    from vlmscope.training.trainer import open_training_data

    data = open_training_data(TrainConfig(model=args.model, dataset="shapes:512", max_steps=1))
    enc = SampleEncoder(vlm.processor, 512, vlm.adapter.image_token_ids())
    pad = vlm.tokenizer.pad_token_id or 0
    batch_list = list(batches((enc.encode(r) for r in data), args.batch_size, pad))[
        : args.warmup + args.steps
    ]
    n_layers, d = vlm.adapter.n_layers, vlm.adapter.d_model
    rows = []
    for kind in ("sae", "transcoder", "clt"):
        torch.manual_seed(0)
        model = build(kind, d, n_layers, args.latents or 8 * d, args.k, device)
        opt = torch.optim.Adam(model.parameters(), lr=1e-4)
        reads = (
            [f"lm.blocks.{i}.hook_resid_post" for i in range(n_layers)]
            if kind == "sae"
            else [resid_mid(i) for i in range(n_layers)]
        )
        writes = reads if kind == "sae" else [mlp_out(i) for i in range(n_layers)]
        split: dict[str, float] = {}
        n_tok = 0
        names = list(dict.fromkeys(reads + writes))
        for step, batch in enumerate(batch_list):
            s = split if step >= args.warmup else {}
            masks = vlm.masks(batch.inputs)

            def fwd(batch=batch, masks=masks, names=names):  # type: ignore[no-untyped-def]
                return vlm.run_with_cache(
                    batch.inputs, names=names, mask=masks.select("all"), masks=masks
                )[1]

            cache = timed(device, fwd, s, "model_forward")
            xs = [cache[r].float() for r in reads]  # type: ignore[index]
            ys = [cache[w].float() for w in writes]  # type: ignore[index]
            dictionary_step(kind, model, xs, ys, opt, device, s)
            if step >= args.warmup:
                n_tok += xs[0].shape[0]
        total = sum(split.values())
        rows.append({"kind": kind, "tokens_per_s": n_tok / total, "peak_mb": peak_memory_mb(device),
                     **{k: 1000 * v / args.steps for k, v in split.items()}})  # fmt: skip
    return rows


def llava7b_random(
    lm_layers: int, vision_layers: int, device: torch.device, dtype: torch.dtype
) -> HookedVLM:
    """A randomly initialised model of LLaVA-1.5-7B's shape (CLIP ViT-L/14 at 336 px: 576 image
    tokens; Llama-7B decoder of width 4096), cut to `lm_layers` / `vision_layers` layers, with a
    working processor. Throughput depends on shapes, not on trained weights."""
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
    )

    from vlmscope.models.zoo.common import LLAVA_USER_ASSISTANT, train_tokenizer
    from vlmscope.models.zoo.llava import llava_processor

    tok = train_tokenizer(
        ["<image>"], named_tokens={"image_token": "<image>"}, chat_template=LLAVA_USER_ASSISTANT
    )
    processor = llava_processor(tok, 336, 14)
    vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_attention_heads=16,
                              num_hidden_layers=vision_layers, image_size=336, patch_size=14,
                              projection_dim=768)  # fmt: skip
    text = LlamaConfig(vocab_size=32064, hidden_size=4096, intermediate_size=11008,
                       num_hidden_layers=lm_layers, num_attention_heads=32, num_key_value_heads=32,
                       max_position_embeddings=4096, rms_norm_eps=1e-5,
                       pad_token_id=tok.pad_token_id)  # fmt: skip
    config = LlavaConfig(vision_config=vision, text_config=text,
                         image_token_id=tok.convert_tokens_to_ids("<image>"),
                         vision_feature_layer=-2, vision_feature_select_strategy="default",
                         pad_token_id=tok.pad_token_id)  # fmt: skip
    torch.manual_seed(0)
    with torch.device(device):
        model = LlavaForConditionalGeneration(config).to(dtype).eval()
    return HookedVLM(model, processor)


def bench_trainer(args: argparse.Namespace, vlm: HookedVLM, label: str) -> list[dict]:
    """The trainer itself (`vlmscope train`'s code: hooks, masks, AuxK, dead-latent counters,
    finite checks, optimizer), timed from its own metrics after the warm-up steps."""
    rows = []
    for kind in ("sae", "transcoder", "clt"):
        row = trainer_run(args, vlm, label, "shapes:512", kind, args.batch_size)
        rows.append({"kind": kind, **row})
    return rows


def trainer_run(args: argparse.Namespace, vlm: HookedVLM, label: str, dataset: str, kind: str,
                batch_size: int, extra: str = "") -> dict:  # fmt: skip
    """tokens/s, peak memory and ms per step of one `vlmscope train` run after the warm-up."""
    import json
    import tempfile

    from vlmscope.training.config import parse_train_args
    from vlmscope.training.trainer import train

    n_layers = vlm.adapter.n_layers
    layers = " ".join(str(i) for i in range(min(args.layers, n_layers)))
    with tempfile.TemporaryDirectory() as out:
        # an SAE reads hook_resid_post of --layers (a --hookpoints pattern would take them all)
        flags = (f"{label} {dataset} --sae.kind {kind} --layers {layers} "
                 f"--sae.expansion-factor {args.expansion} --sae.k {args.k} "
                 f"--batch-size {batch_size} "
                 f"--max-steps {args.warmup + args.steps} --max-tokens 0 --log-every 1 "
                 f"--save-every 100000 --ctx-len 1024 --output-dir {out} --run-name {kind} "
                 f"--device {vlm.device} {extra}")  # fmt: skip
        cfg = parse_train_args(flags.split())
        if vlm.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(vlm.device)
        res = train(cfg, vlm, progress=False)
        logs = [json.loads(x) for x in (res.run_dir / "metrics.jsonl").read_text().splitlines()]
    # tokens_per_s is cumulative from the start: recover the time at each logged step.
    first, last = logs[args.warmup - 1], logs[-1]
    secs = last["tokens"] / last["tokens_per_s"] - first["tokens"] / first["tokens_per_s"]
    return {"tokens_per_s": (last["tokens"] - first["tokens"]) / secs,
            "peak_mb": peak_memory_mb(vlm.device), "ms_per_step": 1000 * secs / args.steps,
            "tokens_per_step": (last["tokens"] - first["tokens"]) / args.steps}  # fmt: skip


def bench_pipeline(args: argparse.Namespace, vlm: HookedVLM) -> list[dict]:
    """The trainer on the shapes world with its images against the same conversations as text
    alone, at (about) the same trained tokens per step: the text run's batch holds more
    conversations. Measures what images cost beyond their tokens (image loading and
    processing, the vision tower) with data prepared off the training loop."""
    import json
    import tempfile

    from vlmscope.data.processing import SampleEncoder
    from vlmscope.training.config import TrainConfig
    from vlmscope.training.trainer import open_training_data

    data = open_training_data(TrainConfig(model=args.model, dataset="shapes:512", max_steps=1))
    records = list(data)
    enc = SampleEncoder(vlm.processor, 1024, vlm.adapter.image_token_ids())

    def text_only(m: dict) -> dict:
        parts = m["content"] if isinstance(m["content"], list) else [m["content"]]
        text = " ".join(p if isinstance(p, str) else p.get("text", "") for p in parts)
        return {"role": m["role"], "content": text.strip()}

    def trained_tokens(with_images: bool) -> float:
        n = 0
        for r in records[:64]:
            if not with_images:
                r = type(r)(r.row_id, [text_only(m) for m in r.messages], [], r.text, r.position)
            masks = vlm.masks(enc.encode(r).tensors)
            n += int(masks.select("all", include_special=False).sum())
        return n / 64

    per_vlm, per_text = trained_tokens(True), trained_tokens(False)
    text_batch = max(1, round(args.batch_size * per_vlm / per_text))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "shapes_text.jsonl"
        with path.open("w") as f:
            for r in records:
                f.write(json.dumps({"messages": [text_only(m) for m in r.messages]}) + "\n")
        for workers in args.pipeline_workers:
            extra = f"--workers {workers}"
            for kind in ("sae", "transcoder"):
                img = trainer_run(args, vlm, args.model, "shapes:512", kind, args.batch_size,
                                  extra)  # fmt: skip
                txt = trainer_run(args, vlm, args.model, str(path), kind, text_batch, extra)
                rows.append({"kind": f"{kind} w={workers}", "vlm_tok_s": img["tokens_per_s"],
                             "text_tok_s": txt["tokens_per_s"],
                             "ratio": img["tokens_per_s"] / txt["tokens_per_s"],
                             "vlm_tok_step": img["tokens_per_step"],
                             "text_tok_step": txt["tokens_per_step"]})  # fmt: skip
    print(
        f"batch {args.batch_size} with images ({per_vlm:.1f} trained tokens per sample), "
        f"{text_batch} as text ({per_text:.1f})"
    )
    return rows


def print_table(title: str, rows: list[dict]) -> None:
    order = ("tokens_per_s", "peak_mb", "ms_per_step", "model_forward", "encoder", "decoder",
             "backward", "optimizer", "tflops", "mfu", "vlm_tok_s", "text_tok_s", "ratio",
             "vlm_tok_step", "text_tok_step")  # fmt: skip
    keys = [k for k in order if k in rows[0]]
    print(f"\n{title}")
    print(f"{'kind':<22}" + "".join(f"{k:>15}" for k in keys))
    for r in rows:
        label = f"{r['kind']} {r['dtype']}" if "dtype" in r else r["kind"]
        print(f"{label:<22}" + "".join(f"{r[k]:>15.2f}" for k in keys))
    print("(times in ms per step; peak_mb is the process peak RSS on CPU, allocated memory on GPU)")


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", default="toy", help="model for the end-to-end run (default: toy)")
    p.add_argument("--llava7b", action="store_true", help="dictionary step at LLaVA-7B width (GPU)")
    p.add_argument("--layers", type=int, default=4, help="layers trained at once")
    p.add_argument("--latents", type=int, default=0, help="latents per layer (default 8 x d)")
    p.add_argument("--expansion", type=int, default=8, help="trainer runs: latents per dimension")
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--tokens", type=int, default=2048, help="tokens per dictionary step")
    p.add_argument("--batch-size", type=int, default=8, help="samples per model forward")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--lm-layers", type=int, default=32, help="--llava7b: decoder layers built")
    p.add_argument("--vision-layers", type=int, default=24, help="--llava7b: CLIP layers built")
    p.add_argument("--allow-cpu", action="store_true", help="--llava7b on CPU (a smoke run)")
    p.add_argument(
        "--pipeline",
        action="store_true",
        help="only the trainer with images vs text alone at equal tokens per step",
    )
    p.add_argument("--pipeline-workers", type=int, nargs="+", default=[0, 1],
                   help="--pipeline: the --workers values to compare")  # fmt: skip
    args = p.parse_args()
    device = torch.device(args.device)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    print(f"device: {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}, "
          f"threads: {torch.get_num_threads()}, torch {torch.__version__}")  # fmt: skip
    if args.llava7b:
        if device.type != "cuda" and not args.allow_cpu:
            print("--llava7b needs a GPU (--allow-cpu runs it anyway, slowly); skipped")
            return
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        print_table(f"dictionary step alone, d=4096, {args.layers} layers, {args.tokens} tokens",
                    bench_dictionaries(args, device, 4096))  # fmt: skip
        vlm = llava7b_random(args.lm_layers, args.vision_layers, device, dtype)
        print_table(f"trainer end to end, random LLaVA-7B shape ({args.lm_layers} LM layers, "
                    f"{args.vision_layers} vision layers, {dtype}), batch {args.batch_size}",
                    bench_trainer(args, vlm, "llava-7b-random"))  # fmt: skip
        return
    from vlmscope.training.trainer import resolve_model_path

    vlm = HookedVLM.from_pretrained(resolve_model_path(args.model), device=str(device))
    if args.pipeline:
        print_table(f"trainer on {args.model}: shapes with images vs as text alone",
                    bench_pipeline(args, vlm))  # fmt: skip
        return
    d = vlm.adapter.d_model
    print_table(f"dictionary step alone, d={d}, {args.layers} layers, {args.tokens} tokens",
                bench_dictionaries(args, device, d))  # fmt: skip
    print_table(f"end to end on {args.model} (forward + dictionaries), batch {args.batch_size}",
                bench_end_to_end(args, vlm, device))  # fmt: skip
    print_table(f"trainer end to end on {args.model}, batch {args.batch_size}",
                bench_trainer(args, vlm, args.model))  # fmt: skip


if __name__ == "__main__":
    main()
