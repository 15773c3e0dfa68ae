"""Do a vision-tower SAE's features separate colours and shapes? Measured on the toy VLM.

    python benchmarks/vision_features.py                      # trains, scores, writes the figure
    python benchmarks/vision_features.py --steps 50 --eval 100 --figure ''   # quick look

Trains a TopK SAE on the toy VLM's `vision.blocks.{layer}.hook_resid_post` (image patches only,
through `vlmscope train`'s own trainer), then reads the held-out shapes world (test split):
the toy sees a 64x64 image as 8x8 patches of 8 px, the shapes world's own patch grid, so each
patch is labelled with the colour and shape of the object drawn on it (the world's exact
per-patch labels), or background.

Units are the SAE's features and, as baselines, the neurons of the same residual stream (each
in both signs) and as many random directions in it. A unit's top patches are the N (--top)
held-out patches where it is most active; an *object unit* is a live unit whose top patches
are >= 90% on an object. Reported per kind of unit:

  pure in colour / shape / both   the share of object units whose top patches are >= 90% one
                                  colour, one shape, or one colour and one shape
  pairs covered                   how many (colour, shape) pairs have a unit pure in both
  best precision@N                per colour (shape), the best unit's share of top patches with
                                  that colour (shape); mean over colours / shapes
  best AUROC                      per colour (shape), how well the best unit's activation alone
                                  separates patches with it from all others (0.5 = chance)

The figure shows the SAE's object features, each with its top patches (enlarged).
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
        sae=SaeArgs(
            k=args.k, expansion_factor=args.expansion, dead_tokens_threshold=args.dead_tokens
        ),
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
) -> tuple[torch.Tensor, list[str], list[str], list[tuple[Any, int, int, int]]]:
    """Activations [patches, d] of the test split's image patches with their colour and shape
    labels and (image, row, col, patch px)."""
    folder = out / "shapes-test"
    shapes.write_dataset(folder, n=args.eval, seed=args.seed, split="test")
    records = list(open_dataset(folder / "test.parquet", schema="chat"))
    rows = shapes.load_labels(folder, "test")  # in row order, like the records
    labels = {r.row_id: row for r, row in zip(records, rows, strict=True)}
    pictures = {r.row_id: r.images[0] for r in records}
    vlm = HookedVLM.from_pretrained(toy_path(), device="cpu")
    px = vlm.model.config.vision_config.patch_size
    if any(row["patch_size"] != px for row in rows):
        raise SystemExit(f"the toy's {px} px patches are not the shapes world's label patches")
    owner = {  # (row id, patch row, patch col) -> the object drawn on that patch
        (row_id, r, c): o for row_id, row in labels.items() for o in row["objects"]
        for r, c in o["patches"]
    }  # fmt: skip
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
            obj = owner.get((row_id, r, c))
            colours.append(obj["colour"] if obj else BACKGROUND)
            kinds.append(obj["shape"] if obj else BACKGROUND)
            where.append((pictures[row_id], r, c, px))
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


def units_profile(
    acts: torch.Tensor, colours: list[str], kinds: list[str], top: int
) -> dict[str, torch.Tensor]:
    """Per unit (column of acts): whether it is live, the share of its top patches on an
    object, and the dominant colour / shape of those patches with its share (purity)."""
    idx = acts.topk(top, dim=0).indices  # [top, U]
    out: dict[str, Any] = {"live": acts.max(0).values > 0}
    on_object = torch.tensor([c != BACKGROUND for c in colours])
    out["object"] = on_object[idx].float().mean(0)
    for key, labels in (("colour", colours), ("shape", kinds)):
        values = sorted(set(labels) - {BACKGROUND})
        code = torch.tensor([values.index(x) if x in values else -1 for x in labels])
        counts = torch.stack([(code[idx] == v).float().mean(0) for v in range(len(values))])
        purity, which = counts.max(0)
        out[key] = purity
        out[f"{key}_value"] = [values[i] for i in which.tolist()]
    return out


def best_per_value(acts: torch.Tensor, labels: list[str], top: int) -> dict[str, dict[str, Any]]:
    """For each colour (shape): the unit with the best precision@top, and the best AUROC."""
    idx = acts.topk(top, dim=0).indices
    live = acts.max(0).values > 0
    best = {}
    for v in sorted(set(labels) - {BACKGROUND}):
        mask = torch.tensor([x == v for x in labels])
        prec = mask[idx].float().mean(0)
        prec[~live] = 0
        u = int(prec.argmax())
        best[v] = {"unit": u, "precision": float(prec[u]), "auroc": float(auroc(acts, mask).max())}
    return best


def figure(
    path: Path, profile: dict[str, Any], acts: torch.Tensor, where: list[Any], rows: int
) -> None:
    """The SAE's object features (top patches >= 90% on an object), most active first, each
    with its top patches (enlarged to 48 px) and the colour / shape purity of its top patches."""
    from PIL import Image, ImageDraw

    size, label_w, gap, shown = 48, 200, 4, 10
    chosen = ((profile["object"] >= 0.9) & profile["live"]).nonzero().squeeze(1).tolist()
    chosen.sort(key=lambda u: -float(acts[:, u].max()))
    chosen = sorted(
        chosen[:rows], key=lambda u: (profile["shape_value"][u], profile["colour_value"][u])
    )
    canvas = Image.new(
        "RGB", (label_w + shown * (size + gap), len(chosen) * (size + gap) + gap), "white"
    )
    draw = ImageDraw.Draw(canvas)
    for i, u in enumerate(chosen):
        y = gap + i * (size + gap)
        text = (
            f"feature {u}\n{profile['colour_value'][u]} {float(profile['colour'][u]):.2f}, "
            f"{profile['shape_value'][u]} {float(profile['shape'][u]):.2f}"
        )
        draw.multiline_text((6, y + 8), text, fill=(0, 0, 0))
        for j, n in enumerate(acts[:, u].topk(shown).indices.tolist()):
            picture, r, c, px = where[n]
            crop = picture.crop((c * px, r * px, c * px + px, r * px + px))
            x = label_w + j * (size + gap)
            canvas.paste(crop.resize((size, size), Image.NEAREST), (x, y))
            draw.rectangle([x - 1, y - 1, x + size, y + size], outline=(180, 180, 180))
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path, optimize=True)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--layer", type=int, default=2, help="vision block whose output (2)")
    p.add_argument("--steps", type=int, default=400, help="training steps (400)")
    p.add_argument("--batch-size", type=int, default=16, help="images per step (16)")
    p.add_argument("--expansion", type=int, default=4, help="latents per input dim (4)")
    p.add_argument("--k", type=int, default=8, help="TopK k (8)")
    p.add_argument(
        "--dead-tokens",
        type=int,
        default=10_000,
        help="patches without firing after which a latent is dead and AuxK revives it (10000)",
    )
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
    print(f"| units | live (object units) | object units pure in colour | in shape | in both | "
          f"colour x shape pairs covered | best precision@{args.top}, colours / shapes | "
          f"best AUROC, colours / shapes |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    profiles = {}
    for name, acts in units.items():
        prof = units_profile(acts, colours, kinds, args.top)
        profiles[name] = prof
        obj = prof["live"] & (prof["object"] >= 0.9)
        pc, ps = prof["colour"][obj] >= 0.9, prof["shape"][obj] >= 0.9
        both = obj.nonzero().squeeze(1)[(pc & ps)].tolist()
        pairs = {(prof["colour_value"][u], prof["shape_value"][u]) for u in both}
        n_pairs = len(col_values) * len(shape_values)
        bc, bs = best_per_value(acts, colours, args.top), best_per_value(acts, kinds, args.top)

        def mean(d: dict[str, Any], key: str) -> float:
            return sum(v[key] for v in d.values()) / len(d)

        print(
            f"| {name} | {int(prof['live'].sum())} of {acts.shape[1]} ({int(obj.sum())}) | "
            f"{100 * float(pc.float().mean()):.0f}% | {100 * float(ps.float().mean()):.0f}% | "
            f"{100 * float((pc & ps).float().mean()):.0f}% | {len(pairs)} of {n_pairs} | "
            f"{mean(bc, 'precision'):.2f} / {mean(bs, 'precision'):.2f} | "
            f"{mean(bc, 'auroc'):.3f} / {mean(bs, 'auroc'):.3f} |"
        )
    if args.figure:
        figure(Path(args.figure), profiles["SAE features"], units["SAE features"], where, 16)
        print(f"\nfigure written to {args.figure}")


if __name__ == "__main__":
    main()
