"""`vlmscope demo`: the whole pipeline on the shipped toy VLM and the shapes world.

1. load the model and show a prompt's tokens, token masks and cached activation shapes;
2. train a cross-layer transcoder (CLT) on the model while it reads shapes-world questions;
3. train per-layer transcoders with the same latent budget and sparsity, and compare their
   held-out reconstruction error with the CLT's;
4. evaluate the CLT as a replacement for the MLPs (FVU, CE-loss score, KL, top-1 agreement);
5. attribute "What colour is the circle?" on a held-out image, write the graph JSON and a
   patch heatmap, and measure how much of the image's influence falls on the circle;
6. feature dashboards of the CLT (top examples with their image patches, density, logit
   effects), so `vlmscope serve --graphs demo_out/attribution --features demo_out/features`
   opens the graph with its feature cards.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vlmscope.models.hooked import HookedVLM

QUESTION = "What colour is the circle?"
#: the attribution graph's name (its file names in demo_out/attribution/).
SLUG = "circle-colour"


@dataclass
class DemoBudget:
    """How long each stage runs; `quick` is for tests and smoke runs."""

    # 360k tokens: on the v2 toy (64 image tokens a prompt) 120k left the CLT at nMSE 0.042
    # and a graph replacement score of 0.58; 360k gives 0.023 and 0.70 in about 40 s more.
    train_tokens: int = 360_000
    expansion_factor: int = 4
    k: int = 8
    batch_size: int = 16
    eval_tokens: int = 20_000
    max_feature_nodes: int = 400
    n_train: int = 3000
    feature_tokens: int = 20_000

    @classmethod
    def quick(cls) -> DemoBudget:
        return cls(train_tokens=6_000, eval_tokens=2_000, max_feature_nodes=64, n_train=200,
                   feature_tokens=1_500)  # fmt: skip


def _section(n: int, title: str) -> None:
    print(f"\n=== {n}/6 {title} " + "=" * max(0, 66 - len(title)))


def _token_strip(vlm: HookedVLM, inputs: Any, masks: Any, b: int = 0) -> str:
    """The prompt as tokens, with each run of image tokens folded into one [IMG xN] marker."""
    tok = vlm.tokenizer
    parts: list[str] = []
    run = 0
    for s, t in enumerate(inputs["input_ids"][b].tolist()):
        if not masks.valid[b, s]:
            continue
        if masks.image[b, s]:
            run += 1
            continue
        if run:
            parts.append(f"[IMG x{run}]")
            run = 0
        parts.append(tok.convert_ids_to_tokens(t))
    if run:
        parts.append(f"[IMG x{run}]")
    return " ".join(p.replace("Ġ", "_").replace("Ċ", "\\n") for p in parts)


def demo_image() -> Any:
    """A held-out shapes-world picture with one circle, generated (no files needed): the one
    the attribution step explains, drawn as the toy saw its training pictures."""
    from vlmscope.data import shapes

    return shapes.example_with_one("circle").image


def show_model(vlm: HookedVLM, prompt: str, image: Any) -> None:
    """Tokens, masks and cached activation shapes of one image+text prompt."""
    a = vlm.adapter
    print(f"adapter: {a.family}; dims: {a.dims()}")
    inputs = vlm.prepare(prompt, images=[image] if a.capabilities.has_vision else None)
    masks = vlm.masks(inputs)
    names = [
        "lm.blocks.*.hook_resid_post",
        "lm.blocks.0.attn.hook_pattern",
        "lm.blocks.0.mlp.hook_out",
    ]
    if a.projector is not None:
        names.append("projector.hook_out")
    out, cache = vlm.run_with_cache(inputs, names=names)
    print(f"prompt tokens ({inputs['input_ids'].shape[1]}): {_token_strip(vlm, inputs, masks)}")
    print(
        f"token mask: {int(masks.image.sum())} image, {int(masks.text.sum())} text, "
        f"{int(masks.special.sum())} special, {int(masks.pad.sum())} padding"
    )
    row = "".join(
        "I" if i else ("S" if s else "t")
        for i, s in zip(masks.image[0], masks.special[0], strict=True)
    )
    print(f"  per position (I image, S special, t text): {row}")
    if bool(masks.image.any()):
        pm = masks.patch_map[0][masks.image[0]]
        cells = pm[pm[:, 3] >= 0]
        rows, cols = int(cells[:, 2].max()) + 1, int(cells[:, 3].max()) + 1
        print(
            f"  patch map: {len(pm)} image tokens on a {rows}x{cols} grid (image, view, row, col)"
        )
    print("cached activations:")
    for k, v in cache.items():
        print(f"  {k:<38} {tuple(v.shape)}")
    top = torch.softmax(out.logits[0, -1].float(), -1).topk(3)
    guesses = ", ".join(
        f"{vlm.tokenizer.decode([int(i)])!r} {p:.2f}"
        for p, i in zip(top.values, top.indices, strict=True)
    )
    print(f"next-token top 3: {guesses}")


def _train(
    vlm: HookedVLM, model: str, kind: str, n_targets: int, out: Path, budget: DemoBudget
) -> Any:
    from vlmscope.training.config import SaeArgs, TrainConfig
    from vlmscope.training.trainer import train

    cfg = TrainConfig(
        model=model,
        dataset=f"shapes:{budget.n_train}",
        sae=SaeArgs(
            kind=kind, expansion_factor=budget.expansion_factor, k=budget.k, n_targets=n_targets
        ),
        batch_size=budget.batch_size,
        max_tokens=budget.train_tokens,
        output_dir=str(out),
        run_name=kind,
        save_every=10**9,
        log_every=10,
    )
    return train(cfg, vlm, progress=True)


def _heldout(budget: DemoBudget) -> Any:
    from vlmscope.training.config import TrainConfig
    from vlmscope.training.trainer import open_training_data

    return open_training_data(
        TrainConfig(model="-", dataset=f"shapes:{budget.n_train}", split="test", max_steps=1)
    )


def attribution_example(
    vlm: HookedVLM,
    dictionaries: Path,
    out: Path,
    max_feature_nodes: int = 400,
    n_scan: int = 400,
    model: str | None = None,
) -> dict[str, Any]:
    """Attribute QUESTION on a held-out shapes image with exactly one circle; report how much
    of the image patches' effect on the top logit (the heatmap's map) lands on the circle's
    patches, beside the grounding benchmark's mean for colour questions. `model`: the name the
    graph shows (`vlmscope attribute --model` gives it the same way; default: the folder's)."""
    from vlmscope.attribution.attribute import attribute
    from vlmscope.attribution.export import (
        concentration,
        patch_effect,
        public_model_name,
        save_raw,
        store_image,
        write_graph_files,
    )
    from vlmscope.attribution.graph import graph_scores, prune
    from vlmscope.attribution.heatmap import heatmap_path, save_heatmap_png
    from vlmscope.data import shapes

    sample = shapes.example_with_one("circle", n_scan=n_scan)
    image = sample.image
    circle = next(o for o in sample.objects if o.shape == "circle")
    inputs = vlm.prepare(QUESTION, images=[image])
    graph = attribute(vlm, dictionaries, inputs, max_feature_nodes=max_feature_nodes, batch_size=32)
    pruned = prune(graph)
    replacement, completeness = graph_scores(graph)
    # The layout `vlmscope attribute --graph-dir out --slug SLUG` writes: SLUG.json and the
    # graph-metadata.json index (vlmscope serve, circuit-tracer's frontend), the raw graph,
    # the image once under images/, and SLUG.heatmap.png.
    json_path, _ = write_graph_files(
        graph,
        out,
        SLUG,
        prune_result=pruned,
        prompt_text=QUESTION,
        image_paths=[out / store_image(image, out)],
        relative_to=out,
        scan=public_model_name(model),
    )
    raw_path = save_raw(graph, json_path.with_suffix(".safetensors"))
    png_path = save_heatmap_png(graph, image, heatmap_path(json_path), logit_index=0)
    heat = patch_effect(graph, logit_index=0)[0][0].abs()  # scored as the benchmark scores it
    # Ground-truth patches of the circle on the model's own grid (the image is not cropped).
    label_px = image.width // heat.shape[1]
    labels = shapes.object_patches(circle, shapes.ShapesConfig(), label_px)
    conc = concentration(heat, labels)
    share = len(labels) / heat.numel()
    top = graph.logit_targets[0]
    print(f'prompt: "{QUESTION}" on a held-out image with a {circle.colour} circle')
    print(f"top logit: {top.token!r} (p={top.probability:.2f}); correct answer: {circle.colour!r}")
    n_active = graph.metadata["n_active_features"]
    kept = f"{int(pruned.node_mask.sum())} nodes, {int(pruned.edge_mask.sum())} edges"
    print(f"graph: {graph.n_features} of {n_active} active features explored; kept {kept}")
    print(f"replacement score {replacement:.3f}, completeness score {completeness:.3f}")
    print(
        f"image patches' effect on the circle's {len(labels)} of {heat.numel()} patches: "
        f"{100 * conc:.1f}% (uniform would be {100 * share:.1f}%)"
    )
    bench = grounding_benchmark(vlm, "colour", "effect_clt")
    if bench is not None:
        print(
            f"  one example; the grounding benchmark's mean over {bench['n']} held-out colour "
            f"questions: {100 * bench['mean']:.1f}% (benchmarks/grounding.py, same map)"
        )
    print(f"wrote {json_path}, {raw_path}, {png_path}")
    return {
        "answer": circle.colour,
        "top_logit": top.token.strip(),
        "top_probability": top.probability,
        "replacement_score": replacement,
        "completeness_score": completeness,
        "circle_concentration": conc,
        "uniform_share": share,
        "benchmark_mean": None if bench is None else bench["mean"],
    }


#: the grounding benchmark's tables for the shipped toy (benchmarks/grounding.py --summary)
GROUNDING_SUMMARY = Path(__file__).parent / "models" / "toy" / "grounding.json"


def grounding_benchmark(vlm: HookedVLM, question_type: str, method: str) -> dict[str, Any] | None:
    """The benchmark's {mean, median, top_hit, n} for one question type and map, when `vlm`
    is the shipped toy with the very weights the summary was measured on (a retrained toy in
    the same folder gets None, as does any other model)."""
    from vlmscope.capture.layout import sha256_file
    from vlmscope.models.toy import TOY_DIR

    where = getattr(vlm.model.config, "_name_or_path", "")
    if not GROUNDING_SUMMARY.exists() or Path(where).resolve() != TOY_DIR:
        return None
    summary = json.loads(GROUNDING_SUMMARY.read_text())
    if summary.get("weights_sha256") != sha256_file(TOY_DIR / "model.safetensors"):
        return None
    return summary.get("by_type", {}).get(question_type, {}).get(method)


def run_demo(
    model: str = "toy",
    out_dir: str | os.PathLike[str] = "demo_out",
    device: str | None = None,
    budget: DemoBudget | None = None,
) -> dict[str, Any]:
    """Run the six stages and return their headline numbers (also written as summary.json)."""
    from vlmscope.cli import print_unit_table
    from vlmscope.replacement.evaluate import evaluate
    from vlmscope.training.trainer import resolve_model_path

    budget = budget or DemoBudget()
    out = Path(out_dir)
    # Start clean, removing only what an earlier demo wrote here (never the user's files).
    for owned in ("runs", "attribution", "features"):
        shutil.rmtree(out / owned, ignore_errors=True)
    (out / "summary.json").unlink(missing_ok=True)
    summary: dict[str, Any] = {"model": model}

    _section(1, "model, token masks and activations")
    path = resolve_model_path(model)
    vlm = HookedVLM.from_pretrained(path, device=device, dtype=torch.float32)
    show_model(vlm, QUESTION, demo_image())

    _section(2, "train a cross-layer transcoder on the shapes world")
    clt = _train(vlm, path, "clt", 0, out / "runs", budget)
    print_unit_table(clt.fvu_per_unit, clt.l0_per_unit, clt.dead_per_unit)

    _section(3, "per-layer transcoders with the same latent budget and L0")
    plt = _train(vlm, path, "transcoder", 1, out / "runs", budget)
    print_unit_table(plt.fvu_per_unit, plt.l0_per_unit, plt.dead_per_unit)
    # The CLT's full evaluation (stage 4's table) also gives its reconstruction: one pass.
    reports = {}
    for name, res, per_layer in (("clt", clt, True), ("transcoders", plt, False)):
        reports[name] = evaluate(
            vlm,
            res.dictionaries,
            _heldout(budget),
            max_tokens=budget.eval_tokens,
            per_layer=per_layer,
            progress=False,
            batch_size=budget.batch_size,
        )
    nmse = {k: r.reconstruction["all"]["overall"]["normalized_mse"] for k, r in reports.items()}
    l0 = {k: r.reconstruction["all"]["overall"]["l0"] for k, r in reports.items()}
    print(
        f"\nheld-out normalised MSE (all layers):  CLT {nmse['clt']:.4f}   "
        f"per-layer transcoders {nmse['transcoders']:.4f}"
    )
    print(f"mean L0 per layer:  CLT {l0['clt']:.1f}   transcoders {l0['transcoders']:.1f}")
    better = "lower" if nmse["clt"] < nmse["transcoders"] else "NOT lower"
    print(f"-> the CLT's reconstruction error is {better} at the same budget")
    summary["heldout_nmse"] = nmse

    _section(4, "evaluate the CLT as a replacement for the MLPs")
    report = reports["clt"]
    print(report.table())
    report.save(Path(clt.dictionaries) / "metrics.json")
    # The toy is trained to predict answers only; its loss on image and question tokens is
    # noise that zero-ablation can even lower, so the headline figures are on answer tokens.
    answer = report.next_token["answer"]["all_layers"]
    summary["eval"] = {
        "ce_loss_score_answer": answer["ce_loss_score"],
        "kl_answer": answer["kl"],
        "top1_answer": answer["top1_agreement"],
    }
    print(
        f"\n-> on answer tokens, with every MLP replaced: CE-loss score "
        f"{answer['ce_loss_score']:.3f}, KL {answer['kl']:.4f}, top-1 agreement "
        f"{answer['top1_agreement']:.1%}"
    )

    _section(5, "attribution graph for a shapes-world question")
    summary["attribution"] = attribution_example(
        vlm, clt.dictionaries, out / "attribution", budget.max_feature_nodes, model=model
    )

    _section(6, "feature dashboards for the viewer")
    from vlmscope.features.run import FeaturesOptions, collect_features

    res = collect_features(
        path, str(clt.dictionaries), f"shapes:{budget.n_train}", out / "features",
        FeaturesOptions(max_tokens=budget.feature_tokens, batch_size=budget.batch_size),
        vlm=vlm, progress=False,
    )  # fmt: skip
    alive = sum(u["alive"] for u in res.units)
    total = sum(u["n_features"] for u in res.units)
    print(f"{res.tokens} tokens: {alive} of {total} features fired; cards in {res.out}")
    summary["features"] = {"tokens": res.tokens, "alive": alive, "features": total}
    print(f"\nexplore them: vlmscope serve --graphs {out / 'attribution'} --features {res.out}")
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=float))
    print(f"\nsummary written to {out / 'summary.json'}")
    return summary
