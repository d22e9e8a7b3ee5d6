"""The estimator registry: each entry's advantage function by hand, and the registry agrees with the recipe schema."""

from __future__ import annotations

import typing

import torch

from rlcli.rl.estimators import ESTIMATORS, AdvantageInputs

MASK = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 0, 0], [1, 1, 0]]).float()
NO_KL = torch.zeros(4, 3)


def test_the_schema_offers_exactly_the_registered_estimators():
    from rlcli.config.ppo import PPOAlgo

    assert set(typing.get_args(PPOAlgo.model_fields["advantage"].annotation)) == set(ESTIMATORS)
    for e in ESTIMATORS.values():
        assert e.paper and e.description and e.kl_mode in ("reward", "loss")
        assert e.critic == (e.name == "gae")


def test_reinforce_pp_with_group_scaling_divides_by_the_group_std():
    """reinforce_pp + advantage_scaling=group: the advantages are scaled by their group's std (the scores are passed
    on for it)."""
    _, advantages, _ = ESTIMATORS["reinforce_pp"].advantages(torch.tensor([1.0, 3.0, 0.0, 0.0]), NO_KL, MASK,
                                                            AdvantageInputs(beta=0.0, group_size=2, scaling="group"))
    # group 1: scores 1, 3 -> minus the mean 2 -> -1, +1, over the group's std sqrt(2), on every model token (the
    # return-to-go of a final reward); group 2: all equal, advantage 0
    r = 2 ** -0.5
    torch.testing.assert_close(advantages, torch.tensor([[-r, -r, 0.0], [r, r, r], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]),
                               atol=1e-5, rtol=0)


def test_rloo_and_grpo_by_hand_with_the_kl_in_the_reward():
    scores = torch.tensor([1.0, 3.0, 0.0, 2.0])
    kl = torch.tensor([[0.5, 0.5, 9.0], [0.0, 0.0, 0.0], [1.0, 9.0, 9.0], [0.0, 0.0, 0.0]])  # 9s: off the mask
    x = AdvantageInputs(beta=0.1, group_size=2, scaling="none")
    # sequence rewards: score - β·ΣKL over model tokens = 0.9, 3, -0.1, 2
    _, rloo, _ = ESTIMATORS["rloo"].advantages(scores, kl, MASK, x)
    torch.testing.assert_close(rloo[:, 0], torch.tensor([0.9 - 3.0, 3.0 - 0.9, -0.1 - 2.0, 2.0 + 0.1]))
    _, grpo, _ = ESTIMATORS["grpo"].advantages(scores, kl, MASK, x)
    torch.testing.assert_close(grpo[:, 0], torch.tensor([-1.05, 1.05, -1.05, 1.05]))
    assert (grpo[MASK == 0] == 0).all() and (rloo[MASK == 0] == 0).all()


def test_gae_entry_with_the_default_inputs():
    """The registry's gae with AdvantageInputs' defaults (γ 1, λ 0.95, no reward whitening, advantage whitening) is
    rl.advantages.gae followed by masked whitening; the critic flags say which estimators need a value head."""
    from rlcli.rl.advantages import gae
    from rlcli.rl.masked import masked_whiten
    from rlcli.rl.rewards import score_and_kl_rewards

    scores = torch.tensor([1.0, 3.0, 0.0, 2.0])
    values = torch.tensor([[0.1, 0.2, 0.0], [0.3, 0.1, 0.2], [0.0, 0.0, 0.0], [0.5, 0.4, 0.0]])
    kl = torch.full((4, 3), 0.2)
    x = AdvantageInputs(beta=0.1, values=values)
    assert (x.group_size, x.scaling, x.gamma, x.lam, x.whiten_rewards) == (1, "none", 1.0, 0.95, False)
    assert ESTIMATORS["gae"].scaling == "batch"  # a recipe's default for gae: whitened advantages
    x = AdvantageInputs(beta=0.1, values=values, scaling="batch")
    rewards, advantages, returns = ESTIMATORS["gae"].advantages(scores, kl, MASK, x)
    want_rewards = score_and_kl_rewards(scores, kl, MASK, 0.1)
    want_adv, want_ret = gae(values, want_rewards, MASK, 1.0, 0.95)
    torch.testing.assert_close(rewards, want_rewards)
    torch.testing.assert_close(returns, want_ret)
    torch.testing.assert_close(advantages, masked_whiten(want_adv, MASK))
    assert [name for name, e in ESTIMATORS.items() if e.critic] == ["gae"]
    for e in ESTIMATORS.values():  # every critic-free entry runs without values
        if not e.critic:
            e.advantages(scores, kl, MASK, AdvantageInputs(beta=0.1, group_size=2, scaling=e.scaling))


