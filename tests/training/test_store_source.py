"""Training from an activation store: the same CLT as on the fly, bit-exact resume across
epochs with shuffling, token selection, SAEs, and the checks that run before training."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from vlmscope.capture import ActivationStore
from vlmscope.cli import build_parser
from vlmscope.models.hooked import HookedVLM
from vlmscope.training.bundle import DictionaryBundle
from vlmscope.training.capture import capture, config_from_capture_args
from vlmscope.training.config import TrainConfig, parse_train_args
from vlmscope.training.sources import ActivationBatch, TrainState
from vlmscope.training.trainer import Trainer, TrainingError, train

from ..capture.test_store import rewrite_shard

DATA = "shapes:48"
CLT = "--sae.transcode --sae.n_targets 2 --sae.expansion-factor 2 --sae.k 4 --batch-size 4"


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory, zoo_path: Any, llava: HookedVLM) -> Path:
    """resid_mid, mlp.hook_out and resid_post of every layer, in small shards."""
    out = tmp_path_factory.mktemp("store") / "s"
    argv = (
        f"capture {zoo_path('llava')} {DATA} --out {out} --batch-size 4 --max-tokens 0 "
        "--shard-mb 0.05 --hookpoints lm.blocks.*.hook_resid_mid lm.blocks.*.mlp.hook_out "
        "lm.blocks.*.hook_resid_post"
    )
    capture(
        config_from_capture_args(build_parser().parse_args(argv.split())), llava, progress=False
    )
    return out


def states(path: Path) -> dict[str, torch.Tensor]:
    return DictionaryBundle.load(path).state_dict()


def metrics(run: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def test_a_clt_from_the_store_equals_the_clt_trained_on_the_fly(
    tmp_path: Path, zoo_path: Any, llava: HookedVLM, store: Path
) -> None:
    """Same seed, same token order (capture order, batches of the same samples)."""
    base = f"{zoo_path('llava')} {DATA} {CLT} --max-steps 8 --save-every 4 --output-dir {tmp_path}"
    live = train(parse_train_args(f"{base} --run-name live".split()), llava, progress=False)
    cfg = parse_train_args(
        f"{base} --run-name stored --activations {store} --shuffle-buffer-mb 0".split()
    )
    stored = train(cfg, progress=False)
    assert (stored.step, stored.tokens) == (live.step, live.tokens) == (8, live.tokens)
    a, b = states(live.dictionaries), states(stored.dictionaries)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0, msg=k)
    la, lb = metrics(live.run_dir), metrics(stored.run_dir)
    assert [m["loss"] for m in la] == pytest.approx([m["loss"] for m in lb], abs=1e-6)
    bundle = DictionaryBundle.load(stored.dictionaries)
    bundle.check_model(llava.adapter)  # provenance recorded as on the fly
    assert bundle.model_info["data"] == {
        "dataset": DATA,
        "split": "train",
        "seed": 0,
        "ctx_len": 2048,
    }
    assert bundle.model_info["activations"]["tokens"] == ActivationStore(store).n_tokens


def test_resume_from_a_store_is_bit_exact_across_shuffled_epochs(
    tmp_path: Path, store: Path
) -> None:
    flags = (
        f"--activations {store} --sae.kind transcoder --sae.expansion-factor 2 --sae.k 4 "
        f"--batch-size 4 --epochs 2 --max-tokens 0 --save-every 4 --log-every 1 "
        f"--shuffle-buffer-mb 0.1 --output-dir {tmp_path}"
    )
    full = train(parse_train_args(f"{flags} --run-name full".split()), progress=False)
    per_epoch = ActivationStore(store).selected_tokens()
    assert full.tokens == 2 * per_epoch  # every token of both epochs, once each
    cfg = parse_train_args(f"{flags} --run-name crashed".split())
    trainer = Trainer(cfg, progress=False)
    read = trainer.source.batches

    def crash_after_nine(state: TrainState) -> Iterator[ActivationBatch]:
        for i, batch in enumerate(read(state)):
            if i == 9:
                raise RuntimeError("simulated crash")
            yield batch

    trainer.source.batches = crash_after_nine  # type: ignore[method-assign]
    with pytest.raises(RuntimeError, match="simulated crash"):
        trainer.fit()
    saved = json.loads((tmp_path / "crashed" / "checkpoint" / "state.json").read_text())
    assert saved["train_state"]["step"] == 8 and saved["train_state"]["epoch"] == 0
    resumed = train(
        parse_train_args(f"{flags} --run-name crashed --resume".split()), progress=False
    )
    assert (resumed.step, resumed.tokens) == (full.step, full.tokens)
    a, b = states(full.dictionaries), states(resumed.dictionaries)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ma, mb = metrics(full.run_dir), metrics(resumed.run_dir)
    assert [m["loss"] for m in ma] == [m["loss"] for m in mb]


def test_tokens_by_modality_the_seed_clt_flags_and_an_sae(
    tmp_path: Path, store: Path, llava: HookedVLM
) -> None:
    st = ActivationStore(store)
    res = train(
        parse_train_args(
            f"--activations {store} --sae.transcode --sae.n_targets 16 --sae.expansion-factor 2 "
            f"--sae.k 4 --tokens image --epochs 2 --max-tokens 0 --output-dir {tmp_path} "
            "--run-name img".split()
        ),
        progress=False,
    )
    assert res.tokens == 2 * st.manifest["modality_tokens"]["image"]
    bundle = DictionaryBundle.load(res.dictionaries)
    assert bundle.clt is not None  # source l writes to layers l..2: the window is clamped
    assert [tuple(layer.W_dec.shape) for layer in bundle.clt.layers] == [
        (128, 3, 64),
        (128, 2, 64),
        (128, 1, 64),
    ]
    assert bundle.model_info["tokens"] == "image"
    sae = train(
        parse_train_args(
            f"--activations {store} --hookpoints lm.blocks.*.hook_resid_post --sae.k 4 "
            f"--sae.expansion-factor 1 --max-steps 3 --output-dir {tmp_path} --run-name sae".split()
        ),
        progress=False,
    )
    b = DictionaryBundle.load(sae.dictionaries)
    assert b.kind == "sae" and b.reads == [f"lm.blocks.{i}.hook_resid_post" for i in range(3)]
    b.check_model(llava.adapter)
    # --layers narrows --hookpoints as it does on the fly
    from vlmscope.training.sources import bindings
    from vlmscope.training.store_source import store_bindings

    flags = f"--hookpoints lm.blocks.*.hook_resid_post --layers 1 --output-dir {tmp_path}"
    stored = parse_train_args(f"--activations {store} {flags}".split())
    live = parse_train_args(f"m shapes:4 {flags}".split())
    assert (
        store_bindings(stored, b.reads, 3, str(store))[0]
        == bindings(live, llava)[0]
        == ["lm.blocks.1.hook_resid_post"]
    )


def edited(store: Path, to: Path, change: Any) -> Path:
    shutil.copytree(store, to)
    manifest = json.loads((to / "manifest.json").read_text())
    change(manifest)
    (to / "manifest.json").write_text(json.dumps(manifest))
    return to


def test_stores_that_do_not_fit_the_run_are_refused_before_training(
    tmp_path: Path, store: Path, zoo_path: Any
) -> None:
    out = f"--output-dir {tmp_path / 'runs'} --max-steps 2"

    def refused(flags: str, match: str) -> None:
        with pytest.raises(TrainingError, match=match):
            Trainer(parse_train_args(f"{flags} {out}".split()), progress=False)

    refused(f"toy --activations {store} {CLT}", r"captured from model .*llava.* not from 'toy'")
    refused(
        f"{zoo_path('llava')} other.jsonl --activations {store} {CLT}",
        "captured from dataset 'shapes:48', not 'other.jsonl'",
    )
    refused(f"--activations {tmp_path / 'nothing'}", "does not exist")
    no_post = edited(
        store,
        tmp_path / "a",
        lambda m: [m["hooks"].pop(f"lm.blocks.{i}.hook_resid_post") for i in range(3)],
    )
    refused(f"--activations {no_post} --sae.k 4", "holds no hook_resid_post hook that this sae")
    refused(
        f"--activations {no_post} --sae.k 4 --layers 1 2",
        r"lacks \[lm.blocks.1.hook_resid_post, lm.blocks.2.hook_resid_post\] that this sae",
    )
    refused(f"--activations {store} {CLT} --layers 3", r"--layers \[3\] do not exist")
    text = edited(store, tmp_path / "b", lambda m: m["data"].update(tokens="text"))
    refused(
        f"--activations {text} {CLT} --tokens image",
        "asks for image tokens, which the store .* does not hold.*--tokens text",
    )
    unfinished = edited(store, tmp_path / "c", lambda m: m.update(complete=False))
    refused(f"--activations {unfinished} {CLT}", "did not finish.*--resume")
    with pytest.raises(ValueError, match=r"--loss-fn ce splices .* --activations"):
        TrainConfig(
            activations=str(store),
            loss_fn="ce",
            sae=parse_train_args(f"--activations {store} {CLT}".split()).sae,
        )
    shard = sorted(store.glob("shard-*"))[5]
    corrupt = edited(store, tmp_path / "d", lambda m: None)
    data = bytearray((corrupt / shard.name).read_bytes())
    data[-3] ^= 0x55
    (corrupt / shard.name).write_bytes(bytes(data))
    with pytest.raises(TrainingError, match=rf"{shard.name} is corrupted.*checkpoint is intact"):
        train(
            parse_train_args(
                f"--activations {corrupt} {CLT} --shuffle-buffer-mb 0 --run-name "
                f"x --epochs 1 {out}".split()
            ),
            progress=False,
        )
    # NaN in a store passes every byte check (a capture in bf16 that overflowed writes it)
    nan = edited(store, tmp_path / "e", lambda m: None)
    hook = "lm.blocks.1.hook_resid_mid"
    path = rewrite_shard(nan, 5, lambda t: t[hook][1].fill_(float("nan")))
    sample = int(ActivationStore(nan).read(5, ["meta.sample"])["meta.sample"][1])
    with pytest.raises(
        TrainingError,
        match=rf"store {nan}: {hook} has 64 NaN and 0 Inf .* in store samples \[{sample}\] "
        rf"\(the first held in [^)]*{path.name}[^)]*\); the last checkpoint is intact",
    ):
        train(
            parse_train_args(
                f"--activations {nan} {CLT} --shuffle-buffer-mb 0 --run-name y --epochs 1 "
                f"{out}".split()
            ),
            progress=False,
        )


def test_epochs_end_on_the_fly_training_after_whole_passes(
    tmp_path: Path, zoo_path: Any, llava: HookedVLM
) -> None:
    base = f"{zoo_path('llava')} shapes:8 {CLT} --output-dir {tmp_path}"
    res = train(parse_train_args(f"{base} --epochs 2 --max-steps 100".split()), llava,
                progress=False)  # fmt: skip
    assert res.step == 4  # 2 passes of 2 batches of 4 samples
    with pytest.raises(TrainingError, match="--epochs alone gives on-the-fly training no budget"):
        Trainer(parse_train_args(f"{base} --epochs 2 --max-tokens 0 --run-name b".split()), llava)


# --- several processes (torchrun's environment, gloo) ------------------------------------------
def _store_rank(rank: int, world: int, port: int, job: dict[str, Any]) -> None:
    """One rank of a `train --activations` run; writes its dictionaries (or its error)."""
    import os
    import signal

    from safetensors.torch import save_file

    from vlmscope.training.distributed import Layout

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))  # fmt: skip
    torch.set_num_threads(1)
    cfg = TrainConfig.from_dict(job["cfg"])
    out = Path(job["out"])
    try:
        tr = Trainer(cfg, progress=False, layout=Layout.from_environment(cfg.dist_timeout))
        if job["sgd"]:  # see test_distributed: Adam turns float rounding into +-lr steps
            params = [p for g in tr.optimizer.param_groups for p in g["params"]]
            tr.optimizer = torch.optim.SGD(params, lr=cfg.lr)
        if job["die_at"] and rank == world - 1:
            read = tr.source.batches

            def dying(state: TrainState) -> Iterator[ActivationBatch]:
                for i, b in enumerate(read(state)):
                    if i == job["die_at"]:
                        os.kill(os.getpid(), signal.SIGKILL)
                    yield b

            tr.source.batches = dying  # type: ignore[method-assign]
        tr.fit()
        weights = {k: v.contiguous() for k, v in tr.bundle.state_dict().items()
                   if v.device.type != "meta"}  # fmt: skip
        save_file(weights, str(out / f"rank{rank}.safetensors"))
        (out / f"rank{rank}.json").write_text(json.dumps({"ok": True, "tokens": tr.state.tokens}))
    except Exception as e:
        (out / f"rank{rank}.json").write_text(json.dumps({"ok": False, "error": repr(e)}))


def store_ranks(world: int, out: Path, cfg: TrainConfig, sgd: bool = False,
                die_at: int = 0) -> list[dict[str, Any]]:  # fmt: skip
    from .test_distributed import fork_ranks

    out.mkdir(parents=True, exist_ok=True)
    job = {"cfg": cfg.to_dict(), "out": str(out), "sgd": sgd, "die_at": die_at}
    return fork_ranks(_store_rank, world, job, out)


def one_process_sgd(flags: str) -> tuple[Trainer, Any]:
    """The one-process reference, trained with SGD at --lr (as the ranks are)."""
    cfg = parse_train_args(flags.split())
    one = Trainer(cfg, progress=False)
    params = [p for g in one.optimizer.param_groups for p in g["params"]]
    one.optimizer = torch.optim.SGD(params, lr=cfg.lr)
    return one, one.fit()


def two_ranks_against_one(tmp_path: Path, flags: str) -> tuple[list[dict[str, Any]], Any]:
    """2 ranks x --batch-size 2 (run `two`) and 1 process x 4 (run `one`), both with SGD;
    asserts the ranks agree exactly and match the one process to float tolerance."""
    from safetensors.torch import load_file

    from .test_distributed import assert_close

    cfg2 = parse_train_args(f"{flags} --batch-size 2 --run-name two".split())
    results = store_ranks(2, tmp_path / "r2", cfg2, sgd=True)
    assert all(r["ok"] for r in results), results
    one, res = one_process_sgd(f"{flags} --batch-size 4 --run-name one")
    ranks = [load_file(str(tmp_path / "r2" / f"rank{r}.safetensors")) for r in range(2)]
    assert_close(ranks[1], ranks[0], atol=0)
    assert_close(ranks[0], dict(one.bundle.state_dict()), atol=2e-6)
    return results, res


def test_two_ranks_from_a_store_train_the_one_process_dictionaries_of_the_global_batch(
    tmp_path: Path, store: Path
) -> None:
    """2 ranks x --batch-size 2 against 1 process x 4 on the same store: the same shuffled
    global batches (FVU's global variance, global init), so the same CLT to float tolerance,
    identical on both ranks, and the same metrics. BatchTopK: the store holds many identical
    tokens (every sample's chat prefix), so its cut has ties, which both layouts must keep
    alike (one process once kept exactly k x N of them, N ranks every tie)."""
    flags = (
        f"--activations {store} --sae.transcode --sae.n_targets 2 --sae.expansion-factor 2 "
        "--sae.k 4 --sae.activation batchtopk --max-steps 6 --lr 0.05 --device cpu "
        f"--shuffle-buffer-mb 0.1 --output-dir {tmp_path}"
    )
    results, res = two_ranks_against_one(tmp_path, flags)
    assert results[0]["tokens"] == res.tokens
    a, b = metrics(tmp_path / "two"), metrics(tmp_path / "one")
    assert [m["tokens"] for m in a] == [m["tokens"] for m in b]
    for ma, mb in zip(a, b, strict=True):
        assert ma["fvu_per_unit"] == pytest.approx(mb["fvu_per_unit"], abs=1e-5)


def test_distribute_modules_from_a_store_equals_one_process(tmp_path: Path, store: Path) -> None:
    """--distribute-modules on the store source: each rank trains its layers' transcoders on
    the global batch it receives by all-to-all; the saved dictionaries are the unsharded
    one-process run's."""
    from .test_distributed import assert_close

    flags = (
        f"--activations {store} --sae.kind transcoder --sae.expansion-factor 2 --sae.k 4 "
        f"--max-steps 4 --lr 0.05 --device cpu --shuffle-buffer-mb 0.1 --output-dir {tmp_path}"
    )
    cfg = parse_train_args(f"{flags} --batch-size 2 --distribute-modules --run-name dm".split())
    results = store_ranks(2, tmp_path / "r", cfg, sgd=True)
    assert all(r["ok"] for r in results), results
    one_process_sgd(f"{flags} --batch-size 4 --run-name one")
    assert_close(
        dict(states(tmp_path / "dm" / "dictionaries")),
        dict(states(tmp_path / "one" / "dictionaries")),
        atol=2e-6,
    )


def test_a_killed_rank_then_resume_from_a_store_is_bit_exact(tmp_path: Path, store: Path) -> None:
    """Capture order (each rank's samples of every group), 2 ranks, kill -9 one after the
    step-4 checkpoint, resume with 2: the uninterrupted run's weights, bit for bit. The cursor
    is global: resuming with 1 process instead reads the rest of the epoch exactly once."""
    from safetensors.torch import load_file

    flags = (
        f"--activations {store} --sae.kind transcoder --sae.expansion-factor 2 --sae.k 4 "
        "--batch-size 2 --epochs 1 --max-tokens 0 --max-steps 8 --save-every 4 --device cpu "
        f"--shuffle-buffer-mb 0 --output-dir {tmp_path}"
    )
    full = store_ranks(2, tmp_path / "full", parse_train_args(f"{flags} --run-name f".split()))
    assert all(r["ok"] for r in full), full
    killed = parse_train_args(f"{flags} --run-name k".split())
    res = store_ranks(2, tmp_path / "k1", killed, die_at=6)
    assert res[1]["ok"] is None and res[0]["ok"] is False, res
    saved = json.loads((tmp_path / "k" / "checkpoint" / "state.json").read_text())
    assert saved["train_state"]["step"] == 4 and saved["world_size"] == 2
    shutil.copytree(tmp_path / "k", tmp_path / "k-one")
    again = store_ranks(
        2, tmp_path / "k2", parse_train_args(f"{flags} --run-name k --resume".split())
    )
    assert all(r["ok"] for r in again), again
    for r in range(2):
        a = load_file(str(tmp_path / "k2" / f"rank{r}.safetensors"))
        b = load_file(str(tmp_path / "full" / f"rank{r}.safetensors"))
        assert all(torch.equal(a[k], b[k]) for k in a), r
    # One process continues the global cursor: the whole epoch, each token once.
    with pytest.warns(UserWarning, match="checkpointed with 2"):
        one_cfg = parse_train_args(f"{flags} --run-name k-one --resume --max-steps 0".split())
        one = train(one_cfg, progress=False)
    assert one.tokens == ActivationStore(store).selected_tokens()
