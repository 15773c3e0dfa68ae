"""Shared pieces of the offline zoo: an in-memory trained tokenizer, chat templates, tiny images.

Everything here is built locally, so no zoo model ever touches the network.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from typing import Any

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoProcessor, PreTrainedTokenizerFast

COLOURS = ("red", "green", "blue", "yellow", "purple", "orange", "white", "black")
SHAPES = ("circle", "square", "triangle", "star", "cross", "diamond")
NUMBERS = ("zero", "one", "two", "three", "four", "five", "six")
_FILLER = (
    "what colour is the {s}",
    "how many {s}s are there",
    "is there a {c} {s} in the image",
    "the {c} {s} is left of the {c2} {s2}",
    "describe the picture",
    "there are {n} {s}s and one {c} {s2}",
    "answer with one word",
    "the image shows a {c} {s} on a grid",
    "which shape is {c}",
    "a small {c} {s} above a large {c2} {s2}",
)


def corpus(n: int = 400, seed: int = 0) -> list[str]:
    """English-like sentences about coloured shapes: enough to train a small BPE vocabulary."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        t = rng.choice(_FILLER)
        out.append(
            t.format(
                c=rng.choice(COLOURS),
                c2=rng.choice(COLOURS),
                s=rng.choice(SHAPES),
                s2=rng.choice(SHAPES),
                n=rng.choice(NUMBERS),
            )
        )
    out.extend(["user", "assistant", "system", "USER:", "ASSISTANT:", "question:", "answer:"] * 5)
    return out


def train_tokenizer(
    special_tokens: Sequence[str],
    *,
    bos: str | None = "<s>",
    eos: str = "</s>",
    pad: str = "<pad>",
    unk: str | None = "<unk>",
    add_bos: bool = True,
    named_tokens: dict[str, str] | None = None,
    vocab_size: int = 512,
    chat_template: str | None = None,
    texts: Iterable[str] | None = None,
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer in memory and wrap it as a transformers fast tokenizer.

    `special_tokens` are added as unsplittable special tokens (image placeholders, chat-template
    markers); `named_tokens` exposes some of them as attributes (`image_token`, `boi_token`, ...)
    the way hub tokenizers do. Byte-level BPE means any text encodes, no unknown characters.
    """
    base = [t for t in (unk, bos, eos, pad) if t is not None]
    all_special = list(dict.fromkeys([*base, *special_tokens, *(named_tokens or {}).values()]))
    tok = Tokenizer(models.BPE(unk_token=unk))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=all_special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts) if texts is not None else corpus(), trainer)
    if add_bos and bos is not None:
        bos_id = tok.token_to_id(bos)
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)]
        )
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    extra = [t for t in all_special if t not in base]
    kwargs: dict[str, object] = {}
    if named_tokens:
        kwargs["extra_special_tokens"] = dict(named_tokens)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=bos,
        eos_token=eos,
        unk_token=unk,
        pad_token=pad,
        chat_template=chat_template,
        model_max_length=4096,
        **kwargs,
    )
    # Every marker must be an unsplittable special token, named or not.
    fast.add_special_tokens(
        {"additional_special_tokens": extra}, replace_extra_special_tokens=False
    )
    return fast


# Chat templates in the style of the real families, kept short. They receive `messages` whose
# content is either a string or a list of {"type": "text"|"image"} parts (and "video" parts
# where the family has a video path).

CHATML_VISION = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CHATML_TEXT = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}{% if part['type'] == 'text' %}"
    "{{ part['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
LLAVA_USER_ASSISTANT = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: {% else %}ASSISTANT: {% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image>\n{% elif part['type'] == 'text' %}{{ part['text'] }}"
    "{% endif %}{% endfor %}{% endif %}"
    "{% if message['role'] == 'user' %} {% else %}</s>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
GEMMA_TURNS = (
    "{% for message in messages %}<start_of_turn>"
    "{% if message['role'] == 'assistant' %}model{% else %}{{ message['role'] }}{% endif %}"
    "{{ '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{{ image_marker }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


def gemma_template(image_marker: str = "") -> str:
    """Gemma-style turn template; `image_marker` is what an image part becomes in the text."""
    return GEMMA_TURNS.replace("{{ image_marker }}", image_marker)


class ImageOnlyProcessorMixin:
    """Mixin that drops the video processor from a processor (InternVL, GLM-4V, ...; Qwen-VL's
    puts a stand-in back, `qwen2_vl.QwenVideoProcessorMixin`).

    Why: these processors require a video processor, and their video processors need
    torchvision, which this environment lacks; passing `video_processor=None` fails the
    processor's class check. `ProcessorMixin` derives a processor's parts from the `__init__`
    signature, so an `__init__` without `video_processor` makes the processor image+text only,
    both when built and in `from_pretrained`. Everything else is the real family class.
    """

    def __init__(
        self,
        image_processor: Any = None,
        tokenizer: Any = None,
        chat_template: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)  # type: ignore[call-arg]


def register_processor(cls: type) -> type:
    """Let `AutoProcessor` find `cls` by the class name saved in processor_config.json.

    The key is a private string, not the family config class, so loading real Qwen-VL checkpoints
    still gives the stock processor. It only works once this module has been imported: without
    it, `AutoProcessor.from_pretrained` silently returns the bare tokenizer instead.
    """
    AutoProcessor.register(f"vlmscope.zoo:{cls.__name__}", cls, exist_ok=True)
    return cls