def test_group_scaling_divides_the_scores_never_the_kl():
    """GRPO's group std scales the score part only: a group whose scores agree gets -β × (its KL minus the group's
    mean KL), not KL noise blown up to ±1; a group whose scores differ gets (score - mean) / std - β·(KL - mean KL)."""
    scores = torch.tensor([1.0, 1.0, 0.0, 1.0])
    kl = torch.tensor([[0.2, 0.1, 9.0], [0.1, 0.0, 0.0], [0.5, 9.0, 9.0], [0.1, 0.1, 9.0]])  # 9s: off the mask
    x = AdvantageInputs(beta=0.1, group_size=2, scaling="group")
    _, grpo, _ = ESTIMATORS["grpo"].advantages(scores, kl, MASK, x)
    # group 1: equal scores; ΣKL 0.3 and 0.1, mean 0.2 -> -0.1·(±0.1)
    # group 2: scores 0, 1 -> ∓0.5 / std (sqrt(0.5)); ΣKL 0.5 and 0.2, mean 0.35 -> -0.1·(±0.15)
    s = 0.5 / 0.5 ** 0.5
    want = torch.tensor([-0.01, 0.01, -s - 0.015, s + 0.015])
    torch.testing.assert_close(grpo[:, 0], want, atol=2e-6, rtol=0)
    assert (grpo[MASK == 0] == 0).all()
    # reinforce_pp with group scaling: the centred score over the group's std, the per-token KL rewards unscaled
    _, rpp, _ = ESTIMATORS["reinforce_pp"].advantages(scores, kl, MASK, x)
    # row 0 (group 1, score part 0): return-to-go of -0.1·KL = [-0.03, -0.01]
    torch.testing.assert_close(rpp[0, :2], torch.tensor([-0.03, -0.01]), atol=1e-6, rtol=0)
    # row 3 (group 2, score part +s): [s - 0.02, s - 0.01]
    torch.testing.assert_close(rpp[3, :2], torch.tensor([s - 0.02, s - 0.01]), atol=2e-6, rtol=0)


def test_whitening_in_the_estimators_has_a_floor():
    """gae's advantage whitening and reinforce_pp's batch scaling divide by at least WHITEN_MIN_STD: a batch whose
    advantages hardly differ keeps them small instead of scaling noise up to ±1."""
    from rlcli.rl.masked import WHITEN_MIN_STD

    mask = torch.ones(2, 2)
    scores = torch.tensor([1.0, 1.001])
    # gae with values 0 and no KL: every token's advantage is its row's score; mean 1.0005, std 5.8e-4 < the floor
    x = AdvantageInputs(beta=0.0, values=torch.zeros(2, 2), lam=1.0, scaling="batch")
    _, adv, _ = ESTIMATORS["gae"].advantages(scores, torch.zeros(2, 2), mask, x)
    torch.testing.assert_close(adv, torch.tensor([[-0.0005, -0.0005], [0.0005, 0.0005]]) / WHITEN_MIN_STD,
                               atol=1e-5, rtol=0)
    x = AdvantageInputs(beta=0.0, scaling="batch")
    _, adv, _ = ESTIMATORS["reinforce_pp"].advantages(scores, torch.zeros(2, 2), mask, x)
    torch.testing.assert_close(adv, torch.tensor([[-0.0005, -0.0005], [0.0005, 0.0005]]) / WHITEN_MIN_STD,
                               atol=1e-5, rtol=0)
    # whiten_rewards keeps the mean and divides by the floored std too: rewards [0, 0.001], [0, 0.002] (the score on
    # the last token), mean 0.00075, std 9.6e-4 < the floor: (r - mean) / 0.01 + mean
    x = AdvantageInputs(beta=0.0, values=torch.zeros(2, 2), lam=1.0, whiten_rewards=True)
    rewards, _, _ = ESTIMATORS["gae"].advantages(torch.tensor([0.001, 0.002]), torch.zeros(2, 2), mask, x)
    m = 0.00075
    want = (torch.tensor([[0.0, 0.001], [0.0, 0.002]]) - m) / WHITEN_MIN_STD + m
    torch.testing.assert_close(rewards, want, atol=1e-5, rtol=0)


def test_the_critic_can_learn_towards_returns_of_its_own_lambda():
    """Decoupled GAE (VC-PPO): the policy's advantages from ppo.lam, the critic's targets from critic.lam."""
    from rlcli.rl.advantages import gae
    from rlcli.rl.rewards import score_and_kl_rewards

    scores = torch.tensor([1.0, 0.0, 1.0, 0.0])
    values = torch.tensor([[0.3, 0.6, 0.0], [0.2, 0.1, 0.5], [0.9, 0.0, 0.0], [0.4, 0.2, 0.0]])
    kl = torch.full((4, 3), 0.1)
    x = AdvantageInputs(beta=0.1, values=values, lam=0.9, critic_lam=1.0)
    rewards, advantages, returns = ESTIMATORS["gae"].advantages(scores, kl, MASK, x)
    want_rewards = score_and_kl_rewards(scores, kl, MASK, 0.1)
    torch.testing.assert_close(advantages, gae(values, want_rewards, MASK, 1.0, 0.9)[0])
    torch.testing.assert_close(returns, gae(values, want_rewards, MASK, 1.0, 1.0)[1])
    # λ = 1: the returns are the rewards to go, whatever the values (row 0: r = -0.01, 1 - 0.01; 0 off the mask)
    torch.testing.assert_close(returns[0], torch.tensor([0.98, 0.99, 0.0]))
