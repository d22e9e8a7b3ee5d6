"""PPO and the critic-free estimators for language models: the learner (one PPO step on finished episodes), the
rollout (prompts, episodes, scores), the builders of a run's objects, and the recipe checks. ``rlcli ppo``'s loop
is ``rlcli.trainers.ppo``; the maths is ``rlcli.rl`` (losses, estimators, KL, sampling rules)."""

from rlcli.ppo.learner import ForbiddenTokenError, NonFiniteLossError, PPOLearner

__all__ = ["ForbiddenTokenError", "NonFiniteLossError", "PPOLearner"]
