"""The ``rlcli rm`` recipe: a scalar reward model trained on preference pairs."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from rlcli.config.common import (
    DataSource,
    LoraConfig,
    ModelConfig,
    OptimConfig,
    SupervisedEval,
    TrainerRecipe,
    SupervisedTrain,
)


class RMData(DataSource):
    """Preference pairs: a ``chosen`` and a ``rejected`` response, optionally after a shared ``prompt``.

    ``text``: each column holds plain text and the model reads ``prompt + chosen`` / ``prompt + rejected``
    (concatenated as is: put any separator in the data). ``messages``: ``chosen`` / ``rejected`` are lists of
    ``{role, content}`` (the whole conversation, or only the reply when there is a prompt column, which may be
    a message list or a string taken as one user message), rendered with the tokenizer's chat template.

    Texts longer than ``max_length`` tokens lose their *start* (the prompt first, the response's start only when
    the response alone is too long), so the model always reads the end of the response, where the score is read;
    the reward-model scorer truncates the same way.
    """

    format: Literal["auto", "text", "messages"] = "auto"
    """``auto``: ``messages`` when the chosen column holds message lists, else ``text``."""
    prompt_field: str | None = "prompt"
    """Column with the shared prompt. Used when the data has it; null: never use a prompt column."""
    chosen_field: str = "chosen"
    """Column with the preferred response."""
    rejected_field: str = "rejected"
    """Column with the other response."""
    margin_field: str | None = None
    """Optional column with a per-pair margin m (how much better chosen is): the loss becomes
    ``-log σ(r_chosen - r_rejected - m)``."""
    max_length: int = Field(512, gt=1)
    """Tokens per text (prompt + response); longer texts keep their end (see above)."""

    @model_validator(mode="after")
    def _distinct_fields(self) -> "RMData":
        names = [n for n in (self.prompt_field, self.chosen_field, self.rejected_field, self.margin_field) if n]
        if len(set(names)) != len(names):
            raise ValueError(f"prompt_field, chosen_field, rejected_field and margin_field must name different "
                             f"columns; got {names}")
        return self


class RMTrain(SupervisedTrain):
    """How long and how big; sizes count preference pairs (each pair is two texts)."""

    center_penalty: float = Field(0.0, ge=0)
    """Coefficient c of ``c · mean((r_chosen + r_rejected)²)`` added to the loss: keeps rewards centred on 0
    (the Bradley–Terry loss only sees differences, so the reward's offset would otherwise drift). 0: off."""


class RMRecipe(TrainerRecipe):
    """Reward modelling: a sequence classifier with one output, trained with the Bradley–Terry loss."""

    model: ModelConfig
    """A causal LM (an ``rlcli sft`` output works) or an encoder; it gets a fresh one-output score head."""
    lora: LoraConfig | None = None
    """Train LoRA adapters (the score head stays fully trainable) instead of all weights."""
    data: RMData
    train: RMTrain = Field(default_factory=RMTrain)
    eval: SupervisedEval = Field(default_factory=SupervisedEval)
    optim: OptimConfig = Field(default_factory=OptimConfig)
