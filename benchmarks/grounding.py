"""Grounding: does each saliency method put the image's influence on the asked-about object?

    python benchmarks/grounding.py                          # shipped toy, trains its dictionaries
    python benchmarks/grounding.py --clt DIR --transcoders DIR --n 40
    python benchmarks/grounding.py --model path/to/toy --methods grad ig attention

Held-out shapes-world questions of the world the toy was trained on (`world_version`), `--n`
per question type; only questions the toy answers correctly (greedy) are scored, and only
those with a target object (a count of zero or an absent object has none). For each, every
method gives a map over the image patches for the logit of the answer's first token at the
answer position, and the benchmark reports, against the union of the target objects' label
patches (on the model's own patch grid):

- share: the fraction of the map's (non-negative) mass on the target patches (mean, median);
- top hit: how often the map's largest patch is a target patch;
- n: the number of questions scored;

per method, overall, per question type and per number of objects in the scene. Methods: the
attribution graph's patch influence with the CLT and with per-layer transcoders
(`attribution.export.patch_influence`: row-normalised |edges|, `--max-feature-nodes`
explored); the same graphs' signed total effect per patch (`export.patch_effect`, its
magnitude), on the answer's logit alone (``effect_*``), against the question type's other
answers (``contrast_*``: the answer's logit minus the mean of theirs; every graph carries
their logit nodes), and measured from a blank image (``blank_*``, ``blankvs_*`` against the
other answers: `attribute(..., reference="blank")`); and the baselines of
`attribution.baselines` (gradient x input on the patch embeddings, integrated gradients, also
against the other answers, attention from the answer position, attention rollout);
``uniform`` is the share a flat map gets (the target's fraction of the patches; its top hit is
that same fraction). Without
`--clt` / `--transcoders`, both are trained on the toy with the demo's default budget into
``OUT/runs`` (a few minutes on CPU). Results go to ``OUT/grounding.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

METHODS = (
    "graph_clt",
    "graph_plt",
    "effect_clt",
    "effect_plt",
    "contrast_clt",
    "contrast_plt",
    "blank_clt",
    "blank_plt",
    "blankvs_clt",
    "blankvs_plt",
    "grad",
    "ig",
    "ig_contrast",
    "attention",
    "rollout",
    "uniform",
)
#: Not run by default: the baselines with the LM's attention patterns and norm scales (or the
#: patterns only) frozen at the input, as the graph's local replacement model freezes them, and
#: integrated gradients with them frozen at each point of the path (what graphs integrated
#: along the path would give), alone and against the other answers.
FROZEN = ("grad_frozen", "ig_frozen", "ig_frozen_attn", "ig_frozen_contrast", "ig_frozen_path",
          "ig_frozen_path_contrast")  # fmt: skip
LABELS = {
    "graph_clt": "graph, CLT, influence \\|A\\|",
    "graph_plt": "graph, per-layer, influence \\|A\\|",
    "effect_clt": "graph, CLT, effect",
    "effect_plt": "graph, per-layer, effect",
    "contrast_clt": "graph, CLT, effect vs other answers",
    "contrast_plt": "graph, per-layer, effect vs other answers",
    "blank_clt": "graph, CLT, effect from a blank image",
    "blank_plt": "graph, per-layer, effect from a blank image",
    "blankvs_clt": "graph, CLT, effect from a blank image vs other answers",
    "blankvs_plt": "graph, per-layer, effect from a blank image vs other answers",
    "grad": "gradient x input (patch embeddings)",
    "ig": "integrated gradients",
    "ig_contrast": "integrated gradients vs other answers",
    "attention": "attention from the answer position",
    "rollout": "attention rollout",
    "uniform": "uniform",
    "grad_frozen": "gradient x input, patterns and norm scales frozen",
    "ig_frozen": "integrated gradients, patterns and norm scales frozen at the input",
    "ig_frozen_attn": "integrated gradients, patterns frozen at the input",
    "ig_frozen_contrast": "integrated gradients vs other answers, patterns and norm scales "
    "frozen at the input",
    "ig_frozen_path": "integrated gradients, patterns and norm scales frozen at each point",
    "ig_frozen_path_contrast": "integrated gradients vs other answers, patterns and norm scales "
    "frozen at each point",
}


def dictionaries(vlm: Any, model: str, out: Path, tokens: int | None) -> dict[str, Path]:
    """CLT and per-layer transcoders trained on the toy with the demo's settings (and its
    token budget unless `tokens` is given)."""
    from vlmscope.demo import DemoBudget, _train

    budget = DemoBudget() if tokens is None else DemoBudget(train_tokens=tokens)
    clt = _train(vlm, model, "clt", 0, out / "runs", budget)
    plt = _train(vlm, model, "transcoder", 1, out / "runs", budget)
    return {"graph_clt": Path(clt.dictionaries), "graph_plt": Path(plt.dictionaries)}


def competitors(vlm: Any, config: Any, question_type: str, answer_id: int) -> list[int]:
    """First-token ids of the other answers a question of this type can have."""
    from vlmscope.data import shapes

    vocab = shapes.answer_vocabulary(config)  # ..., "yes", "no", then the positions
    words = {
        "colour": config.colours,
        "shape": config.shapes,
        "count": shapes.NUMBER_WORDS[: config.n_count + 1],
        "exists": ("yes", "no"),
        "relation": ("yes", "no"),
        "position": vocab[vocab.index("no") + 1 :],
    }[question_type.split("_")[0]]
    ids = {vlm.tokenizer(" " + w, add_special_tokens=False)["input_ids"][0] for w in words}
    return sorted(ids - {answer_id})


def frozen_baseline(
    vlm: Any, inputs: Any, token: int, method: str, steps: int, others: list[int]
) -> torch.Tensor:
    """`method` (one of FROZEN) on the model whose LM attention patterns (and norm scales, but
    for ig_frozen_attn) are recorded at the input and replayed for every point of the path
    (`freeze.frozen`, value replay; the MLPs stay live), or, for ig_frozen_path*, recorded and
    held at each point of the path (`baselines.integrated_gradients(freeze_path=True)`);
    *_contrast: against the other answers `others`."""
    from vlmscope.attribution import baselines
    from vlmscope.attribution.freeze import FreezeState, frozen

    against = others if method.endswith("_contrast") else []
    if method.startswith("ig_frozen_path"):
        return baselines.integrated_gradients(
            vlm, inputs, token, steps, against=against, freeze_path=True
        )
    state = FreezeState(mode="record", norms=method != "ig_frozen_attn")
    with torch.no_grad(), frozen(vlm, state):
        vlm.forward(inputs)
    state.mode = "replay"
    with frozen(vlm, state):
        if method == "grad_frozen":
            return baselines.gradient_x_input(vlm, inputs, token)
        return baselines.integrated_gradients(vlm, inputs, token, steps, against=against)


def target_patches(sample: Any, config: Any, grid: int) -> list[tuple[int, int]]:
    """Label patches of the question's target objects on a grid x grid patch grid."""
    from vlmscope.data import shapes

    px = config.image_size // grid
    cells = {p for i in sample.target for p in shapes.object_patches(sample.objects[i], config, px)}
    return sorted(cells)


