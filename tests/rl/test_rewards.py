import math

import pytest
import torch

from rlcli.rl.rewards import RunningMoments, per_token_rewards

LOGP = torch.tensor(
    [
        [-1.0, -2.0, -0.5, -3.0, -3.0],
        [-0.2, -0.3, -0.4, -0.5, -0.6],
        [-1.0, -1.0, -1.0, -1.0, -1.0],
    ]
)
REF = torch.tensor(
    [
        [-1.5, -1.0, -0.5, -1.0, -1.0],
        [-0.4, -9.0, -0.2, -1.0, -0.6],
        [-2.0, -2.0, -2.0, -2.0, -2.0],
    ]
)
MASK = torch.tensor(
    [
        [1, 1, 1, 0, 0],  # trailing padding: the score goes on index 2
        [1, 0, 1, 1, 0],  # tool output at index 1, then padding: the score goes on index 3
        [0, 0, 0, 0, 0],  # nothing generated: nothing at all
    ]
)
SCORES = torch.tensor([2.0, -1.0, 5.0])


def test_k1_rewards_by_hand():
    rewards, kl = per_token_rewards(SCORES, LOGP, REF, MASK, kl_coef=0.1)
    expected_kl = torch.tensor(
        [
            [0.5, -1.0, 0.0, 0.0, 0.0],
            [0.2, 0.0, -0.2, 0.5, 0.0],
            [0.0, 0.0, 0.0, 0.0, 0.0],
        ]
    )
    expected_rewards = torch.tensor(
        [
            [-0.05, 0.1, 0.0 + 2.0, 0.0, 0.0],
            [-0.02, 0.0, 0.02, -0.05 - 1.0, 0.0],
            [0.0, 0.0, 0.0, 0.0, 0.0],
        ]
    )
    torch.testing.assert_close(kl, expected_kl)
    torch.testing.assert_close(rewards, expected_rewards)


def test_other_estimator_and_mask_dtypes():
    for mask in (MASK.bool(), MASK.float()):
        rewards, kl = per_token_rewards(SCORES, LOGP, REF, mask, kl_coef=0.1, estimator="abs")
        assert kl[0, 1].item() == 1.0
        torch.testing.assert_close(rewards[0], torch.tensor([-0.05, -0.1, 2.0, 0.0, 0.0]))


def test_scores_must_be_one_per_row():
    with pytest.raises(ValueError, match="scores"):
        per_token_rewards(SCORES[:2], LOGP, REF, MASK, kl_coef=0.1)


def test_no_gradient():
    logp = LOGP.clone().requires_grad_(True)
    rewards, kl = per_token_rewards(SCORES, logp, REF, MASK, kl_coef=0.1)
    assert not rewards.requires_grad and not kl.requires_grad


def _batches():
    g = torch.Generator().manual_seed(0)
    return [
        torch.randn(n, generator=g) * s + m for n, s, m in ((7, 1.0, 3.0), (1, 1.0, 0.0), (16, 4.0, -2.0), (5, 0.5, 10))
    ]


def test_running_moments_match_concatenated_data():
    rm = RunningMoments()
    batches = _batches()
    for batch in batches:
        batch_mean, batch_std = rm.update(batch)
        assert batch_mean == pytest.approx(batch.mean().item(), rel=1e-5)
        assert batch_std == pytest.approx(batch.std().item() if batch.numel() > 1 else 0.0, rel=1e-5)
    everything = torch.cat(batches).double()
    assert rm.count == everything.numel()
    assert rm.mean == pytest.approx(everything.mean().item(), rel=1e-9)
    assert rm.std == pytest.approx(everything.std().item(), rel=1e-9)


def test_running_moments_by_hand():
    rm = RunningMoments()
    assert rm.std == 1.0  # nothing seen yet: dividing by it changes nothing
    rm.update(torch.tensor([1.0, 2.0]))
    rm.update(torch.tensor([3.0, 4.0, 5.0]))
    # 1..5: mean 3, sample variance 10 / 4 = 2.5
    assert rm.mean == pytest.approx(3.0)
    assert rm.std == pytest.approx(2.5**0.5)


def test_update_from_stats_equals_update():
    by_tensor, by_stats = RunningMoments(), RunningMoments()
    for batch in _batches():
        by_tensor.update(batch)
        b = batch.double()
        by_stats.update_from_stats(b.mean().item(), b.var(unbiased=False).item(), b.numel())
    assert by_stats.state_dict() == pytest.approx(by_tensor.state_dict())


def test_state_dict_round_trip():
    rm = RunningMoments()
    batches = _batches()
    for batch in batches[:2]:
        rm.update(batch)
    state = rm.state_dict()
    assert all(type(v) is float for v in state.values())
    restored = RunningMoments()
    restored.load_state_dict(state)
    for batch in batches[2:]:
        rm.update(batch)
        restored.update(batch)
    assert restored.state_dict() == rm.state_dict()
    assert restored.std == rm.std


def test_score_lands_on_a_lone_first_token():
    from rlcli.rl.rewards import score_and_kl_rewards

    # the only model token is at position 0: the score goes there; beta 0.5 charges its KL
    kl = torch.tensor([[2.0, 7.0, 7.0]])
    rewards = score_and_kl_rewards(torch.tensor([3.0]), kl, torch.tensor([[1, 0, 0]]), 0.5)
    torch.testing.assert_close(rewards, torch.tensor([[2.0, 0.0, 0.0]]))


def test_scores_must_be_a_vector():
    from rlcli.rl.rewards import score_and_kl_rewards

    with pytest.raises(ValueError, match="scores must be"):
        per_token_rewards(SCORES[:, None], LOGP, REF, MASK, kl_coef=0.1)
    with pytest.raises(ValueError, match="scores must be"):
        score_and_kl_rewards(SCORES[:, None], LOGP, MASK, 0.1)


def test_full_estimator_uses_temperature_one_by_default():
    from rlcli.rl.kl import kl_penalty

    g = torch.Generator().manual_seed(0)
    logits, ref_logits = torch.randn(3, 5, 4, generator=g), torch.randn(3, 5, 4, generator=g)
    _, kl = per_token_rewards(SCORES, LOGP, REF, MASK, 0.1, "full", logits=logits, ref_logits=ref_logits)
    expected = kl_penalty(LOGP, REF, "full", logits=logits, ref_logits=ref_logits, temperature=1.0)
    torch.testing.assert_close(kl, expected * MASK)


def test_running_moments_start_empty_and_use_two_values():
    moments = RunningMoments()
    assert moments.state_dict() == {"mean": 0.0, "var": 0.0, "count": 0.0} and moments.std == 1.0
    moments.update(torch.tensor([1.0, 3.0]))
    assert moments.std == pytest.approx(math.sqrt(2.0))  # from the second value on: the sample std
    with pytest.raises(ValueError, match="count must be > 0"):
        moments.update_from_stats(0.0, 0.0, 0)
