"""Per-token KL penalty between the policy and the reference model, and the controllers for its coefficient.

Estimators of KL(pi || ref) from the log-probs of the sampled tokens (J. Schulman, "Approximating KL
Divergence", 2020), with ``d = log pi - log ref`` at each token:

- ``k1``: ``d``. Unbiased, but single tokens can be negative.
- ``abs``: ``|d|``.
- ``k2`` / ``mse``: ``0.5 * d**2`` (two names for the same estimator).
- ``k3``: ``(r - 1) - log r`` with ``r = ref / pi = exp(-d)``. Unbiased and never negative. ``d`` is clamped to
  ±``LOG_RATIO_CLAMP`` and the value to at most ``K3_CLAMP`` (verl's ``low_var_kl``): at ``d = -30`` the formula
  gives 1e13 and at ``d = -100`` infinity, one such token would swamp a batch's reward or loss.
- ``full``: the exact ``sum_v pi(v) (log pi(v) - log ref(v))`` over the vocabulary, from both models' logits.
"""

from __future__ import annotations

from typing import Any

import torch

from rlcli.rl.sampling import SamplingRules

KL_ESTIMATORS: tuple[str, ...] = ("k1", "abs", "k2", "mse", "k3", "full")

# bounds of k3 (verl's core_algos.kl_penalty, "low_var_kl"): the log-ratio it exponentiates, and its value
LOG_RATIO_CLAMP = 20.0
K3_CLAMP = 10.0


def _full_kl(logits: torch.Tensor, ref_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return SamplingRules(temperature=temperature).full_kl(logits, ref_logits)


def kl_penalty(
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    estimator: str,
    logits: torch.Tensor | None = None,
    ref_logits: torch.Tensor | None = None,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Per-token estimate of KL(pi || ref) (see the module docstring for the estimators).

    Args:
        logprobs: ``[batch, seq_len]`` float, log pi of the sampled tokens.
        ref_logprobs: ``[batch, seq_len]`` float, log ref of the same tokens.
        estimator: one of ``KL_ESTIMATORS``.
        logits: ``[batch, seq_len, vocab]`` policy logits, required by ``"full"`` only.
        ref_logits: ``[batch, seq_len, vocab]`` reference logits, required by ``"full"`` only.
        temperature: > 0, applied to both logits tensors by ``"full"`` (the sampling temperature, so that
            ``"full"`` measures the same distributions that ``logprobs`` came from).

    Returns:
        ``[batch, seq_len]``, the dtype of ``logprobs`` (float32 for ``"full"``). No masking is applied.
    """
    if estimator == "full":
        if logits is None or ref_logits is None:
            raise ValueError('kl estimator "full" needs both logits and ref_logits')
        return _full_kl(logits, ref_logits, temperature)
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"unknown kl estimator {estimator!r}; valid ones are {', '.join(KL_ESTIMATORS)}")

    log_ratio = logprobs - ref_logprobs
    if estimator == "k1":
        return log_ratio
    if estimator == "abs":
        return log_ratio.abs()
    if estimator in ("k2", "mse"):
        return 0.5 * log_ratio.square()
    # k3: with x = log r = -log_ratio, (e^x - 1) - x; expm1 keeps precision when x is tiny. Beyond the clamps the
    # gradient is 0 (a token that far from the reference is left to the policy loss's clip)
    x = (-log_ratio).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    return (torch.expm1(x) - x).clamp(min=0, max=K3_CLAMP)


class FixedKLController:
    """A constant KL coefficient beta."""

    def __init__(self, kl_coef: float) -> None:
        if kl_coef < 0:
            raise ValueError(f"kl_coef must be >= 0, got {kl_coef}")
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        """Do nothing; present so both controllers fit the same slot."""

    def state_dict(self) -> dict[str, Any]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.value = float(state["value"])


class AdaptiveKLController:
    """KL coefficient that steers the measured KL towards ``target`` (Ziegler et al. 2019, ppo-details item 6).

    ``update`` applies ``e = clip(current_kl / target - 1, -0.2, 0.2); beta *= 1 + e * n_steps / horizon``.
    As in lm-human-preferences, ``n_steps`` is the number of episodes since the last update (the batch size),
    so ``horizon`` is measured in episodes.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: float) -> None:
        problems = []
        if not init_kl_coef > 0:
            problems.append(f"init_kl_coef must be > 0 (a multiplicative update cannot leave 0), got {init_kl_coef}")
        if not target > 0:
            problems.append(f"target must be > 0, got {target}")
        if not horizon > 0:
            problems.append(f"horizon must be > 0, got {horizon}")
        if problems:
            raise ValueError("; ".join(problems))
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        """Move beta after a batch whose measured KL was ``current_kl``.

        lm-human-preferences measures KL per sequence (summed over its tokens) and averages over the batch;
        ``target`` must be in the same units as ``current_kl``.
        """
        error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon

    def state_dict(self) -> dict[str, Any]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.value = float(state["value"])


class KLWatch:
    """Notices a mean KL that stays negative: the signature of log-probs that do not belong to the distribution the
    tokens were sampled from (ppo-details item 14). (The learner watches the critic's explained variance with one
    too: a critic worse than a constant for ``patience`` steps in a row.)

    ``KL(pi || ref)`` is never negative, and its sample mean over a batch drawn from ``pi`` is negative only by
    noise. ``update`` counts steps below ``threshold`` (``negative_steps``, for the metrics) and returns True exactly
    once: at the ``patience``-th consecutive such step, when a warning should be shown.
    """

    def __init__(self, threshold: float = -0.1, patience: int = 3) -> None:
        self.threshold = float(threshold)
        self.patience = int(patience)
        self.negative_steps = 0
        self.streak = 0
        self.warned = False

    def update(self, mean_kl: float) -> bool:
        if mean_kl < self.threshold:
            self.negative_steps += 1
            self.streak += 1
        else:
            self.streak = 0
        if self.streak >= self.patience and not self.warned:
            self.warned = True
            return True
        return False

    def state_dict(self) -> dict[str, Any]:
        return {"negative_steps": self.negative_steps, "streak": self.streak, "warned": self.warned}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.negative_steps = int(state["negative_steps"])
        self.streak = int(state["streak"])
        self.warned = bool(state["warned"])
