"""The advantage estimators: one registry entry each, holding its advantage function, its defaults, a description
and its paper. ``ppo.advantage`` names one; the recipe check, ``rlcli explain``, the run header and the learner all
read this table.

Every advantage function has the same signature (pure tensor math, no model):

    rewards, advantages, returns = estimator.advantages(scores, kl, mask, AdvantageInputs(...))

- ``scores`` ``[B]`` float: each episode's score (after normalisation / scaling / clipping); rows ``g*N .. g*N+N-1``
  are the ``N = group_size`` completions of prompt ``g``;
- ``kl`` ``[B, T]`` float: the per-token KL that enters the reward (zeros when the KL is a loss term instead);
- ``mask`` ``[B, T]`` 0/1: model tokens (tool output and padding are 0);
- returns ``[B, T]`` per-token rewards (for the statistics), advantages and returns, all 0 off model tokens.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from rlcli.rl.advantages import gae
from rlcli.rl.critic_free import group_baseline, returns_to_go, scale_advantages
from rlcli.rl.masked import WHITEN_MIN_STD, masked_whiten
from rlcli.rl.rewards import score_and_kl_rewards


@dataclass(frozen=True)
class AdvantageInputs:
    """What an estimator may use besides scores, KL and mask (each estimator reads the fields it needs)."""

    beta: float  # the KL coefficient of the reward
    group_size: int = 1
    scaling: str = "none"  # advantage_scaling: group | batch | none (gae: batch whitens its advantages)
    values: torch.Tensor | None = None  # [B, T] the value head's predictions (gae)
    gamma: float = 1.0
    lam: float = 0.95
    whiten_rewards: bool = False
    # GAE's λ of the critic's targets (the returns); None: ``lam``. 1 gives Monte-Carlo targets that do not lean on
    # the critic's own values (VC-PPO's decoupled GAE)
    critic_lam: float | None = None
    # sums a 1-D float64 tensor over processes (an all-reduce), so batch statistics are the whole batch's
    sum_over_processes: Callable[[torch.Tensor], torch.Tensor] | None = None


Advantages = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class Estimator:
    name: str
    advantages: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, AdvantageInputs], Advantages]
    critic: bool  # trains a value head
    scaling: str  # default advantage_scaling
    aggregation: str  # default loss_aggregation
    kl_mode: str  # default kl.mode
    description: str
    paper: str


def _gae(scores, kl, mask, x: AdvantageInputs) -> Advantages:
    """PPO with a critic: r_t = -β·KL_t, plus the score on the last model token; GAE over model tokens; advantages
    whitened over the batch (``batch`` scaling); the critic's targets from GAE with its own λ when ``critic_lam`` is set."""
    rewards = score_and_kl_rewards(scores, kl, mask, x.beta)
    if x.whiten_rewards:
        rewards = masked_whiten(rewards, mask, restore_mean=True, sum_over_processes=x.sum_over_processes,
                                min_std=WHITEN_MIN_STD)
    advantages, returns = gae(x.values, rewards, mask, x.gamma, x.lam)
    if x.critic_lam is not None and x.critic_lam != x.lam:
        _, returns = gae(x.values, rewards, mask, x.gamma, x.critic_lam)
    if x.scaling == "batch":
        advantages = masked_whiten(advantages, mask, sum_over_processes=x.sum_over_processes, min_std=WHITEN_MIN_STD)
    return rewards, advantages, returns


def _scaled_scores(centred: torch.Tensor, scores: torch.Tensor, x: AdvantageInputs) -> torch.Tensor:
    """``centred`` [B] divided by the std of its group's scores when ``scaling`` is ``group`` (GRPO), else as is.

    Only the scores are divided: a KL part of the reward is never scaled by the scores' spread, or a group whose
    scores agree (all right, say) would get its KL noise scaled up to full-size advantages. GRPO's KL, a loss term,
    is not scaled by it either."""
    if x.scaling != "group":
        return centred
    return scale_advantages(centred, x.group_size, "group", scores=scores)


def _sequence_baseline(kind: str):
    def advantages(scores, kl, mask, x: AdvantageInputs) -> Advantages:
        """A whole sequence judged against its group: its score minus the group's baseline (divided by the group's
        score std with ``group`` scaling), minus β × its summed KL minus the group's baseline of that (reward mode;
        0 in loss mode); the same advantage on every model token."""
        kl_sums = (kl * mask).sum(dim=1)
        score_part = _scaled_scores(scores - group_baseline(scores, x.group_size, kind), scores, x)
        kl_part = kl_sums - group_baseline(kl_sums, x.group_size, kind)
        adv = (score_part - x.beta * kl_part)[:, None] * mask
        return _finish(adv, score_and_kl_rewards(scores, kl, mask, x.beta), mask, x)

    return advantages


def _reinforce_pp(scores, kl, mask, x: AdvantageInputs) -> Advantages:
    """Per-token rewards (score on the last token, -β·KL_t on each) and the return-to-go; with groups, the group's
    mean score is subtracted first (REINFORCE++-baseline)."""
    centred = scores - group_baseline(scores, x.group_size, "mean") if x.group_size > 1 else scores
    rewards = score_and_kl_rewards(_scaled_scores(centred, scores, x), kl, mask, x.beta)
    return _finish(returns_to_go(rewards, mask), rewards, mask, x)


def _finish(advantages, rewards, mask, x: AdvantageInputs) -> Advantages:
    """Batch normalisation when ``scaling`` is ``batch`` (group scaling was applied to the scores already)."""
    if x.scaling == "batch":
        advantages = scale_advantages(advantages, x.group_size, "batch", mask=mask,
                                      sum_over_processes=x.sum_over_processes)
    return rewards, advantages * mask, returns_to_go(rewards, mask)


ESTIMATORS: dict[str, Estimator] = {
    e.name: e for e in (
        Estimator("gae", _gae, critic=True, scaling="batch", aggregation="token_mean", kl_mode="reward",
                  description="a value head (the critic) and GAE", paper="Schulman et al. 2016 (GAE); Ziegler et al. "
                  "2019 (KL-penalised PPO for LMs)"),
        Estimator("grpo", _sequence_baseline("mean"), critic=False, scaling="group", aggregation="sequence_mean",
                  kl_mode="loss", description="score minus its group's mean, scaled by the group's std",
                  paper="Shao et al. 2024, DeepSeekMath (eq. 3 and 21)"),
        Estimator("rloo", _sequence_baseline("leave_one_out"), critic=False, scaling="none",
                  aggregation="token_mean", kl_mode="reward",
                  description="score minus the mean of the other completions of its prompt",
                  paper="Ahmadian et al. 2024, Back to Basics (after Kool et al. 2019)"),
        Estimator("reinforce_pp", _reinforce_pp, critic=False, scaling="batch", aggregation="token_mean",
                  kl_mode="reward", description="return-to-go of per-token rewards, normalised over the batch",
                  paper="Hu 2025, REINFORCE++"),
    )
}
