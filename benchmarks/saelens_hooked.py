"""The SAELens export, run hooked: vlmscope SAEs attached to a TransformerLens model by SAELens.

    python benchmarks/saelens_hooked.py --peer-python /path/to/saelens-venv/bin/python \
        [--families llama qwen2] [--activations topk jumprelu]

For each zoo text family, in vlmscope's venv: save the tiny zoo model to a folder, train SAEs
on six hook points with `vlmscope train` (one per mapped hook kind: resid_pre, resid_mid,
resid_post, attn.hook_out, mlp.hook_out, attn.hook_z), export them with `export_saelens`, and
record vlmscope's own activations at those hook points (HookedVLM.run_with_cache) and the
SAEs' reconstructions for a batch of token ids.

Then, in a separate venv with sae-lens and transformer-lens (never vlmscope's: they pin their
own packages), this same file with `--peer DIR`: load each SAE with `SAE.load_from_disk`, build
a `HookedSAETransformer` from the model folder the export names (offline: TransformerLens'
`from_pretrained*` accept only its list of official hub names, so the model is built from the
folder with the loader functions from_pretrained itself calls, without weight processing, as
`from_pretrained_no_processing` does), attach every SAE at the hook name its config carries,
run the same tokens with `run_with_cache` (error term on, so each SAE sees the clean model)
and compare each SAE's input (`hook_sae_input`) with vlmscope's captured activations, and its
reconstruction (`hook_sae_recons`) with vlmscope's. Prints a table; exits 1 on a
mismatch. Not part of `make test` (it needs the peer venv).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

HOOKS = [
    "lm.blocks.0.hook_resid_pre",
    "lm.blocks.1.hook_resid_mid",
    "lm.blocks.1.hook_resid_post",
    "lm.blocks.1.attn.hook_out",
    "lm.blocks.2.mlp.hook_out",
]
Z_HOOK = "lm.blocks.1.attn.hook_z"
TEXT = [
    "the red circle sits left of a blue square while a green triangle waits",
    "sparse dictionaries read the residual stream of a small language model",
    "a purple star and two yellow squares share the picture with one circle",
    "activations at each hook point should match across both libraries",
]
#: relative tolerance of a match: |ours - theirs| <= TOL * max|ours| per hook.
TOL = 1e-4


# --- vlmscope's side -------------------------------------------------------------------------
def vlmscope_side(root: Path, family: str, activation: str) -> dict[str, Any]:
    """Train, export and record everything the peer side compares against."""
    import torch
    from safetensors.torch import save_file

    from vlmscope.dictionaries import export_saelens, load_dictionaries
    from vlmscope.models import zoo
    from vlmscope.models.hooked import HookedVLM

    # TransformerLens decides a local folder's architecture by its *path* when the path holds
    # "llama" or "gemma" (and then reads no config: it fails), so the folder is neutral.
    model_dir = root / "model"
    zoo.save(family, model_dir)
    data = root / "text.jsonl"
    with data.open("w") as f:
        for i in range(400):
            words = " ".join(TEXT[(i + j) % len(TEXT)] for j in range(3)).split()
            f.write(json.dumps({"text": " ".join(words[i % 7 :])}) + "\n")
    runs = {}
    for name, hooks in (("resid", HOOKS), ("z", [Z_HOOK])):
        cmd = [sys.executable, "-m", "vlmscope", "train", str(model_dir), str(data),
               "--hookpoints", *hooks, "--sae.kind", "sae", "--sae.activation", activation,
               "--sae.expansion-factor", "2", "--sae.k", "8", "--max-tokens", "6000",
               "--batch-size", "8", "--ctx-len", "32", "--run-name", name,
               "--output-dir", str(root / "checkpoints")]  # fmt: skip
        if activation == "jumprelu":
            cmd += ["--sae.sparsity-coeff", "0.01"]
        subprocess.run(cmd, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"},
                       stdout=subprocess.DEVNULL)  # fmt: skip
        runs[name] = load_dictionaries(root / "checkpoints" / name / "dictionaries")
    saes = {**runs["resid"], **runs["z"]}
    export_dir = root / "saelens"
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        export_saelens(saes, export_dir)  # model name: the run's (the model folder)
    notes = sorted({str(w.message) for w in caught})

    vlm = HookedVLM.from_pretrained(str(model_dir), device="cpu", dtype="float32")
    tok = vlm.tokenizer
    ids = [tok(t)["input_ids"] for t in TEXT]
    n = min(len(x) for x in ids)
    input_ids = torch.tensor([x[:n] for x in ids])
    inputs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
    bos_added = tok.bos_token_id is not None and bool((input_ids[:, 0] == tok.bos_token_id).all())
    out, cache = vlm.run_with_cache(inputs, names=list(saes))
    logits = out.logits if hasattr(out, "logits") else out[0]
    tensors = {"tokens": input_ids, "logits": logits.float().contiguous()}
    with torch.no_grad():
        for hook, coder in saes.items():
            x = cache[hook].float()
            x = x.reshape(*x.shape[:2], -1)  # hook_z: [batch, pos, heads * d_head]
            tensors[f"act/{hook}"] = x.contiguous()
            flat = x.reshape(-1, x.shape[-1])  # vlmscope's coders take [tokens, d_in]
            tensors[f"recons/{hook}"] = coder(flat).reconstruction.reshape(x.shape).contiguous()
    save_file(tensors, str(root / "expected.safetensors"))
    return {"notes": notes, "hooks": list(saes), "bos_added": bos_added}


# --- SAELens' side (run in the peer venv) --------------------------------------------------
def peer_side(root: Path) -> dict[str, Any]:
    import torch
    from sae_lens import SAE, HookedSAETransformer
    from safetensors.torch import load_file
    from transformer_lens import loading
    from transformers import AutoModelForCausalLM, AutoTokenizer

    expected = load_file(str(root / "expected.safetensors"))
    saes = {}
    for folder in sorted((root / "saelens").iterdir()):
        saes[folder.name] = SAE.load_from_disk(str(folder), device="cpu")
    names = {s.cfg.metadata.model_name for s in saes.values()}
    assert len(names) == 1, names
    model_path = names.pop()
    hf = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(model_path)
    try:  # the documented path: official hub names only
        HookedSAETransformer.from_pretrained_no_processing(model_path, hf_model=hf, tokenizer=tok)
        official = "loads"
    except Exception as e:  # the message is the finding
        official = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
    cfg = loading.get_pretrained_model_config(
        model_path, fold_ln=False, device="cpu", dtype=torch.float32
    )
    state = loading.get_pretrained_state_dict(model_path, cfg, hf, dtype=torch.float32)
    model = HookedSAETransformer(cfg, tok, move_to_device=False)
    model.load_and_process_state_dict(
        state, fold_ln=False, center_writing_weights=False, center_unembed=False,
        fold_value_biases=False, refactor_factored_attn_matrices=False,
    )  # fmt: skip
    model.eval()
    tokens = expected["tokens"]
    for sae in saes.values():
        model.add_sae(sae, use_error_term=True)
    attached = sorted(model.acts_to_saes)
    with torch.no_grad():
        logits, cache = model.run_with_cache(tokens)
    model.reset_saes()
    rows = []
    for ours, sae in saes.items():
        hook = sae.cfg.metadata.hook_name
        row = {"vlmscope": ours, "saelens": hook, "attached": hook in attached}
        for what, key in (("input", "hook_sae_input"), ("recons", "hook_sae_recons")):
            want = expected[f"{'act' if what == 'input' else 'recons'}/{ours}"]
            name = f"{hook}.{key}"
            if name not in cache:
                row[what] = None
                continue
            got = cache[name].reshape(want.shape)
            row[what] = float((got - want).abs().max() / want.abs().max())
        rows.append(row)
    bos = {s.cfg.metadata.prepend_bos for s in saes.values()}
    lg = float((logits - expected["logits"]).abs().max() / expected["logits"].abs().max())
    return {"official_from_pretrained": official, "rows": rows, "logits_rel": lg,
            "prepend_bos": sorted(bos)}  # fmt: skip


# --- driver ----------------------------------------------------------------------------------
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--peer-python", help="python of a venv with sae-lens and transformer-lens")
    # gemma2 is left out by default: TransformerLens builds Gemma 2 only from its hard-coded
    # configs of the official checkpoints (from a config.json it raises NotImplementedError).
    ap.add_argument("--families", nargs="+", default=["llama", "qwen2", "qwen3"])
    ap.add_argument("--activations", nargs="+", default=["topk", "jumprelu"])
    ap.add_argument("--peer", type=Path, help=argparse.SUPPRESS)  # internal: the peer side
    args = ap.parse_args()
    if args.peer is not None:
        print(json.dumps(peer_side(args.peer)))
        return 0
    if not args.peer_python:
        ap.error("--peer-python is required")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    failed = False
    print(f"{'family':<7} {'act':<8} {'vlmscope hook':<28} {'SAELens hook':<24} "
          f"{'attached':>8} {'input rel':>10} {'recons rel':>10}")  # fmt: skip
    for family in args.families:
        for activation in args.activations:
            with tempfile.TemporaryDirectory() as tmp:
                root = Path(tmp)
                ours = vlmscope_side(root, family, activation)
                proc = subprocess.run(
                    [args.peer_python, __file__, "--peer", str(root)],
                    capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"},
                )  # fmt: skip
                if proc.returncode != 0:
                    last = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "?"
                    print(f"{family:<7} {activation:<8} SAELens side failed: {last[:160]}")
                    print(proc.stderr[-6000:], file=sys.stderr)
                    failed = True
                    continue
                res = json.loads(proc.stdout.strip().splitlines()[-1])
            for r in res["rows"]:
                ok = r["attached"] and all(
                    r[k] is not None and r[k] <= TOL for k in ("input", "recons")
                )
                failed |= not ok
                fmt = lambda v: "missing" if v is None else f"{v:.1e}"  # noqa: E731
                print(f"{family:<7} {activation:<8} {r['vlmscope']:<28} {r['saelens']:<24} "
                      f"{r['attached']!s:>8} {fmt(r['input']):>10} {fmt(r['recons']):>10}"
                      f"{'' if ok else '  MISMATCH'}")  # fmt: skip
            print(f"{family:<7} {activation:<8} logits, TransformerLens vs transformers: "
                  f"rel {res['logits_rel']:.1e}")  # fmt: skip
            print(f"{family:<7} {activation:<8} from_pretrained_no_processing(folder): "
                  f"{res['official_from_pretrained']}")  # fmt: skip
            bos_ok = res["prepend_bos"] == [ours["bos_added"]]
            failed |= not bos_ok
            print(f"{family:<7} {activation:<8} prepend_bos {res['prepend_bos']}, tokenizer adds "
                  f"BOS: {ours['bos_added']}{'' if bos_ok else '  MISMATCH'}")  # fmt: skip
            if ours["notes"]:
                print(f"{family:<7} {activation:<8} export warning ({len(ours['notes'])} hooks): "
                      f"{ours['notes'][0][:140]}")  # fmt: skip
    print(f"(rel = max |SAELens - vlmscope| / max |vlmscope|; a match is <= {TOL:g})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
