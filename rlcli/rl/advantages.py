"""Generalised advantage estimation over model tokens only."""

from __future__ import annotations

import torch


@torch.no_grad()
def gae(
    values: torch.Tensor,
    rewards: torch.Tensor,
    mask: torch.Tensor,
    gamma: float = 1.0,
    lam: float = 0.95,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE(gamma, lambda) advantages and returns, skipping positions where ``mask`` is 0.

    Positions with mask 0 (padding, and tool output in the middle of a response) are not time steps: the next
    value of a model token is the value of the next position whose mask is 1 (0 past the last one), and the
    recursion runs over model tokens only, so a sequence with a hole gives the same advantages on its model
    tokens as the same sequence with the hole cut out (ppo-details item 10). Values and rewards at masked
    positions are never read. Computed without gradients.

    Args:
        values: ``[batch, response_len]`` float, value-head predictions V(s_t).
        rewards: ``[batch, response_len]`` float, per-token rewards (see ``per_token_rewards``).
        mask: ``[batch, response_len]`` 0/1 of any dtype, 1 on model tokens.
        gamma: discount per model token.
        lam: GAE lambda.

    Returns:
        ``(advantages, returns)``, both ``[batch, response_len]`` in the dtype of ``values``; returns are
        ``advantages + values``; both are 0 where ``mask`` is 0.
    """
    values = values.detach()
    rewards = rewards.detach().to(values.dtype)
    m = mask.to(device=values.device, dtype=torch.bool)
    batch, length = values.shape
    zeros = values.new_zeros(batch)
    next_value = zeros
    next_advantage = zeros
    advantages = torch.zeros_like(values)
    for t in reversed(range(length)):
        m_t = m[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantage = delta + gamma * lam * next_advantage
        # A masked position leaves the carried state untouched, so it is invisible to earlier tokens.
        advantages[:, t] = torch.where(m_t, advantage, zeros)
        next_value = torch.where(m_t, values[:, t], next_value)
        next_advantage = torch.where(m_t, advantage, next_advantage)
    returns = torch.where(m, advantages + values, torch.zeros_like(values))
    return advantages, returns
