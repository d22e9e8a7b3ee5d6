"""The loss functions of rlcli/rl/losses.py on hand-computed examples: the clipped policy and value losses, explained
variance, the assembled PPO loss, and importance weights for tokens drawn by a sampler that is not the learner's
π_old."""

from __future__ import annotations

import math

import pytest
import torch

from rlcli.rl.losses import (
    LossSettings,
    clipped_policy_loss,
    clipped_policy_terms,
    clipped_value_loss,
    explained_variance,
    importance_weights,
    ppo_loss,
)


def test_policy_loss_without_clipping():
    old = torch.tensor([[-1.0, -2.0]])
    logp = (old + torch.tensor([[math.log(1.1), math.log(0.9)]])).requires_grad_(True)
    advantages = torch.tensor([[1.0, -1.0]])
    loss, stats = clipped_policy_loss(logp, old, advantages, torch.ones(1, 2), clip_range=0.2)
    # ratios 1.1, 0.9 are inside [0.8, 1.2]: mean(-1 * 1.1, 1 * 0.9) = -0.1
    torch.testing.assert_close(loss, torch.tensor(-0.1))
    assert stats["clipfrac"].item() == 0.0
    # 0.5 * mean(ln(1.1)^2, ln(0.9)^2) = 0.5 * (0.00908403 + 0.01110084) / 2
    torch.testing.assert_close(stats["approx_kl"], torch.tensor(0.00504622))
    torch.testing.assert_close(stats["ratio_mean"], torch.tensor(1.0))
    loss.backward()
    # d/dlogp of -A * ratio / 2 = -A * ratio / 2
    torch.testing.assert_close(logp.grad, torch.tensor([[-0.55, 0.45]]))


def test_policy_loss_with_clipping():
    old = torch.zeros(1, 5)
    logp = torch.log(torch.tensor([[1.5, 0.5, 1.5, 0.5, 10.0]])).requires_grad_(True)
    advantages = torch.tensor([[1.0, -1.0, -1.0, 1.0, 100.0]])
    mask = torch.tensor([[1, 1, 1, 1, 0]])
    loss, stats = clipped_policy_loss(logp, old, advantages, mask, clip_range=0.2)
    # per token max(-A r, -A clip(r)): -1.2 (clipped), 0.8 (clipped), 1.5, -0.5; the masked token is ignored
    torch.testing.assert_close(loss, torch.tensor((-1.2 + 0.8 + 1.5 - 0.5) / 4))
    torch.testing.assert_close(stats["clipfrac"], torch.tensor(0.5))
    torch.testing.assert_close(stats["ratio_mean"], torch.tensor(1.0))
    assert not any(v.requires_grad for v in stats.values())
    loss.backward()
    # clipped tokens get no gradient; the others get -A * r / 4; the masked one none
    torch.testing.assert_close(logp.grad, torch.tensor([[0.0, 0.0, 0.375, -0.125, 0.0]]))


def test_policy_loss_survives_inf_at_masked_positions():
    logp = torch.tensor([[-1.0, 50.0]], requires_grad=True)
    old = torch.tensor([[-1.0, -float("inf")]])
    loss, _ = clipped_policy_loss(logp, old, torch.tensor([[1.0, 1.0]]), torch.tensor([[1, 0]]))
    loss.backward()
    assert torch.isfinite(loss) and torch.all(torch.isfinite(logp.grad))


