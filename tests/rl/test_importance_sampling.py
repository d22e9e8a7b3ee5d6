"""Importance weights for tokens drawn by a sampler that is not the learner's π_old (rlcli.rl.losses)."""

from __future__ import annotations

import math

import pytest
import torch

from rlcli.rl.losses import LossSettings, importance_weights, ppo_loss

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
