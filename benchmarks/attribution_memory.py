"""Attribution memory on the LLaVA-7B-shaped model: measured peaks against the planner, the
code before the attribution memory work against this one, and the planner's prediction for
LLaVA-1.5-7B.

    python benchmarks/attribution_memory.py --plan-llava7b          # the 7B plan, no weights
    flock /tmp/vlmscope-heavy.lock python benchmarks/attribution_memory.py --layers 1 2 4
    git worktree add /tmp/vlmscope-old 2db3c62                     # the code before (#20)
    flock /tmp/vlmscope-heavy.lock python benchmarks/attribution_memory.py --layers 4 \
        --old-src /tmp/vlmscope-old

The model is `train_throughput.llava7b_random` (LLaVA-1.5-7B's shapes: Llama width 4096, 32
heads, CLIP ViT-L/14 at 336 px, 576 image tokens per image) cut to --layers LM layers and
--vision-layers CLIP layers, random weights; the CLT is random too (TopK, k = --k), saved once
under --work and memory-mapped as `vlmscope attribute` does. The prompt is one image and text,
about --positions positions. Each configuration runs in a fresh process: peak is the process's
peak RSS during `attribute` (Linux VmHWM, reset just before; glibc told to return freed blocks
of 64 KB and up to the system); a sampler thread also keeps, per phase, the largest RSS and its
anonymous and file-backed (mapped dictionary pages, libraries) parts. The planner's prediction
for the same shapes (exact feature counts of that run) is the sum of its device and host parts
and of the dictionary pages it expects mapped, plus what the process held before `attribute`
other than the model's weights (interpreter, libraries, tokenizer, inputs: not the planner's).

--old-src DIR runs DIR's vlmscope in the child instead (PYTHONPATH; the child imports vlmscope
before anything puts this checkout on sys.path, and the parent refuses a child that loaded
vlmscope from anywhere else). Each run saves its graph; when the other code's graph for the
same configuration is there, the table says whether the edges are identical.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key):
            return int(line.split()[1]) * 1024
    return 0


class PhaseSampler:
    """Samples the process's RSS, anonymous and file-backed (mapped dictionary pages), every
    2 ms, and keeps each phase's largest sample; phases are the attribution context's methods
    (whichever of them the code being measured has) and attribute's final assembly."""

    PHASES = ("record_forward", "record", "prepare", "replay", "backward")

    def __init__(self) -> None:
        import threading

        self.phase = "setup"
        self.peaks: dict[str, dict[str, int]] = {}
        self.swapped = 0  # the largest swap seen (bytes)
        self.with_swap = 0  # the largest RSS + swap seen: the peak when swap was needed
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        now = {}
        for line in Path("/proc/self/status").read_text().splitlines():
            key = line.split(":")[0]
            if key in ("VmRSS", "RssAnon", "RssFile", "VmSwap"):
                now[key] = int(line.split()[1]) * 1024
        self.swapped = max(self.swapped, now.get("VmSwap", 0))
        self.with_swap = max(self.with_swap, now["VmRSS"] + now.get("VmSwap", 0))
        best = self.peaks.get(self.phase)
        if best is None or now["VmRSS"] > best["rss"]:
            self.peaks[self.phase] = {"rss": now["VmRSS"], "anon": now["RssAnon"],
                                      "file": now["RssFile"]}  # fmt: skip

    def _run(self) -> None:
        while not self._stop.wait(0.002):
            self._sample()

    def wrap(self, owner: Any, name: str) -> None:
        fn = getattr(owner, name, None)
        if fn is None:
            return

        def phased(*a: Any, **k: Any) -> Any:
            outer, self.phase = self.phase, name
            try:
                return fn(*a, **k)
            finally:
                self._sample()
                self.phase = outer

        setattr(owner, name, phased)

    def __enter__(self) -> PhaseSampler:
        from vlmscope.attribution import attribute, context

        for name in self.PHASES:
            self.wrap(context.AttributionContext, name)
        self.wrap(attribute, "_assemble")
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()


def llava7b_config_dir(out: Path, lm_layers: int = 32, vision_layers: int = 24) -> Path:
    """config.json of the LLaVA-7B-shaped model (what the planner reads; no weights)."""
    import torch
    from train_throughput import llava7b_random

    with torch.device("meta"):
        vlm = llava7b_random(lm_layers, vision_layers, torch.device("meta"), torch.bfloat16)
    vlm.model.config.save_pretrained(out)
    return out


