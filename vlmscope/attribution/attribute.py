"""attribute(): the attribution graph of one prompt (text, or images and text).

Phases: record the original model (features, errors, patterns, scales); replay the frozen
linear model on copies of the prompt; backward from the logit targets; then from features in
order of their estimated influence on the logits, until `max_feature_nodes` are explored.
Rows move to the CPU as they are computed, so device memory holds one batch of rows at a time.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from vlmscope.attribution.context import AttributionContext
from vlmscope.attribution.graph import Graph, LogitTarget, normalize_rows
from vlmscope.models.hooked import HookedVLM
from vlmscope.replacement.model import ReplacementModel
from vlmscope.training.bundle import DictionaryBundle


def select_logits(
    logits: Tensor, tokenizer: Any, desired_prob: float = 0.95, max_n: int = 10
) -> list[LogitTarget]:
    """The most likely next tokens until their probabilities sum to `desired_prob` (at most
    `max_n`, at least one)."""
    probs = torch.softmax(logits.float(), -1)
    top = torch.topk(probs, min(max_n, probs.shape[-1]))
    out: list[LogitTarget] = []
    total = 0.0
    for p, i in zip(top.values.tolist(), top.indices.tolist(), strict=True):
        out.append(LogitTarget(i, tokenizer.decode([i]) if tokenizer is not None else str(i), p))
        total += p
        if total >= desired_prob:
            break
    return out


def attribute(
    model: ReplacementModel | HookedVLM,
    dictionaries: DictionaryBundle | str | os.PathLike[str] | None,
    inputs: Mapping[str, Any],
    *,
    max_feature_nodes: int | None = None,
    desired_logit_prob: float = 0.95,
    max_n_logits: int = 10,
    logit_targets: list[int] | None = None,
    batch_size: int = 64,
    update_interval: int = 4,
    progress: bool = False,
) -> Graph:
    """Attribution graph of one prompt (`inputs` with batch size 1, e.g. from vlm.prepare).

    `model` is a ReplacementModel, or a HookedVLM together with `dictionaries` (transcoders
    or a CLT). `logit_targets` overrides the automatic choice of target tokens.
    """
    rm = model if isinstance(model, ReplacementModel) else None
    if rm is None:
        if dictionaries is None:
            raise ValueError("pass a ReplacementModel, or a HookedVLM and its dictionaries")
        rm = ReplacementModel(model, dictionaries)  # type: ignore[arg-type]
    vlm, bundle = rm.vlm, rm.bundle
    masks = vlm.masks(inputs)
    replace = rm._replace_mask(inputs["input_ids"], inputs.get("attention_mask"))[0]
    ctx = AttributionContext(vlm, bundle, inputs, replace)
    ctx.record()
    feats = ctx.features
    n_feat, n_pos, n_layers = len(feats), masks.valid.shape[1], ctx.n_layers
    tok = vlm.tokenizer
    if logit_targets is not None:
        vocab = ctx.logits.shape[-1]
        bad = [i for i in logit_targets if not 0 <= int(i) < vocab]
        if bad or not logit_targets:
            raise ValueError(f"logit_targets {bad or '[]'}: need token ids in [0, {vocab})")
        probs = torch.softmax(ctx.logits, -1)
        targets = [LogitTarget(i, tok.decode([i]), float(probs[i])) for i in logit_targets]
    else:
        targets = select_logits(ctx.logits, tok, desired_logit_prob, max_n_logits)
    w_u = vlm.adapter.unembed().weight.detach().float()
    w_mean = w_u.mean(0)
    logit_vecs = [w_u[t.token_id] - w_mean for t in targets]
    n_logits = len(targets)
    n_cols = n_feat + n_layers * n_pos + ctx.n_inputs
    max_feats = n_feat if max_feature_nodes is None else min(max_feature_nodes, n_feat)

    ctx.replay(copies=min(batch_size, max(max_feats, n_logits, 1)))
    rows = torch.zeros(n_logits + max_feats, n_cols)
    row_node = torch.zeros(n_logits + max_feats, dtype=torch.long)  # node index of each row
    logit_offset = n_cols
    for i in range(0, n_logits, ctx.copies):
        chunk = [(n_layers, n_pos - 1, v) for v in logit_vecs[i : i + ctx.copies]]
        rows[i : i + len(chunk)] = ctx.backward(chunk).cpu()
        row_node[i : i + len(chunk)] = torch.arange(i, i + len(chunk)) + logit_offset
    done = n_logits
    visited = torch.zeros(n_feat, dtype=torch.bool)
    probs = torch.tensor([t.probability for t in targets])
    bar = tqdm(total=max_feats, desc="attribution", disable=not progress)
    while int(visited.sum()) < max_feats:
        if max_feats == n_feat:
            pending = torch.arange(n_feat)[~visited]
        else:
            est = _partial_influence(rows[:done], row_node[:done], probs, n_cols, n_logits)
            rank = torch.argsort(est[:n_feat], descending=True)
            budget = min(update_interval * ctx.copies, max_feats - int(visited.sum()))
            pending = rank[~visited[rank]][:budget]
        for start in range(0, len(pending), ctx.copies):
            idx = pending[start : start + ctx.copies]
            chunk = [(int(feats.layer[j]), int(feats.position[j]), feats.encoder[j]) for j in idx]
            last = int(visited.sum()) + len(idx) >= max_feats
            rows[done : done + len(idx)] = ctx.backward(chunk, retain=not last).cpu()
            row_node[done : done + len(idx)] = idx
            visited[idx] = True
            done += len(idx)
            bar.update(len(idx))
    bar.close()
    return _assemble(rows, row_node, visited, ctx, masks, targets, inputs, vlm, bundle)


def _partial_influence(
    rows: Tensor, row_node: Tensor, probs: Tensor, n_cols: int, n_logits: int
) -> Tensor:
    """Influence on the logits of every column node, using only the rows computed so far.

    The same series as `influence` on the square matrix whose uncomputed rows are zero, but
    propagated through the [rows, columns] block itself: memory stays linear in the number of
    active features (the square matrix over all of them is what runs out of memory on long,
    image-heavy prompts)."""
    norm = normalize_rows(rows)
    is_logit = row_node >= n_cols
    weight = torch.zeros(len(rows))
    weight[is_logit] = probs[row_node[is_logit] - n_cols]
    feature_row = ~is_logit
    total = torch.zeros(n_cols)
    for _ in range(len(rows) + 1):  # a DAG: no path is longer than the number of rows
        current = weight @ norm
        if not bool(current.any()):
            return total
        total += current
        weight = torch.zeros(len(rows))
        weight[feature_row] = current[row_node[feature_row]]
    raise RuntimeError("partial influence did not converge: the computed rows form a cycle")


def _assemble(
    rows: Tensor,
    row_node: Tensor,
    visited: Tensor,
    ctx: AttributionContext,
    masks: Any,
    targets: list[LogitTarget],
    inputs: Mapping[str, Any],
    vlm: HookedVLM,
    bundle: DictionaryBundle,
) -> Graph:
    feats = ctx.features
    n_feat = len(feats)
    n_logits = len(targets)
    selected = visited.nonzero().squeeze(1)
    keep_cols = torch.cat([selected, torch.arange(n_feat, rows.shape[1])])
    n = len(selected) + rows.shape[1] - n_feat + n_logits
    adj = torch.zeros(n, n)
    new_index = torch.full((n_feat,), -1, dtype=torch.long)
    new_index[selected] = torch.arange(len(selected))
    for r, node in enumerate(row_node.tolist()):
        if node >= rows.shape[1]:  # a logit row (node index past every column)
            dst = n - n_logits + (node - rows.shape[1])
        else:
            dst = int(new_index[node])
        adj[dst, : len(keep_cols)] = rows[r, keep_cols]
    kinds = []
    for s in range(masks.valid.shape[1]):
        kinds.append("image" if masks.image[0, s] else "special" if masks.special[0, s] else "text")
    ids = inputs["input_ids"][0].cpu()
    tok = vlm.tokenizer
    tokens = [tok.decode([int(i)]) for i in ids] if tok is not None else []
    patch_map = masks.patch_map[0].cpu()
    if ctx.cross is not None:  # input nodes past the sequence: cross-attention vision features
        kinds += ctx.cross.kinds
        patch_map = torch.cat([patch_map, ctx.cross.patch_map])
        tokens += ctx.cross.labels if tokens else []
    return Graph(
        adjacency=adj,
        features=torch.stack([feats.layer, feats.position, feats.feature], 1)[selected].cpu(),
        activations=feats.activation[selected].cpu(),
        n_layers=ctx.n_layers,
        input_ids=ids,
        input_kinds=kinds,
        patch_map=patch_map,
        logit_targets=targets,
        input_tokens=tokens,
        metadata={
            "model": getattr(vlm.model, "name_or_path", None) or bundle.model_info.get("name"),
            "dictionaries_trained_on": bundle.model_info.get("name"),
            "family": vlm.adapter.family,
            "dictionaries": bundle.kind,
            "hooks": {"reads": bundle.reads, "writes": bundle.writes},
            # Model layers with a dictionary; every other layer's MLP output is an error node.
            "layers": list(ctx.unit_layers),
            "n_active_features": n_feat,
        },
    )
