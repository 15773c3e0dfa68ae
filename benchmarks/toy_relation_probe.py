"""Where does relation fail in a question-first v2 toy? Linear probes along the decoder.

"Is the red circle left of the square?" needs three steps: find the first named object (A),
find the second (B), compare their places. On relation questions of held-out scenes (full
world, 2-5 objects) this fits, on frozen hidden states of the model as users prompt it
(`HookedVLM.prepare`, question before the image), after each decoder layer (0: the inputs):

- ``find``: a linear map at each image token to its `aux.match_labels` class (0 elsewhere, 1
  on A's patches, 2 on B's): recall on A's and on B's patches says whether the decoder has
  located both named objects there (the match loss trains this after layer 2);
- ``answer``: a linear map at the last prompt position to the world's yes/no: whether the
  comparison is computed anywhere on the way to the answer;
- ``sign``: a linear map at the last prompt position to whether A's block lies before B's
  along the asked axis (`aux.relation_labels`): the comparison without the relation word;
- ``word``: a linear map at the last prompt position to the relation word (4 classes): the
  other half of the answer ("yes" is drawn independently of the places, so the answer is the
  XOR of the two);
- ``compare``: a linear map from the mean image token over A's true patches minus that over
  B's (one copy per relation word, so a linear read can flip its sign for "right of" or
  "below") to yes/no: whether the places are linearly comparable once both are found.

Probes are fitted on `--n` relation questions of a training-side split and scored on
`--n-test` held-out ones; the model's own greedy accuracy and its share of "yes" on those are
printed too. A few CPU-minutes for the defaults.

    python benchmarks/toy_relation_probe.py --model /tmp/toy_v2 [--n 600]
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from vlmscope.data import shapes
from vlmscope.models.hooked import HookedVLM
from vlmscope.models.toy import aux
from vlmscope.models.toy.train import EVAL_SEED, EVAL_SPLIT, WORLD, generate_answers

RELATIONS = ("left", "right", "above", "below")


def question_of(s: shapes.ShapesSample) -> shapes.Question:
    return shapes.Question(
        s.question_type, s.question, s.answer, s.query, s.target, s.phrasing, s.heldout_phrasing
    )


def states(vlm: HookedVLM, samples: list[shapes.ShapesSample]) -> dict[str, torch.Tensor]:
    """Per sample: ``image`` [layers + 1, 64, dim] hidden states at the image tokens, ``last``
    [layers + 1, dim] at the last prompt position, ``match`` [64] labels, ``yes`` and the
    relation's index."""
    image_id = vlm.tokenizer.convert_tokens_to_ids("<image>")
    out: dict[str, list[torch.Tensor]] = {
        "image": [],
        "last": [],
        "match": [],
        "yes": [],
        "rel": [],
        "sign": [],
    }
    for s in samples:
        inputs = vlm.prepare(s.question, images=[s.image])
        with torch.no_grad():  # not inference_mode: the probes backpropagate through copies
            hs = vlm.model(**inputs, output_hidden_states=True).hidden_states
        h = torch.stack([x[0] for x in hs]).float()  # [layers + 1, seq, dim]
        where = inputs["input_ids"][0] == image_id
        out["image"].append(h[:, where])
        out["last"].append(h[:, -1])
        out["match"].append(torch.from_numpy(aux.match_labels(question_of(s), s.objects, WORLD)))
        out["yes"].append(torch.tensor(float(s.answer == "yes")))
        out["rel"].append(torch.tensor(RELATIONS.index(s.query["relation"])))
        axis = shapes.relation_axis(s.query["relation"])
        out["sign"].append(torch.tensor(int(aux.relation_labels(question_of(s), s.objects)[axis])))
    return {k: torch.stack(v) for k, v in out.items()}


