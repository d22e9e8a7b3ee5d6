"""Critic-free advantages and loss aggregation, on hand-computed examples."""

from __future__ import annotations

import math

import pytest
import torch

from rlcli.rl.critic_free import aggregate_loss, group_baseline, returns_to_go, scale_advantages
from rlcli.rl.kl import kl_penalty

# two prompts, three completions each
SCORES = torch.tensor([1.0, 2.0, 6.0, 0.0, 0.0, 3.0])


def test_group_mean_baseline():
    torch.testing.assert_close(group_baseline(SCORES, 3, "mean"), torch.tensor([3.0, 3.0, 3.0, 1.0, 1.0, 1.0]))


def test_leave_one_out_baseline():
    # (2+6)/2, (1+6)/2, (1+2)/2 ; (0+3)/2, (0+3)/2, 0
    expected = torch.tensor([4.0, 3.5, 1.5, 1.5, 1.5, 0.0])
    torch.testing.assert_close(group_baseline(SCORES, 3, "leave_one_out"), expected)
    # RLOO advantages of a group sum to zero
    assert (SCORES - expected).reshape(2, 3).sum(1).abs().max() < 1e-6


def test_groups_of_one_and_ragged_batches_are_refused():
    with pytest.raises(ValueError, match="group_size >= 2"):
        group_baseline(SCORES, 1, "mean")
    with pytest.raises(ValueError, match="multiple of group_size=4"):
        group_baseline(SCORES, 4, "leave_one_out")
    with pytest.raises(ValueError, match="unknown baseline"):
        group_baseline(SCORES, 3, "median")


def test_group_scaling_divides_by_each_groups_std():
    adv = SCORES - group_baseline(SCORES, 3, "mean")
    std1, std2 = math.sqrt(((1 - 3) ** 2 + (2 - 3) ** 2 + (6 - 3) ** 2) / 2), math.sqrt((1 + 1 + 4) / 2)
    got = scale_advantages(adv, 3, "group", scores=SCORES, eps=0.0)
    torch.testing.assert_close(got, torch.tensor([-2 / std1, -1 / std1, 3 / std1, -1 / std2, -1 / std2, 2 / std2]))
    # per-token advantages: every token of a row divided by its group's std
    per_token = adv[:, None].expand(6, 4)
    torch.testing.assert_close(scale_advantages(per_token, 3, "group", scores=SCORES, eps=0.0),
                               got[:, None].expand(6, 4))


def test_batch_and_no_scaling():
    adv = torch.tensor([[1.0, 3.0], [5.0, 0.0]])
    mask = torch.tensor([[1, 1], [1, 0]])
    # over the three model tokens: mean 3, unbiased std 2; REINFORCE++ centres as well as scales, as the learner's
    # batch mode does (dividing by the std alone would disagree with it)
    got = scale_advantages(adv, 1, "batch", mask=mask, eps=0.0)
    torch.testing.assert_close(got, torch.tensor([[-1.0, 0.0], [1.0, 0.0]]))
    assert scale_advantages(adv, 1, "none") is adv


def test_returns_to_go_skip_tool_and_pad_tokens():
    rewards = torch.tensor([[1.0, 9.0, 2.0, 3.0, 7.0]])
    mask = torch.tensor([[1, 0, 1, 1, 0]])  # a tool token, then padding
    torch.testing.assert_close(returns_to_go(rewards, mask), torch.tensor([[6.0, 0.0, 5.0, 3.0, 0.0]]))


def test_aggregations_by_hand():
    per_token = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    totals = dict(total_tokens=4.0, total_sequences=2.0, constant_length=5.0)
    torch.testing.assert_close(aggregate_loss(per_token, mask, "token_mean", **totals), torch.tensor(10 / 4))
    torch.testing.assert_close(aggregate_loss(per_token, mask, "sequence_mean", **totals), torch.tensor((2 + 4) / 2))
    torch.testing.assert_close(aggregate_loss(per_token, mask, "constant", **totals), torch.tensor(10 / (2 * 5)))
    # micro-batches add up to the minibatch's value
    halves = sum(aggregate_loss(per_token[i : i + 1], mask[i : i + 1], "sequence_mean", **totals) for i in range(2))
    torch.testing.assert_close(halves, aggregate_loss(per_token, mask, "sequence_mean", **totals))
    with pytest.raises(ValueError, match="constant_length"):
        aggregate_loss(per_token, mask, "constant", total_tokens=4.0, total_sequences=2.0)