def prepare_clt(args: argparse.Namespace, work: Path) -> Path:
    """A random TopK CLT over every layer of the cut model, saved once per shape."""
    import torch

    from vlmscope.dictionaries import SparseCoderConfig
    from vlmscope.training.bundle import DictionaryBundle, mlp_out, resid_mid

    folder = work / f"clt-L{args.layer}-F{args.latents}-k{args.k}-{args.dtype}"
    if (folder / "config.json").exists():
        return folder
    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    n = args.layer
    cfg = SparseCoderConfig(kind="clt", d_in=4096, num_latents=args.latents, k=args.k, n_layers=n)
    dims = {"d_model": 4096, "n_layers": n}
    info = {"name": "llava7b-random", "family": "llava", "dims": dims, "tokens": "all"}
    reads, writes = [resid_mid(i) for i in range(n)], [mlp_out(i) for i in range(n)]
    b = DictionaryBundle.create(
        cfg.with_dims(4096, 4096, n_layers=n), reads, writes, 4096, 4096, info
    )
    b = b.to(dtype)
    with torch.no_grad():
        for layer in b.clt.layers:  # type: ignore[union-attr]
            layer.W_dec.normal_(0, 0.02)
    b.save(folder)
    return folder


def child(args: argparse.Namespace) -> dict[str, Any]:
    import numpy as np
    import torch
    from PIL import Image

    # vlmscope before train_throughput, from PYTHONPATH (--old-src) or the install:
    # train_throughput puts this checkout first on sys.path, which would win over --old-src.
    import vlmscope

    torch.set_num_threads(args.threads)
    baseline = _status("VmRSS:")
    from train_throughput import llava7b_random

    work = Path(args.work)
    dtype = getattr(torch, args.dtype)
    vlm = llava7b_random(args.layer, args.vision_layers, torch.device("cpu"), dtype)
    from vlmscope.attribution.attribute import attribute

    img = Image.fromarray((np.random.default_rng(0).random((336, 336, 3)) * 255).astype("uint8"))
    words = max(0, args.positions - 600)
    inputs = vlm.prepare("describe the picture " * (1 + words // 3), images=[img])
    clt = work / f"clt-L{args.layer}-F{args.latents}-k{args.k}-{args.dtype}"
    kw: dict[str, Any] = {"max_feature_nodes": args.batch_size, "batch_size": args.batch_size}
    kw["logit_targets"] = [5]
    if args.offload != "none":
        kw["offload"] = args.offload
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")
    before = _status("VmRSS:")
    before_file = _status("RssFile:")
    with PhaseSampler() as phases:
        g = attribute(vlm, str(clt), inputs, **kw)
    # With swap on (to run a configuration larger than RAM), VmHWM stops at what fitted in
    # RAM; the sampled RSS + swap is then the peak.
    peak = max(_status("VmHWM:"), phases.with_swap)
    meta = g.metadata
    from safetensors.torch import save_file

    graph = {"adjacency": g.adjacency.contiguous(), "features": g.features.contiguous()}
    save_file(graph, str(Path(args.graph_out)))
    return {
        "vlmscope": str(Path(vlmscope.__file__).resolve().parent),
        "layers": args.layer,
        "positions": int(inputs["input_ids"].shape[1]),
        "baseline": baseline,
        "before": before,
        "before_file": before_file,
        "peak": peak,
        "swapped": phases.swapped,
        "phases": phases.peaks,
        "model_bytes": sum(t.numel() * t.element_size() for t in vlm.model.parameters()),
        "active": meta.get("active_per_layer"),
        "unique": meta.get("unique_per_layer"),
    }


def predict(args: argparse.Namespace, work: Path, r: dict[str, Any]) -> dict[str, float]:
    from vlmscope.plan.attribution import peak, plan, shape_from_config, with_counts

    cfg_dir = llava7b_config_dir(work / f"config-L{r['layers']}", r["layers"], args.vision_layers)
    clt = work / f"clt-L{r['layers']}-F{args.latents}-k{args.k}-{args.dtype}"
    shape = shape_from_config(cfg_dir, str(clt), r["positions"], dtype=args.dtype,
                              max_feature_nodes=args.batch_size, n_logits=1)  # fmt: skip
    if r["active"]:
        shape = with_counts(shape, r["active"], r["unique"])
    p = plan(shape, args.batch_size, None if args.offload == "none" else args.offload, "cpu")
    device = peak(p, shape)
    # On a CPU the device is the host, and mapped dictionary pages count in RSS too.
    host = p.total("host") + p.total("cache")
    host -= sum(x.bytes for x in p.parts if x.name == "assembled adjacency")
    # What the process held before attribute() other than the model's weights (interpreter,
    # libraries, tokenizer, inputs) is not the planner's: it is added as measured.
    runtime = r["before"] - r["model_bytes"] if "model_bytes" in r else r["baseline"]
    return {"device": device, "host": host, "runtime": runtime,
            "total": device + host + runtime}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--layers", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--positions", type=int, default=600)
    p.add_argument("--latents", type=int, default=16384)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--vision-layers", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--offload", default="none", choices=["none", "disk"],
                   help="attribute's offload (disk: what the replay skips leaves RAM)")  # fmt: skip
    p.add_argument("--work", default="/tmp/vlmscope-attribution-memory")
    p.add_argument("--old-src", default=None, help="run this checkout's vlmscope instead")
    p.add_argument("--plan-llava7b", action="store_true", help="print the LLaVA-1.5-7B plan")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--layer", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--graph-out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(ROOT))
    if args.plan_llava7b:
        cfg = llava7b_config_dir(work / "llava-1.5-7b-config")
        cmd = [sys.executable, "-m", "vlmscope", "plan", "attribute", str(cfg),
               "clt:32768:32:bfloat16", "--positions", "1000", "--gpu-mem", "80",
               "--dtype", "bfloat16", "--out", str(work / "llava7b-plan.json")]  # fmt: skip
        print("$ vlmscope plan attribute <LLaVA-1.5-7B config> clt:32768:32:bfloat16 "
              "--positions 1000 --gpu-mem 80 --dtype bfloat16", flush=True)  # fmt: skip
        subprocess.run(cmd, check=False, cwd=ROOT)
        return
    src = Path(args.old_src).resolve() if args.old_src else ROOT
    print(f"LLaVA-7B-shaped, {args.vision_layers} vision layers, {args.dtype}, CLT "
          f"{args.latents} latents k={args.k}, batch {args.batch_size}, ~{args.positions} "
          f"positions, vlmscope from {src}")  # fmt: skip
    print(f"{'layers':>6} {'positions':>9} {'peak GB':>8} {'predicted GB':>12} {'error':>7}"
          f" {'above model GB':>14} {'mapped GB':>9} {'peak phase':>14}  edges against the "
          "other code", flush=True)  # fmt: skip
    for layers in args.layers:
        args.layer = layers
        prepare_clt(args, work)
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "HF_HUB_OFFLINE": "1"}
        if args.old_src:
            env["PYTHONPATH"] = str(src)
        base = f"L{layers}-p{args.positions}-b{args.batch_size}"
        tag = base if args.offload == "none" else f"{base}-{args.offload}"
        graph = work / f"graph-{tag}{'-old' if args.old_src else ''}.safetensors"
        # An offloaded run is compared with this code's run without offload (same edges).
        other = work / f"graph-{base}{'' if args.old_src or tag != base else '-old'}.safetensors"
        cmd = [sys.executable, __file__, "--child", "--layer", str(layers), "--work", str(work),
               "--positions", str(args.positions), "--latents", str(args.latents), "--k",
               str(args.k), "--dtype", args.dtype, "--batch-size", str(args.batch_size),
               "--vision-layers", str(args.vision_layers), "--threads", str(args.threads),
               "--offload", args.offload, "--graph-out", str(graph)]  # fmt: skip
        out = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if out.returncode != 0:
            print(out.stderr[-3000:])
            continue
        r = json.loads(out.stdout.strip().splitlines()[-1])
        if Path(r["vlmscope"]) != src / "vlmscope":
            raise SystemExit(f"the child ran vlmscope from {r['vlmscope']}, not from {src}")
        # The planner is this checkout's: it predicts this checkout's attribution only.
        pred = None if args.old_src else predict(args, work, r)
        err = "" if pred is None else f"{(pred['total'] - r['peak']) / r['peak']:+.1%}"
        predicted = "" if pred is None else f"{pred['total'] / 1e9:.2f}"
        above = (r["peak"] - r["before"]) / 1e9
        # The sampled peak's file-backed part: mapped dictionary pages (and libraries).
        phase, top = max(r["phases"].items(), key=lambda kv: kv[1]["rss"])
        print(f"{layers:>6} {r['positions']:>9} {r['peak'] / 1e9:>8.2f} {predicted:>12} "
              f"{err:>7} {above:>14.2f} {top['file'] / 1e9:>9.2f} {phase:>14}  "
              f"{compare_graphs(graph, other)}", flush=True)  # fmt: skip
        if r.get("swapped"):
            print(f"{'':>6} (peak includes {r['swapped'] / 1e9:.2f} GB that went to swap)")
        (work / f"result-{tag}{'-old' if args.old_src else ''}.json").write_text(
            json.dumps({**r, "predicted": pred})
        )


def compare_graphs(a: Path, b: Path) -> str:
    """Whether two runs' graphs hold the same features and edges (max |difference| relative
    to the largest edge), or "-" when the other run is not there."""
    if not b.exists():
        return "-"
    from safetensors.torch import load_file

    x, y = load_file(str(a)), load_file(str(b))
    if not x["features"].equal(y["features"]):
        return "different features explored"
    if x["adjacency"].shape != y["adjacency"].shape:
        return f"different shapes {tuple(x['adjacency'].shape)} {tuple(y['adjacency'].shape)}"
    if x["adjacency"].equal(y["adjacency"]):
        return "identical"
    diff = (x["adjacency"] - y["adjacency"]).abs().max()
    return f"max |difference| {float(diff / x['adjacency'].abs().max()):.1e} of the largest edge"


if __name__ == "__main__":
    main()
