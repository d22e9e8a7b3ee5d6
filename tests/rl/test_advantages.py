import pytest
import torch

from rlcli.rl.advantages import gae


def _reference_gae(values, rewards, mask, gamma, lam):
    # Textbook GAE on each row's mask==1 positions only, written out with Python floats.
    advantages = [[0.0] * len(row) for row in values]
    returns = [[0.0] * len(row) for row in values]
    for b, (v_row, r_row, m_row) in enumerate(zip(values, rewards, mask)):
        kept = [t for t, m in enumerate(m_row) if m]
        last = 0.0
        for i in reversed(range(len(kept))):
            t = kept[i]
            next_value = v_row[kept[i + 1]] if i + 1 < len(kept) else 0.0
            delta = r_row[t] + gamma * next_value - v_row[t]
            last = delta + gamma * lam * last
            advantages[b][t] = last
            returns[b][t] = last + v_row[t]
    return torch.tensor(advantages), torch.tensor(returns)


def test_gae_1x4_by_hand():
    values = torch.tensor([[0.1, 0.2, 0.3, 0.4]])
    rewards = torch.tensor([[0.0, 0.0, 0.0, 1.0]])
    mask = torch.ones(1, 4)
    advantages, returns = gae(values, rewards, mask, gamma=1.0, lam=0.95)
    # t=3: 1 - 0.4 = 0.6;  t=2: (0.4 - 0.3) + 0.95 * 0.6 = 0.67
    # t=1: 0.1 + 0.95 * 0.67 = 0.7365;  t=0: 0.1 + 0.95 * 0.7365 = 0.799675
    torch.testing.assert_close(advantages, torch.tensor([[0.799675, 0.7365, 0.67, 0.6]]))
    torch.testing.assert_close(returns, torch.tensor([[0.899675, 0.9365, 0.97, 1.0]]))


def test_gae_with_discount_by_hand():
    values = torch.tensor([[1.0, 2.0]])
    rewards = torch.tensor([[0.5, 3.0]])
    advantages, _ = gae(values, rewards, torch.ones(1, 2), gamma=0.9, lam=0.5)
    # t=1: 3 - 2 = 1;  t=0: 0.5 + 0.9 * 2 - 1 + 0.9 * 0.5 * 1 = 1.75
    torch.testing.assert_close(advantages, torch.tensor([[1.75, 1.0]]))


def test_hole_in_the_middle_equals_hole_removed():
    values = torch.tensor([[0.1, 0.2, 7.0, 8.0, 0.3, 0.4, 9.0]])
    rewards = torch.tensor([[0.0, 0.0, 5.0, 5.0, -0.1, 1.0, 5.0]])
    mask = torch.tensor([[1, 1, 0, 0, 1, 1, 0]])  # tool output at 2-3, padding at 6
    advantages, returns = gae(values, rewards, mask, gamma=1.0, lam=0.95)

    kept = mask[0].bool()
    cut_adv, cut_ret = gae(values[:, kept], rewards[:, kept], torch.ones(1, 4), gamma=1.0, lam=0.95)
    torch.testing.assert_close(advantages[:, kept], cut_adv)
    torch.testing.assert_close(returns[:, kept], cut_ret)
    assert torch.all(advantages[:, ~kept] == 0) and torch.all(returns[:, ~kept] == 0)
    # t=5: 1 - 0.4 = 0.6; t=4: -0.1 + 0.4 - 0.3 + 0.57 = 0.57; t=1: 0.3 - 0.2 + 0.5415 = 0.6415;
    # t=0: 0.2 - 0.1 + 0.95 * 0.6415 = 0.709425
    torch.testing.assert_close(cut_adv, torch.tensor([[0.709425, 0.6415, 0.57, 0.6]]))


@pytest.mark.parametrize("gamma, lam", [(1.0, 0.95), (0.9, 0.8), (0.99, 1.0)])
def test_matches_reference_loop_on_random_batch(gamma, lam):
    g = torch.Generator().manual_seed(0)
    values = torch.randn(5, 9, generator=g)
    rewards = torch.randn(5, 9, generator=g)
    mask = (torch.rand(5, 9, generator=g) > 0.35).long()
    mask[0] = 0
    mask[1] = 1
    advantages, returns = gae(values, rewards, mask, gamma=gamma, lam=lam)
    ref_adv, ref_ret = _reference_gae(values.tolist(), rewards.tolist(), mask.tolist(), gamma, lam)
    torch.testing.assert_close(advantages, ref_adv)
    torch.testing.assert_close(returns, ref_ret)


def test_masked_values_and_rewards_are_never_read():
    g = torch.Generator().manual_seed(1)
    values = torch.randn(3, 8, generator=g)
    rewards = torch.randn(3, 8, generator=g)
    mask = torch.tensor([[1, 0, 0, 1, 1, 0, 1, 0], [0, 1, 1, 1, 1, 1, 0, 0], [0] * 8])
    advantages, returns = gae(values, rewards, mask)
    hole = ~mask.bool()
    changed_values = values.masked_fill(hole, float("nan"))
    changed_rewards = rewards.masked_fill(hole, 100.0)
    adv2, ret2 = gae(changed_values, changed_rewards, mask.float())
    torch.testing.assert_close(adv2, advantages)
    torch.testing.assert_close(ret2, returns)
    assert torch.all(advantages[2] == 0)


def test_no_gradient():
    values = torch.randn(2, 3, requires_grad=True)
    advantages, returns = gae(values, torch.randn(2, 3), torch.ones(2, 3))
    assert not advantages.requires_grad and not returns.requires_grad


def test_defaults_are_gamma_1_and_lambda_0_95():
    values = torch.tensor([[0.1, 0.2, 0.3, 0.4]])
    rewards = torch.tensor([[0.0, 0.0, 0.0, 1.0]])
    mask = torch.ones(1, 4)
    for got, expected in zip(gae(values, rewards, mask), gae(values, rewards, mask, gamma=1.0, lam=0.95)):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
