"""The train CLI is generated from the config dataclasses and validates before loading models."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from vlmscope.cli import main
from vlmscope.training.config import TrainConfig, parse_train_args

USER_COMMAND = (
    "MODEL DATASET --sae.transcode --sae.n_targets 16 --sae.expansion-factor 2 --sae.k 32 "
    "--layers 0 1 2 --loss-fn fvu --batch-size 2 --grad-acc-steps 16 --lr 3e-4 --run-name NAME "
    "--log-to-wandb --ctx-len 512"
)


def test_the_flags_users_type_parse_exactly() -> None:
    cfg = parse_train_args(USER_COMMAND.split())
    assert (cfg.model, cfg.dataset) == ("MODEL", "DATASET")
    assert cfg.sae.transcode and cfg.sae.n_targets == 16 and cfg.sae.expansion_factor == 2
    assert cfg.sae.k == 32 and cfg.layers == [0, 1, 2] and cfg.loss_fn == "fvu"
    assert (cfg.batch_size, cfg.grad_acc_steps, cfg.lr) == (2, 16, 3e-4)
    assert cfg.run_name == "NAME" and cfg.log_to_wandb and cfg.ctx_len == 512
    assert cfg.sae.resolved_kind() == "clt"
    # Both spellings of every flag work.
    a = parse_train_args(["m", "d", "--batch_size", "3", "--sae.expansion_factor", "4"])
    b = parse_train_args(["m", "d", "--batch-size", "3", "--sae.expansion-factor", "4"])
    assert a == b


def test_kind_resolution() -> None:
    assert parse_train_args(["m", "d"]).sae.resolved_kind() == "sae"
    assert parse_train_args(["m", "d", "--sae.transcode"]).sae.resolved_kind() == "transcoder"
    assert parse_train_args(["m", "d", "--sae.kind", "clt"]).sae.coder_config().kind == "clt"


@pytest.mark.parametrize(
    ("argv", "hint"),
    [
        ("train m d --batch-sise 3", "--batch-sise: not a flag of `vlmscope train`; did you mean "
         "--batch-size?"),
        # --device is a flag of other commands, not of this one: never offered here.
        ("plan attribute m d --device cpu", "--device: not a flag of `vlmscope plan attribute`; "
         "see --help"),
        ("plan attribute m d --postions 9", "did you mean --positions?"),
    ],
)  # fmt: skip
def test_unknown_flags_get_hints_from_the_command_invoked(
    argv: str, hint: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from vlmscope.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(argv.split())
    err = capsys.readouterr().err
    assert hint in err
    assert err.count("did you mean") <= 1 and "--batch_size" not in err


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ("--batch-sise 3", "did you mean --batch-size"),
        ("--loss-fn mse", "invalid choice: 'mse'"),
        ("--sae.k 0", "k must be >= 1"),
        ("--batch-size 0", "--batch-size must be >= 1"),
        ("--hookpoints x --sae.transcode", "--hookpoints selects SAE hook points"),
        ("--loss-fn kl", "use transcoders"),
        ("--sae.activation jumprelu", "sparsity_coeff > 0"),
        ("--layers 1 1", "duplicates"),
        # Conflicting flags: one would silently override the other.
        ("--sae.kind sae --sae.transcode", "--sae.kind sae reconstructs a hook point but"),
        ("--sae.kind transcoder --sae.n_targets 4", "--sae.n_targets 4 asks for a CLT window"),
        ("--sae.n_targets 4", "add --sae.transcode"),
        # A CLT source writes to the layers right after it: a gap would misroute it.
        ("--sae.transcode --sae.n_targets 2 --layers 0 2", "a CLT needs contiguous --layers"),
        ("--device foo", "--device must be cpu, cuda, cuda:N, mps or xpu, got 'foo'"),
        ("--hookpoints vision.blocks.0.hook_resid_post --tokens text", "no vision-encoder"),
        ("--hookpoints projector.hook_out --loss-fn kl", "train with --loss-fn fvu"),
        ("--tower vision --sae.transcode --sae.n_targets 2", "a CLT spans"),
        ("--tower eyes", "invalid choice: 'eyes'"),
        ("--hookpoints lm.blocks.0.attn.hook_pattern", "exclude attn.hook_pattern"),
    ],
)
def test_bad_flags_fail_before_any_model_loads(
    flags: str, message: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import vlmscope.models.hooked as hooked

    def no_load(*a: object, **k: object) -> None:
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(hooked.HookedVLM, "from_pretrained", no_load)
    with pytest.raises(SystemExit) as e:
        main(["train", "MODEL", "DATA", *flags.split()])
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_cuda_device_on_a_machine_without_cuda_fails_before_loading(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch

    import vlmscope.models.hooked as hooked

    monkeypatch.setattr(hooked.HookedVLM, "from_pretrained", lambda *a, **k: 1 / 0)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as e:
        main(["train", "MODEL", "DATA", "--device", "cuda"])
    assert e.value.code == 2
    assert "--device cuda: CUDA is not available on this machine" in capsys.readouterr().err
    # The config itself (e.g. written for a cluster job) is not tied to this machine.
    assert TrainConfig(device="cuda:1").device == "cuda:1"


def test_shapes_dataset_size_must_be_a_number() -> None:
    with pytest.raises(ValueError, match="shapes:N needs a positive integer N, got 'shapes:x'"):
        TrainConfig(dataset="shapes:x")
    assert TrainConfig(dataset="shapes:12").is_shapes_dataset()


def test_n_targets_1_with_a_transcoder_is_consistent() -> None:
    cfg = parse_train_args(["m", "d", "--sae.kind", "transcoder", "--sae.n_targets", "1"])
    assert cfg.sae.coder_config().kind == "transcoder"


def test_config_round_trips_through_dict() -> None:
    cfg = parse_train_args(USER_COMMAND.split())
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg


def test_help_documents_every_flag(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    flags = "--sae.transcode --sae.n-targets --layers --loss-fn --resume --save-every"
    for flag in (flags + " --max-tokens --hookpoints --tokens --device").split():
        assert flag in out
    assert "(default:" in out


def test_every_flag_has_real_help() -> None:
    """No flag's help is the placeholder made from its name; each says what it does."""
    import argparse

    from vlmscope.training.config import build_train_parser

    parser = build_train_parser()
    flags = [a for a in parser._actions if a.option_strings and a.dest != "help"]
    assert len(flags) > 40
    for action in flags:
        text = (action.help or "").split(" (default:")[0]
        placeholder = action.dest.split(".")[-1].replace("_", " ")
        assert text != placeholder and len(text.split()) >= 4, (action.dest, action.help)
        assert action.help is not None and "(default:" in action.help, action.dest
    helps = {a.dest: a.help for a in flags}
    assert helps["save_every"].startswith("write a checkpoint every this many optimizer steps")
    assert "cuda if available, else cpu" in helps["device"]
    assert "(default: hook_resid_post of --layers)" in helps["hookpoints"]
    assert isinstance(parser, argparse.ArgumentParser)


