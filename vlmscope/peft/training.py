"""Training SAE adapters with Hugging Face's `Trainer`: data, masks, decoder norms, settings.

    data = SaeTrainingData(vlm, dataset, tokens="image")        # records -> encoded samples
    trainer = transformers.Trainer(
        model=peft_model,                                       # a PeftSaeModel on vlm.model
        args=sae_training_arguments("out", max_steps=300, num_latents=4096, batch_size=8),
        train_dataset=data, data_collator=data.collator, callbacks=[SaeCallback()],
    )
    trainer.train()

Records are encoded with the model's own processor and chat template, exactly as
`vlmscope train` encodes them, and each batch carries `sae_mask`: language-model modules read
the tokens `tokens` selects (padding never, BOS and chat-template markers only if asked),
other modules read every row. The loss is the sum of the adapters' losses (FVU + AuxK +
sparsity penalty); `SaeCallback` keeps SAE decoder rows at unit norm as `vlmscope train`
does (gradient component along each row removed before the step, rows renormalised after).
`sae_training_arguments` sets the optimiser and schedule of `vlmscope train --optimizer adam`
(Adam without weight decay or clipping, linear warm-up over 5%, linear decay over the last
20%, and its default rate for the dictionary's kind and normalisation: 2e-4 / sqrt(num_latents
/ 2**14), from 2e-3 for transcoders on mean_norm activations), so the two train the same way.
(`vlmscope train` itself trains SAEs with sign-SGD under schedule-free averaging by default, see
`training/optim.py`; that needs the averaged weights swapped in around saving, which the
`Trainer` does not do, so adapters keep Adam.)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from torch.utils.data import IterableDataset
from transformers import TrainerCallback, TrainingArguments

from vlmscope.data.processing import Sample, SampleEncoder, SkipCounter, collate, encode_stream
from vlmscope.models.masks import TokenKind
from vlmscope.models.vision import vision_row_mask
from vlmscope.peft.layer import SaeLayer
from vlmscope.training.config import default_lr

if TYPE_CHECKING:
    from vlmscope.data.sources import Record
    from vlmscope.models.hooked import HookedVLM


class SaeCollator:
    """Collates encoded samples into model inputs plus `sae_mask` (see the module docstring):
    language-model modules read the selected tokens; modules of the vision tower and the
    projector read the image patches of their own rows (CLS / register tokens too with
    include_special_tokens), placed by `HookedVLM.vision_positions`."""

    def __init__(
        self, vlm: HookedVLM, tokens: TokenKind = "all", include_special_tokens: bool = False
    ) -> None:
        self.vlm = vlm
        self.tokens = tokens
        self.include_special_tokens = include_special_tokens
        pad = vlm.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else 0
        a = vlm.adapter
        self.patterns: dict[str, str] = {f"{a.language_model}.*": ""}
        if a.vision_blocks is not None and a.n_vision_layers:
            self.patterns[f"{a.vision_blocks}.*"] = "vision.blocks.0.hook_resid_post"
        if a.projector is not None:
            self.patterns[a.projector] = self.patterns[f"{a.projector}.*"] = "projector.hook_out"

    def __call__(self, samples: Sequence[Sample]) -> dict[str, Any]:
        batch = collate(list(samples), self.pad_id, masks=self.vlm.masks)
        assert batch.masks is not None
        inputs: dict[str, Any] = dict(batch.inputs)
        rows = batch.masks.select(self.tokens, include_special=self.include_special_tokens)
        mask: dict[str, Any] = {}
        for pattern, hook in self.patterns.items():
            mask[pattern] = rows if not hook else self._vision_rows(batch.inputs, hook)
        inputs["sae_mask"] = mask
        return inputs

    def _vision_rows(self, inputs: dict[str, Any], hook: str) -> Callable[[Tensor], Tensor]:
        def rows(hidden: Tensor) -> Tensor:
            layout = self.vlm.vision_positions(inputs, hook, hidden.shape[:-1])
            keep = vision_row_mask(layout, self.include_special_tokens)
            return keep.reshape(hidden.shape[:-1])

        return rows


class SaeTrainingData(IterableDataset):  # type: ignore[type-arg]
    """Records of a vlmscope dataset (or any iterable of Records) as encoded samples, in
    order, pass after pass; records that cannot be encoded are skipped and counted."""

    def __init__(
        self,
        vlm: HookedVLM,
        records: Iterable[Record],
        *,
        tokens: TokenKind = "all",
        include_special_tokens: bool = False,
        ctx_len: int = 2048,
        strict: bool = False,
    ) -> None:
        super().__init__()
        self.records = records
        self.encoder = SampleEncoder(
            vlm.processor,
            ctx_len,
            vlm.adapter.image_token_ids(),
            videos=vlm.adapter.capabilities.video,
        )
        self.skips = SkipCounter()
        self.strict = strict
        self.collator = SaeCollator(vlm, tokens, include_special_tokens)

    def __iter__(self) -> Iterator[Sample]:
        yield from encode_stream(self.records, self.encoder, self.skips, strict=self.strict)


class SaeCallback(TrainerCallback):
    """Keeps SAE decoder rows at unit norm around each optimiser step (as `vlmscope train`
    does for dictionaries with normalize_decoder) and logs the adapters' mean FVU."""

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        for coder in _normalised_coders(kwargs.get("model")):
            coder.remove_gradient_parallel_to_decoder_directions()

    def on_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        for coder in _normalised_coders(kwargs.get("model")):
            coder.set_decoder_norm_to_unit_norm()

    def on_log(
        self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kw: Any
    ) -> None:
        model = kw.get("model")
        outputs = getattr(model, "last_sae_outputs", None)
        if logs is not None and outputs is not None and outputs.metrics:
            logs["sae_fvu"] = round(outputs.fvu, 6)


