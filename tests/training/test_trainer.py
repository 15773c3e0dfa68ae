"""Training end to end on a zoo VLM: outputs, determinism, resume after SIGKILL, bad input."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from vlmscope.models.hooked import HookedVLM
from vlmscope.training.bundle import DictionaryBundle, ModelMismatchError
from vlmscope.training.config import TrainConfig, parse_train_args
from vlmscope.training.sharded import read_checkpoint_state
from vlmscope.training.trainer import CheckpointError, Trainer, TrainingError, train

DATA = "shapes:48"


def config(out: Path, model: Path | str, extra: str = "", name: str = "run") -> TrainConfig:
    flags = (
        f"{model} {DATA} --sae.transcode --sae.n_targets 2 --sae.expansion-factor 2 --sae.k 4 "
        f"--batch-size 4 --max-steps 8 --save-every 4 --log-every 1 --output-dir {out} "
        f"--run-name {name} {extra}"
    )
    return parse_train_args(flags.split())


@pytest.fixture(scope="module")
def llava(zoo_path: Any) -> HookedVLM:
    return HookedVLM.from_pretrained(zoo_path("llava"), device="cpu", dtype=torch.float32)


def states_equal(a: Path, b: Path, atol: float) -> None:
    sa, sb = DictionaryBundle.load(a).state_dict(), DictionaryBundle.load(b).state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sa[k].float(), sb[k].float(), atol=atol, rtol=0, msg=k)


def test_clt_training_writes_outputs_and_learns(
    tmp_path: Path, zoo_path: Any, llava: HookedVLM
) -> None:
    res = train(config(tmp_path, zoo_path("llava"), "--max-steps 12"), llava, progress=False)
    assert res.step == 12
    lines = (res.run_dir / "metrics.jsonl").read_text().splitlines()
    import json

    metrics = [json.loads(x) for x in lines]
    assert [m["step"] for m in metrics] == list(range(1, 13))
    # from step 2: step 1's batch is the one init_from_data fitted the decoders to
    assert metrics[-1]["fvu"] < metrics[1]["fvu"]
    assert all(m["l0_per_unit"] == [4.0, 4.0, 4.0] for m in metrics)
    bundle = DictionaryBundle.load(res.dictionaries)
    assert bundle.kind == "clt" and bundle.reads[0] == "lm.blocks.0.hook_resid_mid"
    assert bundle.writes[2] == "lm.blocks.2.mlp.hook_out"
    assert bundle.clt is not None and bundle.clt.cfg.n_targets == 2
    bundle.check_model(llava.adapter)
    assert bundle.model_info["data"] == {
        "dataset": DATA,
        "split": "train",
        "seed": 0,
        "ctx_len": 2048,
    }


def test_training_is_deterministic(tmp_path: Path, zoo_path: Any, llava: HookedVLM) -> None:
    a = train(config(tmp_path, zoo_path("llava"), name="a"), llava, progress=False)
    b = train(config(tmp_path, zoo_path("llava"), name="b"), llava, progress=False)
    states_equal(a.dictionaries, b.dictionaries, atol=0)


def test_resume_after_sigkill_matches_uninterrupted(tmp_path: Path, zoo_path: Any) -> None:
    model = zoo_path("llava")
    flags = (
        f"train {model} {DATA} --sae.transcode --sae.n_targets 2 --sae.expansion-factor 2 "
        f"--sae.k 4 --batch-size 2 --max-steps 40 --save-every 3 --output-dir {tmp_path} "
        "--device cpu --grad-acc-steps 2"
    ).split()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "vlmscope"]
    subprocess.run([*cmd, *flags, "--run-name", "full"], env=env, check=True, capture_output=True)
    proc = subprocess.Popen([*cmd, *flags, "--run-name", "killed"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    state = tmp_path / "killed" / "checkpoint" / "state.json"
    deadline = time.time() + 120
    while not state.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert not (tmp_path / "killed" / "dictionaries").exists()
    done = subprocess.run([*cmd, *flags, "--run-name", "killed", "--resume"], env=env,
                          capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    states_equal(tmp_path / "full" / "dictionaries", tmp_path / "killed" / "dictionaries", 1e-6)


def test_existing_run_is_not_overwritten(tmp_path: Path, zoo_path: Any, llava: HookedVLM) -> None:
    cfg = config(tmp_path, zoo_path("llava"), "--max-steps 4")
    train(cfg, llava, progress=False)
    with pytest.raises(TrainingError, match="--resume"):
        Trainer(cfg, llava, progress=False)


def test_nan_activations_stop_with_step_and_hook(
    tmp_path: Path, zoo_path: Any, llava: HookedVLM
) -> None:
    cfg = config(tmp_path, zoo_path("llava"), "--max-steps 12")
    trainer = Trainer(cfg, llava, progress=False)
    calls = {"n": 0}

    def poison(_m: Any, _i: Any, out: torch.Tensor) -> torch.Tensor | None:
        calls["n"] += 1
        return out * float("nan") if calls["n"] > 6 else None

    h = llava.adapter.part(1, "mlp").register_forward_hook(poison)
    try:
        with pytest.raises(TrainingError, match=r"step 6: lm\.blocks\.1\.mlp\.hook_out has"):
            trainer.fit()
    finally:
        h.remove()
    ckpt = tmp_path / "run" / "checkpoint"
    import json

    assert json.loads((ckpt / "state.json").read_text())["train_state"]["step"] == 4
    assert read_checkpoint_state(ckpt)  # intact and loadable


def test_unwritable_output_fails_before_loading(tmp_path: Path, monkeypatch: Any) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    import vlmscope.models.hooked as hooked

    monkeypatch.setattr(hooked.HookedVLM, "from_pretrained", lambda *a, **k: 1 / 0)
    cfg = config(blocker / "sub", Path("any-model"))
    with pytest.raises(TrainingError, match="cannot write to output folder"):
        Trainer(cfg, progress=False)


def test_layers_and_hooks_that_do_not_exist(
    tmp_path: Path, zoo_path: Any, llava: HookedVLM
) -> None:
    with pytest.raises(TrainingError, match=r"--layers \[3\] do not exist: the model has 3"):
        Trainer(config(tmp_path, zoo_path("llava"), "--layers 2 3"), llava, progress=False)
    flags = f"m {DATA} --hookpoints lm.blocks.0.hook_resid_pst --max-steps 2"
    sae = parse_train_args([*flags.split(), "--output-dir", str(tmp_path)])
    with pytest.raises(TrainingError, match=r"did you mean lm\.blocks\.0\.hook_resid_post"):
        Trainer(sae, llava, progress=False)


def test_hookpoints_are_taken_within_layers(tmp_path: Path, llava: HookedVLM) -> None:
    """`--hookpoints` with `--layers` trains the matches in those layers, as `capture` stores
    them (the pattern alone took every layer's, ignoring --layers)."""
    from vlmscope.training.sources import bindings

    flags = f"m {DATA} --hookpoints lm.blocks.*.hook_resid_post --output-dir {tmp_path}"
    names, _, _ = bindings(parse_train_args([*flags.split(), "--layers", "0", "2"]), llava)
    assert names == ["lm.blocks.0.hook_resid_post", "lm.blocks.2.hook_resid_post"]
    all_names, _, _ = bindings(parse_train_args(flags.split()), llava)
    assert len(all_names) == llava.adapter.n_layers
    narrow = parse_train_args([*f"{flags} --layers 1".split()])
    narrow.hookpoints = ["lm.blocks.0.hook_resid_post"]
    with pytest.raises(TrainingError, match=r"match nothing in --layers \[1\]"):
        bindings(narrow, llava)


def test_a_run_reports_its_last_steps_metrics_whatever_it_logs(
    tmp_path: Path, zoo_path: Any, llava: HookedVLM
) -> None:
    """Metrics are read back (a device sync each on a GPU) on log steps only; a run whose data
    ends between log steps still reports its last step's, which a run logging every step wrote
    to metrics.jsonl. Meanwhile the dictionaries leave the NaN/Inf check to the source."""
    import vlmscope.dictionaries.clt as clt_module
    import vlmscope.dictionaries.coder as coder_module

    checked: list[str] = []  # the dictionaries' own NaN/Inf checks of x and y, by name
    check = coder_module.check_finite

    def spy(name: str, tensor: torch.Tensor) -> None:
        checked.append(name)
        check(name, tensor)

    results = {}
    for every in (1, 100):  # 12 steps: the data (48 rows, 4 a batch) ends before step 100
        extra = f"--epochs 1 --max-steps 1000 --log-every {every} --sae.n_targets 0"
        cfg = config(tmp_path, zoo_path("llava"), extra, name=f"log{every}")
        with pytest.MonkeyPatch.context() as mp:
            for module in (coder_module, clt_module):
                mp.setattr(module, "check_finite", spy)
            results[every] = train(cfg, llava, progress=False)
    every_step, sparse = results[1], results[100]
    logs = [json.loads(x) for x in (every_step.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert sparse.step == every_step.step == logs[-1]["step"] > 1
    assert list(sparse.fvu_per_unit.values()) == logs[-1]["fvu_per_unit"]
    assert list(sparse.l0_per_unit.values()) == logs[-1]["l0_per_unit"]
    assert checked and all(name.startswith("init_from_data") for name in checked)


def test_dictionaries_for_another_model_are_refused(
    tmp_path: Path, zoo_path: Any, llava: HookedVLM
) -> None:
    res = train(config(tmp_path, zoo_path("llava"), "--max-steps 2"), llava, progress=False)
    other = HookedVLM.from_pretrained(zoo_path("qwen2_vl"), device="cpu")
    with pytest.raises(ModelMismatchError, match="d_model: dictionaries 64, model 128"):
        DictionaryBundle.load(res.dictionaries).check_model(other.adapter)


@pytest.mark.parametrize("loss", ["kl", "ce"])
def test_spliced_losses_train(loss: str, tmp_path: Path, zoo_path: Any, llava: HookedVLM) -> None:
    res = train(
        config(tmp_path, zoo_path("llava"), f"--loss-fn {loss} --max-steps 6 --sae.n_targets 0"),
        llava,
        progress=False,
    )
    import json

    m = [json.loads(x) for x in (res.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all(torch.isfinite(torch.tensor(x["loss"])) for x in m)
    assert m[-1]["loss"] < m[1]["loss"]  # step 1's batch is the one the init's decoders fit


def test_sae_on_hookpoints(tmp_path: Path, zoo_path: Any, llava: HookedVLM) -> None:
    cfg = parse_train_args(
        f"{zoo_path('llava')} {DATA} --hookpoints lm.blocks.*.attn.hook_z --sae.expansion-factor 1 "
        f"--sae.k 4 --max-steps 3 --batch-size 2 --output-dir {tmp_path} --tokens image".split()
    )
    res = train(cfg, llava, progress=False)
    b = DictionaryBundle.load(res.dictionaries)
    assert b.kind == "sae" and len(b.reads) == 3 and b.cfg.d_in == 64


def test_missing_logger_package_fails_before_loading(tmp_path: Path, monkeypatch: Any) -> None:
    import importlib.util

    import vlmscope.models.hooked as hooked

    monkeypatch.setattr(hooked.HookedVLM, "from_pretrained", lambda *a, **k: 1 / 0)
    if importlib.util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed here")
    with pytest.raises(TrainingError, match="pip install wandb"):
        Trainer(config(tmp_path, Path("m"), "--log-to-wandb"), progress=False)


def test_resume_with_other_settings_is_refused(
    tmp_path: Path, zoo_path: Any, llava: HookedVLM
) -> None:
    train(config(tmp_path, zoo_path("llava"), "--max-steps 2"), llava, progress=False)
    with pytest.raises(TrainingError, match=r"--sae\.k: \d+ -> 5; --batch-size: 4 -> 8 "):
        Trainer(config(tmp_path, zoo_path("llava"), "--resume --sae.k 5 --batch-size 8"), llava,
                progress=False)  # fmt: skip
    # A larger budget is a continuation, not a different run.
    res = train(
        config(tmp_path, zoo_path("llava"), "--resume --max-steps 4"), llava, progress=False
    )
    assert res.step == 4


def test_resuming_a_run_from_before_normalisation_names_the_flag(
    tmp_path: Path, zoo_path: Any, llava: HookedVLM
) -> None:
    """A run saved when the trainer's default was raw activations: resuming it with today's
    default is refused, by the flag's name and with the flag that continues it."""
    flags = "--max-steps 2 --sae.normalize-activations none"
    train(config(tmp_path, zoo_path("llava"), flags), llava, progress=False)
    with pytest.raises(TrainingError, match=r"--sae\.normalize-activations: 'none' -> 'mean_norm'"
                       r".*continues with --sae\.normalize-activations none"):  # fmt: skip
        Trainer(config(tmp_path, zoo_path("llava"), "--resume --max-steps 3"), llava,
                progress=False)  # fmt: skip
    res = train(config(tmp_path, zoo_path("llava"), f"--resume {flags.replace('2', '3')}"), llava,
                progress=False)  # fmt: skip
    assert res.step == 3


@contextlib.contextmanager
def deadline(seconds: int) -> Iterator[None]:
    """Fail (instead of hanging the suite) if the body runs longer than `seconds`."""

    def stop(*_: object) -> None:
        raise TimeoutError(f"still running after {seconds} s")

    old = signal.signal(signal.SIGALRM, stop)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def metrics_of(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_the_issue_command_with_a_window_wider_than_the_layers(
    tmp_path: Path, zoo_path: Any, llava: HookedVLM
) -> None:
    """--sae.n_targets 16 on --layers 0 1 2 is a window: clamped to the layers after each source."""
    flags = (
        f"{zoo_path('llava')} {DATA} --sae.transcode --sae.n_targets 16 --sae.expansion-factor 2 "
        "--sae.k 32 --layers 0 1 2 --loss-fn fvu --batch-size 2 --grad-acc-steps 16 --lr 3e-4 "
        f"--run-name NAME --ctx-len 512 --max-steps 1 --output-dir {tmp_path}"
    )
    res = train(parse_train_args(flags.split()), llava, progress=False)
    clt = DictionaryBundle.load(res.dictionaries).clt
    assert clt is not None and res.step == 1
    # Source l writes to layers l..2: 3, 2 and 1 targets.
    assert [tuple(layer.W_dec.shape) for layer in clt.layers] == [(128, 3, 64), (128, 2, 64),
                                                                 (128, 1, 64)]  # fmt: skip


def test_image_tokens_on_text_only_data_stop_instead_of_looping(
    tmp_path: Path, zoo_path: Any, llava: HookedVLM
) -> None:
    data = tmp_path / "text.jsonl"
    data.write_text("".join(json.dumps({"text": f"plain text line {i}"}) + "\n" for i in range(5)))
    cfg = parse_train_args(
        f"{zoo_path('llava')} {data} --sae.transcode --tokens image --max-steps 3 --batch-size 2 "
        f"--output-dir {tmp_path}".split()
    )
    with (
        deadline(60),
        pytest.raises(
            TrainingError,
            match=r"--tokens image selected no tokens in a full pass over '.*text\.jsonl'",
        ),
    ):
        train(cfg, llava, progress=False)


class FakeSafetensorError(Exception):
    """Not an OSError, like the error safetensors raises when the disk is full."""


def test_a_checkpoint_that_cannot_be_written_keeps_the_previous_one(
    tmp_path: Path, zoo_path: Any, monkeypatch: Any, capsys: Any
) -> None:
    import vlmscope.training.sharded as ckpt
    from vlmscope.cli import main

    real, calls = ckpt.save_file, {"n": 0}

    def disk_full_at_second_checkpoint(*a: Any, **k: Any) -> None:
        calls["n"] += 1  # two files (the one process's shard, rng) per checkpoint
        if calls["n"] > 2:
            raise FakeSafetensorError("No space left on device")
        real(*a, **k)

    monkeypatch.setattr(ckpt, "save_file", disk_full_at_second_checkpoint)
    flags = (
        f"train {zoo_path('llava')} {DATA} --sae.transcode --sae.n_targets 2 --sae.k 4 "
        f"--sae.expansion-factor 2 --batch-size 2 --max-steps 4 --save-every 2 --device cpu "
        f"--output-dir {tmp_path} --run-name run"
    )
    assert main(flags.split()) == 1  # a one-line error, not a traceback
    err = capsys.readouterr().err
    assert "vlmscope train: error: cannot write checkpoint under" in err
    assert "FakeSafetensorError: No space left on device" in err
    assert "the previous checkpoint is intact" in err
    run = tmp_path / "run"
    assert not list(run.glob(".checkpoint.tmp-*"))
    state = json.loads((run / "checkpoint" / "state.json").read_text())
    assert state["train_state"]["step"] == 2
    assert read_checkpoint_state(run / "checkpoint")  # whole and loadable
    assert issubclass(CheckpointError, TrainingError)


def test_final_dictionaries_that_cannot_be_written_and_stale_temporaries(
    tmp_path: Path, zoo_path: Any, llava: HookedVLM, monkeypatch: Any
) -> None:
    run = tmp_path / "run"
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = run / f".checkpoint.tmp-{dead.pid}"  # left by a run killed while writing
    (stale / "dictionaries").mkdir(parents=True)
    real = DictionaryBundle.save

    def half_then_fail(self: DictionaryBundle, path: Any) -> Path:
        if Path(path).name.startswith(".dictionaries.tmp-"):
            real(self, path)
            raise FakeSafetensorError("No space left on device")
        return real(self, path)

    monkeypatch.setattr(DictionaryBundle, "save", half_then_fail)
    with pytest.raises(CheckpointError, match=r"cannot write the final dictionaries .*--resume"):
        train(config(tmp_path, zoo_path("llava"), "--max-steps 2"), llava, progress=False)
    assert not stale.exists()
    assert not (run / "dictionaries").exists() and not list(run.glob(".dictionaries.tmp-*"))
    assert json.loads((run / "checkpoint" / "state.json").read_text())["train_state"]["step"] == 2
    monkeypatch.setattr(DictionaryBundle, "save", real)
    res = train(config(tmp_path, zoo_path("llava"), "--max-steps 2 --resume"), llava,
                progress=False)  # fmt: skip
    assert res.step == 2 and DictionaryBundle.load(res.dictionaries).kind == "clt"


def test_bad_inputs_fail_before_the_model_loads(
    tmp_path: Path, zoo_path: Any, monkeypatch: Any
) -> None:
    import dataclasses

    import vlmscope.models.hooked as hooked

    def no_load(*a: Any, **k: Any) -> None:
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(hooked.HookedVLM, "from_pretrained", no_load)
    with pytest.raises(TrainingError, match=r"model path '\./no-such-model' does not exist"):
        Trainer(config(tmp_path, "./no-such-model"), progress=False)
    missing = tmp_path / "missing.jsonl"
    cfg = dataclasses.replace(config(tmp_path, Path("m")), dataset=str(missing))
    with pytest.raises(TrainingError, match=r"cannot open dataset .*no such file or folder"):
        Trainer(cfg, progress=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg = dataclasses.replace(config(tmp_path, Path("m")), device="cuda")
    with pytest.raises(TrainingError, match="--device cuda: CUDA is not available"):
        Trainer(cfg, progress=False)


def test_a_model_that_cannot_load_and_k_above_the_latents(
    tmp_path: Path, zoo_path: Any, llava: HookedVLM, monkeypatch: Any
) -> None:
    import vlmscope.models.hooked as hooked

    def hub_miss(*a: Any, **k: Any) -> None:
        raise OSError("org/none is not a local folder and is not a valid model identifier")

    monkeypatch.setattr(hooked.HookedVLM, "from_pretrained", hub_miss)
    with pytest.raises(TrainingError, match="cannot load model 'org/none': org/none is not a"):
        Trainer(config(tmp_path, Path("org/none")), progress=False)
    cfg = config(tmp_path, zoo_path("llava"), "--sae.expansion-factor 1 --sae.k 100")
    with pytest.raises(
        TrainingError,
        match=r"--sae\.k 100 is more than the 64 latents per dictionary "
        r"\(--sae\.expansion-factor 1 x width 64\)",
    ):
        Trainer(cfg, llava, progress=False)


def test_lr_schedule_follows_max_steps_without_a_token_budget(
    tmp_path: Path, zoo_path: Any, llava: HookedVLM
) -> None:
    cfg = config(tmp_path, zoo_path("llava"), "--max-steps 4 --lr 1e-3 --lr-decay-fraction 0.5")
    assert cfg.max_tokens == 1_000_000  # the default token budget, far from reached
    res = train(cfg, llava, progress=False)
    assert res.tokens < 10_000
    # After step s, (s + 1) / 4 of the budget is done: warm-up (5%) is over after step 1, the
    # decay covers the last half: lr * (1 - 0.75) / 0.5 at step 3, 0 at step 4.
    lrs = [m["lr"] for m in metrics_of(res.run_dir)]
    assert lrs == pytest.approx([1e-3, 1e-3, 5e-4, 0.0], rel=1e-12, abs=1e-15)


def test_spliced_loss_counts_running_statistics_once(
    tmp_path: Path, zoo_path: Any, llava: HookedVLM, monkeypatch: Any
) -> None:
    from vlmscope.dictionaries.activations import BatchTopK

    cfg = config(
        tmp_path, zoo_path("llava"), "--loss-fn ce --sae.activation batchtopk --max-steps 3"
    )
    trainer = Trainer(cfg, llava, progress=False)
    bundle = trainer.bundle
    spliced_rows: list[int] = []
    encode_unit = bundle.encode_unit

    def spy(i: int, x: torch.Tensor) -> Any:
        if i == 0:
            spliced_rows.append(x.shape[0])
        return encode_unit(i, x)

    monkeypatch.setattr(bundle, "encode_unit", spy)  # only the spliced pass encodes per unit
    res = trainer.fit()
    acts = bundle.activations()
    assert all(isinstance(a, BatchTopK) for a in acts)
    assert [int(a.num_updates) for a in acts] == [3, 3, 3]  # one threshold update per step
    assert all(a.track_statistics for a in acts)  # restored after each spliced pass
    # The spliced pass splices exactly the selected tokens (no padding, BOS or markers).
    assert len(spliced_rows) == 3 and sum(spliced_rows) == res.tokens
    assert bundle.clt is not None
    assert max(int(layer.num_tokens_since_fired.max()) for layer in bundle.clt.layers) <= res.tokens


def test_sae_hook_points_of_other_or_mixed_widths(
    tmp_path: Path, zoo_path: Any, llava: HookedVLM
) -> None:
    def sae(hooks: str) -> TrainConfig:
        return parse_train_args(
            f"{zoo_path('llava')} {DATA} --hookpoints {hooks} --sae.expansion-factor 1 --sae.k 4 "
            f"--max-steps 1 --batch-size 2 --output-dir {tmp_path}".split()
        )

    with pytest.raises(TrainingError, match="different widths") as e:
        Trainer(sae("lm.blocks.0.attn.hook_k lm.blocks.0.hook_resid_post"), llava, progress=False)
    # The key projection has 2 kv heads x 16 = 32 dims; the residual stream 64.
    assert "lm.blocks.0.attn.hook_k: 32" in str(e.value)
    assert "lm.blocks.0.hook_resid_post: 64" in str(e.value)
    with pytest.raises(TrainingError, match=r"\['lm\.blocks\.0\.attn\.hook_pattern'\].*cannot"):
        Trainer(sae("lm.blocks.0.attn.*"), llava, progress=False)
    res = train(sae("lm.blocks.0.attn.hook_k lm.blocks.1.attn.hook_k"), llava, progress=False)
    bundle = DictionaryBundle.load(res.dictionaries)
    assert bundle.reads == ["lm.blocks.0.attn.hook_k", "lm.blocks.1.attn.hook_k"]
    assert bundle.cfg.d_in == 32


def test_trained_runs_load_into_the_exporters(
    tmp_path: Path, zoo_path: Any, llava: HookedVLM
) -> None:
    from safetensors.torch import load_file

    from vlmscope.dictionaries import SparseCoder, load_dictionaries
    from vlmscope.dictionaries.io import export_circuit_tracer, export_saelens

    model = zoo_path("llava")
    tc = parse_train_args(
        f"{model} {DATA} --sae.kind transcoder --sae.activation batchtopk --sae.k 4 "
        f"--sae.expansion-factor 2 --batch-size 2 --max-steps 2 --output-dir {tmp_path} "
        "--run-name tc".split()
    )
    loaded = load_dictionaries(train(tc, llava, progress=False).dictionaries)
    assert isinstance(loaded, dict)
    reads = [f"lm.blocks.{i}.hook_resid_mid" for i in range(3)]
    assert list(loaded) == reads
    export_circuit_tracer(loaded, tmp_path / "ct")
    _, cache = llava.run_with_cache(llava.prepare(["a red square"]), names=reads, mask="all")
    for layer, read in enumerate(reads):
        coder, x = loaded[read].eval(), cache[read].float()
        w = load_file(str(tmp_path / "ct" / f"layer_{layer}.safetensors"))
        pre = x @ w["W_enc"].T + w["b_enc"]  # circuit-tracer's JumpReLU transcoder, by hand
        acts = pre * (pre > w["activation_function.threshold"])
        codes = coder.encode(x)
        assert 0 < codes.l0().float().mean() < coder.num_latents
        torch.testing.assert_close(acts @ w["W_dec"] + w["b_dec"], coder.decode(codes),
                                   atol=1e-5, rtol=0)  # fmt: skip
    sae = parse_train_args(
        f"{model} {DATA} --layers 1 --sae.k 4 --sae.expansion-factor 1 --batch-size 2 "
        f"--max-steps 1 --output-dir {tmp_path} --run-name sae".split()
    )
    saes = load_dictionaries(train(sae, llava, progress=False).dictionaries)
    assert isinstance(saes, dict) and isinstance(saes["lm.blocks.1.hook_resid_post"], SparseCoder)
    export_saelens(saes, tmp_path / "saelens")
    cfg = json.loads(
        (tmp_path / "saelens" / "lm.blocks.1.hook_resid_post" / "cfg.json").read_text()
    )
    assert cfg["model_name"] == str(model)
    # The run's context length and dataset travel to SAELens (its activation store's defaults).
    assert cfg["metadata"]["context_size"] == cfg["context_size"] == sae.ctx_len
    assert cfg["metadata"]["dataset_path"] == DATA


def test_bad_records_are_counted_when_the_run_stops_mid_pass(
    tmp_path: Path, zoo_path: Any, llava: HookedVLM, capsys: pytest.CaptureFixture[str]
) -> None:
    """Reader-level rejections (missing, corrupt image) are reported at the end of a run that
    never finishes a pass, and the checkpoint keeps them."""
    from PIL import Image

    Image.new("RGB", (40, 32), "red").save(tmp_path / "good.png")
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    turns = [{"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": "red"}]
    images = ["missing.png", "corrupt.png"] + ["good.png"] * 30
    rows = [{"id": str(i), "image": im, "conversations": turns} for i, im in enumerate(images)]
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = parse_train_args(
        f"{zoo_path('llava')} {data} --sae.transcode --sae.expansion-factor 2 --sae.k 4 "
        f"--batch-size 2 --max-steps 2 --save-every 1 --output-dir {tmp_path / 'out'}".split()
    )
    res = train(cfg, llava, progress=False)
    assert res.step == 2  # 6 of 32 rows read: the pass did not end
    out = capsys.readouterr().out
    assert "2 records skipped" in out and "missing_image" in out and "corrupt_image" in out
    state = json.loads((res.run_dir / "checkpoint" / "state.json").read_text())
    assert state["train_state"]["skips"] == {"missing_image": 1, "corrupt_image": 1}


def llava_rows_with_bad_ones(folder: Path, n: int = 30) -> tuple[Path, list[int]]:
    """A LLaVA JSONL file of `n` rows whose every third row has a missing or corrupt image;
    the positions of those bad rows."""
    from PIL import Image

    Image.new("RGB", (40, 32), "red").save(folder / "good.png")
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    turns = [{"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": "red"}]
    images = ["good.png" if i % 3 else ("missing.png", "corrupt.png")[i % 2] for i in range(n)]
    rows = [{"id": str(i), "image": im, "conversations": turns} for i, im in enumerate(images)]
    data = folder / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return data, [i for i, im in enumerate(images) if im != "good.png"]


def state_after_training(
    data: Path, bad: list[int], out: Path, model: Path, llava: HookedVLM, name: str, extra: str
) -> dict[str, Any]:
    """Train on `data` (bad rows at `bad`) within its first pass; the checkpoint's train state,
    whose skip counts are checked against the bad rows before its cursor."""
    cfg = parse_train_args(
        f"{model} {data} --sae.transcode --sae.expansion-factor 2 --sae.k 4 --batch-size 2 "
        f"--save-every 100 --output-dir {out} --run-name {name} {extra}".split()
    )
    train(cfg, llava, progress=False)
    state = json.loads((out / name / "checkpoint" / "state.json").read_text())["train_state"]
    assert state["epoch"] == 0  # the pass is not over: the truth below holds
    assert sum(state["skips"].values()) == sum(p < state["rows"] for p in bad), state
    return state  # type: ignore[no-any-return]


def test_skip_counts_hold_the_rows_before_the_cursor_with_workers_reading_ahead(
    tmp_path: Path, zoo_path: Any, llava: HookedVLM
) -> None:
    """A --workers process reads rows ahead of training (one is enough: 8 rows ahead, and a
    pool of one starts twice as fast); a checkpoint's skip counts are the bad rows before its
    data cursor all the same, so a run stopped at step 2 and resumed to step 4 counts what an
    uninterrupted run counts (the rows past the cursor were read, and counted, twice)."""
    data, bad = llava_rows_with_bad_ones(tmp_path)
    args = (data, bad, tmp_path / "out", zoo_path("llava"), llava)
    stopped = state_after_training(*args, "i", "--max-steps 2 --workers 1")
    assert sum(stopped["skips"].values()) > 0  # bad rows lie before the cursor and after it
    resumed = state_after_training(*args, "i", "--max-steps 4 --workers 1 --resume")
    whole = state_after_training(*args, "u", "--max-steps 4")
    assert (resumed["rows"], resumed["skips"]) == (whole["rows"], whole["skips"])


def test_skip_counts_wait_for_the_step_of_a_batch_the_lr_probe_read_ahead(
    tmp_path: Path, zoo_path: Any, llava: HookedVLM
) -> None:
    """--lr-probe 3 reads four batches before step 1 trains; the checkpoint of step 1 counts
    the bad rows before step 1's cursor, not those of the batches still waiting."""
    data, bad = llava_rows_with_bad_ones(tmp_path)
    args = (data, bad, tmp_path / "out", zoo_path("llava"), llava)
    state = state_after_training(*args, "probe", "--lr-probe 3 --max-steps 1 --save-every 1")
    assert (state["step"], state["rows"]) == (1, 3)


def test_skips_after_the_last_batch_wait_for_the_lr_probe_read_ahead_to_be_trained(
    tmp_path: Path, zoo_path: Any, llava: HookedVLM
) -> None:
    """The data ends with two bad rows after its last batch; --lr-probe 3 reads to the end
    of the one pass (--epochs 1) before step 1 trains. Step 1's checkpoint counts no skip
    (they lie past its cursor), a resume counts them once, and the finished run counts them
    as an uninterrupted run does (they were counted as the read-ahead reached the end)."""
    data, _ = llava_rows_with_bad_ones(tmp_path, n=6)  # bad rows 0 and 3
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    good = [r for r in rows if r["image"] == "good.png"]
    bad = [r for r in rows if r["image"] != "good.png"]
    data.write_text("".join(json.dumps(r) + "\n" for r in good + bad))  # 4 good, then 2 bad
    out = tmp_path / "out"
    base = (f"{zoo_path('llava')} {data} --sae.transcode --sae.expansion-factor 2 --sae.k 4 "
            f"--batch-size 2 --epochs 1 --save-every 1 --output-dir {out}")  # fmt: skip

    def state(name: str, extra: str) -> dict[str, Any]:
        train(parse_train_args(f"{base} --run-name {name} {extra}".split()), llava,
              progress=False)  # fmt: skip
        saved = json.loads((out / name / "checkpoint" / "state.json").read_text())
        return saved["train_state"]  # type: ignore[no-any-return]

    first = state("p", "--lr-probe 3 --max-steps 1")
    assert (first["step"], first["rows"], sum(first["skips"].values())) == (1, 2, 0)
    resumed = state("p", "--lr-probe 3 --max-steps 10 --resume")
    whole = state("w", "--max-steps 10")
    assert whole["step"] == resumed["step"] == 2
    assert resumed["skips"] == whole["skips"] == {"missing_image": 1, "corrupt_image": 1}


def test_columns_with_other_names_train_when_mapped(
    tmp_path: Path, zoo_path: Any, llava: HookedVLM
) -> None:
    from PIL import Image

    Image.new("RGB", (40, 32), "blue").save(tmp_path / "a.png")
    msgs = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Colour?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "blue"}]},
    ]
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps({"conv": msgs, "pics": ["a.png"]}) + "\n" for _ in range(4)))
    base = (f"{zoo_path('llava')} {data} --schema chat --sae.transcode --sae.expansion-factor 2 "
            f"--sae.k 4 --batch-size 2 --max-steps 2 --output-dir {tmp_path}")  # fmt: skip
    with pytest.raises(TrainingError, match=r"needs column .messages.*--columns messages=NAME"):
        train(parse_train_args(f"{base} --run-name plain".split()), llava, progress=False)
    cfg = parse_train_args(f"{base} --run-name mapped --columns messages=conv images=pics".split())
    res = train(cfg, llava, progress=False)
    assert res.step == 2 and res.tokens > 0


# --- one run per folder, nothing escapes, nothing left behind (issue 16) ---------------------
def test_a_second_training_with_the_same_run_name_is_refused(
    tmp_path: Path, zoo_path: Any, llava: HookedVLM
) -> None:
    import socket

    first = Trainer(config(tmp_path, zoo_path("llava")), llava, progress=False)
    try:
        with pytest.raises(TrainingError, match=rf"in use by pid {os.getpid()} on host "
                           rf"{socket.gethostname()}"):  # fmt: skip
            Trainer(config(tmp_path, zoo_path("llava"), "--resume"), llava, progress=False)
        first.fit()  # the refused run touched nothing: the first one trains and saves
    finally:
        first.close()
    res = train(config(tmp_path, zoo_path("llava"), "--resume --max-steps 9"), llava,
                progress=False)  # fmt: skip
    assert res.step == 9  # the lock went with the first run


def test_a_run_that_fails_before_training_leaves_no_folder(
    tmp_path: Path, zoo_path: Any, llava: HookedVLM
) -> None:
    with pytest.raises(TrainingError, match=r"--sae\.k 999 is more than"):
        Trainer(config(tmp_path, zoo_path("llava"), "--sae.k 999"), llava, progress=False)
    assert not (tmp_path / "run").exists()
    with pytest.raises(TrainingError, match="does not exist"):
        Trainer(config(tmp_path, "./no-such-model", name="other"), progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_progress_counts_steps_under_max_steps_and_logs_lines_off_a_terminal(
    tmp_path: Path, zoo_path: Any, llava: HookedVLM, capsys: Any, monkeypatch: Any
) -> None:
    monkeypatch.setenv("VLMSCOPE_PROGRESS_SECONDS", "0")
    train(config(tmp_path, zoo_path("llava"), "--max-steps 3"), llava, progress=True)
    err = capsys.readouterr().err
    assert "\r" not in err  # stderr is not a terminal here: whole lines, no redraws
    lines = [line for line in err.splitlines() if line.startswith("run:")]
    assert lines and "3/3" in lines[-1] and "step" in lines[-1]
    assert "100%" in lines[-1]


def test_written_files_follow_the_umask(tmp_path: Path, zoo_path: Any, llava: HookedVLM) -> None:
    from vlmscope.files import umask

    res = train(config(tmp_path, zoo_path("llava"), "--max-steps 2"), llava, progress=False)
    files = [p for p in res.run_dir.rglob("*") if p.is_file()]
    assert any(p.suffix == ".safetensors" for p in files)
    assert {p.stat().st_mode & 0o777 for p in files} == {0o666 & ~umask()}


def test_one_process_opens_its_source_and_loads_the_model_once(
    tmp_path: Path, zoo_path: Any, monkeypatch: Any
) -> None:
    """The rank-0-first construction must not open the data and load the model a second time
    when there is only rank 0 (it did: every one-process run loaded its model twice)."""
    from vlmscope.training import sources

    loads: list[str] = []
    real = sources.load_model

    def counting(cfg: TrainConfig) -> HookedVLM:
        loads.append(cfg.model)
        return real(cfg)

    monkeypatch.setattr(sources, "load_model", counting)
    trainer = Trainer(config(tmp_path, zoo_path("llava")), progress=False)
    trainer.close()
    assert loads == [str(zoo_path("llava"))]


def test_a_model_passed_in_gets_its_requires_grad_back(
    tmp_path: Path, zoo_path: Any, llava: HookedVLM
) -> None:
    """Training freezes the model it reads; a caller's model must not stay frozen after the
    run (it did, which broke the caller's later gradient work, e.g. attribution's checks)."""
    params = list(llava.model.parameters())
    llava.model.requires_grad_(True)  # the shared fixture may come from other tests frozen
    params[0].requires_grad_(False)  # a caller's own choice survives too
    before = [p.requires_grad for p in params]
    train(config(tmp_path, zoo_path("llava"), name="given"), vlm=llava, progress=False)
    assert [p.requires_grad for p in params] == before


def test_worker_processes_last_the_whole_run_and_train_the_same_weights(
    tmp_path: Path, zoo_path: Any, llava: HookedVLM, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--workers 1 over three passes of a small dataset: the same weights as encoding in the
    trainer's process, from one pool started once (a pool per pass cost seconds of start-up at
    every epoch) and stopped when the run ends."""
    import multiprocessing

    from vlmscope.data.processing import EncoderPool
    from vlmscope.training import sources

    pools: list[EncoderPool] = []

    class Counted(EncoderPool):
        def __init__(self, *args: Any) -> None:
            super().__init__(*args)
            pools.append(self)

    monkeypatch.setattr(sources, "EncoderPool", Counted)
    before = {p.pid for p in multiprocessing.active_children()}  # other tests' processes
    flags = "--max-steps 6 --save-every 100"
    model = zoo_path("llava")
    small = {"dataset": "shapes:8"}  # 2 steps of 4 per pass: 3 passes
    ref = train(dataclasses.replace(config(tmp_path, model, flags, "w0"), **small), llava,
                progress=False)  # fmt: skip
    assert pools == []
    cfg = dataclasses.replace(config(tmp_path, model, f"{flags} --workers 1", "w1"), **small)
    res = train(cfg, llava, progress=False)
    assert res.step == 6 and len(pools) == 1
    after = {p.pid for p in multiprocessing.active_children()}
    assert after <= before  # the pool's workers stopped with the run
    states_equal(res.dictionaries, ref.dictionaries, atol=0)


def test_grad_accumulation_steps_end_whole_and_log_all_their_micro_batches(
    tmp_path: Path, zoo_path: Any, llava: HookedVLM, monkeypatch: Any
) -> None:
    """A --max-tokens budget reached inside a cycle of --grad-acc-steps ends that step with all
    of its micro-batches (stopping mid-cycle dropped their gradient while their tokens and rows
    counted as trained on); and a step's loss, FVU and L0 are token-weighted means over its
    micro-batches, as each micro-batch's own forward computed them."""
    seen: list[tuple[int, float, list[float], list[float]]] = []
    real = Trainer._loss

    def record(self: Trainer, res: Any, batch: Any, n_local: int, n_tok: int) -> Any:
        loss = real(self, res, batch, n_local, n_tok)
        seen.append(
            (n_tok, float(loss.detach()), res.fvu_per_unit.tolist(), res.l0_per_unit.tolist())
        )
        return loss

    monkeypatch.setattr(Trainer, "_loss", record)
    cfg = config(tmp_path, zoo_path("llava"), "--grad-acc-steps 3 --batch-size 2 --max-steps 0 "
                 "--max-tokens 500")  # fmt: skip
    res = train(cfg, llava, progress=False)
    assert len(seen) == 3 * res.step, "every step had its 3 micro-batches"
    assert sum(n for n, *_ in seen[:-3]) < 500 <= res.tokens == sum(n for n, *_ in seen)
    logged = metrics_of(res.run_dir)
    assert len(logged) == res.step
    for step, m in enumerate(logged):
        micro = seen[3 * step : 3 * step + 3]
        n = sum(t for t, *_ in micro)
        assert m["loss"] == pytest.approx(sum(t * v for t, v, *_ in micro) / n, rel=1e-6)
        for u, fvu in enumerate(m["fvu_per_unit"]):
            assert fvu == pytest.approx(sum(t * f[u] for t, _, f, _ in micro) / n, abs=2e-6)
        for u, l0 in enumerate(m["l0_per_unit"]):
            assert l0 == pytest.approx(sum(t * z[u] for t, _, _, z in micro) / n, abs=2e-3)


def test_epochs_alone_set_the_budget_and_a_probe_may_read_past_the_first_pass(
    tmp_path: Path, zoo_path: Any, llava: HookedVLM
) -> None:
    """--epochs without --max-tokens has no token budget (the default 1,000,000 would set the
    learning-rate schedule far past the passes), and --lr-probe reading ahead across the end
    of a short first pass does not take it for a pass without tokens."""
    cfg = config(tmp_path, zoo_path("llava"), "--epochs 2")
    assert cfg.max_tokens == 0 and cfg.max_steps == 8
    assert config(tmp_path, zoo_path("llava")).max_tokens == 1_000_000
    probe = "--max-steps 10 --lr-probe 8 --batch-size 2 --run-name probe"
    res = train(  # shapes:16 in batches of 2: 8 per pass; the probe reads 9 ahead
        parse_train_args(f"{zoo_path('llava')} shapes:16 --sae.transcode --sae.expansion-factor "
                         f"2 --sae.k 4 --output-dir {tmp_path} {probe}".split()),
        llava, progress=False,
    )  # fmt: skip
    assert res.step == 10
    assert json.loads((res.run_dir / "lr_probe.json").read_text())["steps"] > 0


def test_resume_refuses_another_k_schedule_or_model_dtype(
    tmp_path: Path, zoo_path: Any, llava: HookedVLM
) -> None:
    train(config(tmp_path, zoo_path("llava"), "--max-steps 2"), llava, progress=False)
    for flags, says in (("--k-anneal-tokens 1000", "--k-anneal-tokens: 0 -> 1000"),
                        ("--dtype bfloat16", "--dtype: '' -> 'bfloat16'"),
                        ("--autocast off", "--autocast: 'auto' -> 'off'")):  # fmt: skip
        with pytest.raises(TrainingError, match=says):
            Trainer(config(tmp_path, zoo_path("llava"), f"--resume {flags}"), llava,
                    progress=False)  # fmt: skip


def test_tf32_is_set_for_cuda_matmuls_only_while_training_and_then_restored() -> None:
    """--tf32 (the default) turns CUDA's float32 matmuls to TF32 while a CUDA run trains, as
    sparsify does; CPU runs and everything after training keep the setting they had (the
    legacy getter still answers: mixing the legacy and per-backend APIs makes it raise)."""
    from vlmscope.training.trainer import tf32_matmuls

    matmul = torch.backends.cuda.matmul
    before = (matmul.fp32_precision, torch.backends.mkldnn.matmul.fp32_precision)
    with tf32_matmuls(torch.device("cuda"), True):  # a setting: no GPU is touched
        assert matmul.fp32_precision == "tf32"
        assert torch.backends.mkldnn.matmul.fp32_precision == before[1]  # CPU matmuls alone
    for device, on in ((torch.device("cpu"), True), (torch.device("cuda"), False)):
        with tf32_matmuls(device, on):
            assert matmul.fp32_precision == before[0]
    assert (matmul.fp32_precision, torch.backends.mkldnn.matmul.fp32_precision) == before
    assert torch.get_float32_matmul_precision() == "highest"


def test_tf32_covers_the_dictionaries_not_the_model_forward_that_makes_activations(
    tmp_path: Path, zoo_path: Any, llava: HookedVLM
) -> None:
    """The activations must stay what eval and attribute see (IEEE float32 for a float32
    model): the model's forward runs outside the TF32 scope, the dictionaries' forward,
    backward and step inside it."""
    import contextlib

    import vlmscope.training.trainer as trainer_module
    from vlmscope.training.bundle import DictionaryBundle

    inside = [False]
    seen: dict[str, list[bool]] = {"model": [], "dictionaries": [], "step": []}

    @contextlib.contextmanager
    def scope(device: torch.device, on: bool) -> Iterator[None]:
        assert on  # the default
        inside[0] = True
        try:
            yield
        finally:
            inside[0] = False

    def spy(name: str, fn: Any) -> Any:
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            seen[name].append(inside[0])
            return fn(*args, **kwargs)

        return wrapped

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(trainer_module, "tf32_matmuls", scope)
        mp.setattr(HookedVLM, "run_with_cache", spy("model", HookedVLM.run_with_cache))
        mp.setattr(DictionaryBundle, "forward", spy("dictionaries", DictionaryBundle.forward))
        mp.setattr(trainer_module, "take_step", spy("step", trainer_module.take_step))
        train(config(tmp_path, zoo_path("llava"), "--max-steps 2"), llava, progress=False)
    assert seen["model"] and not any(seen["model"])
    assert seen["dictionaries"] and all(seen["dictionaries"])
    assert seen["step"] == [True, True]


def test_a_run_from_before_tf32_resumes_as_it_was_trained(
    tmp_path: Path, zoo_path: Any, llava: HookedVLM
) -> None:
    """A train_config.json written before 2026-12-02 has no tf32 (its matmuls were IEEE) and,
    with --hookpoints and --layers, trained every match (--layers did not narrow them yet).
    Resumed with the same flags, it continues so, equal to the same run never interrupted."""
    model = zoo_path("llava")

    def sae(name: str, extra: str) -> TrainConfig:
        flags = (f"{model} {DATA} --hookpoints lm.blocks.*.hook_resid_post --sae.k 4 "
                 f"--sae.expansion-factor 2 --batch-size 4 --save-every 2 --output-dir "
                 f"{tmp_path} --run-name {name} {extra}")  # fmt: skip
        return parse_train_args(flags.split())

    whole = train(sae("whole", "--max-steps 4"), llava, progress=False)
    first = train(sae("old", "--max-steps 2"), llava, progress=False)
    saved_path = first.run_dir / "train_config.json"
    saved = json.loads(saved_path.read_text())
    del saved["tf32"]
    saved["layers"] = [0]  # as the run was started: the flag did not narrow the hooks then
    saved_path.write_text(json.dumps(saved))
    again = sae("old", "--layers 0 --max-steps 4 --resume")
    with pytest.warns(UserWarning) as notes:
        resumed = train(again, llava, progress=False)
    said = " ".join(str(n.message) for n in notes)
    assert "before --layers narrowed --hookpoints" in said and "with --no-tf32" in said
    assert DictionaryBundle.load(resumed.dictionaries).reads == [
        f"lm.blocks.{i}.hook_resid_post" for i in range(llava.adapter.n_layers)
    ]
    states_equal(whole.dictionaries, resumed.dictionaries, atol=0)
    now = json.loads(saved_path.read_text())
    assert now["tf32"] is False and now["layers"] == []
    # from now on the run's own flags are --no-tf32 and no --layers, as the notes said
    with pytest.raises(TrainingError, match=r"--tf32: False -> True \(the run continues with "
                       r"--no-tf32"):  # fmt: skip
        train(sae("old", "--max-steps 6 --resume"), llava, progress=False)
    assert train(sae("old", "--max-steps 6 --resume --no-tf32"), llava, progress=False).step == 6


def test_a_probe_reading_past_a_pass_end_leaves_the_cursor_of_what_was_trained(
    tmp_path: Path, zoo_path: Any, llava: HookedVLM
) -> None:
    """--lr-probe reads batches ahead, here across the end of a two-batch pass; a checkpoint
    after step 1 must resume at pass 0, row 4 (the pass used to move on when it was read,
    and the resumed run skipped the rest of pass 0), and the resumed run equals the
    uninterrupted one (at a constant rate: a shorter budget would change the schedule)."""
    model = zoo_path("llava")

    def probed(name: str, extra: str) -> TrainConfig:
        flags = (f"{model} shapes:8 --sae.transcode --sae.n_targets 0 --sae.expansion-factor 2 "
                 f"--sae.k 4 --batch-size 4 --lr-probe 3 --lr-warmup-fraction 0 "
                 f"--lr-decay-fraction 0 --epochs 3 --max-steps 6 "
                 f"--output-dir {tmp_path} --run-name {name} {extra}")  # fmt: skip
        return parse_train_args(flags.split())

    whole = train(probed("whole", ""), llava, progress=False)
    assert whole.step == 6
    train(probed("cut", "--max-steps 1 --save-every 1"), llava, progress=False)
    st = json.loads((tmp_path / "cut" / "checkpoint" / "state.json").read_text())["train_state"]
    assert (st["step"], st["epoch"], st["rows"]) == (1, 0, 4)
    resumed = train(probed("cut", "--resume"), llava, progress=False)
    assert resumed.step == 6
    states_equal(whole.dictionaries, resumed.dictionaries, atol=0)


def test_an_sae_trains_on_a_model_whose_processor_wants_an_image_with_every_prompt(
    tmp_path: Path, zoo_path: Any
) -> None:
    """An SAE's width is read off a one-word probe prompt, which PaliGemma's processor refuses
    without an image: `vlmscope train` of a PaliGemma SAE stopped before its first step with
    the processor's ValueError. The probe brings an image where the processor wants one."""
    model = zoo_path("paligemma")
    flags = f"{model} shapes:8 --max-steps 1 --sae.k 4 --sae.expansion-factor 2"
    res = train(parse_train_args([*flags.split(), "--output-dir", str(tmp_path)]), progress=False)
    bundle = DictionaryBundle.load(res.dictionaries)
    paligemma = HookedVLM.from_pretrained(model, device="cpu")
    assert res.step == 1 and bundle.kind == "sae"
    assert bundle.cfg.d_in == paligemma.adapter.d_model
