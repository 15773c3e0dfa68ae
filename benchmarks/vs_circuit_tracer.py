"""vlmscope attribution against circuit-tracer 0.5.0 (nnsight backend), side by side.

    python benchmarks/vs_circuit_tracer.py            # creates ../<repo>-peers/circuit-tracer
    python benchmarks/vs_circuit_tracer.py --lengths 18 64 480 --max-feature-nodes 256
    python benchmarks/vs_circuit_tracer.py --ct-python /path/to/venv/bin/python

Same weights, same prompt, same settings. A random text Llama (width --d-model, --layers
layers) and a cross-layer transcoder over every layer (JumpReLU, its per-layer threshold set
so that about --k features fire per position on the longest prompt) are built once with
vlmscope; the CLT is saved in vlmscope's layout and exported to circuit-tracer's with
`export_circuit_tracer`. Each tool then attributes each prompt in a fresh process of its own
(so its peak memory is its own), after one small warm-up attribution in that process, with the
same max_feature_nodes, batch size, logit targets (top logits to 0.95, at most 10) and dtype
(float32 on the CPU). vlmscope runs with `convention="circuit-tracer"` (circuit-tracer's
treatment of position 0), so the two graphs are the same graph: the table's last column is
the largest difference between their edges, relative to the largest edge.

Time is the wall time of `attribute` alone; peak is the process's peak RSS above its RSS just
before `attribute` (Linux VmHWM, reset then; glibc told to return freed blocks of 64 KB and up).
Repeats alternate between the tools and keep each one's fastest run. circuit-tracer is installed
from PyPI into its own venv (never into vlmscope's), torch pinned to vlmscope's constraints,
with the set of pins known to work for 0.5.0 on CPU. Keep this out of `make test`.
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
CT_PINS = [
    "circuit-tracer==0.5.0",
    "transformers==4.57.3",
    "huggingface-hub<1.0",
    "nnsight>=0.6,<0.7",
    "transformer-lens>=2.16,<3",
    "datasets<4",
    "pyarrow<19",
    "numpy<2",
]


# --------------------------------------------------------------------------- measurement


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key):
            return int(line.split()[1]) * 1024
    return 0


def measure(fn: Any) -> tuple[Any, float, float]:
    """(result, seconds, peak bytes above the RSS before the call)."""
    import gc

    gc.collect()
    before = _status("VmRSS:")
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    t = time.perf_counter()
    out = fn()
    dt = time.perf_counter() - t
    return out, dt, max(0, _status("VmHWM:") - before)


# --------------------------------------------------------------------------- children


def child_vlmscope(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    sys.path.insert(0, str(ROOT))
    from vlmscope.attribution.attribute import attribute
    from vlmscope.models.hooked import HookedVLM
    from vlmscope.training.bundle import DictionaryBundle

    torch.set_num_threads(args.threads)
    work = Path(args.work)
    vlm = HookedVLM.from_pretrained(work / "model", device="cpu", dtype=torch.float32)
    bundle = DictionaryBundle.load(work / "vlmscope_clt", mmap=True)
    prompts = json.loads((work / "prompts.json").read_text())

    def run(ids: list[int], nodes: int) -> Any:
        t = torch.tensor([ids])
        inputs = {"input_ids": t, "attention_mask": torch.ones_like(t)}
        return attribute(vlm, bundle, inputs, max_feature_nodes=nodes,
                         batch_size=args.batch_size, convention="circuit-tracer")  # fmt: skip

    run(prompts["18"], 8)  # warm-up
    g, dt, peak = measure(lambda: run(prompts[str(args.length)], args.max_feature_nodes))
    _save(args, g.adjacency, g.features, [t.token_id for t in g.logit_targets])
    return {"seconds": dt, "peak_bytes": peak, "active": g.metadata["n_active_features"]}


def child_ct(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from circuit_tracer.attribution.attribute import attribute
    from circuit_tracer.replacement_model.replacement_model_nnsight import (
        NNSightReplacementModel,
    )
    from circuit_tracer.transcoder.cross_layer_transcoder import load_clt

    torch.set_num_threads(args.threads)
    work = Path(args.work)
    cpu = torch.device("cpu")
    clt = load_clt(str(work / "ct_clt"), device=cpu, dtype=torch.float32)
    model = NNSightReplacementModel.from_pretrained_and_transcoders(
        str(work / "model"), clt, device=cpu, dtype=torch.float32
    )
    prompts = json.loads((work / "prompts.json").read_text())

    def run(ids: list[int], nodes: int) -> Any:
        return attribute(torch.tensor(ids), model, max_feature_nodes=nodes,
                         batch_size=args.batch_size, verbose=False)  # fmt: skip

    run(prompts["18"], 8)  # warm-up
    g, dt, peak = measure(lambda: run(prompts[str(args.length)], args.max_feature_nodes))
    feats = g.active_features[g.selected_features]
    _save(args, g.adjacency_matrix, feats, [int(t.vocab_idx) for t in g.logit_targets])
    return {"seconds": dt, "peak_bytes": peak, "active": len(g.active_features)}


def _save(args: argparse.Namespace, adj: Any, feats: Any, logits: list[int]) -> None:
    import torch
    from safetensors.torch import save_file

    out = Path(args.work) / f"graph_{args.child}_{args.length}.safetensors"
    save_file({"adjacency": adj.float().contiguous(), "features": feats.long().contiguous(),
               "logits": torch.tensor(logits)}, str(out))  # fmt: skip


# --------------------------------------------------------------------------- setup (vlmscope)


def save_random_llama(folder: Path, d_model: int, n_layers: int) -> None:
    """A seeded random Llama with a 1,024-token tokenizer, saved so that transformers 4.57 and
    5.x both read it (the peers' venvs pin other versions); shared by the peer benchmarks."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    sys.path.insert(0, str(ROOT))
    from vlmscope.models.zoo.common import train_tokenizer

    torch.manual_seed(0)
    tok = train_tokenizer([], vocab_size=1024)
    heads = max(1, d_model // 64)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=d_model,
                      intermediate_size=3 * d_model, num_hidden_layers=n_layers,
                      num_attention_heads=heads, num_key_value_heads=heads,
                      max_position_embeddings=4096, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      tie_word_embeddings=False)  # fmt: skip
    LlamaForCausalLM(cfg).eval().save_pretrained(folder)
    tok.save_pretrained(folder)
    tc = folder / "tokenizer_config.json"
    tc.write_text(
        json.dumps({**json.loads(tc.read_text()), "tokenizer_class": "PreTrainedTokenizerFast"})
    )


def build_shared(args: argparse.Namespace, work: Path) -> None:
    """The random Llama, the CLT in both layouts, and the prompts (token ids)."""
    import torch

    sys.path.insert(0, str(ROOT))
    from vlmscope.dictionaries import SparseCoderConfig, export_circuit_tracer
    from vlmscope.models.hooked import HookedVLM
    from vlmscope.training.bundle import DictionaryBundle, mlp_out, resid_mid

    save_random_llama(work / "model", args.d_model, args.layers)
    prompts = write_prompts(work, [18, 64, 480, *args.lengths])

    vlm = HookedVLM.from_pretrained(work / "model", device="cpu", dtype=torch.float32)
    a = vlm.adapter
    layers = range(a.n_layers)
    dcfg = SparseCoderConfig(
        kind="clt", num_latents=args.latents, activation="jumprelu", sparsity_coeff=0.01
    )
    info = {"name": str(work / "model"), "family": a.family, "dims": a.dims(), "tokens": "all",
            "include_special_tokens": True}  # fmt: skip
    reads, writes = [resid_mid(i) for i in layers], [mlp_out(i) for i in layers]
    bundle = DictionaryBundle.create(dcfg, reads, writes, a.d_model, a.d_model, info)
    clt = bundle.clt
    assert clt is not None
    longest = max(args.lengths)
    mids: dict[int, torch.Tensor] = {}

    def grab(t: torch.Tensor, ctx: Any) -> None:
        mids[int(ctx.layer)] = t[0].detach()

    with torch.no_grad(), vlm.hooks([("lm.blocks.*.hook_resid_mid", grab)]):
        vlm.forward({"input_ids": torch.tensor([prompts[str(longest)]])})
    with torch.no_grad():
        for i, layer in enumerate(clt.layers):
            layer.W_dec.normal_(0, 0.5 / args.d_model**0.5)
            pre = mids[i][1:] @ layer.W_enc.T  # position 0 is zeroed by the convention
            t = torch.quantile(pre.flatten()[:2_000_000], 1 - args.k / args.latents)
            layer.activation.log_threshold.fill_(float(torch.log(t.clamp(min=1e-4))))
    bundle.save(work / "vlmscope_clt")
    export_circuit_tracer(clt, work / "ct_clt")


def write_prompts(work: Path, lengths: list[int]) -> dict[str, list[int]]:
    """Token ids of English-like text about shapes, one prompt per length, each with a BOS."""
    from transformers import AutoTokenizer

    sys.path.insert(0, str(ROOT))
    from vlmscope.models.zoo.common import corpus

    tok = AutoTokenizer.from_pretrained(work / "model")
    ids = tok(" ".join(corpus(4000, seed=1)), add_special_tokens=False)["input_ids"]
    prompts = {str(n): [tok.bos_token_id, *ids[: n - 1]] for n in sorted(set(lengths))}
    (work / "prompts.json").write_text(json.dumps(prompts))
    return prompts


def ensure_ct_python(args: argparse.Namespace) -> str:
    if args.ct_python:
        return args.ct_python
    venv = ROOT.parent / f"{ROOT.name}-peers" / "circuit-tracer"
    py = venv / "bin" / "python"
    if not py.exists():
        print(f"installing circuit-tracer 0.5.0 into {venv} (once)", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        torch_pin = [line for line in (ROOT / "constraints.txt").read_text().splitlines()
                     if line.startswith("torch==")]  # fmt: skip
        pins = venv / "torch-constraint.txt"
        pins.write_text("\n".join(torch_pin) + "\n")
        subprocess.run([str(py), "-m", "pip", "install", "-q", "-c", str(pins), *CT_PINS],
                       check=True)  # fmt: skip
    return str(py)


# --------------------------------------------------------------------------- parent


def compare(work: Path, length: int) -> float:
    """Largest |edge difference| between the two graphs on the nodes both hold, relative to
    the largest edge."""
    import torch
    from safetensors.torch import load_file

    a = load_file(str(work / f"graph_vlmscope_{length}.safetensors"))
    b = load_file(str(work / f"graph_ct_{length}.safetensors"))
    if not torch.equal(a["logits"], b["logits"]):
        return float("nan")
    fa, fb = a["features"].tolist(), b["features"].tolist()
    key_b = {tuple(f): i for i, f in enumerate(fb)}
    pairs = [(i, key_b[tuple(f)]) for i, f in enumerate(fa) if tuple(f) in key_b]
    na, nb = len(fa), len(fb)
    rest_a = torch.arange(na, a["adjacency"].shape[0])
    rest_b = torch.arange(nb, b["adjacency"].shape[0])
    ia = torch.cat([torch.tensor([p[0] for p in pairs], dtype=torch.long), rest_a])
    ib = torch.cat([torch.tensor([p[1] for p in pairs], dtype=torch.long), rest_b])
    sa, sb = a["adjacency"][ia][:, ia], b["adjacency"][ib][:, ib]
    return float((sa - sb).abs().max() / sb.abs().max().clamp(min=1e-30))


def run_child(python: str, args: argparse.Namespace, tool: str, length: int) -> dict[str, Any]:
    cmd = [python, str(Path(__file__).resolve()), "--child", tool, "--work", str(args.work),
           "--length", str(length), "--max-feature-nodes", str(args.max_feature_nodes),
           "--batch-size", str(args.batch_size), "--threads", str(args.threads)]  # fmt: skip
    # torch's allocator alike for both: huge pages for its large tensors, as `vlmscope
    # attribute` sets them (vlmscope/torch_env.py), unless the caller chose
    env = {"THP_MEM_ALLOC_ENABLE": "1", **os.environ, "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "MALLOC_MMAP_THRESHOLD_": "65536",
           "TOKENIZERS_PARALLELISM": "false"}  # fmt: skip
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{tool} at {length} tokens failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--lengths", type=int, nargs="+", default=[18, 64, 480])
    p.add_argument("--max-feature-nodes", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--d-model", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--latents", type=int, default=4096)
    p.add_argument("--k", type=int, default=16, help="features firing per position (target)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--work", default="/tmp/vlmscope-vs-circuit-tracer")
    p.add_argument("--ct-python", default=None, help="python of an existing circuit-tracer venv")
    p.add_argument("--rebuild", action="store_true", help="rebuild the shared model and CLT")
    p.add_argument("--child", choices=["vlmscope", "ct"], default=None, help=argparse.SUPPRESS)
    p.add_argument("--length", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        res = child_vlmscope(args) if args.child == "vlmscope" else child_ct(args)
        print(json.dumps(res))
        return
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    if args.rebuild or not (work / "ct_clt" / "config.yaml").exists():
        build_shared(args, work)
    write_prompts(work, [18, *args.lengths])
    ct_py = ensure_ct_python(args)
    print(f"Llama d={args.d_model}, {args.layers} layers; CLT {args.latents} latents/layer "
          f"(JumpReLU, ~{args.k} active per position); max_feature_nodes "
          f"{args.max_feature_nodes}, batch {args.batch_size}, float32, {args.threads} threads; "
          f"best of {args.repeats}")  # fmt: skip
    head = ("tokens", "active", "vlmscope s", "c-t s", "speed-up", "vlmscope MB", "c-t MB",
            "mem ratio", "max edge diff")  # fmt: skip
    print(" ".join(f"{h:>12}" for h in head), flush=True)
    rows = []
    for n in args.lengths:
        best: dict[str, dict[str, Any]] = {}
        for _ in range(args.repeats):
            for tool, py in (("vlmscope", sys.executable), ("ct", ct_py)):
                r = run_child(py, args, tool, n)
                if tool not in best or r["seconds"] < best[tool]["seconds"]:
                    best[tool] = {
                        **r,
                        "peak_bytes": min(r["peak_bytes"], best.get(tool, r)["peak_bytes"]),
                    }
        v, c = best["vlmscope"], best["ct"]
        diff = compare(work, n)
        row = (n, v["active"], v["seconds"], c["seconds"], c["seconds"] / v["seconds"],
               v["peak_bytes"] / 2**20, c["peak_bytes"] / 2**20,
               c["peak_bytes"] / max(1, v["peak_bytes"]), diff)  # fmt: skip
        rows.append(dict(zip(head, row, strict=True)))
        line = (f"{row[0]:>12} {row[1]:>12} {row[2]:>12.2f} {row[3]:>12.2f} {row[4]:>11.2f}x "
                f"{row[5]:>12.0f} {row[6]:>12.0f} {row[7]:>11.2f}x {row[8]:>12.2e}")  # fmt: skip
        print(line, flush=True)
    (work / "results.json").write_text(json.dumps(rows, indent=2))
    print(f"(speed-up and mem ratio: circuit-tracer / vlmscope; results in {work}/results.json)")


if __name__ == "__main__":
    main()
