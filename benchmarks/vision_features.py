"""Do a vision-tower SAE's features separate colours and shapes? Measured on the toy VLM.

    python benchmarks/vision_features.py                      # trains, scores, writes the figure
    python benchmarks/vision_features.py --steps 50 --eval 100 --figure ''   # quick look

Trains a TopK SAE on the toy VLM's `vision.blocks.{layer}.hook_resid_post` (image patches only,
through `vlmscope train`'s own trainer), then reads the held-out shapes world (test split):
the toy sees a 64x64 image as 4x4 patches of 16 px, exactly the shapes world's cells, so each
patch is labelled with the colour and shape of the object drawn in its cell, or background.

For every colour and every shape, and for each unit (an SAE feature, or as baselines a
neuron of the same residual stream or a random direction in it), the patches are ranked by
the unit's activation:

  precision@N  the fraction of the unit's N top-activating patches that have that colour
               (shape); the best unit per colour (shape) is reported
  AUROC        how well the unit's activation separates patches with that colour (shape) from
               all other patches (1 = perfectly, 0.5 = chance)

and a unit is *pure* when at least 90% of its top N patches share one colour (one shape).
The figure shows, for each colour and shape, the top patches of the SAE feature with the best
precision@N.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from vlmscope.data import open_dataset, shapes
from vlmscope.models.hooked import HookedVLM
from vlmscope.models.toy import toy_path
from vlmscope.models.vision import vision_row_mask
from vlmscope.replacement.evaluate import iter_batches
from vlmscope.training.bundle import DictionaryBundle
from vlmscope.training.config import SaeArgs, TrainConfig
from vlmscope.training.trainer import train

BACKGROUND = "background"


def train_sae(args: argparse.Namespace, hook: str, out: Path) -> DictionaryBundle:
    cfg = TrainConfig(
        model="toy",
        dataset="shapes",
        sae=SaeArgs(k=args.k, expansion_factor=args.expansion),
        hookpoints=[hook],
        batch_size=args.batch_size,
        max_steps=args.steps,
        max_tokens=0,
        seed=args.seed,
        output_dir=str(out),
        run_name="vision-sae",
        log_every=max(1, args.steps // 5),
    )
    result = train(cfg, HookedVLM.from_pretrained(toy_path(), device="cpu"), progress=False)
    print(f"trained: {result.step} steps, {result.tokens} patches, training FVU "
          f"{result.fvu_per_unit[hook]:.3f}")  # fmt: skip
    return DictionaryBundle.load(result.dictionaries)


def held_out_patches(
    args: argparse.Namespace, hook: str, out: Path
) -> tuple[torch.Tensor, list[str], list[str], list[tuple[Any, int, int]]]:
    """Activations [patches, d] of the test split's image patches with their colour and shape
    labels and (image, row, col)."""
    folder = out / "shapes-test"
    shapes.write_dataset(folder, n=args.eval, seed=args.seed, split="test")
    records = list(open_dataset(folder / "test.parquet", schema="chat"))
    rows = shapes.load_labels(folder, "test")  # in row order, like the records
    labels = {r.row_id: row for r, row in zip(records, rows, strict=True)}
    pictures = {r.row_id: r.images[0] for r in records}
    vlm = HookedVLM.from_pretrained(toy_path(), device="cpu")
    xs, colours, kinds, where = [], [], [], []
    for batch in iter_batches(vlm, records, batch_size=32):
        masks = batch.masks if batch.masks is not None else vlm.masks(batch.inputs)
        _, cache = vlm.run_with_cache(batch.inputs, names=[hook], masks=masks)
        act = cache[hook]
        layout = vlm.vision_positions(batch.inputs, hook, act.shape[:-1])
        keep = vision_row_mask(layout)
        xs.append(act.reshape(-1, act.shape[-1])[keep].float())
        for image, _, r, c in layout[keep].tolist():
            row_id = batch.row_ids[masks.image_sample[image]]
            obj = next((o for o in labels[row_id]["objects"] if o["cell"] == [r, c]), None)
            colours.append(obj["colour"] if obj else BACKGROUND)
            kinds.append(obj["shape"] if obj else BACKGROUND)
            where.append((pictures[row_id], r, c))
    return torch.cat(xs), colours, kinds, where


def auroc(scores: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    """AUROC of every column of scores [N, U] for the bool labels [N] (ties count half)."""
    ranks = torch.empty_like(scores)
    order = scores.argsort(dim=0)
    ar = torch.arange(1, len(scores) + 1, dtype=scores.dtype).unsqueeze(1).expand_as(scores)
    ranks.scatter_(0, order, ar)
    # Average ranks over ties (activations are often exactly 0).
    for u in range(scores.shape[1]):
        vals, inverse = scores[:, u].unique(return_inverse=True)
        if len(vals) < len(scores):
            mean_rank = torch.zeros(len(vals)).index_add_(0, inverse, ranks[:, u])
            count = torch.zeros(len(vals)).index_add_(0, inverse, torch.ones(len(scores)))
            ranks[:, u] = (mean_rank / count)[inverse]
    n_pos = int(positive.sum())
    n_neg = len(positive) - n_pos
    return (ranks[positive].sum(0) - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def score(
    acts: torch.Tensor, labels: list[str], values: list[str], top: int, on_object: torch.Tensor
) -> dict[str, Any]:
    """Best precision@top and AUROC per label value over the units (columns of acts); and,
    among *object units* (live units whose top patches are >= 90% on an object), the
    fraction whose top patches are >= 90% one value."""
    idx = acts.topk(top, dim=0).indices  # [top, U]
    live = acts.max(0).values > 0
    objects = live & (on_object[idx].float().mean(0) >= 0.9)
    best: dict[str, dict[str, float | int]] = {}
    pure = torch.zeros(acts.shape[1], dtype=torch.bool)
    for v in values:
        mask = torch.tensor([x == v for x in labels])
        prec = mask[idx].float().mean(0)
        prec[~live] = 0
        u = int(prec.argmax())
        best[v] = {"unit": u, "precision": float(prec[u]), "auroc": float(auroc(acts, mask).max())}
        pure |= prec >= 0.9
    n_obj = int(objects.sum())
    share = float(pure[objects].float().mean()) if n_obj else float("nan")
    return {"best": best, "pure": share, "live": int(live.sum()), "objects": n_obj}


def figure(
    path: Path, best: dict[str, dict[str, Any]], acts: torch.Tensor, where: list[Any], top: int
) -> None:
    """One row per colour and shape: its best feature's top patches, 3x enlarged."""
    from PIL import Image, ImageDraw

    cell, scale, label_w, gap = 16, 3, 190, 4
    shown = min(top, 10)
    rows = list(best.items())
    width = label_w + shown * (cell * scale + gap)
    height = len(rows) * (cell * scale + gap) + gap
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for i, (value, info) in enumerate(rows):
        y = gap + i * (cell * scale + gap)
        text = f"{value}: feature {info['unit']}\nprecision {info['precision']:.2f}"
        draw.multiline_text((6, y + 6), text, fill=(0, 0, 0))
        order = acts[:, info["unit"]].topk(shown).indices.tolist()
        for j, n in enumerate(order):
            picture, r, c = where[n]
            crop = picture.crop((c * cell, r * cell, c * cell + cell, r * cell + cell))
            crop = crop.resize((cell * scale, cell * scale), Image.NEAREST)
            x = label_w + j * (cell * scale + gap)
            canvas.paste(crop, (x, y))
            draw.rectangle([x - 1, y - 1, x + cell * scale, y + cell * scale], outline=(180,) * 3)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path, optimize=True)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--layer", type=int, default=2, help="vision block whose output (2)")
    p.add_argument("--steps", type=int, default=400, help="training steps (400)")
    p.add_argument("--batch-size", type=int, default=16, help="images per step (16)")
    p.add_argument("--expansion", type=int, default=4, help="latents per input dim (4)")
    p.add_argument("--k", type=int, default=8, help="TopK k (8)")
    p.add_argument("--eval", type=int, default=500, help="held-out images (500)")
    p.add_argument("--top", type=int, default=20, help="top-activating patches per unit (20)")
    p.add_argument("--seed", type=int, default=0, help="seed of training and data (0)")
    p.add_argument(
        "--figure", default="docs/vision_sae_features.png", help="PNG to write ('' for none)"
    )
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    hook = f"vision.blocks.{args.layer}.hook_resid_post"
    with tempfile.TemporaryDirectory(prefix="vision-features-") as tmp:
        bundle = train_sae(args, hook, Path(tmp))
        x, colours, kinds, where = held_out_patches(args, hook, Path(tmp))
    coder = bundle.coders[0].eval()
    with torch.no_grad():
        feats = coder.encode(x).to_dense()
    gen = torch.Generator().manual_seed(args.seed)
    centred = x - x.mean(0)
    random_dirs = torch.randn(x.shape[1], feats.shape[1], generator=gen)
    units = {
        "SAE features": feats,
        "neurons (+ and -)": torch.cat([centred, -centred], 1),
        "random directions": centred @ random_dirs,
    }
    col_values = sorted(set(colours) - {BACKGROUND})
    shape_values = sorted(set(kinds) - {BACKGROUND})
    n_obj = sum(c != BACKGROUND for c in colours)
    print(f"\n{hook}: {len(x)} held-out patches of {args.eval} images ({n_obj} on an object)\n")
    print(f"| units | count (live / object units) | colour: best precision@{args.top} | "
          f"colour: best AUROC | shape: best precision@{args.top} | shape: best AUROC | "
          f"object units pure in colour | pure in shape |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    results = {}
    on_object = torch.tensor([c != BACKGROUND for c in colours])
    for name, acts in units.items():
        c = score(acts, colours, col_values, args.top, on_object)
        s = score(acts, kinds, shape_values, args.top, on_object)
        results[name] = (c, s)

        def mean(d: dict[str, Any], key: str) -> float:
            return sum(v[key] for v in d["best"].values()) / len(d["best"])

        print(
            f"| {name} | {acts.shape[1]} ({c['live']} / {c['objects']}) | "
            f"{mean(c, 'precision'):.2f} | {mean(c, 'auroc'):.3f} | {mean(s, 'precision'):.2f} | "
            f"{mean(s, 'auroc'):.3f} | {100 * c['pure']:.0f}% | {100 * s['pure']:.0f}% |"
        )
    print("(best precision and AUROC: the best unit per colour or shape, mean over them)")
    c, s = results["SAE features"]
    print("\nBest SAE feature per value (precision@top, AUROC):")
    for v, info in {**c["best"], **s["best"]}.items():
        print(f"  {v:<10} feature {info['unit']:>4}  {info['precision']:.2f}  {info['auroc']:.3f}")
    if args.figure:
        figure(Path(args.figure), {**c["best"], **s["best"]}, feats, where, args.top)
        print(f"\nfigure written to {args.figure}")


if __name__ == "__main__":
    main()
