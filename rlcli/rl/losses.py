"""PPO-clip policy and value losses (ppo-details item 11), and ``ppo_loss``: the whole loss of a micro-batch."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rlcli.rl.critic_free import aggregate_loss
from rlcli.rl.kl import LOG_RATIO_CLAMP, kl_penalty
from rlcli.rl.masked import masked_mean, masked_var


def clipped_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float = 0.2,
    clip_range_high: float | None = None,
    dual_clip: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO-clip surrogate: masked mean of ``max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps_high))``.

    Args:
        logprobs: ``[batch, response_len]`` float, current policy log-probs (carries the gradient).
        old_logprobs: ``[batch, response_len]`` float, log-probs at rollout time (treated as constants).
        advantages: ``[batch, response_len]`` float, usually whitened (treated as constants).
        mask: ``[batch, response_len]`` 0/1 of any dtype, 1 on model tokens.
        clip_range, clip_range_high, dual_clip: see :func:`clipped_policy_terms`.

    Returns:
        ``(loss, stats)``: ``loss`` is a 0-dim tensor; ``stats`` holds detached 0-dim tensors ``clipfrac``
        (fraction of model tokens where the clipped term is the one used), ``approx_kl`` (masked mean of
        ``0.5 * (logprobs - old_logprobs)**2``, as in lm-human-preferences), ``ratio_mean`` and
        ``dual_clipfrac`` (tokens whose loss the dual clip capped; 0 without it).
    """
    per_token, stats = clipped_policy_terms(logprobs, old_logprobs, advantages, mask, clip_range, clip_range_high,
                                            dual_clip)
    return masked_mean(per_token, mask.to(device=logprobs.device, dtype=torch.bool)), stats


