"""vlmscope against EleutherAI's sparsify (eai-sparsify 1.3.3), side by side on the same tokens.

    python benchmarks/vs_sparsify.py              # creates ../<repo>-peers/sparsify once
    python benchmarks/vs_sparsify.py --tokens 81920 --kinds sae transcoder
    python benchmarks/vs_sparsify.py --synthetic 512 --expansion 16 --batch-tokens 2048 --repeat 1
    python benchmarks/vs_sparsify.py --random-llama 512 --kinds sae transcoder --layer 1 --repeat 1
    python benchmarks/vs_sparsify.py --model PATH --dataset DATA --heldout-split train \\
        --modalities text --kinds sae transcoder --layer 6     # your own weights and prompts

What is compared. The toy VLM's activations (shapes world, train split; held-out FVU on the
test split) are captured once with vlmscope's hooks and written to a folder; both tools then
train on exactly those rows, in the same order, the same number of tokens per step, each in a
fresh process of its own (so the peak RSS column is each tool's own):

- text: the conversations with their images removed, run through the toy's language model;
- vlm: the same conversations with their images (the toy's image tokens: 64 each; 16 on the
  v1 toy that the figures in benchmarks/README.md dated before 2026-12-01 were measured on).

A model without an image processor gives text rows only, and one that cannot give text rows
(PaliGemma's processor wants an image in every prompt; Mllama's cross-attention layers, when
a CLT or --layer reads one, run only with images) rows with images only; the driver says
which rows it left out and why.

Per kind:
- sae: `lm.blocks.L.hook_resid_post` -> itself; sparsify's `SparseCoder` (SAE config).
- transcoder: `hook_resid_mid` -> `mlp.hook_out` of layer L; sparsify's `SparseCoder` with
  `transcode=True` fed the same input and target.
- clt: vlmscope's cross-layer transcoder over every layer (each layer's features write to
  its own and all later MLP outputs) against what sparsify 1.3.3 offers for the job, one
  per-layer transcoder per layer, trained on the same pairs. Same latents per layer and k.

sparsify runs its own training step as its `Trainer` does (first batch: b_dec = target mean,
transcoders b_enc = -mean(x) W_enc^T; unit-norm decoder upkeep for SAEs; its default
optimizer, sign-SGD under a schedule-free wrapper, evaluated after `optimizer.eval()` as its
`save` does; AuxK off, its default). Its `Trainer` class itself needs a Hugging Face causal LM
and token ids, so it cannot take the VLM's image tokens; its training step is what is timed.
vlmscope runs the step of `vlmscope train` (init_from_data on the first batch, the trainer's
activation normalisation, optimiser, learning-rate rule and schedule: `--optimizer auto` is
signum for SAEs, Adam for transcoders and CLTs, see training/optim.py; decoder-norm upkeep,
dead-latent counters), and
its held-out FVU is that of the weights it would save (signum: the schedule-free average).
tokens/s is the dictionary step alone (forward, backward, optimizer) after `--warmup` steps,
from the median step time (the mean is in the --json output);
the model forward that produced the activations is the same for both and is left out.
Keep this out of `make test`: it installs a package and trains for minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
SPARSIFY = "eai-sparsify==1.3.3"


# --------------------------------------------------------------------------- shared helpers


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def reset_peak_rss() -> None:
    """Restart the kernel's peak-RSS count (VmHWM) from the current RSS (Linux)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_rss_since_reset_mb() -> float:
    with open("/proc/self/status") as f:
        line = next(x for x in f if x.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024


def fvu(y: torch.Tensor, y_hat: torch.Tensor) -> float:
    return float((y - y_hat).pow(2).sum() / (y - y.mean(0)).pow(2).sum())


def load_rows(folder: Path, name: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / f"{name}.safetensors"))


def pairs_for(kind: str, tensors: dict[str, torch.Tensor], layers: list[int]) -> list[tuple]:
    """(x, y) per trained unit: an SAE reconstructs resid_post, transcoders map resid_mid to
    the MLP output."""
    kx, ky = ("resid_post", "resid_post") if kind == "sae" else ("resid_mid", "mlp_out")
    missing = sorted({f"{k}.{i}" for i in layers for k in (kx, ky)} - set(tensors))
    if missing:
        raise SystemExit(
            f"the captured rows lack {', '.join(missing)} (a --layer or kind they were not "
            "captured for): use another --activations folder"
        )
    return [(tensors[f"{kx}.{i}"], tensors[f"{ky}.{i}"]) for i in layers]


