"""The ``rlcli sft`` recipe."""

from __future__ import annotations

from typing import Literal

from pydantic import ValidationInfo, Field, field_validator, model_validator

from rlcli.config.common import (
    DataSource,
    LoraConfig,
    MixedPrecision,
    ModelConfig,
    OptimConfig,
    RecipeBase,
    Section,
    _no_means_no,
    processes_of,
    share_micro_batch,
)


class SFTData(DataSource):
    """Training text. Formats: ``text`` (loss on everything), ``prompt_completion`` (loss on the completion),
    ``messages`` (chat template; loss on assistant turns only), ``segments`` (text-environment episodes:
    ``[{source: prompt|model|tool, text}]``, loss on model segments only, tokenised as the environment does)."""

    format: Literal["auto", "text", "prompt_completion", "messages", "segments"] = "auto"
    """``auto`` picks from the columns: segments > messages > prompt+completion > text."""
    text_field: str = "text"
    """Column with the text (format ``text``)."""
    prompt_field: str = "prompt"
    """Column with the prompt (format ``prompt_completion``; no loss on it)."""
    completion_field: str = "completion"
    """Column with the completion (format ``prompt_completion``; the loss is on it)."""
    messages_field: str = "messages"
    """Column with a list of chat messages (format ``messages``; the loss is on assistant turns)."""
    segments_field: str = "segments"
    """Column with ``[{source, text}]`` segments (format ``segments``; the loss is on model segments)."""
    max_length: int = Field(512, gt=1)
    """Truncate each example (prompt included) to this many tokens."""
    packing: bool = False
    """Concatenate examples (each ending with EOS) into rows of exactly ``max_length`` tokens. Attention is not
    reset between packed examples."""
    add_eos: bool = True
    """Append the EOS token to text and completions so the model learns to stop."""


class SFTTrain(Section):
    """How long and how big."""

    epochs: float = Field(1.0, gt=0)
    """Passes over the training data (fractions allowed). Ignored when ``max_steps`` is set."""
    max_steps: int | None = Field(None, gt=0)
    """Stop after this many optimizer steps."""
    batch_size: int = Field(32, gt=0)
    """Global batch: examples per optimizer step, across all processes and accumulation steps."""
    micro_batch_size: int | None = Field(None, gt=0)
    """Examples per forward pass on one process (accumulation steps = batch_size / (micro × processes)).
    Default: the whole per-process share, batch_size / processes, in one pass; set it lower when memory is short."""
    mixed_precision: MixedPrecision = "no"
    """``bf16`` / ``fp16`` autocast for forward passes (GPU; bf16 also on CPU), ``no`` for float32."""
    tf32: bool = True
    """On CUDA GPUs from Ampere on, run float32 matmuls and convolutions on TF32 tensor cores (~10-bit mantissa
    inputs, float32 accumulation): several times faster for float32 weights, and what mixed precision leaves in
    float32. No effect on CPU."""
    eval_every: int | None = Field(None, gt=0)
    """Evaluate every N optimizer steps (and at the end) when there is eval data."""
    eval_batch_size: int = Field(16, gt=0)
    """Examples per forward pass during evaluation (no gradients, so larger than training batches is fine)."""
    save_every: int | None = Field(None, gt=0)
    """Write a resumable checkpoint every N optimizer steps."""
    keep_checkpoints: int = Field(2, gt=0)
    """Keep only the newest N checkpoints."""

    _mp = field_validator("mixed_precision", mode="before")(_no_means_no)

    @model_validator(mode="after")
    def _batches_divide(self, info: ValidationInfo) -> "SFTTrain":
        self.micro_batch_size, _ = share_micro_batch(self.batch_size, self.micro_batch_size, processes_of(info),
                                                     "train.batch_size", "train.micro_batch_size")
        return self


class SFTRecipe(RecipeBase):
    """Supervised fine-tuning, full or LoRA."""

    model: ModelConfig
    lora: LoraConfig | None = None
    """Train LoRA adapters instead of all weights (omit for full fine-tuning)."""
    data: SFTData
    train: SFTTrain = Field(default_factory=SFTTrain)
    optim: OptimConfig = Field(default_factory=OptimConfig)
