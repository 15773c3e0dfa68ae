"""Training end to end on a zoo VLM: outputs, determinism, resume after SIGKILL, bad input."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from vlmscope.models.hooked import HookedVLM
from vlmscope.training.bundle import DictionaryBundle, ModelMismatchError
from vlmscope.training.config import TrainConfig, parse_train_args
from vlmscope.training.trainer import Trainer, TrainingError, train

DATA = "shapes:48"


def config(out: Path, model: Path, extra: str = "", name: str = "run") -> TrainConfig:
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
    assert metrics[-1]["fvu"] < metrics[0]["fvu"]
    assert all(m["l0_per_unit"] == [4.0, 4.0, 4.0] for m in metrics)
    bundle = DictionaryBundle.load(res.dictionaries)
    assert bundle.kind == "clt" and bundle.reads[0] == "lm.blocks.0.hook_resid_mid"
    assert bundle.writes[2] == "lm.blocks.2.mlp.hook_out"
    assert bundle.clt is not None and bundle.clt.cfg.n_targets == 2
    bundle.check_model(llava.adapter)


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
    DictionaryBundle.load(ckpt / "dictionaries")  # intact and loadable


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
    with pytest.raises(TrainingError, match=r"--layers \[7\] do not exist: the model has 3"):
        Trainer(config(tmp_path, zoo_path("llava"), "--layers 0 7"), llava, progress=False)
    flags = f"m {DATA} --hookpoints lm.blocks.0.hook_resid_pst --max-steps 2"
    sae = parse_train_args([*flags.split(), "--output-dir", str(tmp_path)])
    with pytest.raises(TrainingError, match=r"did you mean lm\.blocks\.0\.hook_resid_post"):
        Trainer(sae, llava, progress=False)


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
    assert m[-1]["loss"] < m[0]["loss"]


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
    with pytest.raises(TrainingError, match=r"--sae: .*--batch-size: 4 -> 8"):
        Trainer(config(tmp_path, zoo_path("llava"), "--resume --sae.k 5 --batch-size 8"), llava,
                progress=False)  # fmt: skip
    # A larger budget is a continuation, not a different run.
    res = train(
        config(tmp_path, zoo_path("llava"), "--resume --max-steps 4"), llava, progress=False
    )
    assert res.step == 4