# --------------------------------------------------------------------------- capture


def capture(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """Activations of `--model` (the toy VLM by default) on `--dataset` (the shapes world by
    default), with and without images: the layers the kinds train, as `vlmscope train` hooks
    them."""
    sys.path.insert(0, str(ROOT))
    from safetensors.torch import save_file

    from vlmscope.data.processing import SampleEncoder, SkipRecord, batches
    from vlmscope.models.hooked import HookedVLM
    from vlmscope.training.config import TrainConfig
    from vlmscope.training.sources import open_training_data, resolve_model_path

    vlm = HookedVLM.from_pretrained(resolve_model_path(args.model))
    n_layers = vlm.adapter.n_layers
    if not 0 <= args.layer < n_layers:
        raise SystemExit(f"--layer {args.layer}: {args.model} has layers 0..{n_layers - 1}")
    # a CLT reads every layer; otherwise only --layer is kept (a 32-layer model's every hook
    # would not fit in memory)
    layers = list(range(n_layers)) if "clt" in args.kinds else [args.layer]
    names = [f"lm.blocks.{i}.{h}" for i in layers
             for h in ("hook_resid_post", "hook_resid_mid", "mlp.hook_out")]  # fmt: skip
    enc = SampleEncoder(vlm.processor, 512, vlm.adapter.image_token_ids())
    if not enc.has_images and "vlm" in args.modalities:
        if args.modalities == ["vlm"]:
            raise SystemExit(f"--modalities vlm: {args.model} has no image processor, so no "
                             "rows with images; use --modalities text")  # fmt: skip
        print(f"{args.model} has no image processor: text rows only (--modalities text)")
        args.modalities = [m for m in args.modalities if m != "vlm"]
    pad = vlm.tokenizer.pad_token_id or 0
    info: dict[str, Any] = {"layers": n_layers, "d": vlm.adapter.d_model, "model": args.model,
                            "dataset": args.dataset}  # fmt: skip
    train_budget = args.tokens + args.warmup * args.batch_tokens
    # held-out rows from their own split, or (--heldout-split train) the rows after the
    # training rows of the train split
    same = args.heldout_split == "train"
    plan = [("train", train_budget + (args.heldout_tokens if same else 0))]
    if not same:
        plan.append((args.heldout_split, args.heldout_tokens))
    for split, budget in plan:
        # the files this split's rows go to (both when the held-out rows come from train)
        writes = ["train", "test"] if same else ["train" if split == "train" else "test"]
        dataset = args.dataset
        if args.dataset == "shapes":  # 4,000 scenes hold ~64k text tokens; longer budgets more
            dataset = f"shapes:{max(4000, -(-budget // 12))}"
        cfg = TrainConfig(model=args.model, dataset=dataset, split=split, max_steps=1)
        for modality in list(args.modalities):
            if all((out / f"{modality}_{w}.safetensors").exists() for w in writes):
                continue
            try:
                records = open_training_data(cfg)
            except (ValueError, FileNotFoundError) as e:
                if split == "train":
                    raise
                hint = "--heldout-split train holds out the train rows after the training rows"
                raise SystemExit(f"held-out rows: {e}. {hint}") from None
            rows: dict[str, list[torch.Tensor]] = {}
            n = 0
            skipped: list[SkipRecord] = []

            def stream(records=records, modality=modality, skipped=skipped):  # type: ignore[no-untyped-def]
                encoded = 0
                for r in records:
                    if modality == "text":
                        r.messages = [_text_only(m) for m in r.messages]
                        r.images = []
                    try:  # as the trainer does: a record the processor refuses is skipped
                        sample = enc.encode(r)
                    except SkipRecord as e:
                        skipped.append(e)
                        if not encoded and len(skipped) >= 32:  # refused every time: say why
                            return
                        continue
                    encoded += 1
                    yield sample

            for batch in batches(stream(), 32, pad, masks=vlm.masks):
                sel = batch.masks.select("all", include_special=False)  # type: ignore[union-attr]
                _, cache = vlm.run_with_cache(batch.inputs, names=names, mask=sel,
                                              masks=batch.masks)  # fmt: skip
                missing = [name for name in names if name not in cache]
                if missing:  # e.g. Mllama's cross-attention layers, which run only with images
                    _drop(args, modality, f"{', '.join(missing[:3])} did not run on its rows")
                    break
                for name in names:
                    _, _, layer, hook = name.split(".", 3)  # lm.blocks.L.<hook>
                    key = f"{hook.replace('hook_', '').replace('mlp.', 'mlp_')}.{layer}"
                    rows.setdefault(key, []).append(cache[name].float())
                n += int(sel.sum())
                if n >= budget:
                    break
            if modality not in args.modalities:
                continue
            if n == 0 and skipped:
                _drop(args, modality, f"the processor refused its first {len(skipped)} "
                                      f"prompts ({skipped[0]})")  # fmt: skip
                continue
            if n < budget:
                raise SystemExit(f"{args.dataset} {split}/{modality}: only {n} tokens, "
                                 f"{budget} needed")  # fmt: skip
            tensors = {k: torch.cat(v)[:budget].contiguous() for k, v in rows.items()}
            if "train" in writes:
                save_file({k: v[:train_budget].contiguous() for k, v in tensors.items()},
                          str(out / f"{modality}_train.safetensors"))  # fmt: skip
            if "test" in writes:
                save_file({k: v[-args.heldout_tokens:].contiguous() for k, v in tensors.items()},
                          str(out / f"{modality}_test.safetensors"))  # fmt: skip
    return info


def synthesise(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """--synthetic D: activations of a made-up 2-layer residual stream of width D, for sizes the
    toy cannot reach. Each token is a sparse sum of 16 of 8 D true directions (exponential
    magnitudes) plus noise; each layer's MLP output is a random GELU MLP of its input (width 4
    D), scaled to the input's norm; resid_post = resid_mid + mlp_out feeds the next layer."""
    from safetensors.torch import save_file

    d, n_layers, n_true, active = args.synthetic, 2, 8 * args.synthetic, 16
    gen = torch.Generator().manual_seed(1234)
    directions = torch.nn.functional.normalize(torch.randn(n_true, d, generator=gen), dim=1)
    mlps = [
        (torch.randn(d, 4 * d, generator=gen) / d**0.5, torch.randn(4 * d, d, generator=gen) / d)
        for _ in range(n_layers)
    ]
    for split, n in (("train", args.tokens + args.warmup * args.batch_tokens),
                     ("test", args.heldout_tokens)):  # fmt: skip
        path = out / f"synthetic_{split}.safetensors"
        if path.exists():
            continue
        which = torch.rand(n, n_true, generator=gen).topk(active, dim=1).indices
        size = -torch.rand(n, active, generator=gen).log()
        parts = size.reshape(-1, 1) * directions[which.reshape(-1)]
        x = torch.zeros(n, d).index_add_(0, torch.arange(n).repeat_interleave(active), parts)
        x += 0.05 * torch.randn(n, d, generator=gen)
        tensors = {}
        for layer, (a, b) in enumerate(mlps):
            mlp = torch.nn.functional.gelu(x @ a) @ b
            mlp *= x.norm(dim=1, keepdim=True).mean() / mlp.norm(dim=1, keepdim=True).mean()
            tensors[f"resid_mid.{layer}"], tensors[f"mlp_out.{layer}"] = x, mlp
            x = x + mlp
            tensors[f"resid_post.{layer}"] = x
        save_file({k: v.clone() for k, v in tensors.items()}, str(path))  # some are shared
    return {"layers": n_layers, "d": d}


def random_llama_rows(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """--random-llama D: activations of the seeded random 8-layer Llama of width D that
    vs_sparsify_e2e.py trains on, reading documents of its 30 words (BOS dropped): a third kind
    of rows, whose MLP outputs are a random function of their inputs with no sparse structure
    behind them."""
    import random

    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from vs_circuit_tracer import save_random_llama
    from vs_sparsify_e2e import WORDS

    n_layers = 8
    if not (out / "model").exists():
        save_random_llama(out / "model", args.random_llama, n_layers)
    tok = AutoTokenizer.from_pretrained(out / "model")
    model = AutoModelForCausalLM.from_pretrained(out / "model").eval()
    rng = random.Random(args.seed)
    caps: dict[str, torch.Tensor] = {}

    def keep(key: str) -> Any:
        return lambda _m, _a, o: caps.__setitem__(key, o[0] if isinstance(o, tuple) else o)

    for i, layer in enumerate(model.model.layers):
        layer.post_attention_layernorm.register_forward_pre_hook(
            lambda _m, a, i=i: caps.__setitem__(f"resid_mid.{i}", a[0])
        )
        layer.mlp.register_forward_hook(keep(f"mlp_out.{i}"))
        layer.register_forward_hook(keep(f"resid_post.{i}"))
    for split, budget in (("train", args.tokens + args.warmup * args.batch_tokens),
                          ("test", args.heldout_tokens)):  # fmt: skip
        path = out / f"llama_{split}.safetensors"
        if path.exists():
            continue
        rows: dict[str, list[torch.Tensor]] = {}
        n = 0
        while n < budget:
            text = " ".join(rng.choice(WORDS) for _ in range(300))
            ids = tok(text, return_tensors="pt").input_ids[:, :256]
            with torch.no_grad():
                model(ids)
            for key, v in caps.items():
                rows.setdefault(key, []).append(v[0, 1:].float())
            n += ids.shape[1] - 1
        save_file({k: torch.cat(v)[:budget].contiguous() for k, v in rows.items()}, str(path))
    return {"layers": n_layers, "d": args.random_llama}


def _drop(args: argparse.Namespace, modality: str, why: str) -> None:
    """Leave out `modality`'s rows, saying why; stop when no modality is left."""
    what = {"text": "text rows (images removed)", "vlm": "rows with images"}[modality]
    args.modalities = [m for m in args.modalities if m != modality]
    if not args.modalities:
        raise SystemExit(f"{args.model}: no {what} to compare: {why}")
    print(f"{args.model}: {what} left out: {why}; comparing on {' '.join(args.modalities)}")


def _text_only(message: dict[str, Any]) -> dict[str, Any]:
    content = message["content"]
    if isinstance(content, list):
        content = " ".join(p.get("text", "") for p in content if p.get("type") == "text")
    return {**message, "content": content.strip()}


# --------------------------------------------------------------------------- the two trainers


def run_sparsify(args: argparse.Namespace, folder: Path, kind: str, modality: str) -> dict:
    """sparsify's training step on the captured rows (see the module docstring)."""
    from schedulefree import ScheduleFreeWrapper
    from sparsify import SparseCoder, SparseCoderConfig
    from sparsify.sign_sgd import SignSGD

    info = json.loads((folder / "info.json").read_text())
    layers = list(range(info["layers"])) if kind == "clt" else [args.layer]
    train = pairs_for(kind, load_rows(folder, f"{modality}_train"), layers)
    test = pairs_for(kind, load_rows(folder, f"{modality}_test"), layers)
    transcode = kind != "sae"
    torch.manual_seed(args.seed)
    coders = []
    for _ in layers:
        cfg = SparseCoderConfig(expansion_factor=args.expansion, k=args.k, transcode=transcode)
        coders.append(SparseCoder(info["d"], cfg, "cpu", dtype=torch.float32))
    lr = 5e-3 / (coders[0].num_latents / 2**14) ** 0.5  # sparsify's default for signum
    params = [{"params": c.parameters(), "lr": lr} for c in coders]
    opt = ScheduleFreeWrapper(SignSGD(params), momentum=0.95)
    opt.train()

    def step(i: int) -> None:
        sl = slice(i * args.batch_tokens, (i + 1) * args.batch_tokens)
        for c, (x, y) in zip(coders, train, strict=True):
            xb, yb = x[sl], y[sl]
            if i == 0:
                with torch.no_grad():
                    if transcode:
                        c.encoder.bias.data = -xb.mean(0) @ c.encoder.weight.data.T
                    c.b_dec.data = yb.mean(0)
            if not transcode:
                c.set_decoder_norm_to_unit_norm()
            out = c(x=xb, y=yb, dead_mask=None)
            out.fvu.backward()
        if not transcode:
            for c in coders:
                c.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        opt.zero_grad()

    return _timed_loop(args, step, lambda: _sparsify_heldout(opt, coders, test))


def _sparsify_heldout(opt: Any, coders: list, test: list[tuple]) -> list[float]:
    opt.eval()  # schedule-free: evaluate the averaged weights, as sparsify's save does
    with torch.no_grad():
        out = [fvu(y, c(x=x, y=y).sae_out) for c, (x, y) in zip(coders, test, strict=True)]
    opt.train()
    return out


def run_vlmscope(args: argparse.Namespace, folder: Path, kind: str, modality: str) -> dict:
    """vlmscope's training step (what `vlmscope train` runs per batch) on the captured rows."""
    sys.path.insert(0, str(ROOT))
    from vlmscope.dictionaries import CrossLayerTranscoder, SparseCoder, SparseCoderConfig
    from vlmscope.training.bundle import DictionaryBundle
    from vlmscope.training.config import SaeArgs, TrainConfig
    from vlmscope.training.lr_probe import probe_lr
    from vlmscope.training.optim import (
        averaged,
        build_optimizer,
        is_schedule_free,
        lr_multiplier,
        take_step,
    )

    info = json.loads((folder / "info.json").read_text())
    layers = list(range(info["layers"])) if kind == "clt" else [args.layer]
    train = pairs_for(kind, load_rows(folder, f"{modality}_train"), layers)
    test = pairs_for(kind, load_rows(folder, f"{modality}_test"), layers)
    swap_init(args.init)
    if args.centring >= 0:
        from vlmscope.dictionaries import coder

        coder.CENTRING_GRID = (args.centring,)
    torch.manual_seed(args.seed)
    d = info["d"]
    sae = SaeArgs(kind=kind)
    if args.normalize != "auto":
        sae.normalize_activations = args.normalize
    common = {"d_in": d, "expansion_factor": args.expansion, "k": args.k,
              "normalize_activations": sae.normalize_activations,
              "activation": args.activation}  # fmt: skip
    if kind == "clt":
        cfg = SparseCoderConfig(kind="clt", n_layers=len(layers), **common)
        model: Any = CrossLayerTranscoder(cfg)
    else:
        cfg = SparseCoderConfig(kind=kind, **common)
        model = SparseCoder(cfg)
    model.train()
    tcfg = TrainConfig(model="toy", dataset="shapes", max_tokens=args.tokens, sae=sae,
                       optimizer=args.optimizer)  # fmt: skip
    warmup = tcfg.lr_warmup_fraction if args.lr_warmup < 0 else args.lr_warmup
    decay = tcfg.resolved_lr_decay() if args.lr_decay < 0 else args.lr_decay
    base_lr = tcfg.lr_for(cfg.num_latents) * args.lr_scale
    opt = build_optimizer(tcfg.resolved_optimizer(), model.parameters(), base_lr)
    # the trainer's order: unit decoder rows after an Adam step, before a schedule-free forward
    norm_before = cfg.normalize_decoder and is_schedule_free(opt)
    xs_all, ys_all = [x for x, _ in train], [y for _, y in train]

    def call(xs: list[torch.Tensor], ys: list[torch.Tensor]) -> Any:
        if kind == "clt":
            return model(xs, ys)
        return model(xs[0]) if kind == "sae" else model(xs[0], ys[0])

    total = args.tokens + args.warmup * args.batch_tokens
    probe: dict[str, Any] = {}

    def batch(i: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        sl = slice(i * args.batch_tokens, (i + 1) * args.batch_tokens)
        return [x[sl] for x in xs_all], [y[sl] for y in ys_all]

    def step(i: int) -> None:
        nonlocal base_lr
        xs, ys = batch(i)
        if i == 0:
            if kind == "clt":
                model.init_from_data(xs, ys)
            else:
                model.init_from_data(xs[0], None if kind == "sae" else ys[0])
            if args.lr_probe:  # what `vlmscope train --lr-probe N` does after the init
                t0 = time.perf_counter()
                hooks = [str(n) for n in range(len(xs))]
                bundle = DictionaryBundle(kind, model if kind == "clt" else {"0": model},
                                          hooks, hooks, {})  # fmt: skip
                result = probe_lr(
                    bundle, tcfg.resolved_optimizer(), base_lr,
                    [[batch(j)] for j in range(args.lr_probe)], batch(args.lr_probe),
                    lambda _: None, bool(cfg.normalize_decoder),
                )  # fmt: skip
                base_lr *= result.scale
                probe.update(seconds=time.perf_counter() - t0, scale=result.scale,
                             score={str(k): v for k, v in result.score.items()})  # fmt: skip
        if norm_before:
            model.set_decoder_norm_to_unit_norm()
        call(xs, ys).loss.backward()
        # The trainer's schedule, counted in tokens of this run (warm-up steps included).
        lr = base_lr * lr_multiplier((i + 1) * args.batch_tokens / total, warmup, decay)
        take_step(model, opt, lr, bool(cfg.normalize_decoder))

    def heldout() -> list[float]:
        model.eval()
        with torch.no_grad(), averaged(opt):  # signum: the averaged weights, as saved
            out = call([x for x, _ in test], [y for _, y in test])
        model.train()
        recons = out.reconstruction if kind == "clt" else [out.reconstruction]
        return [fvu(y, r) for (_, y), r in zip(test, recons, strict=True)]

    out = _timed_loop(args, step, heldout)
    if probe:  # the probe's time counted in the run's mean tokens/s (the median step has none)
        out["probe"] = probe
        out["tokens_per_s_mean"] = args.tokens / (args.tokens / out["tokens_per_s_mean"]
                                                  + probe["seconds"])  # fmt: skip
    return out


def swap_init(mode: str) -> None:
    """--init: vlmscope's data-fitted init (`now`), none (`before`: unit rows, W_enc = W_dec,
    b_enc = 0, as vlmscope had it), or sparsify's (nn.Linear's uniform encoder rows, the SAE
    decoder their unit-norm copy, transcoders' b_enc centred on the first batch)."""
    import math

    from vlmscope.dictionaries import clt, coder

    def sparsify_like(unit: Any, x_n: torch.Tensor, centre: torch.Tensor | None) -> None:
        d = unit.W_enc.shape[1]
        w = (torch.rand(unit.W_enc.shape) * 2 - 1) / math.sqrt(d)
        unit.W_enc.copy_(w)
        if centre is not None:
            unit.W_dec.copy_(w / w.norm(dim=1, keepdim=True))
            unit.b_enc.zero_()
        else:
            unit.b_enc.copy_(-(x_n.mean(0) @ w.T))

    if mode != "now":
        fn = sparsify_like if mode == "sparsify" else (lambda *a: None)
        coder.fit_init_to_data_ = clt.fit_init_to_data_ = fn  # type: ignore[assignment]


def _timed_loop(args: argparse.Namespace, step: Any, heldout: Any) -> dict:
    """Run the steps; tokens/s of the timed ones, and the peak memory the training adds to
    the process after the activations were loaded (both tools hold the same arrays). The
    held-out evaluations are left out of the peak: each tool's is the benchmark's own code
    (one forward over all held-out rows), not its training."""
    torch.set_num_threads(args.threads)
    base = rss_mb()
    reset_peak_rss()
    peak = 0.0
    n_steps = args.tokens // args.batch_tokens
    curve = []
    for i in range(args.warmup):
        step(i)
    step_secs = []
    for i in range(args.warmup, args.warmup + n_steps):
        t0 = time.perf_counter()
        step(i)
        step_secs.append(time.perf_counter() - t0)
        if args.curve and (i - args.warmup + 1) % args.curve == 0:
            peak = max(peak, peak_rss_since_reset_mb())
            curve.append(((i + 1) * args.batch_tokens, sum(heldout()) / len(heldout())))
            reset_peak_rss()
    added = max(peak, peak_rss_since_reset_mb()) - base
    per_unit = heldout()
    # The median step: on a shared machine a neighbour's burst stalls a few steps of one tool
    # and not the other; the mean (all steps' time) is kept beside it.
    median = sorted(step_secs)[len(step_secs) // 2]
    return {"tokens_per_s": args.batch_tokens / median,
            "tokens_per_s_mean": n_steps * args.batch_tokens / sum(step_secs), "peak_mb": added,
            "fvu": sum(per_unit) / len(per_unit), "fvu_per_unit": per_unit,
            "curve": curve}  # fmt: skip


# --------------------------------------------------------------------------- driver


def sparsify_python(args: argparse.Namespace) -> Path:
    venv = Path(args.sparsify_venv)
    python = venv / "bin" / "python"
    if not python.exists():
        print(f"creating {venv} with {SPARSIFY} (torch pinned by constraints.txt)")
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", "-c",
                        str(ROOT / "constraints.txt"), SPARSIFY], check=True)  # fmt: skip
    return python


def child(python: Path, role: str, args: argparse.Namespace, folder: Path, kind: str,
          modality: str) -> dict:  # fmt: skip
    cmd = [str(python), __file__, "--role", role, "--data", str(folder), "--kind", kind,
           "--modality", modality, *args.passthrough]  # fmt: skip
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from vlmscope.torch_env import ALLOC_ENV, spin_env

    # torch's allocator alike for both (huge pages, as `vlmscope train` sets them); OpenMP's
    # shorter spin for vlmscope's role, which `vlmscope train` sets for its numpy selection
    # threads (vlmscope/torch_env.py)
    env = {**ALLOC_ENV, **os.environ, "PYTHONWARNINGS": "ignore"}
    if role == "vlmscope":
        env.update(spin_env(env))
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if res.returncode:
        raise SystemExit(f"{role} {kind}/{modality} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


class _Help(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The module docstring as written, and every flag's default."""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=_Help)
    p.add_argument("--tokens", type=int, default=40960, help="training tokens per run (timed)")
    p.add_argument("--batch-tokens", type=int, default=512, help="tokens per step, both tools")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps before the timed ones")
    p.add_argument("--heldout-tokens", type=int, default=8192,
                   help="tokens the held-out FVU is measured on")  # fmt: skip
    p.add_argument("--expansion", type=int, default=8, help="latents per input dimension")
    p.add_argument("--k", type=int, default=32, help="latents active per token (TopK)")
    p.add_argument("--layer", type=int, default=2, help="layer of the SAE and transcoder")
    p.add_argument(
        "--model",
        default="toy",
        help="whose activations: `toy` (the shipped toy VLM), a zoo name, or a "
        "Hugging Face model folder or name, as `vlmscope train` takes it",
    )
    p.add_argument(
        "--dataset",
        default="shapes",
        help="what it reads: `shapes` (the shapes world) or a dataset as "
        "`vlmscope train` takes it (chat schema)",
    )
    p.add_argument("--heldout-split", default="test",
                   help="split of the held-out rows; `train`: the rows after the training "
                        "rows")  # fmt: skip
    p.add_argument("--seed", type=int, default=0, help="seed of both tools' initialisation")
    p.add_argument("--threads", type=int, default=2, help="torch threads in each trainer")
    p.add_argument("--repeat", type=int, default=3,
                   help="runs of each tool per row, alternating; prints the median")  # fmt: skip
    p.add_argument("--curve", type=int, default=0, help="held-out FVU every N steps (0: end)")
    p.add_argument("--kinds", nargs="+", default=["sae", "transcoder", "clt"],
                   choices=["sae", "transcoder", "clt"], help="rows: dictionary kinds")  # fmt: skip
    p.add_argument("--init", default="now", choices=["now", "before", "sparsify"],
                   help="vlmscope's init (see swap_init), to compare inits")  # fmt: skip
    p.add_argument("--centring", type=float, default=-1.0,
                   help="with --init now: the share of the input mean transcoders and CLTs "
                        "remove at init (-1: coder.choose_centring picks it)")  # fmt: skip
    p.add_argument("--modalities", nargs="+", default=["text", "vlm"],
                   help="rows: text (images removed), vlm (with images); see above")  # fmt: skip
    p.add_argument("--synthetic", type=int, default=0, metavar="D",
                   help="made-up activations of width D instead of the toy's (see "
                        "synthesise; layer 0 for SAE and transcoder, 2 for CLTs)")  # fmt: skip
    p.add_argument("--activation", default="topk", choices=["topk", "batchtopk"],
                   help="vlmscope's --sae.activation (sparsify's stays TopK)")  # fmt: skip
    p.add_argument("--random-llama", type=int, default=0, metavar="D",
                   help="activations of vs_sparsify_e2e.py's random 8-layer Llama of "
                        "width D instead of the toy's (see random_llama_rows)")  # fmt: skip
    p.add_argument("--lr-scale", type=float, default=1.0,
                   help="scales vlmscope's default learning rate (not sparsify's)")  # fmt: skip
    p.add_argument("--lr-probe", type=int, default=0, metavar="N",
                   help="vlmscope's --lr-probe: choose a multiple of its rate on the first N "
                        "steps (0: off; its time is in the mean tokens/s)")  # fmt: skip
    p.add_argument("--optimizer", default="auto", choices=["auto", "adam", "signum"],
                   help="vlmscope's --optimizer (auto: the trainer's per kind)")  # fmt: skip
    p.add_argument(
        "--lr-warmup",
        type=float,
        default=-1.0,
        help="vlmscope's warm-up fraction (-1: the trainer's)",
    )
    p.add_argument("--lr-decay", type=float, default=-1.0,
                   help="vlmscope's decay fraction (-1: the trainer's)")  # fmt: skip
    p.add_argument("--sparsify-venv", default=str(ROOT.parent / f"{ROOT.name}-peers" / "sparsify"),
                   help="sparsify's venv, made once if missing (not vlmscope's)")  # fmt: skip
    p.add_argument(
        "--normalize",
        default="auto",
        choices=["auto", "none", "mean_norm"],
        help="vlmscope's --sae.normalize-activations (auto: the trainer's default)",
    )
    p.add_argument("--json", default="", help="also write the results here")
    p.add_argument("--activations", default="",
                   help="keep the captured activations in this folder and reuse them "
                        "(same --tokens, --warmup, --batch-tokens, --heldout-tokens)")  # fmt: skip
    p.add_argument("--role", default="driver", help=argparse.SUPPRESS)
    p.add_argument("--data", default="", help=argparse.SUPPRESS)
    p.add_argument("--kind", default="", help=argparse.SUPPRESS)
    p.add_argument("--modality", default="", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.synthetic:  # two layers: the SAE and transcoder read layer 0 unless told otherwise
        args.modalities = ["synthetic"]
        args.layer = 0 if args.layer >= 2 else args.layer
    if args.random_llama:
        args.modalities = ["llama"]
    args.passthrough = [f"--{k}={getattr(args, k.replace('-', '_'))}" for k in
                        ("tokens", "batch-tokens", "warmup", "heldout-tokens", "expansion", "k",
                         "layer", "seed", "threads", "curve", "init", "lr-scale", "lr-probe",
                         "optimizer", "lr-warmup", "lr-decay", "centring",
                         "normalize", "activation")]  # fmt: skip
    if args.role != "driver":
        runner = run_sparsify if args.role == "sparsify" else run_vlmscope
        print(json.dumps(runner(args, Path(args.data), args.kind, args.modality)))
        return
    peer = sparsify_python(args)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.activations or tmp)
        folder.mkdir(parents=True, exist_ok=True)
        if args.synthetic:
            info, source = synthesise(args, folder), "synthetic"
        elif args.random_llama:
            info, source = random_llama_rows(args, folder), "random Llama"
        else:
            kept = folder / "info.json"
            if kept.exists():  # rows of another model or dataset must not be reused
                was = json.loads(kept.read_text())
                was_src = (was.get("model", "toy"), was.get("dataset", "shapes"))
                if was_src != (args.model, args.dataset):
                    raise SystemExit(f"{folder} holds rows of {was_src[0]} on {was_src[1]}: "
                                     "use another --activations folder")  # fmt: skip
            info = capture(args, folder)
            source = "toy VLM" if args.model == "toy" else f"{args.model} on {args.dataset}"
        (folder / "info.json").write_text(json.dumps(info))
        print(f"{source}: d = {info['d']}, {info['layers']} layers; {args.tokens} training tokens "
              f"in steps of {args.batch_tokens}; held-out {args.heldout_tokens} tokens; "
              f"{args.expansion} x d latents, k = {args.k}")  # fmt: skip
        for modality in args.modalities:
            for kind in args.kinds:
                runs: dict[str, list[dict]] = {"vlmscope": [], "sparsify": []}
                for _ in range(args.repeat):  # alternate, so a noisy minute hits both
                    runs["vlmscope"].append(
                        child(Path(sys.executable), "vlmscope", args, folder, kind, modality)
                    )
                    runs["sparsify"].append(child(peer, "sparsify", args, folder, kind, modality))
                ours, theirs = (median_run(runs[key]) for key in ("vlmscope", "sparsify"))
                results.append({"kind": kind, "modality": modality, "vlmscope": ours,
                                "sparsify": theirs})  # fmt: skip
                print_row(results[-1], header=len(results) == 1)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


def median_run(runs: list[dict]) -> dict:
    """The run with the median tokens/s (held-out FVU is the same in every repeat: the runs
    are deterministic), with every repeat's tokens/s kept."""
    ranked = sorted(runs, key=lambda r: r["tokens_per_s"])
    return {**ranked[len(ranked) // 2], "tokens_per_s_repeats": [r["tokens_per_s"] for r in runs]}


def print_row(r: dict, header: bool) -> None:
    if header:
        print(f"\n{'kind':<11}{'data':<6}{'tok/s ours':>12}{'sparsify':>10}{'ratio':>7}"
              f"{'+peak MB ours':>14}{'sparsify':>10}{'FVU ours':>10}{'sparsify':>10}")  # fmt: skip
    a, b = r["vlmscope"], r["sparsify"]
    label = "clt*" if r["kind"] == "clt" else r["kind"]
    ratio = a["tokens_per_s"] / b["tokens_per_s"]
    print(f"{label:<11}{r['modality']:<6}{a['tokens_per_s']:>12,.0f}{b['tokens_per_s']:>10,.0f}"
          f"{ratio:>7.2f}{a['peak_mb']:>14,.0f}{b['peak_mb']:>10,.0f}"
          f"{a['fvu']:>10.3f}{b['fvu']:>10.3f}", flush=True)  # fmt: skip
    for key in ("vlmscope", "sparsify"):
        if r[key]["curve"]:
            pts = ", ".join(f"{t // 1000}k: {v:.3f}" for t, v in r[key]["curve"])
            print(f"    {key} held-out FVU by tokens: {pts}")


if __name__ == "__main__":
    main()
