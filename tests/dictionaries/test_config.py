"""SparseCoderConfig: derived values, round trip through dicts, and every validation error."""

from __future__ import annotations

import json

import pytest

from vlmscope.dictionaries.config import SparseCoderConfig


def test_derived_values_resolve_from_d_in() -> None:
    cfg = SparseCoderConfig(d_in=16, expansion_factor=4)
    assert cfg.d_out == 16
    assert cfg.num_latents == 64
    assert cfg.normalize_decoder is True  # SAE default
    explicit = SparseCoderConfig(kind="transcoder", d_in=16, d_out=8, num_latents=100)
    assert (explicit.d_out, explicit.num_latents) == (8, 100)
    assert explicit.normalize_decoder is False  # transcoder default
    assert SparseCoderConfig(kind="sae", d_in=4, normalize_decoder=False).normalize_decoder is False


@pytest.mark.parametrize(
    "values",
    [
        {},
        {"d_in": 16, "k": 8, "expansion_factor": 2},
        {
            "kind": "transcoder",
            "activation": "jumprelu",
            "d_in": 8,
            "d_out": 12,
            "num_latents": 40,
            "skip_connection": True,
            "sparsity_coeff": 0.01,
            "normalize_activations": "mean_norm",
            "metadata": {"hookpoints": ["lm.blocks.0.mlp.hook_in"], "model": "m", "dims": [8]},
        },
        {"kind": "clt", "activation": "batchtopk", "d_in": 8, "n_layers": 4, "n_targets": 2},
    ],
)
def test_from_dict_of_to_dict_is_identity(values: dict) -> None:
    cfg = SparseCoderConfig(**values)
    as_dict = cfg.to_dict()
    json.dumps(as_dict)  # plain JSON
    again = SparseCoderConfig.from_dict(json.loads(json.dumps(as_dict)))
    assert again == cfg
    assert again.to_dict() == as_dict


def test_to_dict_is_a_copy() -> None:
    cfg = SparseCoderConfig(d_in=4, metadata={"hookpoints": ["a"]})
    cfg.to_dict()["metadata"]["hookpoints"].append("b")
    assert cfg.metadata == {"hookpoints": ["a"]}


def test_unknown_keys_are_rejected_with_a_suggestion() -> None:
    with pytest.raises(ValueError, match=r"unknown key\(s\) 'expansion_factr' \(did you mean "):
        SparseCoderConfig.from_dict({"d_in": 4, "expansion_factr": 8})
    with pytest.raises(ValueError, match="'zzz'"):
        SparseCoderConfig.from_dict({"zzz": 1})


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"kind": "crosscoder"}, "kind must be one of"),
        ({"activation": "relu"}, "activation must be one of"),
        ({"normalize_activations": "layer_norm"}, "normalize_activations must be one of"),
        ({"d_in": -1}, "d_in must be >= 0"),
        ({"d_in": 4, "num_latents": 8, "k": 9}, "k=9 exceeds num_latents=8"),
        ({"k": 0}, "k must be >= 1"),
        ({"d_in": 4, "d_out": 5}, "d_out=5 != d_in=4"),
        ({"skip_connection": True}, "skip_connection is for transcoders"),
        ({"n_layers": 2}, "n_layers and n_targets are for kind='clt'"),
        ({"activation": "jumprelu"}, "jumprelu needs sparsity_coeff > 0"),
        ({"jumprelu_bandwidth": 0.0}, "jumprelu_bandwidth must be"),
        ({"jumprelu_init_threshold": -1.0}, "jumprelu_init_threshold must be"),
        ({"aux_k_coeff": -0.5}, "aux_k_coeff must be"),
        ({"threshold_momentum": 1.0}, "threshold_momentum must be in"),
        ({"expansion_factor": 0}, "set num_latents or expansion_factor"),
        ({"dead_tokens_threshold": 0}, "dead_tokens_threshold must be >= 1"),
    ],
)
def test_invalid_values_raise_value_error(values: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SparseCoderConfig(**values)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"d_in": "16"}, "d_in must be an int"),
        ({"k": True}, "k must be an int"),
        ({"k": 4.0}, "k must be an int"),
        ({"aux_k_coeff": "1"}, "aux_k_coeff must be a number"),
        ({"skip_connection": 1}, "skip_connection must be a bool"),
        ({"metadata": {"x": object()}}, "JSON-serialisable"),
        ({"metadata": {1: "a"}}, "str keys"),
    ],
)
def test_wrong_types_raise_type_error(values: dict, message: str) -> None:
    with pytest.raises(TypeError, match=message):
        SparseCoderConfig(**values)


def test_ints_are_accepted_for_float_fields() -> None:
    cfg = SparseCoderConfig(aux_k_coeff=1)
    assert isinstance(cfg.aux_k_coeff, float) and cfg.aux_k_coeff == 1.0


def test_with_dims_fills_what_the_trainer_learns_later() -> None:
    cfg = SparseCoderConfig(kind="clt", expansion_factor=4, k=8)
    with pytest.raises(ValueError, match="d_in, n_layers not set"):
        cfg.check_buildable()
    filled = cfg.with_dims(16, n_layers=3)
    filled.check_buildable()
    assert (filled.d_in, filled.d_out, filled.num_latents, filled.n_layers) == (16, 16, 64, 3)
    # Re-filling re-derives num_latents from the expansion factor, keeps explicit sizes.
    assert filled.with_dims(32, n_layers=3).num_latents == 128
    explicit = SparseCoderConfig(num_latents=100).with_dims(16)
    assert explicit.num_latents == 100


def test_clt_window() -> None:
    cfg = SparseCoderConfig(kind="clt", d_in=4, n_layers=5, n_targets=2)
    assert [cfg.n_out(layer) for layer in range(5)] == [2, 2, 2, 2, 1]
    everything = SparseCoderConfig(kind="clt", d_in=4, n_layers=5)
    assert [everything.n_out(layer) for layer in range(5)] == [5, 4, 3, 2, 1]
    with pytest.raises(IndexError):
        cfg.n_out(5)


def test_clt_window_wider_than_the_layers_is_clamped() -> None:
    """n_targets is a window: 16 on 3 layers means every later layer, as n_targets=0 does."""
    wide = SparseCoderConfig(kind="clt", expansion_factor=2, k=4, n_targets=16)
    filled = wide.with_dims(8, n_layers=3)
    assert filled.n_targets == 16  # what the user asked for is kept
    assert filled.window() == 3
    assert [filled.n_out(layer) for layer in range(3)] == [3, 2, 1]
    assert SparseCoderConfig.from_dict(filled.to_dict()) == filled