def test_value_loss_with_clipping():
    old = torch.tensor([[0.0, 0.0, 0.0, 0.0]])
    values = torch.tensor([[0.1, 0.5, 0.5, 9.0]], requires_grad=True)
    returns = torch.tensor([[1.0, 1.0, 0.0, -9.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    loss, stats = clipped_value_loss(values, old, returns, mask, clip_range_value=0.2)
    # token 0: inside the clip range, 0.9^2 = 0.81
    # token 1: max(0.5^2, (0.2 - 1)^2) = 0.64 (clipped term used)
    # token 2: max(0.5^2, 0.2^2) = 0.25 (unclipped term used)
    torch.testing.assert_close(loss, torch.tensor(0.5 * (0.81 + 0.64 + 0.25) / 3))
    torch.testing.assert_close(stats["vf_clipfrac"], torch.tensor(1 / 3))
    loss.backward()
    # d/dv of 0.5 * (v - R)^2 / 3 = (v - R) / 3 where the unclipped term is used
    torch.testing.assert_close(values.grad, torch.tensor([[-0.9 / 3, 0.0, 0.5 / 3, 0.0]]))


def test_value_loss_without_clipping_is_half_mse():
    old = torch.tensor([[1.0, 2.0]])
    values = torch.tensor([[1.1, 1.9]])
    returns = torch.tensor([[2.0, 1.0]])
    loss, stats = clipped_value_loss(values, old, returns, torch.ones(1, 2), clip_range_value=0.2)
    torch.testing.assert_close(loss, torch.tensor(0.5 * (0.81 + 0.81) / 2))
    assert stats["vf_clipfrac"].item() == 0.0


def test_explained_variance_by_hand():
    returns = torch.tensor([[1.0, 2.0, 3.0, 4.0, 100.0]])
    values = torch.tensor([[1.0, 2.0, 3.0, 3.0, -100.0]])
    mask = torch.tensor([[1, 1, 1, 1, 0]])
    # residuals [0, 0, 0, 1]: var 0.25; var(returns) = 5/3; 1 - 0.25 / (5/3) = 0.85
    torch.testing.assert_close(explained_variance(values, returns, mask), torch.tensor(0.85))
    torch.testing.assert_close(explained_variance(returns, returns, mask), torch.tensor(1.0))
    flat = torch.ones(1, 5)
    assert math.isnan(explained_variance(values, flat, mask).item())


@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.long, torch.float32])
def test_mask_dtypes(mask_dtype):
    mask = torch.tensor([[1, 0]]).to(mask_dtype)
    loss, _ = clipped_policy_loss(torch.zeros(1, 2), torch.zeros(1, 2), torch.tensor([[2.0, 5.0]]), mask)
    torch.testing.assert_close(loss, torch.tensor(-2.0))


def test_clip_higher_widens_only_the_upper_bound():
    """DAPO's clip-higher: ratios count within [1 - 0.2, 1 + 0.28]."""
    old = torch.zeros(1, 4)
    logp = torch.log(torch.tensor([[1.25, 1.5, 0.7, 1.25]])).requires_grad_(True)
    advantages = torch.tensor([[1.0, 1.0, 1.0, -1.0]])
    loss, stats = clipped_policy_loss(logp, old, advantages, torch.ones(1, 4), clip_range=0.2, clip_range_high=0.28)
    # A > 0: min(r, clip(r)) -> 1.25 (inside the wider bound), 1.28 (clipped), 0.7 (below: the unclipped counts);
    # A < 0: max(r, clip(r)) -> 1.25 (inside [0.8, 1.28]); per-token loss = -A * that
    torch.testing.assert_close(loss, torch.tensor((-1.25 - 1.28 - 0.7 + 1.25) / 4))
    torch.testing.assert_close(stats["clipfrac"], torch.tensor(0.25))
    loss.backward()
    # gradient -A * r / 4 where the unclipped term is used, 0 at the clipped token
    torch.testing.assert_close(logp.grad, torch.tensor([[-1.25 / 4, 0.0, -0.7 / 4, 1.25 / 4]]))
    # the symmetric clip would have cut the first token at 1.2
    symmetric, _ = clipped_policy_loss(logp.detach(), old, advantages, torch.ones(1, 4), clip_range=0.2)
    torch.testing.assert_close(symmetric, torch.tensor((-1.2 - 1.2 - 0.7 + 1.25) / 4))


def test_dual_clip_caps_the_loss_of_negative_advantages():
    """Dual-clip (Ye et al. 2020, verl's clip_ratio_c): with A < 0 the loss is at most -A * c."""
    old = torch.zeros(1, 4)
    logp = torch.log(torch.tensor([[5.0, 2.0, 5.0, 0.5]])).requires_grad_(True)
    advantages = torch.tensor([[-2.0, -2.0, 1.0, -2.0]])
    loss, stats = clipped_policy_loss(logp, old, advantages, torch.ones(1, 4), clip_range=0.2, dual_clip=3.0)
    # token 0: max(2 * 5, 2 * 1.2) = 10, capped at 2 * 3 = 6; token 1: 4 < 6, kept; token 2 (A > 0): min(5, 1.2) -> -1.2;
    # token 3: max(2 * 0.5, 2 * 0.8) = 1.6
    torch.testing.assert_close(loss, torch.tensor((6.0 + 4.0 - 1.2 + 1.6) / 4))
    torch.testing.assert_close(stats["dual_clipfrac"], torch.tensor(0.25))
    loss.backward()
    # the capped token is a constant (no gradient), token 1 gets -A * r / 4 = 1, the clipped ones 0
    torch.testing.assert_close(logp.grad, torch.tensor([[0.0, 1.0, 0.0, 0.0]]))
    plain, plain_stats = clipped_policy_loss(logp.detach(), old, advantages, torch.ones(1, 4), clip_range=0.2)
    torch.testing.assert_close(plain, torch.tensor((10.0 + 4.0 - 1.2 + 1.6) / 4))
    assert plain_stats["dual_clipfrac"].item() == 0.0
    # only negative advantages are capped: a small positive one (-A * c > its loss) keeps its clipped surrogate
    small = torch.tensor([[0.5]])
    loss_small, stats_small = clipped_policy_loss(torch.log(torch.tensor([[1.1]])), torch.zeros(1, 1), small,
                                                  torch.ones(1, 1), clip_range=0.2, dual_clip=3.0)
    torch.testing.assert_close(loss_small, torch.tensor(-0.55))
    assert stats_small["dual_clipfrac"].item() == 0.0


def test_ppo_loss_adds_its_parts_as_the_settings_say():
    """ppo_loss = policy + vf_coef · value + kl_coef · KL - entropy_coef · entropy, each aggregated as asked."""
    from rlcli.rl.losses import LossSettings, clipped_value_loss, ppo_loss

    old = torch.zeros(2, 3)
    logp = torch.log(torch.tensor([[1.1, 0.9, 1.0], [1.0, 1.3, 1.0]])).requires_grad_(True)
    adv = torch.tensor([[1.0, -1.0, 0.0], [2.0, 1.0, 0.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 0]]).float()
    totals = dict(total_tokens=4.0, total_sequences=2.0, constant_length=None)
    settings = LossSettings(aggregation="token_mean", clip_range=0.2, clip_range_high=None, dual_clip=None,
                            clip_range_value=0.2, vf_coef=0.5, kl_estimator="k2", entropy_coef=0.1)
    values = torch.tensor([[0.5, 0.5, 0.0], [1.0, 1.0, 0.0]], requires_grad=True)
    returns = torch.tensor([[1.0, 0.0, 0.0], [1.0, 2.0, 0.0]])
    ref = torch.full((2, 3), -0.5)
    entropy = torch.full((2, 3), 2.0, requires_grad=True)
    loss, parts = ppo_loss(logp, old, adv, mask, settings, totals, values=values, old_values=values.detach(),
                           returns=returns, ref_logprobs=ref, kl_coef=0.2, entropy=entropy)
    policy, _ = clipped_policy_loss(logp, old, adv, mask, clip_range=0.2)
    value, _ = clipped_value_loss(values, values.detach(), returns, mask, 0.2)
    d = (logp - ref)[mask.bool()]
    kl = (0.5 * d**2).mean()
    torch.testing.assert_close(loss, policy + 0.5 * value + 0.2 * kl - 0.1 * 2.0)
    assert set(parts) == {"loss_policy", "loss_value", "loss_kl", "loss_entropy", "policy_clipfrac", "approx_kl",
                          "ratio", "value_clipfrac"}  # no dual-clip statistic without dual_clip
    loss.backward()
    assert (entropy.grad[mask.bool()] < 0).all() and values.grad.abs().sum() > 0  # the bonus pushes entropy up
    _, with_dual = ppo_loss(logp.detach(), old, adv, mask, LossSettings(**{**settings.__dict__, "dual_clip": 3.0}),
                            totals, kl_coef=0.0)
    assert "policy_dual_clipfrac" in with_dual and "loss_value" not in with_dual and "loss_kl" not in with_dual


def test_policy_loss_default_clip_range_is_0_2():
    logp = torch.log(torch.tensor([[1.5, 0.5]]))
    loss, stats = clipped_policy_loss(logp, torch.zeros(1, 2), torch.tensor([[1.0, -1.0]]), torch.ones(1, 2))
    # ratios clipped to 1.2 and 0.8: mean(-1.2, 0.8)
    torch.testing.assert_close(loss, torch.tensor(-0.2))
    assert stats["clipfrac"].item() == 1.0


def test_value_loss_default_clip_range_is_0_2():
    # v moved from 0 to 1, return 1: the clipped prediction 0.2 is the worse one: 0.5 * 0.8**2
    loss, stats = clipped_value_loss(torch.tensor([[1.0]]), torch.zeros(1, 1), torch.ones(1, 1), torch.ones(1, 1))
    torch.testing.assert_close(loss, torch.tensor(0.32))
    assert stats["vf_clipfrac"].item() == 1.0


def test_only_the_new_log_probs_and_values_get_gradients():
    """Old log-probs, advantages, old values and returns are constants of the loss, even when they carry a graph."""
    logp = torch.tensor([[-1.0, -0.5]], requires_grad=True)
    old = torch.tensor([[-1.1, -0.4]], requires_grad=True)
    adv = torch.tensor([[1.0, -1.0]], requires_grad=True)
    loss, _ = clipped_policy_loss(logp, old, adv, torch.ones(1, 2))
    loss.backward()
    assert logp.grad is not None and old.grad is None and adv.grad is None
    values = torch.tensor([[0.5, 0.1]], requires_grad=True)
    old_values = torch.tensor([[0.4, 0.0]], requires_grad=True)
    returns = torch.tensor([[1.0, 0.0]], requires_grad=True)
    loss, _ = clipped_value_loss(values, old_values, returns, torch.ones(1, 2))
    loss.backward()
    assert values.grad is not None and old_values.grad is None and returns.grad is None


def test_per_token_terms_default_clip_ranges_are_0_2():
    from rlcli.rl.losses import clipped_policy_terms, clipped_value_terms

    terms, _ = clipped_policy_terms(torch.log(torch.tensor([[1.5]])), torch.zeros(1, 1), torch.ones(1, 1),
                                    torch.ones(1, 1))
    torch.testing.assert_close(terms, torch.tensor([[-1.2]]))
    terms, _ = clipped_value_terms(torch.tensor([[1.0]]), torch.zeros(1, 1), torch.ones(1, 1), torch.ones(1, 1))
    torch.testing.assert_close(terms, torch.tensor([[0.32]]))


def test_explained_variance_of_small_returns():
    # returns [0, 0.2]: variance 0.02 (below 1 but not 0); residuals [-0.05, 0.05]: variance 0.005
    ev = explained_variance(torch.tensor([[0.05, 0.15]]), torch.tensor([[0.0, 0.2]]), torch.ones(1, 2))
    torch.testing.assert_close(ev, torch.tensor(0.75))


def test_policy_ratio_is_clamped_before_exp():
    """The log-ratio is clamped to ±20 before exp (verl): a token whose log-prob rose by 100 nats with a negative
    advantage gives a finite loss of |A|·e^20, not inf, and no gradient (it is beyond the clamp)."""
    import math

    logp = torch.tensor([[-0.0, -1.0]], requires_grad=True)
    old = torch.tensor([[-100.0, -1.0]])
    adv = torch.tensor([[-1.0, 1.0]])
    per_token, stats = clipped_policy_terms(logp, old, adv, torch.ones(1, 2))
    assert torch.isfinite(per_token).all()
    torch.testing.assert_close(per_token[0, 0], torch.tensor(math.exp(20.0)))
    per_token.sum().backward()
    assert logp.grad[0, 0] == 0.0 and logp.grad[0, 1] == -1.0  # the second token: ratio 1, gradient -A


# --- importance weights for tokens drawn by a sampler that is not the learner's π_old ---------------------------------

# two rows of three tokens, the last token of row 1 is padding; log π_old - log q per token:
# row 0: log 3, log 0.5, log 1.5 (sum log 2.25); row 1: log 0.8, log 4, (pad)
OLD = torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.0, 9.0]])
RATIOS = torch.tensor([[3.0, 0.5, 1.5], [0.8, 4.0, 1.0]])
SAMPLER = OLD - torch.log(RATIOS)
MASK = torch.tensor([[1, 1, 1], [1, 1, 0]]).float()