def score(heat: torch.Tensor, labels: list[tuple[int, int]]) -> tuple[float, bool]:
    """(share of the non-negative mass on the labels, whether the top patch is a label)."""
    from vlmscope.attribution.export import concentration

    h = heat.clamp(min=0)
    r, c = divmod(int(h.flatten().argmax()), h.shape[1])
    return concentration(h, labels), (r, c) in set(labels)


def summarise(rows: list[dict[str, Any]], methods: list[str], key: str) -> dict[str, Any]:
    """Group -> method -> {mean, median, top_hit, n}."""
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        groups["all" if key == "all" else str(r[key])].append(r)
    out: dict[str, Any] = {}
    for g, rs in sorted(groups.items()):
        out[g] = {}
        for m in methods:
            shares = [r["share"][m] for r in rs]
            hits = [r["hit"][m] for r in rs]
            out[g][m] = {
                "mean": statistics.fmean(shares),
                "median": statistics.median(shares),
                "top_hit": statistics.fmean(hits),
                "n": len(rs),
            }
    return out


def table(summary: dict[str, Any], methods: list[str], title: str) -> str:
    """Markdown table: one row per group and method."""
    lines = [
        f"| {title} | method | mean | median | top patch on target | n |",
        "|---|---|---|---|---|---|",
    ]
    for g, per in summary.items():
        for m in methods:
            s = per[m]
            lines.append(
                f"| {g} | {LABELS[m]} | {s['mean']:.1%} | {s['median']:.1%} | "
                f"{s['top_hit']:.1%} | {s['n']} |"
            )
    return "\n".join(lines)


