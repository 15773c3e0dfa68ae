"""SAELens exports carry TransformerLens hook names and a hub id where TransformerLens has the
family, keep vlmscope's names in their metadata, and say so where it does not."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest

from tests.dictionaries.test_io import make_coder, saelens_forward
from vlmscope.dictionaries import export_saelens
from vlmscope.dictionaries.transformer_lens import tl_hook_name

#: TransformerLens's own hook names of a block (HookedTransformer, TransformerBlock/Attention).
TL_BLOCK_HOOKS = {"hook_resid_pre", "hook_resid_mid", "hook_resid_post", "hook_attn_out",
                  "hook_mlp_out", "attn.hook_z"}  # fmt: skip


def run_sae(family: str, model: str, hook: str) -> object:
    coder = make_coder("sae", "topk")
    coder.cfg.metadata = {"vlmscope_bundle": {"reads": [hook], "writes": [hook],
                          "model": {"name": model, "family": family}}}  # fmt: skip
    return coder


def test_supported_family_gets_transformer_lens_names(tmp_path: Path) -> None:
    hook = "lm.blocks.1.hook_resid_post"
    coder = run_sae("llama", "meta-llama/Llama-3.2-1B", hook)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        export_saelens(coder, tmp_path, hook_name=hook)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    meta = cfg["metadata"]
    assert (meta["hook_name"], meta["model_name"]) == (
        "blocks.1.hook_resid_post",
        "meta-llama/Llama-3.2-1B",
    )
    assert (cfg["hook_name"], cfg["model_name"]) == (meta["hook_name"], meta["model_name"])
    assert (meta["vlmscope_hook_name"], meta["vlmscope_model_name"]) == (
        hook,
        "meta-llama/Llama-3.2-1B",
    )
    assert meta["transformer_lens"] is True and "transformer_lens_note" not in meta
    # The weights are unchanged by the renaming: SAELens' formulas still reproduce the module.
    from tests.dictionaries.test_io import inputs

    (x,) = inputs()
    import torch

    torch.testing.assert_close(
        saelens_forward(tmp_path, x), coder(x).reconstruction, atol=1e-5, rtol=0
    )


def test_vlm_family_says_transformer_lens_cannot_hook_it(tmp_path: Path) -> None:
    hook = "lm.blocks.1.hook_resid_post"
    with pytest.warns(UserWarning, match="TransformerLens has no llava models"):
        export_saelens(run_sae("llava", "llava-hf/llava-1.5-7b-hf", hook), tmp_path, hook_name=hook)
    meta = json.loads((tmp_path / "cfg.json").read_text())["metadata"]
    assert meta["hook_name"] == hook and meta["model_name"] == "llava-hf/llava-1.5-7b-hf"
    assert (
        meta["transformer_lens"] is False
        and "HookedSAETransformer" in meta["transformer_lens_note"]
    )


def test_local_model_needs_a_hub_id(tmp_path: Path) -> None:
    hook = "lm.blocks.0.attn.hook_z"
    with pytest.warns(UserWarning, match="not a Hugging Face id"):
        export_saelens(run_sae("qwen2", str(tmp_path), hook), tmp_path / "a", hook_name=hook)
    cfg = json.loads((tmp_path / "a" / "cfg.json").read_text())
    assert cfg["metadata"]["hook_name"] == "blocks.0.attn.hook_z"
    assert cfg["reshape_activations"] == "hook_z"
    export_saelens(run_sae("qwen2", str(tmp_path), hook), tmp_path / "b", hook_name=hook,
                   model_name="Qwen/Qwen2-0.5B")  # fmt: skip
    meta = json.loads((tmp_path / "b" / "cfg.json").read_text())["metadata"]
    assert meta["model_name"] == "Qwen/Qwen2-0.5B" and meta["transformer_lens"] is True


def test_hook_name_table() -> None:
    for ours, theirs in [("lm.blocks.3.hook_resid_pre", "blocks.3.hook_resid_pre"),
                         ("lm.blocks.3.hook_resid_mid", "blocks.3.hook_resid_mid"),
                         ("lm.blocks.3.hook_resid_post", "blocks.3.hook_resid_post"),
                         ("lm.blocks.3.attn.hook_z", "blocks.3.attn.hook_z"),
                         ("lm.blocks.3.attn.hook_out", "blocks.3.hook_attn_out"),
                         ("lm.blocks.3.mlp.hook_out", "blocks.3.hook_mlp_out")]:  # fmt: skip
        assert tl_hook_name(ours) == theirs
        assert theirs.split(".", 2)[2] in TL_BLOCK_HOOKS
    unmapped = ["lm.blocks.3.attn.hook_q", "lm.blocks.3.mlp.hook_in",
                "lm.blocks.3.attn.hook_pattern", "vision.blocks.0.hook_resid_post"]  # fmt: skip
    for unmapped_hook in unmapped:
        assert tl_hook_name(unmapped_hook) is None


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "gemma2"])
def test_prepend_bos_follows_the_family_tokenizer(tmp_path: Path, family: str) -> None:
    """SAELens tokenizes with the config's prepend_bos: it must match what the family's
    tokenizer did to the text the SAE was trained on (the zoo's tokenizers are the truth)."""
    from vlmscope.models import zoo

    _, tok = zoo.build(family)
    ids = tok("a b c")["input_ids"]
    adds_bos = tok.bos_token_id is not None and ids[0] == tok.bos_token_id
    hook = "lm.blocks.1.hook_resid_post"
    export_saelens(run_sae(family, "org/model", hook), tmp_path, hook_name=hook)
    meta = json.loads((tmp_path / "cfg.json").read_text())["metadata"]
    assert meta["prepend_bos"] is adds_bos