def test_a_field_without_help_fails_when_the_parser_is_built(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from vlmscope.training import config as config_module

    monkeypatch.delitem(config_module._HELP, "ctx_len")
    with pytest.raises(KeyError, match="'ctx_len' has no --help text"):
        config_module.build_train_parser()


def test_sae_flags_mirror_the_dictionary_config() -> None:
    """--sae.* flags are SparseCoderConfig's fields with its defaults (plus kind/transcode);
    a field added to one and not the other fails here."""
    import dataclasses

    from vlmscope.dictionaries import SparseCoderConfig
    from vlmscope.training.config import _DERIVED_SAE_FIELDS, SaeArgs

    coder = {f.name: f for f in dataclasses.fields(SparseCoderConfig)}
    args = {f.name: f for f in dataclasses.fields(SaeArgs)}
    assert set(args) - {"transcode"} == set(coder) - _DERIVED_SAE_FIELDS
    for name, f in args.items():
        if name in ("kind", "transcode"):
            continue
        if name == "n_targets":  # None = not given; it resolves to the coder's default
            assert f.default is None
            assert SaeArgs().coder_config().n_targets == coder[name].default
            continue
        if name == "normalize_activations":  # the trainer normalises, the library does not
            assert (f.default, coder[name].default) == ("mean_norm", "none")
            continue
        assert f.default == coder[name].default, name


@pytest.mark.parametrize(
    ("flags", "kind", "n_targets"),
    [
        ("--sae.transcode", "transcoder", 0),
        ("--sae.transcode --sae.n_targets 1", "transcoder", 0),
        ("--sae.transcode --sae.n_targets 0", "clt", 0),  # 0: every later layer, as --help says
        ("--sae.transcode --sae.n_targets 3", "clt", 3),
        ("--sae.kind clt", "clt", 0),
    ],
)
def test_n_targets_means_what_the_help_says(flags: str, kind: str, n_targets: int) -> None:
    cfg = parse_train_args(["m", "d", *flags.split()])
    assert cfg.sae.resolved_kind() == kind
    assert cfg.sae.coder_config().n_targets == n_targets


def test_negative_n_targets_and_escaping_run_names_are_refused() -> None:
    with pytest.raises(ValueError, match=r"--sae\.n_targets must be >= 0"):
        parse_train_args_or_raise("m d --sae.transcode --sae.n_targets -2")
    for name in ("../../escaped_run", "a/b", "..", "/abs"):
        with pytest.raises(ValueError, match="--run-name must be one folder name"):
            parse_train_args_or_raise(f"m d --run-name {name}")


def test_a_negative_number_is_read_as_a_value(capsys: Any) -> None:
    """`--lr -1e-3` reaches validation (which explains the refusal), not argparse's
    'expected one argument'."""
    with pytest.raises(SystemExit):
        parse_train_args(["m", "d", "--lr", "-1e-3"])
    err = capsys.readouterr().err
    assert "--lr must be a finite number >= 0, got -0.001" in err
    assert "expected one argument" not in err
    cfg = parse_train_args(["m", "d", "--sae.jumprelu-init-threshold", "1e-3", "--seed", "-3"])
    assert cfg.sae.jumprelu_init_threshold == 1e-3 and cfg.seed == -3


def parse_train_args_or_raise(flags: str) -> TrainConfig:
    from vlmscope.training.config import build_train_parser, config_from_args

    return config_from_args(build_train_parser().parse_args(flags.split()))


def test_images_outside_the_root_need_the_flag_that_help_names(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from vlmscope.training.trainer import open_training_data

    for command in (["train", "--help"], ["eval", "--help"]):
        with pytest.raises(SystemExit):
            main(command)
        out = " ".join(capsys.readouterr().out.split())
        assert "--allow-outside-image-root" in out and "must stay inside it" in out, command
    (tmp_path / "root").mkdir()
    Image.new("RGB", (8, 8), "red").save(tmp_path / "x.png")
    conv = [{"from": "human", "value": "<image>\nQ"}, {"from": "gpt", "value": "A"}]
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"image": "../x.png", "conversations": conv}) + "\n")
    flags = ["m", str(data), "--image-root", str(tmp_path / "root")]
    confined = open_training_data(parse_train_args(flags))
    assert list(confined) == [] and confined.stats.counts == {"image_outside_root": 1}
    allowed = open_training_data(parse_train_args([*flags, "--allow-outside-image-root"]))
    assert len(list(allowed)) == 1
