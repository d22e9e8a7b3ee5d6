"""Pure tensor math for PPO on language models: no models, no I/O, no config objects."""

from rlcli.rl.advantages import gae
from rlcli.rl.critic_free import aggregate_loss, group_baseline, returns_to_go, scale_advantages
from rlcli.rl.kl import KL_ESTIMATORS, AdaptiveKLController, FixedKLController, KLWatch, kl_penalty
from rlcli.rl.logprobs import entropy_from_logits, logprobs_from_logits
from rlcli.rl.losses import (
    clipped_policy_loss,
    clipped_policy_terms,
    clipped_value_loss,
    clipped_value_terms,
    explained_variance,
)
from rlcli.rl.masked import masked_mean, masked_sum, masked_var, masked_whiten
from rlcli.rl.rewards import RunningMoments, per_token_rewards, score_and_kl_rewards
from rlcli.rl.sampling import SamplingRules, turn_positions
from rlcli.rl.types import Rollout, RolloutForward

__all__ = [
    "KL_ESTIMATORS",
    "AdaptiveKLController",
    "FixedKLController",
    "KLWatch",
    "Rollout",
    "RolloutForward",
    "RunningMoments",
    "SamplingRules",
    "aggregate_loss",
    "clipped_policy_loss",
    "clipped_policy_terms",
    "clipped_value_loss",
    "clipped_value_terms",
    "entropy_from_logits",
    "explained_variance",
    "gae",
    "group_baseline",
    "kl_penalty",
    "logprobs_from_logits",
    "masked_mean",
    "masked_sum",
    "masked_var",
    "masked_whiten",
    "per_token_rewards",
    "returns_to_go",
    "scale_advantages",
    "score_and_kl_rewards",
    "turn_positions",
]