def _normalised_coders(model: Any) -> Iterator[Any]:
    if model is None:
        return
    for module in model.modules():
        if isinstance(module, SaeLayer):
            for name in module.active_adapters:
                coder = module.sae_coders._modules.get(name)
                if coder is not None and coder.cfg.normalize_decoder:
                    yield coder


def sae_training_arguments(
    output_dir: str,
    *,
    max_steps: int,
    num_latents: int,
    kind: str = "sae",
    normalize_activations: str = "none",
    batch_size: int = 8,
    lr: float = 0.0,
    warmup_fraction: float = 0.05,
    decay_fraction: float = 0.2,
    seed: int = 0,
    **overrides: Any,
) -> TrainingArguments:
    """TrainingArguments that train SAE adapters as `vlmscope train --optimizer adam` trains
    dictionaries (see the module docstring). `kind` and `normalize_activations` are the
    adapters' (their SaeConfig's), for the default rate when `lr` is 0; `overrides` are passed
    on to TrainingArguments."""
    warmup = max(0, round(warmup_fraction * max_steps))
    decay = max(0, round(decay_fraction * max_steps))
    values: dict[str, Any] = {
        "output_dir": output_dir,
        "max_steps": max_steps,
        "per_device_train_batch_size": batch_size,
        "learning_rate": lr or default_lr(num_latents, "adam", kind, normalize_activations),
        "weight_decay": 0.0,
        "max_grad_norm": 0.0,
        "lr_scheduler_type": "warmup_stable_decay",
        "warmup_steps": warmup,
        "lr_scheduler_kwargs": {"num_decay_steps": decay, "decay_type": "linear"},
        "remove_unused_columns": False,
        "report_to": [],
        "save_strategy": "no",
        "logging_steps": max(1, max_steps // 10),
        "seed": seed,
        "use_cpu": not torch.cuda.is_available(),
        "disable_tqdm": True,
    }
    values.update(overrides)
    return TrainingArguments(**values)


__all__ = [
    "SaeCallback",
    "SaeCollator",
    "SaeTrainingData",
    "sae_training_arguments",
]
