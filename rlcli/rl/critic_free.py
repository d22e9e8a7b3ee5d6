"""Advantages without a critic, and how a per-token loss becomes one number.

Critic-free estimators sample ``group_size`` completions of each prompt and judge each completion against the
others: rows ``g*N .. g*N+N-1`` of a batch are the ``N`` completions of prompt ``g`` (``N = group_size``).

- ``group_baseline(scores, N, "mean")``: the group's mean score (GRPO: Shao et al. 2024, "DeepSeekMath").
- ``group_baseline(scores, N, "leave_one_out")``: the mean of the *other* completions' scores, an unbiased baseline
  (RLOO: Ahmadian et al. 2024, "Back to Basics: Revisiting REINFORCE Style Optimization ...", after Kool et al.
  2019).
- ``scale_advantages(adv, N, "group")``: divide by the group's score std (GRPO); ``"batch"``: centre and divide by
  the std over the whole batch (REINFORCE++: Hu 2025, global normalisation); ``"none"``: leave as is (Dr. GRPO: Liu et al. 2025,
  "Understanding R1-Zero-Like Training", shows the group std biases updates towards too-easy and too-hard prompts).
- ``returns_to_go(rewards, mask)``: REINFORCE's return from every model token to the end (γ = 1), skipping tool and
  pad tokens (REINFORCE++ keeps the per-token KL reward and uses this as the advantage).
- ``aggregate_loss``: how per-token losses of a minibatch become one scalar: ``token_mean`` (every token of the
  minibatch weighs the same: DAPO, Yu et al. 2025), ``sequence_mean`` (mean over each sequence's tokens, then over
  sequences: GRPO), ``constant`` (sum over tokens / (sequences × a fixed length): Dr. GRPO, which removes the bias
  towards long wrong answers that per-sequence normalisation has).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch

from rlcli.rl.masked import WHITEN_MIN_STD, masked_whiten

Baseline = Literal["mean", "leave_one_out"]
Scaling = Literal["group", "batch", "none"]
Aggregation = Literal["token_mean", "sequence_mean", "constant"]


def _groups(x: torch.Tensor, group_size: int) -> torch.Tensor:
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    if x.dim() != 1 or x.shape[0] % group_size:
        raise ValueError(f"expected [batch] with batch a multiple of group_size={group_size}, got {tuple(x.shape)}")
    return x.reshape(-1, group_size)


@torch.no_grad()
def group_baseline(scores: torch.Tensor, group_size: int, kind: Baseline) -> torch.Tensor:
    """Each completion's baseline from the scores of its group.

    Args:
        scores: ``[batch]`` float; consecutive rows of ``group_size`` share a prompt.
        group_size: completions per prompt (N >= 2: with one completion there is nothing to compare with).
        kind: ``"mean"`` (b_i = mean of the group, itself included) or ``"leave_one_out"`` (b_i = mean of the
            other N - 1).

    Returns:
        ``[batch]`` baselines, the dtype of ``scores``.
    """
    if group_size < 2:
        raise ValueError(f"a group baseline needs group_size >= 2 completions per prompt, got {group_size}: with one "
                         "completion the baseline is the score itself and every advantage is 0")
    g = _groups(scores, group_size)
    total = g.sum(dim=1, keepdim=True)
    if kind == "mean":
        base = (total / group_size).expand_as(g)
    elif kind == "leave_one_out":
        base = (total - g) / (group_size - 1)
    else:
        raise ValueError(f"unknown baseline {kind!r}; use 'mean' or 'leave_one_out'")
    return base.reshape(-1)


@torch.no_grad()
def scale_advantages(
    advantages: torch.Tensor,
    group_size: int,
    kind: Scaling,
    *,
    scores: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    eps: float = 1e-6,
    sum_over_processes: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Divide advantages by a standard deviation.

    Args:
        advantages: ``[batch]`` (one per sequence) or ``[batch, T]`` (per token; then ``mask`` marks model tokens).
        group_size: completions per prompt (for ``"group"``).
        kind: ``"group"``: by the (unbiased) std of the group's ``scores`` (GRPO); ``"batch"``: minus the mean and
            by the std of all advantages in the batch, over model tokens when per token (REINFORCE++'s global
            normalisation, ``masked_whiten``); ``"none"``: unchanged.
        scores: ``[batch]``, required by ``"group"``.
        mask: ``[batch, T]`` 0/1, for per-token advantages with ``"batch"``.
        eps: added to the std (``"group"``) or to the variance (``"batch"``).
        sum_over_processes: sums a 1-D float64 tensor over processes (``"batch"`` only), so that every process
            divides by the std of the whole batch.

    Returns:
        the shape of ``advantages``; 0 where ``mask`` is 0.
    """
    if kind == "none":
        return advantages
    if kind == "group":
        if scores is None:
            raise ValueError('scale "group" needs the scores')
        std = _groups(scores.double(), group_size).std(dim=1, unbiased=True) if group_size > 1 else None
        if std is None:
            raise ValueError("group scaling needs group_size >= 2")
        per_row = std.repeat_interleave(group_size).to(advantages.dtype)
        if advantages.dim() == 2:
            per_row = per_row[:, None]
        return advantages / (per_row + eps)
    if kind == "batch":
        # REINFORCE++'s global normalisation centres and scales: the batch whitening PPO uses, one function for both
        m = torch.ones_like(advantages, dtype=torch.bool) if mask is None else mask.bool()
        return masked_whiten(advantages, m, eps=eps, sum_over_processes=sum_over_processes, min_std=WHITEN_MIN_STD)
    raise ValueError(f"unknown scaling {kind!r}; use 'group', 'batch' or 'none'")


