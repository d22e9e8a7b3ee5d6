"""The ``reward:`` section, shared by ``rlcli ppo`` and ``rlcli env-rollout`` (its own module, so neither recipe
module imports the other)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from rlcli.config.common import Section


class RewardConfig(Section):
    """Where scores come from: a Python function, a sequence-classifier reward model, or a reward-model LoRA adapter
    on the policy's own base (exactly one)."""

    function: str | None = None
    """``path/to/file.py:name`` or ``module:name``: called with the keyword arguments it declares among
    ``prompts``, ``responses``, ``rows`` (dataset rows), ``answers`` and ``histories`` (text environments),
    returning one float per sample."""
    model: str | None = None
    """Reward model: an ``rlcli rm`` output dir or a hub id of a sequence classifier. Loaded as a model of its own
    (a LoRA reward model is merged into a copy of its base)."""
    adapter: str | None = None
    """Multi-adapter RLHF: the output dir of an ``rlcli rm`` run with ``lora:`` trained on the same base model as
    this LoRA policy (``model.name_or_path``) with the same tokenizer. Only one copy of the base is held: the policy
    adapter trains, the reference is the base with every adapter off, and the reward is the base with this adapter
    on (frozen), read by its score head at the last real token. Needs ``lora:``; checked by ``--dry-run``.
    (``rlcli env-rollout`` has no policy adapter to share a base with and loads it like ``model``.)"""
    label: str | int | None = None
    """Output of the reward model to use: index or label name (``POSITIVE``, ``nothate``). Default: the only /
    first output. A reward adapter's score head has unnamed outputs: give an index."""
    normalize: bool = False
    """Normalise reward-model (or reward-adapter) scores with the mean/std saved by ``rlcli rm``."""
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
        given = {k: v for k, v in (("function", self.function), ("model", self.model), ("adapter", self.adapter))
                 if v is not None}
        if len(given) != 1:
            got = ", ".join(f"{k}={v!r}" for k, v in given.items()) or "none"
            raise ValueError(f"give exactly one of 'function', 'model' or 'adapter'; got {got}")
        return self
