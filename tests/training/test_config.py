"""The train CLI is generated from the config dataclasses and validates before loading models."""

from __future__ import annotations

import pytest

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
        assert f.default == coder[name].default, name