@torch.no_grad()
def returns_to_go(rewards: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``G_t = sum of rewards[t'] over model tokens t' >= t`` (γ = 1): ``[batch, T]`` -> ``[batch, T]``, 0 where
    ``mask`` is 0. Tool and pad tokens are skipped: they neither add reward nor end the sum."""
    m = mask.to(device=rewards.device, dtype=torch.bool)
    r = torch.where(m, rewards, torch.zeros_like(rewards))
    g = r.flip(1).cumsum(1).flip(1)
    return torch.where(m, g, torch.zeros_like(g))


def aggregate_loss(
    per_token: torch.Tensor,
    mask: torch.Tensor,
    kind: Aggregation,
    *,
    total_tokens: float,
    total_sequences: float,
    constant_length: float | None = None,
) -> torch.Tensor:
    """This micro-batch's share of a minibatch's loss: summed over the micro-batches (and processes) of the
    minibatch, the shares give the minibatch loss of the chosen aggregation.

    Args:
        per_token: ``[b, T]`` per-token losses (differentiable).
        mask: ``[b, T]`` 0/1, 1 on model tokens.
        kind: ``"token_mean"``: sum / ``total_tokens``; ``"sequence_mean"``: sum over rows of each row's token
            mean, / ``total_sequences``; ``"constant"``: sum / (``total_sequences`` × ``constant_length``).
        total_tokens: model tokens of the whole minibatch (all micro-batches and processes).
        total_sequences: sequences of the whole minibatch.
        constant_length: the fixed length of ``"constant"`` (e.g. the generation budget).

    Returns:
        a 0-dim tensor.
    """
    m = mask.to(device=per_token.device, dtype=torch.bool)
    x = torch.where(m, per_token, torch.zeros_like(per_token))
    if kind == "token_mean":
        return x.sum() / max(total_tokens, 1.0)
    if kind == "sequence_mean":
        per_row = x.sum(dim=1) / m.sum(dim=1).clamp(min=1)
        return per_row.sum() / max(total_sequences, 1.0)
    if kind == "constant":
        if not constant_length or constant_length <= 0:
            raise ValueError("aggregation 'constant' needs constant_length > 0")
        return x.sum() / (max(total_sequences, 1.0) * constant_length)
    raise ValueError(f"unknown aggregation {kind!r}; use 'token_mean', 'sequence_mean' or 'constant'")
