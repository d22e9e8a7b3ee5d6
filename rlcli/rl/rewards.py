"""Per-token rewards (KL penalty plus the sequence score) and running statistics for reward normalisation."""

from __future__ import annotations

import math
from typing import Any

import torch

from rlcli.rl.kl import kl_penalty


@torch.no_grad()
def score_and_kl_rewards(
    scores: torch.Tensor,
    kl: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float | torch.Tensor,
) -> torch.Tensor:
    """``r_t = -kl_coef * kl_t`` on every model token, plus the score on the last one (ppo-details item 6).

    The score goes on the last position where ``mask`` is 1, wherever trailing padding starts; a mask may
    have holes in the middle (tool output), which get neither reward nor KL. A row whose mask is all zero
    gets all-zero rewards and its score is dropped. Computed without gradients.

    Args:
        scores: ``[batch]`` float, one scalar score per sequence (reward model or environment).
        kl: ``[batch, response_len]`` float, a per-token KL estimate (``kl_penalty``), values at masked positions
            ignored.
        mask: ``[batch, response_len]`` 0/1 of any dtype, 1 on model tokens.
        kl_coef: beta, a float or 0-dim tensor.

    Returns:
        ``[batch, response_len]`` rewards in the dtype of ``kl``; 0 where ``mask`` is 0.
    """
    if scores.dim() != 1 or scores.shape[0] != kl.shape[0]:
        raise ValueError(f"scores must be [batch] = [{kl.shape[0]}], got {tuple(scores.shape)}")
    m = mask.to(device=kl.device, dtype=torch.bool)
    rewards = -kl_coef * torch.where(m, kl, torch.zeros_like(kl))

    positions = torch.arange(m.shape[1], device=m.device).expand_as(m)
    last = torch.where(m, positions, torch.full_like(positions, -1)).max(dim=1).values
    has_token = last >= 0
    score_src = torch.where(has_token, scores.to(rewards), 0.0)
    return rewards.scatter_add(1, last.clamp(min=0).unsqueeze(1), score_src.unsqueeze(1))


@torch.no_grad()
def per_token_rewards(
    scores: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float | torch.Tensor,
    estimator: str = "k1",
    *,
    logits: torch.Tensor | None = None,
    ref_logits: torch.Tensor | None = None,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``kl_penalty`` then ``score_and_kl_rewards``, from the two models' log-probs.

    Args:
        scores: ``[batch]`` float, one scalar score per sequence.
        logprobs: ``[batch, response_len]`` float, policy log-probs of the response tokens.
        ref_logprobs: ``[batch, response_len]`` float, reference log-probs of the same tokens.
        mask: ``[batch, response_len]`` 0/1 of any dtype, 1 on model tokens.
        kl_coef: beta, a float or 0-dim tensor.
        estimator: a name from ``rlcli.rl.kl.KL_ESTIMATORS``.
        logits, ref_logits, temperature: passed to ``kl_penalty``; ``"full"`` needs the logits
            (``[batch, response_len, vocab]``).

    Returns:
        ``(rewards, kl)``, both ``[batch, response_len]`` in the dtype of ``logprobs``; 0 where ``mask`` is 0.
    """
    if scores.dim() != 1 or scores.shape[0] != logprobs.shape[0]:
        raise ValueError(f"scores must be [batch] = [{logprobs.shape[0]}], got {tuple(scores.shape)}")
    m = mask.to(device=logprobs.device, dtype=torch.bool)
    kl = kl_penalty(logprobs, ref_logprobs, estimator, logits=logits, ref_logits=ref_logits, temperature=temperature)
    kl = torch.where(m, kl.to(logprobs.dtype), torch.zeros_like(logprobs))
    return score_and_kl_rewards(scores, kl, m, kl_coef), kl


class RunningMoments:
    """Running mean and std of a stream of scalars (Chan et al.'s parallel update), for reward normalisation.

    State is three Python floats (``mean``, ``var`` = population variance, ``count``), so it fits in a
    checkpoint (ppo-details item 7). ``std`` is the sample (unbiased) std of everything seen, as ``torch.std``
    would give on the concatenated data; it is 1.0 until two values have been seen, so dividing by it is a
    no-op rather than a division by zero.
    """

    def __init__(self) -> None:
        self.mean = 0.0
        self.var = 0.0
        self.count = 0.0

    @property
    def std(self) -> float:
        if self.count < 2:
            return 1.0
        return math.sqrt(self.var * self.count / (self.count - 1))

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> tuple[float, float]:
        """Fold in a batch of values.

        Args:
            x: any shape, floating; every element is one observation.

        Returns:
            ``(batch_mean, batch_std)`` of ``x`` alone (unbiased std; 0.0 for a single value).
        """
        if x.numel() == 0:
            raise ValueError("RunningMoments.update got an empty tensor")
        x = x.detach().to(torch.float64).flatten()
        n = x.numel()
        batch_mean = x.mean().item()
        batch_var = x.var(unbiased=False).item()
        self.update_from_stats(batch_mean, batch_var, n)
        batch_std = math.sqrt(batch_var * n / (n - 1)) if n > 1 else 0.0
        return batch_mean, batch_std

    def update_from_stats(self, mean: float, var: float, count: float) -> None:
        """Fold in a batch already reduced to statistics (e.g. summed across processes first).

        Args:
            mean: the batch mean.
            var: the batch's population variance (divided by ``count``, not ``count - 1``).
            count: the number of values in the batch (> 0).
        """
        mean, var, count = float(mean), float(var), float(count)
        if not count > 0:
            raise ValueError(f"count must be > 0, got {count}")
        total = self.count + count
        delta = mean - self.mean
        m2 = self.var * self.count + var * count + delta * delta * self.count * count / total
        self.mean += delta * count / total
        self.var = m2 / total
        self.count = total

    def state_dict(self) -> dict[str, Any]:
        return {"mean": self.mean, "var": self.var, "count": self.count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.mean = float(state["mean"])
        self.var = float(state["var"])
        self.count = float(state["count"])