@pytest.mark.parametrize("mode, expected, capped", [
    # per token: 3 -> 2 and 4 -> 2 (truncated) or 0 (masked)
    ("token_truncate", [[2.0, 0.5, 1.5], [0.8, 2.0, 0.0]], 2 / 5),
    ("token_mask", [[0.0, 0.5, 1.5], [0.8, 0.0, 0.0]], 2 / 5),
    # per sequence: 3 × 0.5 × 1.5 = 2.25 -> capped; 0.8 × 4 = 3.2 -> capped
    ("sequence_truncate", [[2.0, 2.0, 2.0], [2.0, 2.0, 0.0]], 1.0),
    ("sequence_mask", [[0.0, 0.0, 0.0], [0.0, 0.0, 0.0]], 1.0),
])
def test_weights_by_hand(mode, expected, capped):
    weights, stats = importance_weights(OLD, SAMPLER, MASK, mode, cap=2.0)
    torch.testing.assert_close(weights, torch.tensor(expected))
    assert stats["is_capped_fraction"].item() == pytest.approx(capped)
    raw = [3.0, 0.5, 1.5, 0.8, 4.0] if mode.startswith("token") else [2.25] * 3 + [3.2] * 2
    assert stats["is_weight_mean"].item() == pytest.approx(sum(raw) / 5, rel=1e-6)