def fit(x: torch.Tensor, y: torch.Tensor, classes: int, steps: int) -> nn.Linear:
    """Multinomial logistic regression on standardised features (full batch, Adam)."""
    torch.manual_seed(0)
    head = nn.Linear(x.shape[-1], classes)
    opt = torch.optim.Adam(head.parameters(), lr=1e-2, weight_decay=1e-4)
    for _ in range(steps):
        loss = nn.functional.cross_entropy(head(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return head


def standardise(train: torch.Tensor, test: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mean, std = train.mean(0), train.std(0) + 1e-6
    return (train - mean) / std, (test - mean) / std


def compare_features(d: dict[str, torch.Tensor], layer: int) -> torch.Tensor:
    """Mean image token on A's patches minus on B's, in the block of the asked relation."""
    img, m = d["image"][:, layer], d["match"]
    a = (img * (m == 1)[..., None]).sum(1) / (m == 1).sum(1, keepdim=True).clamp(min=1)
    b = (img * (m == 2)[..., None]).sum(1) / (m == 2).sum(1, keepdim=True).clamp(min=1)
    out = torch.zeros(len(img), len(RELATIONS), img.shape[-1])
    out[torch.arange(len(img)), d["rel"]] = a - b
    return out.flatten(1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", required=True, help="a question-first v2 toy folder")
    p.add_argument("--n", type=int, default=600, help="relation questions to fit on (600)")
    p.add_argument("--n-test", type=int, default=200, help="held-out relation questions (200)")
    p.add_argument("--steps", type=int, default=300, help="probe optimisation steps (300)")
    p.add_argument("--json", default=None, help="also write the scores here")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    vlm = HookedVLM.from_pretrained(args.model, device="cpu")
    config = replace(WORLD, question_types=("relation",))
    train = shapes.generate(args.n, seed=0, split="relprobe", config=config)
    test = shapes.generate(args.n_test, EVAL_SEED, EVAL_SPLIT, config)
    tr, te = states(vlm, train), states(vlm, test)
    preds = generate_answers(vlm, test)
    acc = sum(p_ == s.answer for p_, s in zip(preds, test, strict=True)) / len(test)
    said_yes = sum(p_ == "yes" for p_ in preds) / len(test)
    result: dict[str, Any] = {
        "model": args.model,
        "n": args.n,
        "n_test": args.n_test,
        "model_accuracy": acc,
        "model_says_yes": said_yes,
        "truth_yes": float(te["yes"].mean()),
        "layers": [],
    }
    print(
        f"model: {acc:.1%} right on {len(test)} held-out relation questions, says yes "
        f"{said_yes:.1%} (truth {result['truth_yes']:.1%})"
    )
    cols = ("answer", "sign", "word", "compare")
    print(f"{'layer':<6} {'find A':>8} {'find B':>8}" + "".join(f" {c:>8}" for c in cols))
    for layer in range(tr["image"].shape[1]):
        x_tr, x_te = standardise(
            tr["image"][:, layer].flatten(0, 1), te["image"][:, layer].flatten(0, 1)
        )
        y_tr, y_te = tr["match"].flatten(), te["match"].flatten()
        find_head = fit(x_tr, y_tr, 3, args.steps)
        with torch.no_grad():
            pred = find_head(x_te).argmax(-1)
        find = [float((pred[y_te == c] == c).float().mean()) for c in (1, 2)]
        row = {"layer": layer, "find_a": find[0], "find_b": find[1]}
        last = (tr["last"][:, layer], te["last"][:, layer])
        for name, (f_tr, f_te), key, classes in (
            ("answer", last, "yes", 2),
            ("sign", last, "sign", 2),
            ("word", last, "rel", len(RELATIONS)),
            ("compare", (compare_features(tr, layer), compare_features(te, layer)), "yes", 2),
        ):
            f_tr, f_te = standardise(f_tr, f_te)
            head = fit(f_tr, tr[key].long(), classes, args.steps)
            with torch.no_grad():
                row[name] = float((head(f_te).argmax(-1) == te[key].long()).float().mean())
        result["layers"].append(row)
        print(
            f"{layer:<6} {row['find_a']:>8.1%} {row['find_b']:>8.1%}"
            + "".join(f" {row[c]:>8.1%}" for c in cols)
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
