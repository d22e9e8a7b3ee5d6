"""Per-token log-probabilities and entropies from a causal LM's logits.

Both functions work one batch row at a time, so at most one row's ``[response_len, vocab]`` float32 copy exists
besides the logits themselves (a bf16 ``[B, T, V]`` tensor is never upcast as a whole). Under autograd the
per-row copies are kept for the backward pass, as a whole-batch version would keep them too.
"""

from __future__ import annotations

import torch


def _check_temperature(temperature: float) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def _scaled_row(row_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    row = row_logits.float()
    return row / temperature if temperature != 1.0 else row


def logprobs_from_logits(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Log-probability of each label under ``softmax(logits / temperature)``.

    Use the temperature that sampled the tokens (ppo-details.md item 4), or the log-probs belong to a
    different distribution from the one that generated the rollout.

    Args:
        logits: ``[batch, seq_len, vocab]``, any floating dtype (bf16/fp16 are upcast per row).
        labels: ``[batch, seq_len]`` long, token ids in ``[0, vocab)``; ``logits[:, t]`` scores ``labels[:, t]``.
        temperature: > 0.

    Returns:
        ``[batch, seq_len]`` float32 (float64 if ``logits`` are float64), differentiable w.r.t. ``logits``.
    """
    _check_temperature(temperature)
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} do not match labels {tuple(labels.shape)}")
    rows = []
    for row_logits, row_labels in zip(logits, labels):
        row = _scaled_row(row_logits, temperature)
        label_logits = row.gather(-1, row_labels.unsqueeze(-1)).squeeze(-1)
        rows.append(label_logits - torch.logsumexp(row, dim=-1))
    if not rows:
        return logits.new_zeros(labels.shape, dtype=torch.promote_types(logits.dtype, torch.float32))
    return torch.stack(rows)


def entropy_from_logits(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Entropy (nats) of ``softmax(logits / temperature)`` at every position.

    Args:
        logits: ``[batch, seq_len, vocab]``, any floating dtype (bf16/fp16 are upcast per row).
        temperature: > 0.

    Returns:
        ``[batch, seq_len]`` float32 (float64 if ``logits`` are float64).
    """
    _check_temperature(temperature)
    rows = []
    for row_logits in logits:
        row = _scaled_row(row_logits, temperature)
        probs = torch.softmax(row, dim=-1)
        # H = logsumexp(z) - sum_v p_v z_v; tokens with p = 0 (z = -inf included) contribute 0, not nan.
        p_z = torch.where(probs > 0, probs * row, torch.zeros_like(row))
        rows.append(torch.logsumexp(row, dim=-1) - p_z.sum(dim=-1))
    if not rows:
        return logits.new_zeros(logits.shape[:-1], dtype=torch.promote_types(logits.dtype, torch.float32))
    return torch.stack(rows)
