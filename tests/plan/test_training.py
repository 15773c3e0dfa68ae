"""The training planner against what a real run holds (zoo llava on CPU)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from vlmscope.models.hooked import HookedVLM
from vlmscope.plan.memory import ModelShape
from vlmscope.plan.training import plan_training
from vlmscope.training.config import parse_train_args
from vlmscope.training.trainer import Trainer


@pytest.fixture(scope="module")
def llava(zoo_path: Any) -> HookedVLM:
    return HookedVLM.from_pretrained(zoo_path("llava"), device="cpu", dtype=torch.float32)


def lines(plan: Any, group: str) -> dict[str, float]:
    return {x.what: x.bytes for x in plan.budget.groups[group]}


@pytest.mark.parametrize(
    "flags",
    ["--sae.kind clt --sae.n_targets 2 --sae.expansion-factor 2 --sae.k 4",
     "--sae.transcode --sae.num-latents 96 --sae.k 4 --sae.activation jumprelu "
     "--sae.sparsity-coeff 0.01 --sae.skip-connection --layers 0 2"],
)  # fmt: skip
def test_planned_dictionary_and_model_bytes_equal_a_real_runs_tensors(
    tmp_path: Path, zoo_path: Any, llava: HookedVLM, flags: str
) -> None:
    model = str(zoo_path("llava"))
    argv = [model, "shapes:16", *flags.split(), "--max-steps", "1", "--batch-size", "2",
            "--output-dir", str(tmp_path), "--device", "cpu", "--dtype", "float32"]  # fmt: skip
    cfg = parse_train_args(argv)
    trainer = Trainer(cfg, llava, progress=False)
    trainer.fit()
    params = [p for p in trainer.bundle.parameters()]
    held = sum(p.numel() * p.element_size() for p in params)
    grads = sum(p.numel() * p.element_size() for p in params)  # set_to_none: measured as params
    adam = sum(t.numel() * t.element_size() for st in trainer.optimizer.state.values()
               for k, t in st.items() if k != "step")  # fmt: skip
    plan = plan_training(ModelShape.from_config(model), cfg, gpus=1, gpu_mem_gib=1)
    d = lines(plan, "dictionary")
    assert d["parameters (fp32)"] == held
    assert d["gradients (fp32)"] == grads
    assert d["Adam moments (fp32)"] == adam
    weights = sum(p.numel() * p.element_size() for p in llava.model.parameters())
    assert lines(plan, "model")["weights"] == weights
    counters = sum(b.numel() * b.element_size() for n, b in trainer.bundle.named_buffers()
                   if n.endswith("num_tokens_since_fired"))  # fmt: skip
    assert lines(plan, "buffers")["dead-latent counters"] == counters


def test_a_72b_clt_on_all_layers_does_not_fit_8x80_and_the_advice_does(tmp_path: Path) -> None:
    shape = ModelShape.from_config("qwen2_5_vl_72b")
    assert 73.0e9 < shape.n_params < 73.8e9 and shape.n_layers == 80  # the public 73.4B
    cfg = parse_train_args(["x", "y", "--sae.kind", "clt", "--batch-size", "1",
                            "--ctx-len", "2048"])  # fmt: skip
    plan = plan_training(shape, cfg, gpus=8, gpu_mem_gib=80)
    assert not plan.fits and plan.tokens_per_step == 8 * 2048
    assert any("--shard-model fsdp" in a for a in plan.advice)
    # follow the advice: it must fit
    flags = " ".join(a.split(":")[0] for a in plan.advice)
    again = parse_train_args(["x", "y", "--sae.kind", "clt", "--batch-size", "1", "--ctx-len",
                              "2048", *flags.split()])  # fmt: skip
    assert plan_training(shape, again, gpus=8, gpu_mem_gib=80).fits


def test_advice_to_distribute_modules_says_the_probe_must_go(tmp_path: Path) -> None:
    """--distribute-modules and --lr-probe exclude each other (the trainer refuses the pair),
    so advice that adds the one to a run with the other says so."""
    shape = ModelShape.from_config("qwen2_5_vl_72b")
    argv = ["x", "y", "--sae.kind", "clt", "--batch-size", "1", "--ctx-len", "2048"]
    probed = plan_training(shape, parse_train_args([*argv, "--lr-probe", "8"]), 8, 80)
    plain = plan_training(shape, parse_train_args(argv), 8, 80)
    [with_probe] = [a for a in probed.advice if a.startswith("--distribute-modules")]
    [without] = [a for a in plain.advice if a.startswith("--distribute-modules")]
    assert "no --lr-probe" in with_probe and "--lr-probe" not in without
    assert probed.budget.total() == plain.budget.total()  # the probe waits in host memory


def test_advice_stops_once_the_plan_fits_and_never_raises_memory() -> None:
    """A one-layer CLT of a 72B model on 8 GPUs fits once the weights are sharded;
    --distribute-modules would then raise memory (G times the tokens per held unit and the
    all-to-all buffers against 1/G of a small dictionary), so the advice must not add it."""
    shape = ModelShape.from_config("qwen2_5_vl_72b")
    argv = ["x", "y", "--sae.kind", "clt", "--sae.num-latents", "1024", "--layers", "0",
            "--batch-size", "1", "--ctx-len", "2048"]  # fmt: skip

    def total(*extra: str) -> float:
        return plan_training(shape, parse_train_args([*argv, *extra]), 8, 80).budget.total()

    sharded = plan_training(shape, parse_train_args([*argv, "--shard-model", "fsdp"]), 8, 80)
    assert sharded.fits and total("--shard-model", "fsdp", "--distribute-modules") > total(
        "--shard-model", "fsdp"
    )
    plan = plan_training(shape, parse_train_args(argv), 8, 80)
    assert not plan.fits
    assert [a.split(":")[0] for a in plan.advice] == ["--shard-model fsdp"]


@pytest.mark.parametrize(
    ("flags", "gpus"),
    [("--sae.kind clt --sae.n_targets 3 --sae.num-latents 64 --sae.k 4", 2),
     ("--sae.kind clt --sae.num-latents 64 --sae.k 4 --sae.skip-connection", 3),
     ("--sae.transcode --sae.num-latents 64 --sae.k 4", 3)],
)  # fmt: skip
def test_distribute_modules_plans_the_largest_ranks_share_of_the_real_split(
    zoo_path: Any, flags: str, gpus: int
) -> None:
    """Under --distribute-modules the planner holds the parameters of the rank that owns the
    most; the truth is the trainer's own split, each rank's shard built on the meta device
    (a CLT sharded by target layer, per-layer units in blocks)."""
    import dataclasses

    from vlmscope.dictionaries import CrossLayerTranscoder
    from vlmscope.training.clt_shards import CLTShard, CLTShards
    from vlmscope.training.distributed import Layout
    from vlmscope.training.modules import ModuleShards

    model = str(zoo_path("llava"))
    cfg = parse_train_args([model, "x", *flags.split(), "--distribute-modules"])
    shape = ModelShape.from_config(model)
    n = shape.n_layers
    coder = dataclasses.replace(cfg.sae.coder_config(), d_in=shape.d_model, d_out=shape.d_model)
    if coder.kind == "clt":
        coder = dataclasses.replace(coder, n_layers=n)
    held = []
    for rank in range(gpus):
        layout = Layout(rank=rank, world=gpus)
        if coder.kind == "clt":
            meta = CrossLayerTranscoder(coder, device="meta")
            shard = CLTShard(meta, CLTShards(coder, layout), "meta", seed=0)
            held.append(sum(p.numel() for p in shard.parameters()))
        else:
            per = sum(p.numel() for p in _one_coder(coder).parameters())
            held.append(per * len(ModuleShards(n, layout).mine))
    plan = plan_training(shape, cfg, gpus=gpus, gpu_mem_gib=80)
    assert lines(plan, "dictionary")["parameters (fp32)"] == max(held) * 4
    assert max(held) < plan.dictionary_params  # no rank holds the whole dictionary


def _one_coder(coder: Any) -> torch.nn.Module:
    from vlmscope.dictionaries import SparseCoder

    return SparseCoder(coder, device="meta")


@pytest.mark.parametrize("family", ["llava", "mllama"])
def test_the_fsdp_root_unit_is_every_weight_outside_the_sharded_layers(
    zoo_path: Any, monkeypatch: pytest.MonkeyPatch, family: str
) -> None:
    """--shard-model fsdp gathers the root unit (embeddings, head, projector, the vision tower
    and Mllama's cross-attention layers) whole for every forward: the plan counts it, and the
    largest unit gathered beside it, as the units shard_frozen_model makes (seen by a spy on
    fully_shard)."""
    import torch.distributed.device_mesh
    import torch.distributed.fsdp

    from vlmscope.training.distributed import Layout, shard_frozen_model

    model = str(zoo_path(family))
    vlm = HookedVLM.from_pretrained(model, device="cpu", dtype=torch.float32)
    units: list[torch.nn.Module] = []
    monkeypatch.setattr(torch.distributed.fsdp, "fully_shard", lambda m, mesh: units.append(m))
    monkeypatch.setattr(torch.distributed.device_mesh, "init_device_mesh", lambda *a: None)
    shard_frozen_model(vlm, Layout(rank=0, world=2, backend="gloo"))
    assert units[-1] is vlm.model
    size = {id(p): p.numel() * p.element_size() for p in vlm.model.parameters()}
    in_units = [{id(p) for p in unit.parameters()} for unit in units[:-1]]
    root = sum(n for i, n in size.items() if not any(i in u for u in in_units))
    argv = [model, "shapes:16", "--shard-model", "fsdp", "--dtype", "float32", "--sae.k", "4"]
    plan = plan_training(ModelShape.from_config(model), parse_train_args(argv), 2, 1)
    assert lines(plan, "model")["FSDP root unit, gathered whole"] == root
    largest = max(sum(size[i] for i in u) for u in in_units)
    assert lines(plan, "model")["FSDP gathered layers (2 in flight)"] == 2 * largest


def test_the_sharded_layers_are_the_decoders_when_the_vision_tower_has_more_blocks(
    tmp_path: Path, zoo_path: Any
) -> None:
    """Qwen2-VL-7B has 32 vision blocks and 28 decoder layers: the planner took the longest
    list of layers, the vision blocks, for the units FSDP shards (about 10 GiB per GPU too
    high at 7B). It takes the language model's decoder layers, as the model holds them."""
    from transformers import AutoConfig, Qwen2VLForConditionalGeneration

    config = AutoConfig.from_pretrained(zoo_path("qwen2_vl"))
    config.vision_config.depth = config.text_config.num_hidden_layers + 2
    config.save_pretrained(tmp_path / "deep")
    shape = ModelShape.from_config(str(tmp_path / "deep"))
    with torch.device("meta"):
        model = Qwen2VLForConditionalGeneration(config)
    layers = model.model.language_model.layers
    sizes = [sum(p.numel() for p in layer.parameters()) for layer in layers]
    assert len(model.model.visual.blocks) > len(layers)
    assert shape.largest_layer == max(sizes)
    assert shape.root_unit == sum(p.numel() for p in model.parameters()) - sum(sizes)
    # one process shards nothing: no shard, root or gathered layers on top of the weights
    cfg = parse_train_args(
        [str(tmp_path / "deep"), "shapes:16", "--shard-model", "fsdp", "--sae.k", "4"]
    )
    one = lines(plan_training(shape, cfg, gpus=1, gpu_mem_gib=1), "model")
    assert not any("FSDP" in what for what in one)


def test_the_weights_are_planned_in_the_checkpoints_dtype_under_autocast(
    zoo_path: Any, llava: HookedVLM
) -> None:
    """Autocast (`--autocast auto`, the default) changes the dtype matmuls compute in, not the
    one weights are stored in: a float32 checkpoint's weights take 4 bytes each (the plan
    assumed bf16 under autocast), as the loaded model's do."""
    model = str(zoo_path("llava"))
    plan = plan_training(ModelShape.from_config(model), parse_train_args([model, "shapes:16",
                         "--sae.k", "4"]), gpus=1, gpu_mem_gib=1)  # fmt: skip
    real = sum(p.numel() * p.element_size() for p in llava.model.parameters())
    assert lines(plan, "model")["weights"] == real
