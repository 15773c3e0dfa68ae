"""Linear probes on a v2 toy's image tokens: does the vision pathway encode what questions need?

Fits one linear map (`vlmscope.models.toy.aux.PatchHead`) from the projector's outputs (what
the language model sees for each of the 64 patches) to each patch's object shape, colour,
counts of objects sharing its shape / colour, quadrant and centre, on frozen features of
training-split pictures, and scores it on held-out pictures. High probe accuracy with low
question accuracy puts the failure in the language model (binding, counting, relations); low
probe accuracy puts it in the vision tower.

    python benchmarks/toy_probe.py --model /tmp/toy_v2 [--n 1500]
"""

from __future__ import annotations

import argparse
import json

import torch

from vlmscope.data import shapes
from vlmscope.models.hooked import HookedVLM
from vlmscope.models.toy import aux
from vlmscope.models.toy.train import EVAL_SEED, EVAL_SPLIT, WORLD


def features(vlm: HookedVLM, samples: list[shapes.ShapesSample]) -> torch.Tensor:
    """Projector outputs ``[images, patches, dim]``."""
    out = []
    with aux.ProjectorTap(vlm.model) as tap:
        for i in range(0, len(samples), 64):
            chunk = samples[i : i + 64]
            pixels = vlm.processor.image_processor([s.image for s in chunk], return_tensors="pt")
            with torch.inference_mode():
                vlm.model.model.get_image_features(pixel_values=pixels["pixel_values"])
            assert tap.output is not None
            out.append(tap.output.float().clone())
    return torch.cat(out)


def labels(samples: list[shapes.ShapesSample]) -> dict[str, torch.Tensor]:
    return aux.collate_labels([aux.patch_labels(s.objects, WORLD) for s in samples])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", required=True, help="a v2 toy folder")
    p.add_argument("--n", type=int, default=1500, help="training pictures for the probe")
    p.add_argument("--steps", type=int, default=400, help="probe optimisation steps (full batch)")
    p.add_argument("--json", default=None, help="also write the scores here")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    vlm = HookedVLM.from_pretrained(args.model, device="cpu")
    config = WORLD
    train = shapes.generate(args.n, seed=0, split="probe", config=config)
    test = shapes.generate(max(200, args.n // 4), seed=EVAL_SEED, split=EVAL_SPLIT, config=config)
    x_train, x_test = features(vlm, train), features(vlm, test)
    y_train, y_test = labels(train), labels(test)
    mean, std = x_train.mean((0, 1)), x_train.std((0, 1)) + 1e-6
    head = aux.PatchHead(x_train.shape[-1], config)
    opt = torch.optim.Adam(head.parameters(), lr=1e-2)
    for _ in range(args.steps):
        loss, _ = head.loss((x_train - mean) / std, y_train)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        _, fit = head.loss((x_train - mean) / std, y_train)
        _, held = head.loss((x_test - mean) / std, y_test)
    print(f"{'target':<14} {'probe, fit':>10} {'held-out':>10}")
    for k in held:
        print(f"{k:<14} {fit[k]:>10.3f} {held[k]:>10.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": args.model, "n": args.n, "fit": fit, "heldout": held}, f, indent=2)


if __name__ == "__main__":
    main()
