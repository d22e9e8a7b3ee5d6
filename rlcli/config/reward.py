"""The ``reward:`` section, shared by ``rlcli ppo`` and ``rlcli env-rollout`` (its own module, so neither recipe
module imports the other)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from rlcli.config.common import Section


class RewardConfig(Section):
    """Where scores come from: a Python function or a sequence-classifier reward model (exactly one)."""

    function: str | None = None
    """``path/to/file.py:name`` or ``module:name``: called with the keyword arguments it declares among
    ``prompts``, ``responses``, ``rows`` (dataset rows), ``answers`` and ``histories`` (text environments),
    returning one float per sample."""
    model: str | None = None
    """Reward model: an ``rlcli rm`` output dir or a hub id of a sequence classifier."""
    label: str | int | None = None
    """Output of the reward model to use: index or label name (``POSITIVE``). Default: the only / first output."""
    normalize: bool = False
    """Normalise reward-model scores with the mean/std saved by ``rlcli rm``."""
    batch_size: int = Field(32, gt=0)
    """Texts per reward-model forward pass."""
    input: Literal["prompt_and_response", "response"] = "prompt_and_response"
    """What the reward model reads."""
    truncate_at: list[str] = Field(default_factory=list)
    """'EOS trick': score the response cut at the first of these strings (in addition to stop strings)."""
    missing_eos_penalty: float | None = None
    """Score given to responses that did not stop (no EOS / stop string) instead of their reward."""

    @model_validator(mode="after")
    def _one_source(self) -> "RewardConfig":
        if (self.function is None) == (self.model is None):
            raise ValueError(f"give exactly one of 'function' or 'model'; got function={self.function!r}, "
                             f"model={self.model!r}")
        return self
