"""SAE adapters through peft's own API: the seed example, modes, adapters, files, bad input."""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import PeftModel, inject_adapter_in_model
from safetensors.torch import load_file
from torch import nn
from transformers.modeling_outputs import BaseModelOutput

from vlmscope.peft import (
    AdapterMismatchError,
    BatchTopKSaeConfig,
    JumpReLUSaeConfig,
    PeftSaeModel,
    SaeConfig,
    SaeLayer,
    TargetNotFoundError,
    TopKSaeConfig,
    collect_sae_outputs,
    get_peft_sae_model,
    sae_mask,
)

ROOT = Path(__file__).resolve().parents[2]


class Net(nn.Module):
    """Two Linears and a module that returns a tuple, and one that returns a ModelOutput."""

    def __init__(self, width: int = 10, out: int = 10) -> None:
        super().__init__()
        self.linear = nn.Linear(width, out)
        self.tupled = TupleBlock(out)
        self.dicted = OutputBlock(out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, _ = self.tupled(self.linear(x))
        return self.dicted(h).last_hidden_state


class TupleBlock(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.proj = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.proj(x), x.sum(-1)


class OutputBlock(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.proj = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> BaseModelOutput:
        return BaseModelOutput(last_hidden_state=self.proj(x), hidden_states=(x,))


def reconstruct(layer: SaeLayer, adapter: str, y: torch.Tensor) -> torch.Tensor:
    """TopK SAE reconstruction written out by hand from the adapter's tensors."""
    c = layer.sae_coders[adapter]
    pre = (y - c.b_dec) @ c.W_enc.T + c.b_enc
    top = pre.topk(c.cfg.k, dim=-1)
    codes = torch.zeros_like(pre).scatter(-1, top.indices, top.values.relu())
    return codes @ c.W_dec + c.b_dec


def seed_example() -> str:
    """The README's PEFT example (the seed's example with only its import line changed)."""
    text = (ROOT / "README.md").read_text()
    section = text.split("### Dictionaries on any module (PEFT adapters)", 1)[1]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


def test_the_seed_example_runs_with_only_its_import_changed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    code = seed_example()
    imports = [line for line in code.splitlines() if "import" in line]
    assert imports == [
        "import torch",
        "import torch.nn as nn",
        "from peft import inject_adapter_in_model",
        "from vlmscope.peft import TopKSaeConfig, get_peft_sae_model, PeftSaeModel",
    ]
    monkeypatch.chdir(tmp_path)
    before_save, after_save = code.split('peft_model.save_pretrained("test_save_peft_model")')
    ns: dict[str, Any] = {}
    exec(before_save, ns)
    assert ns["result"].shape == (1, 512, 10)
    saved_model = ns["peft_model"]
    saved_model.save_pretrained("test_save_peft_model")
    exec(after_save, ns)
    loaded = ns["peft_model"]
    assert isinstance(loaded, PeftSaeModel)
    a, b = saved_model.state_dict(), loaded.state_dict()
    adapter_keys = [k for k in a if ".sae_coders." in k]
    assert len(adapter_keys) == 7  # W_enc, b_enc, W_dec, b_dec, 2 scales, dead counter
    for k in adapter_keys:
        assert torch.equal(a[k], b[k]), k
    files = sorted(p.name for p in (tmp_path / "test_save_peft_model").iterdir())
    assert "adapter_config.json" in files and "adapter_model.safetensors" in files
    x = torch.randn(1, 512, 10)
    # The loaded base model is a fresh DummyModel: copy its Linear to compare whole outputs.
    loaded.get_base_model().linear.base_layer.load_state_dict(
        saved_model.get_base_model().linear.base_layer.state_dict()
    )
    assert torch.equal(saved_model(x), loaded(x))


def test_inject_adapter_in_model_replaces_the_output_with_the_reconstruction() -> None:
    torch.manual_seed(0)
    net = Net()
    x = torch.randn(2, 7, 10)
    y = net.linear(x)
    model = inject_adapter_in_model(
        TopKSaeConfig(k=3, num_latents=16, target_modules=["linear"]), net
    )
    layer = model.linear
    assert isinstance(layer, SaeLayer)
    torch.testing.assert_close(layer(x), reconstruct(layer, "default", y), atol=1e-5, rtol=0)


def test_observe_mode_passes_the_output_through_and_records_the_loss() -> None:
    torch.manual_seed(0)
    net = Net()
    x = torch.randn(2, 7, 10)
    clean = net(x)
    cfg = SaeConfig(k=3, num_latents=16, target_modules=["linear"], mode="observe")
    model = get_peft_sae_model(net, cfg)
    model.train()
    out = model(x)
    assert torch.equal(out, clean)
    loss = model.sae_loss()
    assert loss is not None and loss.requires_grad
    metrics = model.last_sae_outputs.metrics["linear/default"]
    assert metrics["rows"] == 14 and metrics["l0"] == 3


def test_tuple_and_model_output_modules_keep_their_structure() -> None:
    torch.manual_seed(0)
    net = Net()
    x = torch.randn(3, 10)
    h = net.linear(x)
    cfg = TopKSaeConfig(k=2, num_latents=8, target_modules=r"tupled|dicted")
    model = inject_adapter_in_model(cfg, net)
    first, second = model.tupled(h)
    assert torch.equal(second, h.sum(-1))
    base_first = model.tupled.base_layer.proj(h)
    torch.testing.assert_close(first, reconstruct(model.tupled, "default", base_first))
    out = model.dicted(h)
    assert isinstance(out, BaseModelOutput) and out.hidden_states[0] is h
    base = model.dicted.base_layer.proj(h)
    torch.testing.assert_close(out.last_hidden_state, reconstruct(model.dicted, "default", base))


def test_disable_adapter_gives_the_base_model_back() -> None:
    torch.manual_seed(0)
    net = Net()
    x = torch.randn(4, 10)
    clean = net(x)
    model = get_peft_sae_model(net, TopKSaeConfig(k=2, num_latents=8, target_modules=["linear"]))
    replaced = model(x)
    assert not torch.allclose(replaced, clean)
    with model.disable_adapter():
        assert torch.equal(model(x), clean)
    assert torch.equal(model(x), replaced)


def test_unload_puts_every_module_back_even_those_without_a_weight() -> None:
    """`tupled` and `dicted` are blocks (no `weight` of their own), like the MLPs and decoder
    layers adapters usually sit on; `linear` is a Linear."""
    torch.manual_seed(0)
    net = Net()
    x = torch.randn(4, 10)
    clean = net(x)
    modules = {name: getattr(net, name) for name in ("linear", "tupled", "dicted")}
    config = TopKSaeConfig(k=2, num_latents=8, target_modules=list(modules))
    model = get_peft_sae_model(net, config)
    assert not torch.allclose(model(x), clean)
    base = model.unload()
    assert all(getattr(base, name) is module for name, module in modules.items())
    assert not any(isinstance(m, SaeLayer) for m in base.modules())
    for m in modules.values():  # the adapters' hook and back-reference went with them
        assert "_sae_owner" not in m.__dict__ and not m._forward_hooks
    assert torch.equal(base(x), clean)


def test_only_adapter_tensors_are_trainable_and_a_step_leaves_the_model_alone() -> None:
    torch.manual_seed(0)
    net = Net()
    base = {k: v.clone() for k, v in net.state_dict().items()}
    model = get_peft_sae_model(net, SaeConfig(k=2, num_latents=8, target_modules=["linear"]))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {
        f"base_model.model.linear.sae_coders.default.{t}"
        for t in ("W_enc", "b_enc", "W_dec", "b_dec")
    }
    model.train()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(torch.randn(8, 10))
    loss = model.sae_loss()
    assert loss is not None
    loss.backward()
    opt.step()
    now = model.get_base_model().state_dict()
    for k, v in base.items():
        key = k.replace("linear.", "linear.base_layer.", 1) if k.startswith("linear.") else k
        assert torch.equal(now[key], v), k


def test_several_named_adapters_switch_save_and_load(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = Net()
    x = torch.randn(5, 10)
    y = net.linear(x)
    model = get_peft_sae_model(net, TopKSaeConfig(k=2, num_latents=8, target_modules=["linear"]))
    model.add_adapter("wide", TopKSaeConfig(k=4, num_latents=32, target_modules=["linear"]))
    layer = model.get_base_model().linear
    assert sorted(layer.sae_coders) == ["default", "wide"]
    model.set_adapter("wide")
    torch.testing.assert_close(layer(x), reconstruct(layer, "wide", y))
    model.set_adapter("default")
    torch.testing.assert_close(layer(x), reconstruct(layer, "default", y))
    # Only the active adapter trains.
    assert layer.sae_coders["default"].W_enc.requires_grad
    assert not layer.sae_coders["wide"].W_enc.requires_grad

    model.save_pretrained(tmp_path / "ad")
    wide_file = load_file(str(tmp_path / "ad" / "wide" / "adapter_model.safetensors"))
    assert wide_file["base_model.model.linear.sae_coders.W_enc"].shape == (32, 10)

    loaded = PeftSaeModel.from_pretrained(Net(), tmp_path / "ad")
    loaded.load_adapter(tmp_path / "ad" / "wide", adapter_name="wide")
    lay2 = loaded.get_base_model().linear
    for name in ("default", "wide"):
        for k, v in layer.sae_coders[name].state_dict().items():
            assert torch.equal(lay2.sae_coders[name].state_dict()[k], v), (name, k)
    loaded.delete_adapter("wide")
    assert list(lay2.sae_coders) == ["default"]


def test_peft_from_pretrained_reads_the_adapter_as_an_sae_config(tmp_path: Path) -> None:
    model = get_peft_sae_model(
        Net(), BatchTopKSaeConfig(k=2, num_latents=8, target_modules=["linear"])
    )
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "VLMSCOPE_SAE" and saved["activation"] == "batchtopk"
    plain = PeftModel.from_pretrained(Net(), tmp_path)  # peft's own loader
    cfg = plain.peft_config["default"]
    assert isinstance(cfg, SaeConfig) and cfg.activation == "batchtopk" and cfg.num_latents == 8


def test_batchtopk_and_jumprelu_adapters_train() -> None:
    torch.manual_seed(0)
    for cfg in (
        BatchTopKSaeConfig(k=2, num_latents=8, target_modules=["linear"]),
        JumpReLUSaeConfig(num_latents=8, target_modules=["linear"]),
    ):
        model = get_peft_sae_model(Net(), cfg)
        model.train()
        model(torch.randn(16, 10))
        loss = model.sae_loss()
        assert loss is not None and torch.isfinite(loss)
        loss.backward()
        coder = model.get_base_model().linear.sae_coders["default"]
        assert coder.W_enc.grad is not None
        if cfg.activation == "batchtopk":
            assert int(coder.activation.num_updates) == 1  # threshold estimated while training


def test_sae_mask_selects_the_rows_that_are_read_and_replaced() -> None:
    torch.manual_seed(0)
    net = Net()
    x = torch.randn(2, 6, 10)
    y = net.linear(x)
    model = inject_adapter_in_model(
        TopKSaeConfig(k=2, num_latents=8, target_modules=["linear"]), net
    )
    mask = torch.zeros(2, 6, dtype=torch.bool)
    mask[0, 1:4] = True
    mask[1, 5] = True
    with sae_mask(mask):
        out = model.linear(x)
    assert torch.equal(out[~mask], y[~mask].detach())
    torch.testing.assert_close(out[mask], reconstruct(model.linear, "default", y[mask]))
    assert collect_sae_outputs(model).metrics["linear/default"]["rows"] == 4
    with sae_mask({"dicted": torch.ones(9, dtype=torch.bool)}):  # other modules: all rows
        model.linear(x)
    with sae_mask(torch.ones(2, 5, dtype=torch.bool)), pytest.raises(ValueError) as e:
        model.linear(x)
    assert "linear" in str(e.value) and "(2, 6, 10)" in str(e.value) and "[2, 6]" in str(e.value)


def test_target_modules_that_match_nothing_list_the_closest_names() -> None:
    with pytest.raises(TargetNotFoundError) as e:
        inject_adapter_in_model(TopKSaeConfig(k=1, num_latents=4, target_modules=["linaer"]), Net())
    assert "linaer" in str(e.value) and "linear" in str(e.value)
    with pytest.raises(TargetNotFoundError) as e:
        inject_adapter_in_model(
            TopKSaeConfig(k=1, num_latents=4, target_modules=r"tupled\.prj"), Net()
        )
    assert "tupled.proj" in str(e.value)


def test_an_adapter_loaded_onto_another_model_names_the_module_and_shapes(tmp_path: Path) -> None:
    get_peft_sae_model(
        Net(), TopKSaeConfig(k=1, num_latents=4, target_modules=["linear"])
    ).save_pretrained(tmp_path)
    with pytest.raises(AdapterMismatchError) as e:
        PeftSaeModel.from_pretrained(Net(width=10, out=12), tmp_path)
    message = str(e.value)
    assert "'linear'" in message and "[4, 10]" in message and "[4, 12]" in message
    assert "\n" not in message


def test_bad_configs_fail_when_built() -> None:
    with pytest.raises(ValueError, match="mode"):
        SaeConfig(mode="swap", target_modules=["linear"])
    with pytest.raises(ValueError, match="k=9 exceeds num_latents=4"):
        TopKSaeConfig(k=9, num_latents=4, target_modules=["linear"])
    with pytest.raises(ValueError, match="cross-layer"):
        SaeConfig(kind="clt", target_modules=["linear"])


def test_the_core_package_never_imports_peft_at_import_time() -> None:
    """Every module outside vlmscope/peft imports peft (or vlmscope.peft) inside functions
    at most, so `import vlmscope...` works without loading peft. The one exception is the
    `vlmscope peft` command's flags (vlmscope.peft.cli), which, like the package's lazy
    __init__, import nothing of peft at module level."""
    offenders = []
    light = {ROOT / "vlmscope" / "peft" / "cli.py", ROOT / "vlmscope" / "peft" / "__init__.py"}
    for path in (ROOT / "vlmscope").rglob("*.py"):
        if "peft" in path.relative_to(ROOT / "vlmscope").parts[:1] and path not in light:
            continue
        text = path.read_text()
        if "peft" not in text:
            continue
        tree = ast.parse(text)
        for node in tree.body:
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            names = [n for n in names if n != "vlmscope.peft.cli"]
            if any(re.match(r"(vlmscope\.)?peft(\.|$)", n) for n in names):
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert offenders == []
