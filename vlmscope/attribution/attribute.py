"""attribute(): the attribution graph of one prompt (text, or images and text).

Phases, in order (everything is undone in `finally`):

1. record the original model once: features, errors, patterns, scales (context.py);
2. choose the batch (`batch_size="auto"`: the planner, from what is free after recording);
3. offload what the replay never runs (`offload="cpu"|"disk"`: MLPs, vision tower,
   embeddings, unembedding), as circuit-tracer does;
4. replay the frozen linear model on copies of the prompt (it keeps nothing per copy);
5. backward from the logit targets, then from features in order of their estimated influence
   on the logits, until `max_feature_nodes` are explored;
6. assemble the graph.

Rows move to the host as they are computed; above `rows_in_memory_gb` they go to a
memory-mapped temporary file instead, and the influence estimate reads them in blocks.

Conventions at special tokens (`convention`):

- "vlmscope" (default): the dictionaries replace the tokens they were trained on. Special
  tokens (BOS, chat-template and image-boundary markers) are left unreplaced unless they were
  trained on: their whole MLP output is an error node and their skip path is off. Every MLP
  output is then a node of the graph, so completeness is measured, not assumed; and a VLM
  prompt has many such markers, not only a BOS.
- "circuit-tracer": every position is replaced; at position 0 features and the error are
  zeroed (that MLP output belongs to no node) and the skip path stays live. This reproduces
  circuit-tracer's graphs 1:1, for comparing the two tools on one model.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor
from tqdm.auto import tqdm

from vlmscope.attribution.context import AttributionContext, DecoderCache
from vlmscope.attribution.graph import Graph, LogitTarget, check_finite_rows
from vlmscope.attribution.offload import offloaded
from vlmscope.models.hooked import HookedVLM
from vlmscope.replacement.model import ReplacementModel, replace_positions
from vlmscope.training.bundle import DictionaryBundle

Convention = Literal["vlmscope", "circuit-tracer"]
Offload = Literal["cpu", "disk", "auto"] | None


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
    batch_size: int | Literal["auto"] = 64,
    update_interval: int = 4,
    progress: bool = False,
    convention: Convention = "vlmscope",
    offload: Offload = None,
    memory_gb: float | None = None,
    rows_in_memory_gb: float | None = None,
    reference: Literal["blank"] | Mapping[str, Any] | None = None,
) -> Graph:
    """Attribution graph of one prompt (`inputs` with batch size 1, e.g. from vlm.prepare).

    `model` is a ReplacementModel, or a HookedVLM together with `dictionaries` (transcoders
    or a CLT; a folder is memory-mapped, never read whole). `logit_targets` overrides the
    automatic choice of target tokens. `batch_size="auto"` takes the largest batch the planner
    fits in `memory_gb` (default: what the device has free after recording). `offload` moves
    what the replay never runs off the device ("cpu") or out of memory ("disk"); edges are
    the same. See the module docstring for `convention`.

    `reference` ("blank": the prompt with every image and video blank,
    `baselines.blank_inputs`; or a prompt of the same tokens) also records each row's edges
    from the reference's input sources into `graph.reference_edges`, so heatmaps can measure
    patches against it
    (`export.patch_effect`). The graph's own edges do not change.
    """
    if convention not in ("vlmscope", "circuit-tracer"):
        raise ValueError(f"convention must be 'vlmscope' or 'circuit-tracer', not {convention!r}")
    if offload not in (None, "cpu", "disk", "auto"):
        raise ValueError(f"offload must be None, 'cpu', 'disk' or 'auto', not {offload!r}")
    if isinstance(model, ReplacementModel):
        vlm, bundle, replace_tokens = model.vlm, model.bundle, model.replace_tokens
    else:
        if dictionaries is None:
            raise ValueError("pass a ReplacementModel, or a HookedVLM and its dictionaries")
        vlm, replace_tokens = model, "trained"
        bundle = (
            dictionaries
            if isinstance(dictionaries, DictionaryBundle)
            else DictionaryBundle.load(dictionaries, mmap=True)
        )
        bundle.check_model(vlm.adapter)
    bundle.eval()
    skipped = vlm.adapter.skipped_blocks(inputs)
    if skipped:  # the graph's replay runs every layer, as the recorded forward must
        raise ValueError(
            f"{vlm.adapter.family} skips its layers {sorted(skipped)} (cross-attention) for a "
            "prompt without an image, so its graph cannot be built on one: give an image"
        )
    masks = vlm.masks(inputs)
    ids, attn = inputs["input_ids"], inputs.get("attention_mask")
    seq = ids.shape[1]
    zero = torch.zeros(seq, dtype=torch.bool)
    if convention == "circuit-tracer":
        replace = replace_positions(vlm.adapter, bundle.model_info, "all", ids, attn)[0]
        zero[0] = True
    else:
        replace = replace_positions(vlm.adapter, bundle.model_info, replace_tokens, ids, attn)[0]
    ctx = AttributionContext(vlm, bundle, inputs, replace, zero_mask=zero)
    ctx.record_forward()
    reference_kind = None if reference is None else "prompt"
    if reference is not None:
        if isinstance(reference, str):
            reference_kind = reference
            if reference != "blank":
                raise ValueError(f"reference must be 'blank' or a prompt, not {reference!r}")
            if not any(k in inputs for k in ("pixel_values", "pixel_values_videos")):
                raise ValueError("reference='blank' needs a prompt with an image or a video")
            from vlmscope.attribution.baselines import blank_inputs

            reference = blank_inputs(inputs)
        ctx.record_reference(reference)
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
    w_u = vlm.adapter.unembed().weight.detach()
    w_mean = w_u.float().mean(0)
    logit_vecs = [w_u[t.token_id].float() - w_mean for t in targets]
    n_logits = len(targets)
    n_cols = ctx.n_cols
    max_feats = n_feat if max_feature_nodes is None else min(max_feature_nodes, n_feat)
    wanted = max(max_feats, n_logits, 1)
    if batch_size == "auto" or offload == "auto":
        from vlmscope.plan.attribution import plan_after_record

        plan = plan_after_record(ctx, max_feats, n_logits, batch_size, offload, memory_gb)
        copies, offload = min(plan.batch, wanted), plan.choices["offload"]
        if progress:
            tqdm.write(plan.choices["summary"])
    else:
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1 or 'auto', got {batch_size}")
        copies = min(int(batch_size), wanted)
    cache: DecoderCache = {None: "device", "cpu": "cpu", "disk": "disk"}[offload]
    ctx.prepare(cache)

    with contextlib.ExitStack() as stack:
        stack.enter_context(offloaded(vlm, offload))
        rows = stack.enter_context(_row_buffer(n_logits + max_feats, n_cols, rows_in_memory_gb))
        ref_rows = None if reference is None else torch.zeros(n_logits + max_feats, ctx.n_inputs)

        def backward(targets: list[tuple[int, int, Tensor]], last: bool) -> Tensor:
            # The backward costs as many copies as were replayed, whatever the targets: a
            # batch far smaller than the replay gets a replay of its own size (cheap: the
            # replay keeps nothing per copy, and its forward costs about one backward).
            if ctx.copies == 0 or len(targets) * 3 <= ctx.copies or len(targets) > ctx.copies:
                ctx.replay(copies=len(targets) if len(targets) * 3 <= copies else copies)
            return ctx.backward(targets, retain=not last)

        row_node = torch.zeros(n_logits + max_feats, dtype=torch.long)  # node index of each row
        row_sum = torch.zeros(n_logits + max_feats)  # sum of |row|, for the influence estimate
        logit_offset = n_cols
        last_batch = max_feats == 0

        def store(start: int, got: Tensor, nodes: Tensor) -> None:
            check_finite_rows(got, nodes, ctx)
            host = got.cpu()
            rows[start : start + len(host)] = host
            row_sum[start : start + len(host)] = host.abs().sum(1)
            row_node[start : start + len(host)] = nodes
            if ref_rows is not None:
                assert ctx.reference_rows is not None
                ref_rows[start : start + len(host)] = ctx.reference_rows.cpu()

        for i in range(0, n_logits, copies):
            chunk = [(n_layers, n_pos - 1, v) for v in logit_vecs[i : i + copies]]
            nodes = torch.arange(i, i + len(chunk)) + logit_offset
            last = last_batch and i + copies >= n_logits
            store(i, backward(chunk, last), nodes)
        done = n_logits
        visited = torch.zeros(n_feat, dtype=torch.bool)
        probs = torch.tensor([t.probability for t in targets])
        bar = tqdm(total=max_feats, desc="attribution", disable=not progress)
        while int(visited.sum()) < max_feats:
            if max_feats == n_feat:
                pending = torch.arange(n_feat)[~visited]
            else:
                est = _partial_influence(
                    rows[:done], row_node[:done], probs, n_cols, n_logits, row_sum[:done]
                )
                rank = torch.argsort(est[:n_feat], descending=True)
                budget = min(update_interval * copies, max_feats - int(visited.sum()))
                pending = rank[~visited[rank]][:budget]
            for start in range(0, len(pending), copies):
                idx = pending[start : start + copies]
                enc = ctx.encoder_rows(idx)
                layer, pos = feats.layer[idx].tolist(), feats.position[idx].tolist()
                chunk = [(layer[j], pos[j], enc[j]) for j in range(len(idx))]
                last = int(visited.sum()) + len(idx) >= max_feats
                store(done, backward(chunk, last), idx)
                visited[idx] = True
                done += len(idx)
                bar.update(len(idx))
        bar.close()
        graph = _assemble(rows, row_node, visited, ctx, masks, targets, inputs, vlm, bundle)
        if ref_rows is not None:
            graph.reference_edges = _reference_edges(ref_rows, row_node, visited, graph)
            graph.metadata["reference"] = reference_kind
    graph.metadata["batch_size"] = copies
    graph.metadata["convention"] = convention
    return graph


@contextlib.contextmanager
def _row_buffer(n_rows: int, n_cols: int, in_memory_gb: float | None) -> Iterator[Tensor]:
    """[n_rows, n_cols] float32 zeros: in host memory up to `in_memory_gb` (default: half of
    the machine's memory), else in a memory-mapped temporary file removed on exit."""
    size = n_rows * n_cols * 4
    limit = _default_row_budget() if in_memory_gb is None else in_memory_gb * 2**30
    if size <= limit:
        yield torch.zeros(n_rows, n_cols)
        return
    with tempfile.TemporaryDirectory(prefix="vlmscope-rows-") as tmp:
        path = Path(tmp) / "rows.bin"
        with open(path, "wb") as f:
            f.truncate(size)  # sparse: zeros until written
        storage = torch.UntypedStorage.from_file(str(path), shared=True, nbytes=size)
        yield torch.empty(0).set_(storage, 0, (n_rows, n_cols))


def _default_row_budget() -> float:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2
    except (ValueError, OSError):
        return float(8 << 30)


def _partial_influence(
    rows: Tensor,
    row_node: Tensor,
    probs: Tensor,
    n_cols: int,
    n_logits: int,
    row_sum: Tensor | None = None,
    block_rows: int = 1024,
) -> Tensor:
    """Influence on the logits of every column node, using only the rows computed so far.

    The same series as `influence` on the square matrix whose uncomputed rows are zero. With N
    the row-normalised |rows| and w_k the weight on each row after k steps (w_0: the logits'
    probabilities), w_{k+1} on a feature's row is (w_k @ N) at that feature's column, and the
    result is (sum_k w_k) @ N. Only the columns of computed features matter for w_k, so the
    iteration runs on that [rows, computed features] block, and the full rows are read twice,
    block by block (they may be a memory-mapped file)."""
    n = len(rows)
    sums = rows.abs().sum(1) if row_sum is None else row_sum
    scale = 1.0 / sums.clamp(min=1e-10)
    is_logit = row_node >= n_cols
    feature_rows = (~is_logit).nonzero().squeeze(1)
    feature_cols = row_node[feature_rows]
    sub = torch.empty(n, len(feature_rows))
    for b in range(0, n, block_rows):
        block = rows[b : b + block_rows]
        sub[b : b + len(block)] = block[:, feature_cols].abs() * scale[b : b + block_rows, None]
    weight = torch.zeros(n)
    weight[is_logit] = probs[row_node[is_logit] - n_cols]
    total_w = weight.clone()
    for _ in range(n + 1):  # a DAG: no path is longer than the number of rows
        current = weight @ sub
        if not bool(current.any()):
            break
        weight = torch.zeros(n)
        weight[feature_rows] = current
        total_w += weight
    else:
        raise RuntimeError("partial influence did not converge: the computed rows form a cycle")
    total = torch.zeros(n_cols)
    for b in range(0, n, block_rows):
        block = rows[b : b + block_rows]
        w = total_w[b : b + block_rows] * scale[b : b + block_rows]
        total += w @ block.abs()
    return total


def _reference_edges(ref_rows: Tensor, row_node: Tensor, visited: Tensor, graph: Graph) -> Tensor:
    """[n_nodes, n_inputs] reference edges in the graph's node order (rows as `_assemble`
    places them; input, error and unexplored nodes have none)."""
    n_feat = len(visited)
    n_cols = n_feat + graph.n_errors + graph.n_inputs
    new_index = torch.full((n_feat,), -1, dtype=torch.long)
    new_index[visited.nonzero().squeeze(1)] = torch.arange(int(visited.sum()))
    out = torch.zeros(graph.adjacency.shape[0], graph.n_inputs)
    for r, node in enumerate(row_node.tolist()):
        if node >= n_cols:
            dst = graph.logit_slice.start + (node - n_cols)
        else:
            dst = int(new_index[node])
        out[dst] = ref_rows[r]
    return out


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
            # Per dictionary layer: active and distinct active features (what the planner
            # needs to predict this prompt's memory again).
            "active_per_layer": [u.count for u in ctx.units],
            "unique_per_layer": [len(u.unique) for u in ctx.units],
        },
    )