def test_a_sequence_below_the_cap_keeps_its_weight_and_an_unknown_mode_is_refused():
    weights, stats = importance_weights(OLD, SAMPLER, MASK, "sequence_mask", cap=3.0)
    torch.testing.assert_close(weights, torch.tensor([[2.25, 2.25, 2.25], [0.0, 0.0, 0.0]]))
    assert stats["is_capped_fraction"].item() == pytest.approx(2 / 5)
    for mode in ("tokens", "none"):  # "none" means no weights at all: the caller does not call this
        with pytest.raises(ValueError, match="token_truncate"):
            importance_weights(OLD, SAMPLER, MASK, mode, cap=2.0)


@pytest.mark.parametrize("mode", ["token_mask", "sequence_mask", "token_truncate"])
def test_a_weight_at_the_cap_is_kept(mode):
    """Only weights *above* the cap are truncated or masked: the sampler equal to π_old gives weights of exactly 1,
    kept whole under a cap of 1."""
    weights, stats = importance_weights(OLD, OLD, MASK, mode, cap=1.0)
    torch.testing.assert_close(weights, MASK)
    assert stats["is_capped_fraction"].item() == 0.0 and stats["is_weight_mean"].item() == 1.0


def test_the_corrected_gradient_is_the_policys_own_and_the_uncorrected_is_the_samplers():
    """One-token episodes from a sampler q = softmax(θ / 1.7) while the learner's π = softmax(θ): the policy
    gradient of ppo_loss estimated from q's samples with weights π/q (a cap no weight reaches) matches the exact
    on-policy gradient -Σ_y π(y) A(y) ∇log π(y); without the weights it matches q's instead."""
    torch.manual_seed(0)
    theta = torch.tensor([2.0, 0.5, 0.0, -1.0, 1.0])
    advantage = torch.tensor([1.0, -0.5, 0.3, 2.0, -1.0])
    pi, q = torch.softmax(theta, 0), torch.softmax(theta / 1.7, 0)
    n = 200_000
    y = torch.multinomial(q, n, replacement=True)

    def exact(dist):  # -Σ_y dist(y) A(y) ∇_θ log π(y), with ∇_θ log π(y) = onehot(y) - π
        return -(dist[:, None] * advantage[:, None] * (torch.eye(5) - pi)).sum(0)

    settings = LossSettings(aggregation="token_mean", clip_range=0.2, clip_range_high=None, dual_clip=None,
                            clip_range_value=0.2, vf_coef=0.0, kl_estimator="k3", entropy_coef=0.0)
    grads = {}
    for corrected in (True, False):
        t = theta.clone().requires_grad_(True)
        logp = torch.log_softmax(t, 0)[y][:, None]
        old = logp.detach()
        mask = torch.ones(n, 1)
        weights = None
        if corrected:
            weights, _ = importance_weights(old, torch.log(q)[y][:, None], mask, "token_truncate", cap=100.0)
        loss, _ = ppo_loss(logp, old, advantage[y][:, None], mask, settings, {"total_tokens": n, "total_sequences": n},
                           kl_coef=0.0, is_weights=weights)
        loss.backward()
        grads[corrected] = t.grad
    on_policy, sampler = exact(pi), exact(q)
    assert (grads[True] - on_policy).norm() < 0.03 * on_policy.norm()
    assert (grads[False] - sampler).norm() < 0.03 * sampler.norm()
    assert (on_policy - sampler).norm() > 0.2 * on_policy.norm()  # 0.29: the test can tell the two apart