def test_k3_by_hand():
    # log pi = log 0.5, log ref = log 0.25: r = ref / pi = 0.5, k3 = (r - 1) - log r = -0.5 + log 2
    got = kl_penalty(torch.tensor([[math.log(0.5)]]), torch.tensor([[math.log(0.25)]]), "k3")
    torch.testing.assert_close(got, torch.tensor([[-0.5 + math.log(2.0)]]))


def test_group_scaling_needs_scores_and_groups_of_two():
    adv = torch.tensor([1.0, -1.0])
    with pytest.raises(ValueError, match="group_size >= 2"):
        scale_advantages(adv, 1, "group", scores=adv)
    with pytest.raises(ValueError, match="needs the scores"):
        scale_advantages(adv, 2, "group")


def test_scaling_adds_eps_to_the_std():
    # a group whose scores differ by 0.002: std = 0.001 * sqrt(2), so eps = 1e-6 shows in the 4th digit
    scores = torch.tensor([0.0, 0.002], dtype=torch.float64)
    adv = scores - scores.mean()
    std = 0.001 * math.sqrt(2)
    torch.testing.assert_close(scale_advantages(adv, 2, "group", scores=scores), adv / (std + 1e-6), rtol=1e-9, atol=0)
    # batch scaling of the same two values: minus the mean 0.001; their std sqrt(2e-6 + eps 1e-6) is below the
    # whitening floor, which divides instead
    torch.testing.assert_close(scale_advantages(scores, 1, "batch"), (scores - 0.001) / 0.01, rtol=1e-9, atol=0)
    # ten times the spread: above the floor, over sqrt(unbiased variance 2e-4 + eps 1e-6)
    torch.testing.assert_close(scale_advantages(scores * 10, 1, "batch"), (scores * 10 - 0.01) / math.sqrt(2.01e-4),
                               rtol=1e-9, atol=0)


def test_batch_scaling_of_small_and_single_values():
    # population variance 0.01 (below 1: a floor at 1 would show), unbiased 0.02
    adv = torch.tensor([[0.1, -0.1]], dtype=torch.float64)
    torch.testing.assert_close(scale_advantages(adv, 1, "batch", eps=0.0), adv / math.sqrt(0.02), rtol=1e-9, atol=0)
    # one model token: it is its own mean, so it becomes 0 (no division by n - 1 = 0, no NaN)
    one = torch.tensor([[2.0, 5.0]], dtype=torch.float64)
    got = scale_advantages(one, 1, "batch", mask=torch.tensor([[1, 0]]), eps=0.5)
    torch.testing.assert_close(got, torch.tensor([[0.0, 0.0]], dtype=torch.float64))


def test_aggregations_of_empty_rows_and_minibatches_are_zero_not_nan():
    per_token = torch.tensor([[1.0, 2.0], [3.0, 4.0]], requires_grad=True)
    mask = torch.tensor([[1, 1], [0, 0]])  # the second row has no model token
    # sequence_mean: row means 1.5 and 0 (not 0/0)
    got = aggregate_loss(per_token, mask, "sequence_mean", total_tokens=2.0, total_sequences=2.0)
    torch.testing.assert_close(got, torch.tensor(0.75))
    empty = torch.zeros(2, 2)
    for kind in ("token_mean", "sequence_mean", "constant"):
        loss = aggregate_loss(per_token, empty, kind, total_tokens=0.0, total_sequences=0.0, constant_length=4.0)
        assert loss.item() == 0.0, kind
    # totals below 1 count as 1; a constant length of 1 is legal
    torch.testing.assert_close(aggregate_loss(per_token, mask, "token_mean", total_tokens=0.5, total_sequences=1.0),
                               torch.tensor(3.0))
    torch.testing.assert_close(aggregate_loss(per_token, mask, "constant", total_tokens=2.0, total_sequences=0.5,
                                              constant_length=1.0), torch.tensor(3.0))
    with pytest.raises(ValueError, match="constant_length"):
        aggregate_loss(per_token, mask, "constant", total_tokens=2.0, total_sequences=2.0, constant_length=-1.0)


def test_aggregate_loss_keeps_the_gradient():
    per_token = torch.tensor([[1.0, 2.0, 3.0]], requires_grad=True)
    mask = torch.tensor([[1, 1, 0]])
    for kind in ("token_mean", "sequence_mean", "constant"):
        per_token.grad = None
        aggregate_loss(per_token, mask, kind, total_tokens=2.0, total_sequences=1.0, constant_length=2.0).backward()
        torch.testing.assert_close(per_token.grad, torch.tensor([[0.5, 0.5, 0.0]]))
