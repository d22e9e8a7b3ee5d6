"""Per-token log-probabilities and entropies of ``softmax(logits / temperature)``.

Shorthands for ``SamplingRules(temperature=t).logprobs`` / ``.entropy`` (``rlcli.rl.sampling``), for callers with no
other sampling rule. They work one batch row at a time, so at most one row's ``[response_len, vocab]`` float32 copy
exists besides the logits themselves (a bf16 ``[B, T, V]`` tensor is never upcast as a whole).
"""

from __future__ import annotations

import torch

from rlcli.rl.sampling import SamplingRules


def _rules(temperature: float) -> SamplingRules:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return SamplingRules(temperature=temperature)


def logprobs_from_logits(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Log-probability of each label under ``softmax(logits / temperature)``.

    Use the temperature that sampled the tokens (ppo-details item 4), or the log-probs belong to a different
    distribution from the one that generated the rollout; with any other sampling rule, use ``SamplingRules``.

    Args:
        logits: ``[batch, seq_len, vocab]``, any floating dtype (bf16/fp16 are upcast per row).
        labels: ``[batch, seq_len]`` long, token ids in ``[0, vocab)``; ``logits[:, t]`` scores ``labels[:, t]``.
        temperature: > 0.

    Returns:
        ``[batch, seq_len]`` float32 (float64 if ``logits`` are float64), differentiable w.r.t. ``logits``.
    """
    return _rules(temperature).logprobs(logits, labels)


def entropy_from_logits(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Entropy (nats) of ``softmax(logits / temperature)`` at every position.

    Args:
        logits: ``[batch, seq_len, vocab]``, any floating dtype (bf16/fp16 are upcast per row).
        temperature: > 0.

    Returns:
        ``[batch, seq_len]`` float32 (float64 if ``logits`` are float64).
    """
    return _rules(temperature).entropy(logits)
