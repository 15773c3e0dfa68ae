"""Save/load round trips, file errors, and the circuit-tracer and SAELens exporters, whose
files are read back and evaluated by hand with each tool's formulas."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from vlmscope.dictionaries.clt import CrossLayerTranscoder
from vlmscope.dictionaries.coder import SparseCoder
from vlmscope.dictionaries.config import SparseCoderConfig
from vlmscope.dictionaries.io import (
    DictionaryFormatError,
    export_circuit_tracer,
    export_saelens,
    load_dictionaries,
    save_dictionaries,
)

D, F = 6, 16


def _prepare(module: torch.nn.Module, xs: list[torch.Tensor], ys: list[torch.Tensor]) -> None:
    """Random weights, JumpReLU thresholds that cut some latents, a BatchTopK threshold."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("log_threshold"):
                p.copy_(torch.log(torch.rand(p.shape, generator=gen) + 0.2))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    module.train()
    for _ in range(3):
        if isinstance(module, CrossLayerTranscoder):
            module(xs, ys)
        else:
            module(xs[0], ys[0] if module.cfg.kind == "transcoder" else None)
    module.eval()


def make_coder(kind: str, activation: str, *, seed: int = 0, **kw: object) -> SparseCoder:
    cfg = SparseCoderConfig(
        kind=kind,
        activation=activation,
        d_in=D,
        num_latents=F,
        k=3,
        sparsity_coeff=0.1,
        normalize_activations="mean_norm",
        **kw,  # type: ignore[arg-type]
    )
    coder = SparseCoder(cfg)
    gen = torch.Generator().manual_seed(seed)
    x, y = torch.randn(64, D, generator=gen) * 4, torch.randn(64, D, generator=gen) * 0.3
    coder.init_from_data(x, y if kind == "transcoder" else None)
    _prepare(coder, [x], [y])
    return coder


def make_clt(
    activation: str, n_layers: int = 3, n_targets: int = 2, skip: bool = True
) -> CrossLayerTranscoder:
    cfg = SparseCoderConfig(
        kind="clt",
        activation=activation,
        d_in=D,
        num_latents=F,
        k=3,
        n_layers=n_layers,
        n_targets=n_targets,
        skip_connection=skip,
        sparsity_coeff=0.1,
        normalize_activations="mean_norm",
    )
    clt = CrossLayerTranscoder(cfg)
    gen = torch.Generator().manual_seed(1)
    xs = [torch.randn(64, D, generator=gen) * (i + 1) for i in range(n_layers)]
    ys = [torch.randn(64, D, generator=gen) * 0.2 * (i + 1) for i in range(n_layers)]
    clt.init_from_data(xs, ys)
    _prepare(clt, xs, ys)
    return clt


def inputs(n_layers: int = 1, seed: int = 5) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(32, D, generator=gen) * (i + 1) for i in range(n_layers)]


