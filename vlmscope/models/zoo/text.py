"""Tiny text-only decoders: Llama 3, Qwen2, Qwen3 and Gemma 2, each with its family's tokens.

The "processor" of a text-only entry is its tokenizer. Every model keeps the traits that make the
family different for an adapter: Llama's BOS and untied head, Qwen2's q/k/v biases, Qwen3's
per-head q_norm/k_norm and tied head, Gemma 2's four norms per layer, embedding scaling,
soft-capping and sliding-window layers interleaved with global ones.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from vlmscope.models.zoo import register
from vlmscope.models.zoo.common import CHATML_TEXT, train_tokenizer
from vlmscope.models.zoo.llava import tiny_llama_text_config

# Llama 3 style turns. Like the real template it starts with the BOS text, so that
# `apply_chat_template(tokenize=True)` (which adds no special tokens) yields exactly one BOS;
# rendering to a string and then calling the tokenizer adds a second one, as with the real model.
LLAMA3_TEXT = (
    "{{ bos_token }}{% for message in messages %}"
    "<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}{% if part['type'] == 'text' %}"
    "{{ part['text'] }}{% endif %}{% endfor %}{% endif %}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
# Gemma turns, starting with the BOS text like the real template. Written out rather than built
# from common.gemma_template(): there the newline after the role follows `{% endif %}`, and the
# chat-template renderer (trim_blocks=True) drops it, giving "<start_of_turn>userhi".
GEMMA_TEXT = (
    "{{ bos_token }}{% for message in messages %}<start_of_turn>"
    "{{ 'model' if message['role'] == 'assistant' else message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}{% if part['type'] == 'text' %}"
    "{{ part['text'] }}{% endif %}{% endfor %}{% endif %}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)

QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def perturb_constant_params(model: nn.Module, std: float = 0.2) -> nn.Module:
    """Add Gaussian noise to every parameter that init left constant (norm weights, biases).

    A fresh model has all-ones (Gemma: all-zeros) norm weights and all-zero biases, so an adapter
    that forgot a norm's weight or a projection's bias would still match the reference exactly.
    Perturbing them makes such mistakes show up in logit comparisons, as they would on a trained
    checkpoint. Uses the global torch RNG, so the result is fixed by the zoo's seed.
    """
    with torch.no_grad():
        for p in model.parameters():
            if p.numel() > 1 and bool((p == p.flatten()[0]).all()):
                p.add_(torch.randn_like(p) * std)
    return model


def _ids(tok: PreTrainedTokenizerFast) -> dict[str, Any]:
    """The special-token ids a text config must agree on with its tokenizer."""
    return dict(
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id
    )


@register(
    "llama", description="Llama 3 (GQA, llama3 RoPE scaling, BOS, untied head)", multimodal=False
)
def build_llama() -> tuple[Any, Any]:
    """Llama 3: BOS-prefixed, header-token chat turns, llama3-scaled RoPE exercising all 3 bands."""
    tok = train_tokenizer(
        [
            "<|start_header_id|>",
            "<|end_header_id|>",
            "<|eot_id|>",
            "<|end_of_text|>",
        ],
        bos="<|begin_of_text|>",
        eos="<|eot_id|>",
        pad="<|finetune_right_pad_id|>",
        unk=None,
        chat_template=LLAMA3_TEXT,
    )
    config = tiny_llama_text_config(
        len(tok),
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
        **_ids(tok),
    )
    return perturb_constant_params(LlamaForCausalLM(config)), tok


def _qwen_tokenizer(extra: list[str] | None = None) -> PreTrainedTokenizerFast:
    """Qwen-style tokenizer: no BOS, no UNK, ChatML markers, `<|endoftext|>` as padding."""
    return train_tokenizer(
        QWEN_SPECIALS + (extra or []),
        bos=None,
        eos="<|im_end|>",
        pad="<|endoftext|>",
        unk=None,
        add_bos=False,
        chat_template=CHATML_TEXT,
    )


def tiny_qwen2_text_config(vocab_size: int, **overrides: Any) -> Qwen2Config:
    """A 3-layer Qwen2 decoder with GQA (q/k/v biases are built in); O(1) activations."""
    kw: dict[str, Any] = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        initializer_range=0.2,
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        tie_word_embeddings=False,
    )
    kw.update(overrides)
    return Qwen2Config(**kw)


@register("qwen2", description="Qwen2 (GQA, q/k/v bias, no BOS, ChatML)", multimodal=False)
def build_qwen2() -> tuple[Any, Any]:
    """Qwen2: the only text family here with q/k/v biases; no BOS token at all."""
    tok = _qwen_tokenizer()
    config = tiny_qwen2_text_config(len(tok), **_ids(tok))
    return perturb_constant_params(Qwen2ForCausalLM(config)), tok


@register(
    "qwen3", description="Qwen3 (GQA, per-head q_norm/k_norm, tied head, ChatML)", multimodal=False
)
def build_qwen3() -> tuple[Any, Any]:
    """Qwen3: RMS-normed queries and keys per head before RoPE, and a tied lm_head."""
    tok = _qwen_tokenizer(["<think>", "</think>"])
    # head_dim * heads != hidden_size, as in the real Qwen3 (e.g. 0.6B: 16 x 128 vs 1024).
    config = Qwen3Config(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=512,
        initializer_range=0.2,
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        tie_word_embeddings=True,
        **_ids(tok),
    )
    return perturb_constant_params(Qwen3ForCausalLM(config)), tok


@register(
    "gemma2",
    description="Gemma 2 (4 norms/layer, soft-capping, sliding window 8 on even layers)",
    multimodal=False,
)
def build_gemma2() -> tuple[Any, Any]:
    """Gemma 2: the family whose residual stream, scaling and masks differ most from Llama."""
    tok = train_tokenizer(
        ["<start_of_turn>", "<end_of_turn>"],
        bos="<bos>",
        eos="<eos>",
        pad="<pad>",
        unk="<unk>",
        chat_template=GEMMA_TEXT,
    )
    # heads * head_dim (128) != hidden (64) and query_pre_attn_scalar (16) != head_dim (32), as in
    # Gemma 2 27B, so an adapter that assumes either identity is caught. sliding_window=8 makes
    # layers 0 and 2 (config.layer_types) local on ~20-token prompts; layer 1 stays global.
    config = Gemma2Config(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        query_pre_attn_scalar=16,
        max_position_embeddings=512,
        initializer_range=0.2,
        rms_norm_eps=1e-6,
        sliding_window=8,
        attn_logit_softcapping=50.0,
        final_logit_softcapping=30.0,
        tie_word_embeddings=True,
        **_ids(tok),
    )
    return perturb_constant_params(Gemma2ForCausalLM(config)), tok
