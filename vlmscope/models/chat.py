"""Tokenizer rules shared by HookedVLM.prepare and the data pipeline.

Templates that write their own BOS (Llama 3, Gemma) would get a second one if the rendered text
were tokenized with the tokenizer's defaults; both use one rule so that they give exactly the
ids transformers' apply_chat_template(tokenize=True) gives.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def add_special_tokens_for_rendered(processor: Any, rendered: Sequence[str]) -> bool:
    """Whether the tokenizer may add its special tokens (BOS) to chat-template output.

    Same rule as transformers: a tokenizer's apply_chat_template never adds them (the template
    writes its own); a processor's adds them unless the rendered prompt already starts with BOS,
    so a template without BOS (LLaVA's `USER: ...`, the shipped toy model) keeps the BOS the
    model was trained with.
    """
    tok = getattr(processor, "tokenizer", processor)
    if processor is tok:
        return False
    bos = getattr(tok, "bos_token", None)
    return not (bos is not None and bool(rendered) and all(t.startswith(bos) for t in rendered))


def tokenizer_special_ids(tokenizer: Any) -> set[int]:
    """BOS/EOS/pad and every added token marked special (chat-template and image markers)."""
    if tokenizer is None:
        return set()
    ids = {int(i) for i in getattr(tokenizer, "all_special_ids", []) or []}
    for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items():
        if getattr(t, "special", False):
            ids.add(int(i))
    return ids