def clipped_policy_terms(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float = 0.2,
    clip_range_high: float | None = None,
    dual_clip: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The PPO-clip surrogate per token, before any averaging (``rlcli.rl.critic_free.aggregate_loss`` chooses
    how): ``[batch, response_len]``, 0 where ``mask`` is 0; ``stats`` as ``clipped_policy_loss``.

    The ratio ``r = π / π_old`` counts within ``[1 - clip_range, 1 + clip_range_high]`` (``clip_range_high`` None:
    ``clip_range``, the symmetric clip of Schulman et al. 2017). A larger upper bound lets unlikely tokens with a
    positive advantage grow faster ("clip-higher", DAPO: Yu et al. 2025, 0.2 / 0.28). ``dual_clip`` = c > 1 caps the
    loss of a token with a negative advantage at ``-A · c`` (Ye et al. 2020, "Mastering Complex Control in MOBA
    Games"; verl's ``clip_ratio_c``, 3.0): without it, a token whose ratio has grown far above 1 while its
    advantage is negative gets an unbounded push.
    """
    m = mask.to(device=logprobs.device, dtype=torch.bool)
    high = clip_range if clip_range_high is None else clip_range_high
    # Zero the log-ratio at masked positions before exp: an inf there would turn into a NaN gradient. Clamped to
    # ±LOG_RATIO_CLAMP before exp (verl's compute_policy_loss): far outside the clip the gradient is 0 anyway, and
    # e^100 would make the whole minibatch's loss infinite
    log_ratio = torch.where(m, logprobs - old_logprobs.detach(), torch.zeros_like(logprobs))
    ratio = torch.exp(log_ratio.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
    advantages = advantages.detach()
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + high)
    loss = torch.maximum(unclipped, clipped)
    capped = torch.zeros_like(m)
    if dual_clip is not None:
        cap = -advantages * dual_clip
        capped = (advantages < 0) & (loss > cap)
        loss = torch.where(capped, cap, loss)
    per_token = torch.where(m, loss, torch.zeros_like(loss))
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean((clipped > unclipped).to(ratio.dtype), m),
            "approx_kl": masked_mean(0.5 * log_ratio.square(), m),
            "ratio_mean": masked_mean(ratio, m),
            "dual_clipfrac": masked_mean(capped.to(ratio.dtype), m),
        }
    return per_token, stats


def clipped_value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_range_value: float = 0.2,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped value loss: ``0.5 * masked mean of max((v - R)**2, (clip(v, old - c, old + c) - R)**2)``.

    Args:
        values: ``[batch, response_len]`` float, current value predictions (carries the gradient).
        old_values: ``[batch, response_len]`` float, value predictions at rollout time (constants).
        returns: ``[batch, response_len]`` float, GAE returns (constants).
        mask: ``[batch, response_len]`` 0/1 of any dtype, 1 on model tokens.
        clip_range_value: c.

    Returns:
        ``(loss, stats)``: ``loss`` is a 0-dim tensor; ``stats["vf_clipfrac"]`` is a detached 0-dim tensor,
        the fraction of model tokens where the clipped term is the one used.
    """
    per_token, stats = clipped_value_terms(values, old_values, returns, mask, clip_range_value)
    return masked_mean(per_token, mask.to(device=values.device, dtype=torch.bool)), stats


def clipped_value_terms(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_range_value: float = 0.2,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The clipped value loss per token, ``0.5 * max((v - R)**2, (clip(v) - R)**2)``, 0 where ``mask`` is 0;
    ``stats`` as ``clipped_value_loss``."""
    m = mask.to(device=values.device, dtype=torch.bool)
    old_values = old_values.detach()
    returns = returns.detach()
    values_clipped = old_values + torch.clamp(values - old_values, -clip_range_value, clip_range_value)
    unclipped = (values - returns).square()
    clipped = (values_clipped - returns).square()
    per_token = torch.where(m, 0.5 * torch.maximum(unclipped, clipped), torch.zeros_like(unclipped))
    with torch.no_grad():
        stats = {"vf_clipfrac": masked_mean((clipped > unclipped).to(values.dtype), m)}
    return per_token, stats


@torch.no_grad()
def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``1 - Var[returns - values] / Var[returns]`` over model tokens.

    1 is a perfect value function, 0 no better than a constant, negative worse than one.

    Args:
        values: ``[batch, response_len]`` float.
        returns: ``[batch, response_len]`` float.
        mask: ``[batch, response_len]`` 0/1 of any dtype.

    Returns:
        0-dim float tensor; NaN when the returns have zero variance (the ratio is undefined).
    """
    values = values.detach().to(returns.dtype)
    var_returns = masked_var(returns, mask)
    ratio = masked_var(returns - values, mask) / var_returns
    return torch.where(var_returns > 0, 1.0 - ratio, torch.full_like(ratio, float("nan")))


IMPORTANCE_SAMPLING_MODES = ("none", "token_truncate", "token_mask", "sequence_truncate", "sequence_mask")


@torch.no_grad()
def importance_weights(
    old_logprobs: torch.Tensor,
    sampler_logprobs: torch.Tensor,
    mask: torch.Tensor,
    mode: str,
    cap: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Importance weights π_old / q for tokens drawn by a sampler q that is not the learner's π_old (another engine,
    another precision): the policy loss of each token is multiplied by its weight, so the update is the one π_old's
    own samples would have given (truncated importance sampling, Yao et al. 2025, "Your Efficient RL Framework
    Secretly Brings You Off-Policy RL Training"; TRL's ``vllm_importance_sampling_mode``, verl's rollout correction).

    Args:
        old_logprobs: ``[b, T]`` log π_old of the sampled tokens (the learner's, detached).
        sampler_logprobs: ``[b, T]`` log q of the same tokens (the engine's).
        mask: ``[b, T]`` 0/1, model tokens.
        mode: ``token_*``: a weight per token; ``sequence_*``: one per sequence, exp of the summed log-ratio over
            its model tokens; ``*_truncate``: weights above ``cap`` become ``cap``; ``*_mask``: tokens (sequences)
            whose weight is above ``cap`` get weight 0.
        cap: the bound (> 1).

    Returns:
        ``(weights [b, T], stats)``: weights 0 off the mask; ``is_weight_mean`` (over model tokens, before the cap)
        and ``is_capped_fraction`` (model tokens whose weight the cap truncated or masked), detached 0-dim tensors.
    """
    if mode not in IMPORTANCE_SAMPLING_MODES[1:]:
        raise ValueError(f"unknown importance sampling mode {mode!r}; one of {', '.join(IMPORTANCE_SAMPLING_MODES)}")
    m = mask.to(device=old_logprobs.device, dtype=torch.bool)
    log_w = torch.where(m, old_logprobs - sampler_logprobs.to(old_logprobs), 0.0)
    if mode.startswith("sequence"):
        log_w = log_w.sum(dim=1, keepdim=True).expand_as(log_w)
    w = torch.exp(log_w.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
    over = w > cap
    capped = w.clamp(max=cap) if mode.endswith("truncate") else torch.where(over, torch.zeros_like(w), w)
    stats = {"is_weight_mean": masked_mean(w, m), "is_capped_fraction": masked_mean(over.to(w.dtype), m)}
    return torch.where(m, capped, torch.zeros_like(capped)), stats


@dataclass(frozen=True)
class LossSettings:
    """How ``ppo_loss`` puts its terms together (the recipe's ``ppo`` and ``kl`` sections: no defaults here, so they
    live in one place, the schema)."""

    aggregation: str  # of the policy, KL and entropy terms (the value loss is always a token mean)
    clip_range: float
    clip_range_high: float | None
    dual_clip: float | None
    clip_range_value: float
    vf_coef: float
    kl_estimator: str  # of the KL term, when ``ref_logprobs`` are given (loss mode)
    entropy_coef: float


def ppo_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    settings: LossSettings,
    totals: dict,
    *,
    values: torch.Tensor | None = None,
    old_values: torch.Tensor | None = None,
    returns: torch.Tensor | None = None,
    ref_logprobs: torch.Tensor | None = None,
    kl_coef: float,
    entropy: torch.Tensor | None = None,
    is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The PPO loss of one micro-batch, as its share of the minibatch's: the clipped policy loss, plus ``vf_coef`` ×
    the clipped value loss (with a critic), plus ``kl_coef`` × the KL estimate (``ref_logprobs`` given: the KL in
    the loss, GRPO), minus ``entropy_coef`` × the entropy (``entropy`` given).

    Args:
        logprobs: ``[b, T]`` the current policy's log-probs of the sampled tokens (gradient; 0 off model tokens).
        old_logprobs, advantages: ``[b, T]`` from the rollout (constants); mask: ``[b, T]`` 0/1, model tokens.
        settings: the recipe's knobs (``LossSettings``).
        totals: the minibatch's ``total_tokens`` / ``total_sequences`` / ``constant_length`` (``aggregate_loss``).
        values, old_values, returns: ``[b, T]`` the value head's predictions (gradient) and the rollout's (constants).
        ref_logprobs: ``[b, T]`` the reference's log-probs (constants), for the KL term; kl_coef: its β.
        entropy: ``[b, T]`` the sampling distribution's entropy at each position (gradient).
        is_weights: ``[b, T]`` importance weights of the policy term (``importance_weights``), constants.

    Returns:
        ``(loss, parts)``: the 0-dim loss and its parts: ``loss_policy`` / ``loss_value`` / ``loss_kl`` /
        ``loss_entropy`` (differentiable shares) and detached statistics (``policy_clipfrac``, ``approx_kl``,
        ``ratio``, ``policy_dual_clipfrac``, ``value_clipfrac``).
    """
    s = settings
    pg_terms, pg = clipped_policy_terms(logprobs, old_logprobs, advantages, mask, s.clip_range, s.clip_range_high,
                                        s.dual_clip)
    if is_weights is not None:
        pg_terms = pg_terms * is_weights.detach()
    pg_loss = aggregate_loss(pg_terms, mask, s.aggregation, **totals)
    loss, parts = pg_loss, {"loss_policy": pg_loss, "policy_clipfrac": pg["clipfrac"], "approx_kl": pg["approx_kl"],
                            "ratio": pg["ratio_mean"]}
    if s.dual_clip is not None:
        parts["policy_dual_clipfrac"] = pg["dual_clipfrac"]
    if values is not None and old_values is not None:
        vf_terms, vf = clipped_value_terms(values, old_values, returns, mask, s.clip_range_value)
        vf_loss = aggregate_loss(vf_terms, mask, "token_mean", **totals)
        loss = loss + s.vf_coef * vf_loss
        parts.update({"loss_value": vf_loss, "value_clipfrac": vf["vf_clipfrac"]})
    if ref_logprobs is not None:
        # the gradient flows through the policy's log-probs only (the reference's are constants): k3's is that of
        # KL(π_ref‖π), k2's that of KL(π‖π_ref) (rlcli.rl.kl)
        kl_terms = kl_penalty(logprobs, ref_logprobs.detach(), s.kl_estimator)
        kl_part = aggregate_loss(kl_terms, mask, s.aggregation, **totals)
        loss = loss + kl_coef * kl_part
        parts["loss_kl"] = kl_part
    if entropy is not None:
        entropy_part = aggregate_loss(entropy, mask, s.aggregation, **totals)
        loss = loss - s.entropy_coef * entropy_part
        parts["loss_entropy"] = entropy_part
    return loss, parts
