"""vlmscope attribution against circuit-tracer 0.5.0 (nnsight backend), side by side.

    python benchmarks/vs_circuit_tracer.py            # creates ../<repo>-peers/circuit-tracer
    python benchmarks/vs_circuit_tracer.py --lengths 18 64 480 --max-feature-nodes 256
    python benchmarks/vs_circuit_tracer.py --ct-python /path/to/venv/bin/python
    python benchmarks/vs_circuit_tracer.py --model MODEL --dictionaries CLT --prompt "..."

By default both tools attribute prompts of --lengths tokens on a random model and CLT built here
(below). `--model` takes a Hugging Face folder of your own instead (an architecture both tools
load and hook the same way: Llama, Gemma 2, Gemma 3), `--dictionaries` a vlmscope bundle trained
on it (a JumpReLU or ReLU CLT, or per-layer JumpReLU transcoders, over every layer; without it a
random CLT is built for the model), and `--prompt` / `--prompts-file` your prompts (each row is
one prompt, labelled by its token count).

Same weights, same prompt, same settings. A random text Llama (width --d-model, --layers
layers) and a cross-layer transcoder over every layer (JumpReLU, its per-layer threshold set
so that about --k features fire per position on a 480-token prompt) are built once with
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
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
# the prompt length the CLT's thresholds are set on, whatever lengths are measured, so that the
# same command builds the same CLT
CALIBRATION = 480
# architectures whose hook_resid_mid and hook_mlp_out circuit-tracer 0.5.0's nnsight backend
# maps to the places vlmscope's resid_mid and mlp_out read (its Qwen3 mapping has neither)
CT_ARCHITECTURES = ("LlamaForCausalLM", "Gemma2ForCausalLM", "Gemma3ForConditionalGeneration")
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
    setup = json.loads((work / "setup.json").read_text())
    vlm = HookedVLM.from_pretrained(setup["model"], device="cpu", dtype=torch.float32)
    bundle = DictionaryBundle.load(setup["vlmscope"], mmap=True)
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
    from circuit_tracer.transcoder.single_layer_transcoder import load_transcoder_set

    torch.set_num_threads(args.threads)
    work = Path(args.work)
    setup = json.loads((work / "setup.json").read_text())
    cpu = torch.device("cpu")
    folder = work / "ct_clt"
    hooks = {"feature_input_hook": "hook_resid_mid", "feature_output_hook": "hook_mlp_out"}
    if setup["ct_kind"] == "cross_layer_transcoder":
        dicts: Any = load_clt(str(folder), device=cpu, dtype=torch.float32, **hooks)
    else:
        paths = {int(f.stem.split("_")[1]): str(f) for f in folder.glob("layer_*.safetensors")}
        dicts = load_transcoder_set(paths, scan=str(folder), device=cpu, dtype=torch.float32,
                                    **hooks)  # fmt: skip
    model = NNSightReplacementModel.from_pretrained_and_transcoders(
        setup["model"], dicts, device=cpu, dtype=torch.float32
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


def build_shared(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """The model (--model, or a random Llama), the dictionaries in both layouts (--dictionaries,
    or a random JumpReLU CLT), and setup.json, which tells the children where they are."""
    import torch

    sys.path.insert(0, str(ROOT))
    from vlmscope.dictionaries import export_circuit_tracer
    from vlmscope.models.hooked import HookedVLM
    from vlmscope.training.bundle import DictionaryBundle, mlp_out, resid_mid

    if args.model is None:
        model = work / "model"
        save_random_llama(model, args.d_model, args.layers)
    else:
        model = Path(args.model).resolve()
    vlm = HookedVLM.from_pretrained(model, device="cpu", dtype=torch.float32)
    a = vlm.adapter
    reads = [resid_mid(i) for i in range(a.n_layers)]
    writes = [mlp_out(i) for i in range(a.n_layers)]
    if args.dictionaries is not None:
        ours = Path(args.dictionaries).resolve()
        bundle = DictionaryBundle.load(ours)
    else:
        ours = work / "vlmscope_clt"
        bundle = random_clt(args, vlm, model, reads, writes)
        bundle.save(ours)
    if (bundle.reads, bundle.writes) != (reads, writes):
        raise SystemExit(
            f"{ours}: circuit-tracer's dictionaries read hook_resid_mid and write hook_mlp_out "
            f"of every layer; these read {bundle.reads} and write {bundle.writes}"
        )
    if bundle.clt is not None:
        export_circuit_tracer(bundle.clt, work / "ct_clt")
        kind = "cross_layer_transcoder"
    else:
        if bundle.cfg.activation not in ("jumprelu", "relu"):
            raise SystemExit(
                f"{ours}: circuit-tracer 0.5.0 loads per-layer transcoders as JumpReLU or ReLU "
                f"only, and these are {bundle.cfg.activation}"
            )
        export_circuit_tracer(dict(zip(bundle.reads, bundle.coders, strict=True)), work / "ct_clt")
        kind = "transcoder_set"
    setup = {"model": str(model), "vlmscope": str(ours), "ct_kind": kind, "stamp": stamp(args)}
    (work / "setup.json").write_text(json.dumps(setup, indent=2))
    return setup


def random_clt(
    args: argparse.Namespace, vlm: Any, model: Path, reads: list[str], writes: list[str]
) -> Any:
    """A JumpReLU CLT over every layer, its thresholds set so that about --k features fire per
    position on the CALIBRATION-token prompt, and decoder rows small enough for a sane output."""
    import torch
    from transformers import AutoTokenizer

    from vlmscope.dictionaries import SparseCoderConfig
    from vlmscope.training.bundle import DictionaryBundle

    a = vlm.adapter
    dcfg = SparseCoderConfig(
        kind="clt", num_latents=args.latents, activation="jumprelu", sparsity_coeff=0.01
    )
    info = {"name": str(model), "family": a.family, "dims": a.dims(), "tokens": "all",
            "include_special_tokens": True}  # fmt: skip
    bundle = DictionaryBundle.create(dcfg, reads, writes, a.d_model, a.d_model, info)
    clt = bundle.clt
    assert clt is not None
    tok = AutoTokenizer.from_pretrained(model)
    calibration = corpus_prompts(tok, [CALIBRATION])[str(CALIBRATION)]
    mids: dict[int, torch.Tensor] = {}

    def grab(t: torch.Tensor, ctx: Any) -> None:
        mids[int(ctx.layer)] = t[0].detach()

    with torch.no_grad(), vlm.hooks([("lm.blocks.*.hook_resid_mid", grab)]):
        vlm.forward({"input_ids": torch.tensor([calibration])})
    with torch.no_grad():
        for i, layer in enumerate(clt.layers):
            layer.W_dec.normal_(0, 0.5 / a.d_model**0.5)
            pre = mids[i][1:] @ layer.W_enc.T  # position 0 is zeroed by the convention
            t = torch.quantile(pre.flatten()[:2_000_000], 1 - args.k / args.latents)
            layer.activation.log_threshold.fill_(float(torch.log(t.clamp(min=1e-4))))
    return bundle


def stamp(args: argparse.Namespace) -> dict[str, Any]:
    """What the shared setup depends on: a change rebuilds it."""
    keys = ("model", "dictionaries", "d_model", "layers", "latents", "k")
    return {k: str(getattr(args, k)) for k in keys}


def corpus_prompts(tok: Any, lengths: list[int]) -> dict[str, list[int]]:
    """Token ids of English-like text about shapes, one prompt per length, each from the
    tokenizer's BOS (where it has one)."""
    sys.path.insert(0, str(ROOT))
    from vlmscope.models.zoo.common import corpus

    ids = tok(" ".join(corpus(4000, seed=1)), add_special_tokens=False)["input_ids"]
    bos = [] if tok.bos_token_id is None else [tok.bos_token_id]
    return {str(n): [*bos, *ids[: n - len(bos)]] for n in sorted(set(lengths))}


