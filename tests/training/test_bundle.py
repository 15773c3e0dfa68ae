"""DictionaryBundle.check_model: dictionaries for another model are refused by their weights."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from vlmscope.dictionaries import SparseCoderConfig
from vlmscope.models.hooked import HookedVLM
from vlmscope.training.bundle import DictionaryBundle, ModelMismatchError, mlp_out, resid_mid


def test_widths_are_checked_even_without_recorded_dims(zoo_path: Any) -> None:
    vlm = HookedVLM.from_pretrained(zoo_path("llava"), device="cpu", dtype=torch.float32)
    d = vlm.adapter.d_model
    reads = [resid_mid(i) for i in range(vlm.adapter.n_layers)]
    writes = [mlp_out(i) for i in range(vlm.adapter.n_layers)]
    cfg = SparseCoderConfig(kind="clt", expansion_factor=2, k=4)
    fits = DictionaryBundle.create(cfg, reads, writes, d, d, {"name": "hand-made"})
    fits.check_model(vlm.adapter)  # no metadata about the model, right widths: accepted
    narrow = DictionaryBundle.create(cfg, reads, writes, d // 2, d, {"name": "hand-made"})
    with pytest.raises(ModelMismatchError, match=rf"reads width {d // 2}, model {d}"):
        narrow.check_model(vlm.adapter)
    head = "lm.blocks.0.attn.hook_k"
    kv = vlm.adapter.n_kv_heads * vlm.adapter.d_head
    sae = SparseCoderConfig(kind="sae", expansion_factor=2, k=4)
    wrong = DictionaryBundle.create(sae, [head], [head], d, d, {"name": "hand-made"})
    assert kv != d  # the zoo LLaVA has grouped-query attention
    with pytest.raises(ModelMismatchError, match=rf"{head}: dictionaries reads width {d}"):
        wrong.check_model(vlm.adapter)
    DictionaryBundle.create(sae, [head], [head], kv, kv, {"name": "x"}).check_model(vlm.adapter)
