"""The ``rlcli sft`` recipe."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from rlcli.config.common import (
    DataSource,
    LoraConfig,
    ModelConfig,
    OptimConfig,
    SupervisedEval,
    TrainerRecipe,
    SupervisedTrain,
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


class SFTTrain(SupervisedTrain):
    """How long and how big; sizes count examples."""


class SFTRecipe(TrainerRecipe):
    """Supervised fine-tuning, full or LoRA."""

    model: ModelConfig
    lora: LoraConfig | None = None
    """Train LoRA adapters instead of all weights (omit for full fine-tuning)."""
    data: SFTData
    train: SFTTrain = Field(default_factory=SFTTrain)
    eval: SupervisedEval = Field(default_factory=SupervisedEval)
    optim: OptimConfig = Field(default_factory=OptimConfig)