def write_prompts(work: Path, model: Path, lengths: list[int], texts: list[str]) -> list[int]:
    """prompts.json: the corpus at each of `lengths` (18 always, for the warm-up), and each of
    `texts` tokenised as the model's tokenizer does by default. Returns the lengths to measure."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    prompts = corpus_prompts(tok, [18, *lengths])
    measured = []
    for text in texts:
        ids = tok(text)["input_ids"]
        if len(ids) in measured:
            raise SystemExit(f"two prompts of {len(ids)} tokens: rows are labelled by length")
        prompts[str(len(ids))] = ids
        measured.append(len(ids))
    (work / "prompts.json").write_text(json.dumps(prompts))
    return measured or lengths


def check_architecture(args: argparse.Namespace) -> None:
    if args.model is None:
        return
    config = Path(args.model) / "config.json"
    if not config.exists():
        raise SystemExit(f"--model {args.model}: no config.json (a Hugging Face model folder?)")
    archs = json.loads(config.read_text()).get("architectures") or []
    if not set(archs) & set(CT_ARCHITECTURES):
        raise SystemExit(
            f"--model {args.model} is {archs}: circuit-tracer 0.5.0 hooks hook_resid_mid and "
            f"hook_mlp_out where vlmscope does only for {', '.join(CT_ARCHITECTURES)}"
        )
    tok = Path(args.model) / "tokenizer_config.json"
    tok_cfg = json.loads(tok.read_text()) if tok.exists() else {}
    if tok_cfg.get("tokenizer_class") == "TokenizersBackend" or isinstance(
        tok_cfg.get("extra_special_tokens"), list
    ):
        raise SystemExit(
            f"{tok} was written by transformers 5, which circuit-tracer's pinned transformers "
            "4.57 cannot read: in a copy of the folder set tokenizer_class to "
            '"PreTrainedTokenizerFast" and drop the list-valued extra_special_tokens'
        )


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
    the largest edge; where that is not small, which sources differ is printed."""
    import torch
    from safetensors.torch import load_file

    a = load_file(str(work / f"graph_vlmscope_{length}.safetensors"))
    b = load_file(str(work / f"graph_ct_{length}.safetensors"))
    if not torch.equal(a["logits"], b["logits"]):
        print(f"  {length} tokens: the tools chose other logit targets, so the model computes "
              "something else under circuit-tracer's transformers 4.57 (a config written the "
              "5.x way?): edges not compared", flush=True)  # fmt: skip
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
    scale = sb.abs().max().clamp(min=1e-30)
    diff = float((sa - sb).abs().max() / scale)
    if diff > 1e-4:
        # columns are [features, errors, tokens, logits]: name the kind of source that differs
        n_logits = len(a["logits"])
        tokens = slice(sa.shape[1] - n_logits - length, sa.shape[1] - n_logits)
        others = torch.ones(sa.shape[1], dtype=torch.bool)
        others[tokens] = False
        ta, tb = sa[:, tokens], sb[:, tokens]
        big = tb.abs() > 1e-3 * tb.abs().max()
        ratio = (ta[big] / tb[big]).median() if big.any() else float("nan")
        print(f"  {length} tokens: edges from token nodes differ by {float(ratio):.4g}x "
              f"(vlmscope / circuit-tracer, median); from other sources by at most "
              f"{float((sa - sb)[:, others].abs().max() / scale):.2e}", flush=True)  # fmt: skip
    return diff