def files_in(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


# ---------------------------------------------------------------------------- vlmscope layout


@pytest.mark.parametrize(
    ("kind", "activation"),
    [("sae", "topk"), ("sae", "batchtopk"), ("sae", "jumprelu"), ("transcoder", "jumprelu")],
)
def test_sparse_coder_round_trip(tmp_path: Path, kind: str, activation: str) -> None:
    coder = make_coder(kind, activation, skip_connection=kind == "transcoder")
    coder.save(tmp_path / "c")
    assert files_in(tmp_path / "c") == ["cfg.json", "sae.safetensors"]
    loaded = SparseCoder.load(tmp_path / "c").eval()
    assert loaded.cfg == coder.cfg
    for (name, a), (_, b) in zip(
        coder.state_dict().items(), loaded.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name
    (x,) = inputs()
    y = x * 0.5 if kind == "transcoder" else None
    assert torch.equal(coder(x, y).reconstruction, loaded(x, y).reconstruction)
    assert isinstance(load_dictionaries(tmp_path / "c"), SparseCoder)


def test_per_hookpoint_run_round_trip(tmp_path: Path) -> None:
    coders = {
        "lm.blocks.1.hook_resid_post": make_coder("sae", "topk", seed=1),
        "lm.blocks.0.hook_resid_post": make_coder("sae", "batchtopk", seed=2),
    }
    save_dictionaries(coders, tmp_path, metadata={"model": "tiny"})
    assert files_in(tmp_path) == [
        "config.json",
        "lm.blocks.0.hook_resid_post/cfg.json",
        "lm.blocks.0.hook_resid_post/sae.safetensors",
        "lm.blocks.1.hook_resid_post/cfg.json",
        "lm.blocks.1.hook_resid_post/sae.safetensors",
    ]
    header = json.loads((tmp_path / "config.json").read_text())
    assert header["hookpoints"] == list(coders) and header["metadata"] == {"model": "tiny"}
    loaded = load_dictionaries(tmp_path)
    assert isinstance(loaded, dict) and list(loaded) == list(coders)
    (x,) = inputs()
    for name, coder in coders.items():
        assert torch.equal(loaded[name].eval()(x).reconstruction, coder(x).reconstruction)


def test_clt_round_trip(tmp_path: Path) -> None:
    clt = make_clt("batchtopk")
    save_dictionaries(clt, tmp_path)
    assert files_in(tmp_path) == [
        "config.json",
        "layer_0.safetensors",
        "layer_1.safetensors",
        "layer_2.safetensors",
    ]
    loaded = load_dictionaries(tmp_path)
    assert isinstance(loaded, CrossLayerTranscoder) and loaded.cfg == clt.cfg
    xs = inputs(3)
    ys = [x * 0.1 for x in xs]
    for a, b in zip(clt(xs, ys).reconstruction, loaded.eval()(xs, ys).reconstruction, strict=True):
        assert torch.equal(a, b)


def test_files_are_safetensors_and_json_only(tmp_path: Path) -> None:
    save_dictionaries({"h": make_coder("sae", "topk")}, tmp_path / "run")
    make_clt("jumprelu").save(tmp_path / "clt")
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert path.suffix in (".json", ".safetensors"), path
            assert not path.name.startswith("."), f"leftover temporary file {path}"
            if path.suffix == ".safetensors":
                assert path.read_bytes()[:2] != b"PK"  # not a torch.save zip
                load_file(str(path))
            else:
                json.loads(path.read_text())


def test_dtype_is_kept_or_overridden(tmp_path: Path) -> None:
    coder = make_coder("sae", "topk").to(torch.bfloat16)
    coder.save(tmp_path)
    assert SparseCoder.load(tmp_path).W_enc.dtype == torch.bfloat16
    assert SparseCoder.load(tmp_path, dtype=torch.float32).W_dec.dtype == torch.float32


def test_missing_and_corrupt_files(tmp_path: Path) -> None:
    make_coder("sae", "topk").save(tmp_path / "c")
    (tmp_path / "c" / "sae.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"sae\.safetensors not found"):
        SparseCoder.load(tmp_path / "c")
    (tmp_path / "c" / "sae.safetensors").write_bytes(b"\x00" * 40)
    with pytest.raises(DictionaryFormatError, match="not a readable safetensors file"):
        SparseCoder.load(tmp_path / "c")
    (tmp_path / "c" / "cfg.json").write_text("{not json")
    with pytest.raises(DictionaryFormatError, match="not valid JSON"):
        SparseCoder.load(tmp_path / "c")
    with pytest.raises(FileNotFoundError, match=r"neither config\.json"):
        load_dictionaries(tmp_path)


def test_config_errors_are_reported_with_the_file(tmp_path: Path) -> None:
    make_coder("sae", "topk").save(tmp_path)
    cfg_path = tmp_path / "cfg.json"
    header = json.loads(cfg_path.read_text())
    header["config"]["num_latnts"] = 3
    cfg_path.write_text(json.dumps(header))
    with pytest.raises(DictionaryFormatError, match=r"cfg\.json: invalid config: .*'num_latnts'"):
        SparseCoder.load(tmp_path)
    header["config"].pop("num_latnts")
    header["format_version"] = 99
    cfg_path.write_text(json.dumps(header))
    with pytest.raises(DictionaryFormatError, match="format_version 99 is not supported"):
        SparseCoder.load(tmp_path)


def test_shape_mismatch_names_the_tensor_and_both_shapes(tmp_path: Path) -> None:
    make_coder("sae", "topk").save(tmp_path)
    cfg_path = tmp_path / "cfg.json"
    header = json.loads(cfg_path.read_text())
    header["config"]["num_latents"] = 2 * F
    cfg_path.write_text(json.dumps(header))
    with pytest.raises(DictionaryFormatError) as err:
        SparseCoder.load(tmp_path)
    message = str(err.value)
    assert "sae.safetensors" in message
    assert f"tensor 'W_enc' has shape ({F}, {D}) but the config implies ({2 * F}, {D})" in message
    assert f"tensor 'W_dec' has shape ({F}, {D}) but the config implies ({2 * F}, {D})" in message


def test_missing_tensor_is_named(tmp_path: Path) -> None:
    coder = make_coder("transcoder", "topk", skip_connection=True)
    coder.save(tmp_path)
    tensors = load_file(str(tmp_path / "sae.safetensors"))
    del tensors["W_skip"]
    save_file(tensors, str(tmp_path / "sae.safetensors"))
    with pytest.raises(DictionaryFormatError, match=r"missing \['W_skip'\], unexpected \[\]"):
        SparseCoder.load(tmp_path)


def test_clt_missing_layer_file(tmp_path: Path) -> None:
    make_clt("jumprelu").save(tmp_path)
    (tmp_path / "layer_1.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"n_layers=3 but \['layer_1.safetensors'\]"):
        load_dictionaries(tmp_path)


def test_hookpoint_names_must_be_folder_names(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="cannot name a folder"):
        save_dictionaries({"a/b": make_coder("sae", "topk")}, tmp_path)
    with pytest.raises(ValueError, match="cannot name a folder"):
        save_dictionaries({"..": make_coder("sae", "topk")}, tmp_path)


# ---------------------------------------------------------------------------- SAELens


def saelens_forward(folder: Path, x: torch.Tensor) -> torch.Tensor:
    """SAELens' inference formulas (apply_b_dec_to_input, topk / jumprelu) on the files."""
    cfg = json.loads((folder / "cfg.json").read_text())
    w = load_file(str(folder / "sae_weights.safetensors"))
    sae_in = x - w["b_dec"] if cfg["apply_b_dec_to_input"] else x
    hidden = sae_in @ w["W_enc"] + w["b_enc"]
    if cfg["architecture"] == "topk":
        values, indices = hidden.topk(cfg["k"], dim=-1)
        acts = torch.zeros_like(hidden).scatter(-1, indices, values.relu())
    else:
        acts = hidden.relu() * (hidden > w["threshold"])
    return acts @ w["W_dec"] + w["b_dec"]


@pytest.mark.parametrize("activation", ["topk", "jumprelu", "batchtopk"])
def test_saelens_export_reproduces_the_module(tmp_path: Path, activation: str) -> None:
    coder = make_coder("sae", activation, metadata={"model_name": "tiny-vlm"})
    export_saelens(coder, tmp_path, hook_name="blocks.2.hook_resid_post")
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    assert cfg["architecture"] == ("topk" if activation == "topk" else "jumprelu")
    assert (cfg["d_in"], cfg["d_sae"], cfg["dtype"]) == (D, F, "float32")
    assert (cfg["hook_name"], cfg["model_name"]) == ("blocks.2.hook_resid_post", "tiny-vlm")
    assert cfg["normalize_activations"] == "none" and cfg["apply_b_dec_to_input"] is True
    assert cfg.get("k") == (3 if activation == "topk" else None)
    w = load_file(str(tmp_path / "sae_weights.safetensors"))
    shapes = {name: tuple(t.shape) for name, t in w.items()}
    want = {"W_enc": (D, F), "W_dec": (F, D), "b_enc": (F,), "b_dec": (D,)}
    if activation != "topk":
        want["threshold"] = (F,)
    assert shapes == want
    (x,) = inputs()
    out = coder(x)
    assert 0 < out.l0.item() < F  # the thresholds / top-k actually select
    torch.testing.assert_close(saelens_forward(tmp_path, x), out.reconstruction, atol=1e-5, rtol=0)


def test_saelens_export_of_a_run_and_errors(tmp_path: Path) -> None:
    coders = {"lm.blocks.0.hook_resid_post": make_coder("sae", "topk")}
    export_saelens(
        coders, tmp_path, hook_names={"lm.blocks.0.hook_resid_post": "blocks.0.hook_resid_post"}
    )
    cfg = json.loads((tmp_path / "lm.blocks.0.hook_resid_post" / "cfg.json").read_text())
    assert cfg["hook_name"] == "blocks.0.hook_resid_post"
    with pytest.raises(ValueError, match="pass hook_name"):
        export_saelens(make_coder("sae", "topk"), tmp_path / "x")
    with pytest.raises(ValueError, match="SAELens export is for SAEs"):
        export_saelens(make_coder("transcoder", "topk"), tmp_path / "y", hook_name="h")
    fresh = SparseCoder(SparseCoderConfig(d_in=D, num_latents=F, activation="batchtopk", k=2))
    with pytest.raises(ValueError, match="threshold not estimated"):
        export_saelens(fresh, tmp_path / "z", hook_name="h")


# ---------------------------------------------------------------------------- circuit-tracer


def read_yaml(path: Path) -> dict:
    yaml = pytest.importorskip("yaml")
    return yaml.safe_load(path.read_text())


@pytest.mark.parametrize("activation", ["jumprelu", "batchtopk"])
def test_circuit_tracer_clt_export(tmp_path: Path, activation: str) -> None:
    clt = make_clt(activation, n_layers=3, n_targets=2, skip=False)
    export_circuit_tracer(
        clt,
        tmp_path,
        feature_input_hook="hook_resid_mid",
        feature_output_hook="hook_mlp_out",
        extra_config={"model_name": 'odd: "name" # 1'},
    )
    assert read_yaml(tmp_path / "config.yaml") == {
        "model_kind": "cross_layer_transcoder",
        "feature_input_hook": "hook_resid_mid",
        "feature_output_hook": "hook_mlp_out",
        "model_name": 'odd: "name" # 1',
    }
    n_layers = 3
    enc, dec = [], []
    for layer in range(n_layers):
        e = load_file(str(tmp_path / f"W_enc_{layer}.safetensors"))
        assert {name: tuple(t.shape) for name, t in e.items()} == {
            f"W_enc_{layer}": (F, D),
            f"b_enc_{layer}": (F,),
            f"b_dec_{layer}": (D,),
            f"threshold_{layer}": (F,),
        }
        w_dec = load_file(str(tmp_path / f"W_dec_{layer}.safetensors"))[f"W_dec_{layer}"]
        assert w_dec.shape == (F, n_layers - layer, D)
        n_out = min(2, n_layers - layer)
        assert (w_dec[:, n_out:] == 0).all()  # beyond the window
        assert (w_dec[:, :n_out] != 0).any()
        enc.append(e)
        dec.append(w_dec)
    # circuit-tracer's CLT: f = x W_enc^T + b_enc, a = f * (f > threshold),
    # y_t = sum_{s <= t} a_s W_dec_s[:, t - s] + b_dec_t.
    xs = inputs(n_layers)
    acts = []
    for layer, x in enumerate(xs):
        f = x @ enc[layer][f"W_enc_{layer}"].T + enc[layer][f"b_enc_{layer}"]
        acts.append(f * (f > enc[layer][f"threshold_{layer}"]))
    out = clt(xs, [x * 0.1 for x in xs])
    for t in range(n_layers):
        y = enc[t][f"b_dec_{t}"]
        for s in range(t + 1):
            y = y + acts[s] @ dec[s][:, t - s]
        torch.testing.assert_close(y, out.reconstruction[t], atol=1e-5, rtol=0)
    assert all(0 < v < F for v in out.l0_per_layer.tolist())


def test_circuit_tracer_refuses_a_topk_clt_and_a_clt_with_a_skip(tmp_path: Path) -> None:
    """circuit-tracer 0.5.0's load_clt reads W_enc_{l}, b_enc_{l}, b_dec_{l}, threshold_{l} and
    W_dec_{l} from these files and builds its CLT with a skip only from other formats."""
    with pytest.raises(ValueError, match="reads no skip connection from a CLT folder"):
        export_circuit_tracer(make_clt("jumprelu"), tmp_path)
    with pytest.raises(ValueError, match="supports only ReLU and JumpReLU") as e:
        export_circuit_tracer(make_clt("topk", skip=False), tmp_path)
    assert "train it with --sae.activation jumprelu" in str(e.value)
    assert not tmp_path.joinpath("config.yaml").exists()


def run_metadata(layers: list[int], n_model_layers: int, name: str = "org/vlm") -> dict:
    """What `vlmscope train` records in cfg.metadata (see training/bundle.py)."""
    return {
        "vlmscope_bundle": {
            "reads": [f"lm.blocks.{i}.hook_resid_mid" for i in layers],
            "writes": [f"lm.blocks.{i}.mlp.hook_out" for i in layers],
            "model": {"name": name, "dims": {"n_layers": n_model_layers, "d_model": D}},
        }
    }


@pytest.mark.parametrize(("layers", "n_model"), [([1, 2, 3], 4), ([0, 1, 2], 4)])
def test_circuit_tracer_refuses_a_clt_on_some_of_the_layers(
    tmp_path: Path, layers: list[int], n_model: int
) -> None:
    """circuit-tracer numbers the model's layers 0..L-1: a subset would shift every index."""
    clt = make_clt("jumprelu", skip=False)
    clt.cfg.metadata = run_metadata(layers, n_model)
    with pytest.raises(
        ValueError, match=rf"0\.\.L-1 of the {n_model}-layer model.*{re.escape(str(layers))}"
    ):
        export_circuit_tracer(clt, tmp_path)
    clt.cfg.metadata = run_metadata([0, 1, 2], 3)
    export_circuit_tracer(clt, tmp_path)  # every layer of a 3-layer model
    assert (tmp_path / "W_enc_2.safetensors").is_file()


def test_circuit_tracer_takes_a_transcoder_run_keyed_by_hook_name(tmp_path: Path) -> None:
    coders = [make_coder("transcoder", "jumprelu", seed=s) for s in range(3)]
    for c in coders:
        c.cfg.metadata = run_metadata([0, 1, 2], 3)
    by_hook = {f"lm.blocks.{i}.hook_resid_mid": coders[i] for i in (2, 0, 1)}  # any order
    export_circuit_tracer(by_hook, tmp_path / "hooks")
    export_circuit_tracer(dict(enumerate(coders)), tmp_path / "ints")
    for layer in range(3):
        a = load_file(str(tmp_path / "hooks" / f"layer_{layer}.safetensors"))
        b = load_file(str(tmp_path / "ints" / f"layer_{layer}.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for c in coders:  # now as if trained with --layers 1 2 on a 4-layer model
        c.cfg.metadata = run_metadata([1, 2], 4)
    subset = {f"lm.blocks.{i}.hook_resid_mid": coders[i] for i in (1, 2)}
    with pytest.raises(ValueError, match=r"0\.\.L-1 of the 4-layer model; .*\[1, 2\]"):
        export_circuit_tracer(subset, tmp_path / "subset")
    with pytest.raises(ValueError, match=r"0\.\.L-1 of the 4-layer model; .*\[1, 2\]"):
        export_circuit_tracer([coders[1], coders[2]], tmp_path / "list")  # a list of that run
    with pytest.raises(
        ValueError, match=r"read lm\.blocks\.<i>\.hook_resid_mid, got 'lm\.blocks\.0\.x'"
    ):
        export_circuit_tracer({"lm.blocks.0.x": coders[0]}, tmp_path / "bad")


def test_saelens_model_name_comes_from_the_training_run(tmp_path: Path) -> None:
    coder = make_coder("sae", "topk", metadata=run_metadata([0], 3, name="org/the-vlm"))
    export_saelens({"lm.blocks.0.hook_resid_post": coder}, tmp_path)
    cfg = json.loads((tmp_path / "lm.blocks.0.hook_resid_post" / "cfg.json").read_text())
    assert cfg["model_name"] == "org/the-vlm"
    export_saelens(coder, tmp_path / "named", hook_name="h", model_name="given")
    assert json.loads((tmp_path / "named" / "cfg.json").read_text())["model_name"] == "given"


def test_circuit_tracer_transcoder_set_export(tmp_path: Path) -> None:
    coders = [make_coder("transcoder", "jumprelu", skip_connection=True, seed=s) for s in range(3)]
    export_circuit_tracer(coders, tmp_path)
    cfg = read_yaml(tmp_path / "config.yaml")
    assert cfg["model_kind"] == "transcoder_set" and cfg["activation"] == "jumprelu"
    assert cfg["feature_input_hook"] == "hook_resid_mid"
    assert files_in(tmp_path) == ["config.yaml"] + [f"layer_{i}.safetensors" for i in range(3)]
    (x,) = inputs()
    y = x * 0.3
    for layer, coder in enumerate(coders):
        w = load_file(str(tmp_path / f"layer_{layer}.safetensors"))
        assert {n: tuple(t.shape) for n, t in w.items()} == {
            "W_enc": (F, D),
            "W_dec": (F, D),
            "b_enc": (F,),
            "b_dec": (D,),
            "W_skip": (D, D),
            "activation_function.threshold": (F,),
        }
        # circuit-tracer's SingleLayerTranscoder: skip applied as x @ W_skip.T.
        pre = x @ w["W_enc"].T + w["b_enc"]
        acts = pre * (pre > w["activation_function.threshold"])
        want = acts @ w["W_dec"] + w["b_dec"] + x @ w["W_skip"].T
        torch.testing.assert_close(coder(x, y).reconstruction, want, atol=1e-5, rtol=0)


def test_circuit_tracer_refuses_a_topk_transcoder_set(tmp_path: Path) -> None:
    """circuit-tracer 0.5.0 loads a transcoder file without a threshold as ReLU."""
    coders = {i: make_coder("transcoder", "topk", seed=i) for i in range(2)}
    with pytest.raises(ValueError, match="loads a transcoder without a threshold as ReLU"):
        export_circuit_tracer(coders, tmp_path / "ct")
    assert not (tmp_path / "ct").exists()


def test_circuit_tracer_transcoder_set_errors(tmp_path: Path) -> None:
    tc = make_coder("transcoder", "jumprelu")
    with pytest.raises(ValueError, match=r"every layer 0\.\.L-1"):
        export_circuit_tracer({0: tc, 2: tc}, tmp_path)
    with pytest.raises(TypeError, match="take transcoders"):
        export_circuit_tracer([make_coder("sae", "jumprelu")], tmp_path)
    with pytest.raises(ValueError, match="same sizes, activation"):
        export_circuit_tracer([tc, make_coder("transcoder", "topk")], tmp_path)


def _tensor_span(path: Path, name: str) -> tuple[int, int]:
    """Byte range of tensor `name`'s data in a safetensors file (from its header)."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    lo, hi = json.loads(raw[8 : 8 + n])[name]["data_offsets"]
    return 8 + n + lo, 8 + n + hi


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x40
    path.write_bytes(bytes(data))


def test_flipped_tensor_bytes_fail_their_checksum(tmp_path: Path) -> None:
    """A flipped bit in a tensor's data (a plausible value, no NaN) is refused on load, and
    the error names the file and the tensor."""
    clt = make_clt("jumprelu")
    clt.save(tmp_path / "clt")
    coder = make_coder("transcoder", "topk")
    save_dictionaries({"h": coder}, tmp_path / "run")
    file = tmp_path / "clt" / "layer_1.safetensors"
    lo, hi = _tensor_span(file, "W_dec")
    _flip(file, (lo + hi) // 2)
    with pytest.raises(
        DictionaryFormatError, match=r"layer_1\.safetensors: tensor 'W_dec'.*checksum"
    ):
        load_dictionaries(tmp_path / "clt")
    sub = tmp_path / "run" / "h" / "sae.safetensors"
    _flip(sub, _tensor_span(sub, "W_enc")[0])
    with pytest.raises(
        DictionaryFormatError, match=r"h/sae\.safetensors: tensor 'W_enc'.*checksum"
    ):
        load_dictionaries(tmp_path / "run")


def test_memory_mapped_blocks_are_verified_on_first_read(tmp_path: Path) -> None:
    """With mmap, nothing is read at load; each block is checked when first asked for, so a
    corrupt block fails then (naming file and tensor) and intact ones pass."""
    from vlmscope.dictionaries.io import load_clt

    clt = make_clt("jumprelu")
    clt.save(tmp_path / "clt")
    file = tmp_path / "clt" / "layer_2.safetensors"
    lo, _ = _tensor_span(file, "W_enc")
    _flip(file, lo + 3)
    mapped = load_clt(tmp_path / "clt", mmap=True)  # nothing checked yet
    checks = mapped.tensor_checks  # type: ignore[attr-defined]
    checks.check("layers.0.W_dec", torch.tensor([1, 5]))
    checks.check("layers.2.W_dec")
    with pytest.raises(DictionaryFormatError, match=r"layer_2\.safetensors: tensor 'W_enc'"):
        checks.check("layers.2.W_enc", torch.tensor([0]))
    # The mapped weights are the saved ones (where intact).
    torch.testing.assert_close(mapped.layers[0].W_dec, clt.layers[0].W_dec, rtol=0, atol=0)


def test_nan_weights_are_refused_on_load_naming_the_tensor(tmp_path: Path) -> None:
    """NaN written at save time (a diverged run) has a valid checksum: the NaN check names it,
    eagerly and when a mapped block is first read."""
    from vlmscope.dictionaries.io import load_clt

    clt = make_clt("jumprelu")
    with torch.no_grad():
        clt.layers[1].W_dec[3, 0, 2] = float("nan")
    clt.save(tmp_path / "clt")
    with pytest.raises(
        DictionaryFormatError, match=r"layer_1\.safetensors: tensor 'W_dec' holds 1 NaN"
    ):
        load_dictionaries(tmp_path / "clt")
    mapped = load_clt(tmp_path / "clt", mmap=True)
    with pytest.raises(DictionaryFormatError, match=r"tensor 'W_dec' holds 1 NaN"):
        mapped.tensor_checks.check("layers.1.W_dec", torch.tensor([3]))  # type: ignore[attr-defined]


def test_folders_written_without_checksums_still_load(tmp_path: Path) -> None:
    clt = make_clt("jumprelu")
    clt.save(tmp_path / "clt")
    cfg = tmp_path / "clt" / "config.json"
    header = json.loads(cfg.read_text())
    del header["checksums"]
    cfg.write_text(json.dumps(header))
    loaded = load_dictionaries(tmp_path / "clt")
    assert isinstance(loaded, CrossLayerTranscoder)
    torch.testing.assert_close(loaded.layers[2].W_enc, clt.layers[2].W_enc, rtol=0, atol=0)


def _rss_file() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssFile:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no RssFile")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads Linux's RssFile")
def test_verifying_a_mapped_block_does_not_map_it_into_the_process(tmp_path: Path) -> None:
    """A block is verified whole but the reader wants a few rows: checking must read the file
    (the page cache), not the mapping, or every verified block stays in the process's memory
    (a CLT's whole decoder during attribution). Measured: the process's file-backed RSS."""
    from vlmscope.dictionaries.io import (
        _map_safetensors,
        _register_checks,
        _write_safetensors,
    )

    t = torch.randn(4096, 4096)  # 64 MiB: four checksum blocks
    path = tmp_path / "w.safetensors"
    record = _write_safetensors(path, {"w": t})
    checks = _register_checks(path, _map_safetensors(path), record)
    before = _rss_file()
    checks.check("w")  # all four blocks: CRC-32 and finite
    assert _rss_file() - before < 8 << 20
    entry = checks.entries["w"]
    assert entry.verified == {0, 1, 2, 3}
    # Rows read from the file (all of a row, or one index along dim 1) map nothing.
    idx = torch.tensor([4000, 5, 17])
    rows = checks.read_rows("w", idx)
    assert rows is not None and torch.equal(rows, t[idx])
    one = checks.read_rows("w", idx, 7)
    assert one is not None and torch.equal(one, t[idx, 7])
    assert _rss_file() - before < 8 << 20
    assert checks.read_rows("not mapped", idx) is None