def summary_of(result: dict[str, Any]) -> dict[str, Any]:
    """The benchmark's tables without its per-question rows (what the demo quotes)."""
    return {k: v for k, v in result.items() if k != "rows"}


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", default="toy", help="model folder or `toy` (the shipped toy)")
    p.add_argument("--clt", default=None, help="CLT dictionaries folder (default: train one)")
    p.add_argument(
        "--transcoders", default=None, help="per-layer transcoders folder (default: train them)"
    )
    p.add_argument("--train-tokens", type=int, default=None,
                   help="tokens to train each on (default: the demo's budget)")  # fmt: skip
    p.add_argument("--n", type=int, default=40, help="held-out questions per type (before "
                   "keeping the correctly answered ones with a target)")  # fmt: skip
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS + FROZEN,
                   help="methods to score (default: all but the frozen baselines: "
                   + ", ".join(FROZEN) + ")")  # fmt: skip
    p.add_argument("--max-feature-nodes", type=int, default=400, help="graph features explored")
    p.add_argument("--ig-steps", type=int, default=32, help="integrated-gradients steps")
    p.add_argument("--out", default="grounding_out", help="output folder")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument(
        "--summary",
        default=None,
        help="also write the tables without the per-question rows here (the shipped toy's: "
        "vlmscope/models/toy/grounding.json, quoted by the demo)",
    )
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    from tqdm.auto import tqdm

    from vlmscope.attribution import baselines
    from vlmscope.attribution.attribute import attribute
    from vlmscope.attribution.export import patch_effect, patch_influence
    from vlmscope.capture.layout import sha256_file
    from vlmscope.data import shapes
    from vlmscope.models.hooked import HookedVLM
    from vlmscope.models.toy.train import generate_answers, heldout_samples, world_version
    from vlmscope.training.trainer import resolve_model_path

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = resolve_model_path(args.model)
    version = world_version(path)
    config = shapes.ShapesConfig(version=version)
    vlm = HookedVLM.from_pretrained(path, device="cpu", dtype=torch.float32)
    weights = Path(path) / "model.safetensors"  # one file for the toy; None for sharded weights
    weights_sha256 = sha256_file(weights) if weights.is_file() else None
    methods = list(args.methods)
    dicts: dict[str, Path] = {}
    graphs = sorted({"graph_" + m.split("_")[1] for m in methods if m.endswith(("_clt", "_plt"))})
    if graphs:
        given = {"graph_clt": args.clt, "graph_plt": args.transcoders}
        if all(given[m] for m in graphs):
            dicts = {m: Path(given[m]) for m in graphs}
        else:
            t0 = time.perf_counter()
            dicts = dictionaries(vlm, str(path), out, args.train_tokens)
            print(f"trained dictionaries in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
            dicts |= {m: Path(v) for m, v in given.items() if v}

    samples = heldout_samples(args.n, version=version)
    preds = generate_answers(vlm, samples)
    right = [s for s, a in zip(samples, preds, strict=True) if a == s.answer]
    kept = [s for s in right if s.target]
    print(
        f"world v{version}: {len(samples)} held-out questions, {len(right)} answered "
        f"correctly, {len(kept)} of them with a target object",
        file=sys.stderr,
    )
    rows: list[dict[str, Any]] = []
    seconds: dict[str, float] = defaultdict(float)
    for s in tqdm(kept, desc="grounding"):
        inputs = vlm.prepare(s.question, images=[s.image])
        token = vlm.tokenizer(" " + s.answer, add_special_tokens=False)["input_ids"][0]
        others = competitors(vlm, config, s.question_type, token)
        heats: dict[str, torch.Tensor] = {}
        built: dict[str, Any] = {}
        for m in methods:
            t0 = time.perf_counter()
            kind = "graph_" + m.split("_")[1] if m.endswith(("_clt", "_plt")) else ""
            if kind in dicts:
                if kind not in built:
                    blank = any(m.startswith("blank") and m.endswith(kind[5:]) for m in methods)
                    built[kind] = attribute(vlm, dicts[kind], inputs,
                                            logit_targets=[token, *others],
                                            max_feature_nodes=args.max_feature_nodes,
                                            batch_size=64,
                                            reference="blank" if blank else None)  # fmt: skip
                g = built[kind]
                if m.startswith("graph"):
                    heats[m] = patch_influence(g, logit_index=0)[0][0]
                elif m.startswith("effect"):
                    heats[m] = patch_effect(g, 0, reference=False)[0][0].abs()
                else:
                    vs = range(1, 1 + len(others)) if "vs" in m or "contrast" in m else ()
                    ref = m.startswith("blank")
                    heats[m] = patch_effect(g, 0, against=vs, reference=ref)[0][0].abs()
            elif m == "grad":
                heats[m] = baselines.gradient_x_input(vlm, inputs, token)
            elif m == "ig":
                heats[m] = baselines.integrated_gradients(vlm, inputs, token, args.ig_steps)
            elif m == "ig_contrast":
                heats[m] = baselines.integrated_gradients(
                    vlm, inputs, token, args.ig_steps, against=others
                )
            elif m in FROZEN:
                heats[m] = frozen_baseline(vlm, inputs, token, m, args.ig_steps, others)
            elif m == "attention":
                heats[m] = baselines.attention_from_answer(vlm, inputs)
            elif m == "rollout":
                heats[m] = baselines.attention_rollout(vlm, inputs)
            seconds[m] += time.perf_counter() - t0
        grid = next(iter(heats.values())).shape[0] if heats else 8
        labels = target_patches(s, config, grid)
        share, hit = {}, {}
        for m, h in heats.items():
            share[m], hit[m] = score(h, labels)
        if "uniform" in methods:
            share["uniform"] = hit["uniform"] = len(labels) / grid**2
        rows.append({"id": s.id, "type": s.question_type, "n_objects": len(s.objects),
                     "question": s.question, "answer": s.answer,
                     "share": share, "hit": hit})  # fmt: skip

    result = {
        "command": "python benchmarks/grounding.py " + " ".join(sys.argv[1:]),
        "model": str(path),
        # the demo quotes this summary only for these exact weights
        "weights_sha256": weights_sha256,
        "world_version": version,
        "n_per_type": args.n,
        "methods": methods,
        "max_feature_nodes": args.max_feature_nodes,
        "seconds_per_question": {m: t / max(1, len(rows)) for m, t in seconds.items()},
        "all": summarise(rows, methods, "all"),
        "by_type": summarise(rows, methods, "type"),
        "by_objects": summarise(rows, methods, "n_objects"),
        "rows": rows,
    }
    (out / "grounding.json").write_text(json.dumps(result, indent=1) + "\n")
    if args.summary:
        Path(args.summary).write_text(json.dumps(summary_of(result), indent=1) + "\n")
    print(table(result["all"], methods, "questions"))
    print()
    print(table(result["by_type"], methods, "question type"))
    print()
    print(table(result["by_objects"], methods, "objects"))
    print(f"\nwrote {out / 'grounding.json'}")


if __name__ == "__main__":
    main()