def _rss(pid: int) -> int:
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def run_child(python: str, args: argparse.Namespace, tool: str, length: int) -> dict[str, Any]:
    """One attribution in a fresh process; {"failed": why} if it exits with an error or its
    resident memory passes --mem-limit-gb (then it is killed), so that a sweep of lengths finds
    the longest prompt each tool can do on this machine."""
    cmd = [python, str(Path(__file__).resolve()), "--child", tool, "--work", str(args.work),
           "--length", str(length), "--max-feature-nodes", str(args.max_feature_nodes),
           "--batch-size", str(args.batch_size), "--threads", str(args.threads)]  # fmt: skip
    # torch's allocator alike for both: huge pages for its large tensors, as `vlmscope
    # attribute` sets them (vlmscope/torch_env.py), unless the caller chose
    env = {"THP_MEM_ALLOC_ENABLE": "1", **os.environ, "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "MALLOC_MMAP_THRESHOLD_": "65536",
           "TOKENIZERS_PARALLELISM": "false"}  # fmt: skip
    limit = args.mem_limit_gb * 2**30
    with subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    ) as proc:
        # the pipes are drained by threads so a chatty child cannot block on a full pipe
        chunks: dict[str, str] = {}

        def drain(name: str, stream: Any) -> None:
            chunks[name] = stream.read()

        readers = [threading.Thread(target=drain, args=(n, st), daemon=True)
                   for n, st in (("out", proc.stdout), ("err", proc.stderr))]  # fmt: skip
        for r in readers:
            r.start()
        while proc.poll() is None:
            if _rss(proc.pid) > limit:
                proc.kill()
                proc.wait()
                return {"failed": f"over {args.mem_limit_gb:g} GB"}
            time.sleep(0.2)
        for r in readers:
            r.join()
    if proc.returncode != 0:
        err = chunks.get("err", "").strip().splitlines()
        why = err[-1] if err else f"exit status {proc.returncode}"
        print(f"{tool} at {length} tokens failed: {why}", file=sys.stderr, flush=True)
        return {"failed": why[:60]}
    return json.loads(chunks["out"].strip().splitlines()[-1])


def best_of(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """A tool's fastest run with its lowest peak; its first failure if any run failed."""
    failed = [r for r in runs if "failed" in r]
    if failed:
        return failed[0]
    fastest = min(runs, key=lambda r: r["seconds"])
    return {**fastest, "peak_bytes": min(r["peak_bytes"] for r in runs)}


def describe(run: dict[str, Any]) -> str:
    if "failed" in run:
        return str(run["failed"])
    return f"{run['seconds']:.2f} s, {run['peak_bytes'] / 2**20:.0f} MB"


def _memory_gb() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) / 2**20
    return 0.0


class _Help(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The module docstring as written, and every flag's default."""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=_Help)
    p.add_argument("--lengths", type=int, nargs="+", default=[18, 64, 480],
                   help="prompt lengths in tokens, one row each")  # fmt: skip
    p.add_argument("--max-feature-nodes", type=int, default=256,
                   help="features explored, both tools")  # fmt: skip
    p.add_argument("--batch-size", type=int, default=64,
                   help="backward passes batched together, both tools")  # fmt: skip
    p.add_argument("--d-model", type=int, default=512, help="width of the random Llama")
    p.add_argument("--layers", type=int, default=8, help="layers of the random Llama")
    p.add_argument("--latents", type=int, default=4096, help="CLT features per layer")
    p.add_argument("--k", type=int, default=16, help="features firing per position (target)")
    p.add_argument("--repeats", type=int, default=2,
                   help="runs of each tool per row, alternating; the fastest is kept")  # fmt: skip
    p.add_argument("--threads", type=int, default=2, help="torch threads in each tool's process")
    p.add_argument("--work", default="/tmp/vlmscope-vs-circuit-tracer",
                   help="folder for the shared model, CLT, prompts and results")  # fmt: skip
    p.add_argument("--ct-python", default=None,
                   help="python of an existing circuit-tracer venv (None: the one this "
                   "script makes once in ../<repo>-peers/circuit-tracer)")  # fmt: skip
    p.add_argument("--rebuild", action="store_true", help="rebuild the shared model and CLT")
    p.add_argument("--model", default=None,
                   help="a Hugging Face model folder of your own (Llama, Gemma 2, Gemma 3) "
                   "instead of the random Llama")  # fmt: skip
    p.add_argument("--dictionaries", default=None,
                   help="a vlmscope bundle for --model (a JumpReLU/ReLU CLT or per-layer "
                   "JumpReLU transcoders over every layer) instead of a random CLT")  # fmt: skip
    p.add_argument(
        "--prompt",
        action="append",
        default=None,
        help="a prompt to attribute (repeatable); replaces --lengths",
    )
    p.add_argument("--prompts-file", default=None, help="prompts to attribute, one per line")
    p.add_argument("--mem-limit-gb", type=float, default=round(0.85 * _memory_gb(), 1),
                   help="a child whose resident memory passes this is stopped and its row "
                   "marked (85%% of this machine's memory)")  # fmt: skip
    p.add_argument("--child", choices=["vlmscope", "ct"], default=None, help=argparse.SUPPRESS)
    p.add_argument("--length", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        res = child_vlmscope(args) if args.child == "vlmscope" else child_ct(args)
        print(json.dumps(res))
        return
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    check_architecture(args)
    texts = list(args.prompt or [])
    if args.prompts_file:
        texts += [t for t in Path(args.prompts_file).read_text().splitlines() if t.strip()]
    setup_file = work / "setup.json"
    setup = json.loads(setup_file.read_text()) if setup_file.exists() else {}
    if args.rebuild or setup.get("stamp") != stamp(args):
        setup = build_shared(args, work)
    lengths = write_prompts(work, Path(setup["model"]), args.lengths, texts)
    ct_py = ensure_ct_python(args)
    what = (f"Llama d={args.d_model}, {args.layers} layers" if args.model is None
            else f"model {args.model}")  # fmt: skip
    dicts = (f"CLT {args.latents} latents/layer (JumpReLU, ~{args.k} active per position)"
             if args.dictionaries is None else f"dictionaries {args.dictionaries}")  # fmt: skip
    print(f"{what}; {dicts}; max_feature_nodes {args.max_feature_nodes}, "
          f"batch {args.batch_size}, float32, {args.threads} threads; "
          f"best of {args.repeats}")  # fmt: skip
    head = ("tokens", "active", "vlmscope s", "c-t s", "speed-up", "vlmscope MB", "c-t MB",
            "mem ratio", "max edge diff")  # fmt: skip
    print(" ".join(f"{h:>12}" for h in head), flush=True)
    rows = []
    for n in lengths:
        runs: dict[str, list[dict[str, Any]]] = {"vlmscope": [], "ct": []}
        for _ in range(args.repeats):  # alternating, so a noisy minute hits both
            for tool, py in (("vlmscope", sys.executable), ("ct", ct_py)):
                runs[tool].append(run_child(py, args, tool, n))
        v, c = best_of(runs["vlmscope"]), best_of(runs["ct"])
        if "failed" in v or "failed" in c:
            rows.append({"tokens": n, "vlmscope": v, "ct": c})
            print(f"{n:>12} vlmscope: {describe(v)}; circuit-tracer: {describe(c)}", flush=True)
            continue
        diff = compare(work, n)
        vals = (n, v["active"], v["seconds"], c["seconds"], c["seconds"] / v["seconds"],
                v["peak_bytes"] / 2**20, c["peak_bytes"] / 2**20,
                c["peak_bytes"] / max(1, v["peak_bytes"]), diff)  # fmt: skip
        rows.append(dict(zip(head, vals, strict=True)))
        line = (f"{vals[0]:>12} {vals[1]:>12} {vals[2]:>12.2f} {vals[3]:>12.2f} "
                f"{vals[4]:>11.2f}x {vals[5]:>12.0f} {vals[6]:>12.0f} {vals[7]:>11.2f}x "
                f"{vals[8]:>12.2e}")  # fmt: skip
        print(line, flush=True)
    (work / "results.json").write_text(json.dumps(rows, indent=2))
    print(f"(speed-up and mem ratio: circuit-tracer / vlmscope; results in {work}/results.json)")


if __name__ == "__main__":
    main()
