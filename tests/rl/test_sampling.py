"""SamplingRules, turn positions, the KL watch, whitening across processes, rewards from a precomputed KL."""

from __future__ import annotations

import math
import threading

import pytest
import torch

from rlcli.rl.kl import KLWatch
from rlcli.rl.masked import masked_whiten
from rlcli.rl.rewards import score_and_kl_rewards
from rlcli.rl.sampling import SamplingRules, turn_positions

# one row, two positions, vocabulary of 4; token 3 is EOS
LOGITS = torch.log(torch.tensor([[[0.1, 0.2, 0.3, 0.4], [0.1, 0.2, 0.3, 0.4]]]))


def test_min_new_tokens_bans_eos_only_at_early_positions():
    rules = SamplingRules(eos_ids=(3,), min_new_tokens=1)
    lp = rules.logprobs(LOGITS, torch.tensor([[2, 2]]))
    # position 0: EOS cut, token 2 has 0.3 / 0.6; position 1: the full distribution
    torch.testing.assert_close(lp, torch.tensor([[math.log(0.5), math.log(0.3)]]))
    assert rules.logprobs(LOGITS, torch.tensor([[3, 3]]))[0, 0] == float("-inf")


def test_turn_positions_restart_after_forced_tokens():
    mask = torch.tensor([[1, 1, 0, 0, 1, 1, 1], [1, 1, 1, 1, 0, 0, 0]])
    got = turn_positions(mask)
    assert got[0][mask[0] == 1].tolist() == [0, 1, 0, 1, 2]
    assert got[1][mask[1] == 1].tolist() == [0, 1, 2, 3]
    rules = SamplingRules(eos_ids=(3,), min_new_tokens=1)
    lp = rules.logprobs(LOGITS, torch.tensor([[2, 2]]), torch.tensor([[5, 0]]))  # the second is a turn's first
    torch.testing.assert_close(lp, torch.tensor([[math.log(0.3), math.log(0.5)]]))


def test_banned_ids_temperature_top_k_top_p():
    probs = torch.tensor([0.1, 0.2, 0.3, 0.4])
    # banned EOS everywhere
    lp = SamplingRules(banned_ids=(3,)).logprobs(LOGITS, torch.tensor([[0, 1]]))
    torch.testing.assert_close(lp, torch.tensor([[math.log(0.1 / 0.6), math.log(0.2 / 0.6)]]))
    # temperature 0.5 squares the probabilities before renormalising
    sq = probs**2 / (probs**2).sum()
    lp = SamplingRules(temperature=0.5).logprobs(LOGITS[:, :1], torch.tensor([[2]]))
    torch.testing.assert_close(lp, torch.log(sq[2]).reshape(1, 1))
    # top-k 2 keeps 0.3 and 0.4
    lp = SamplingRules(top_k=2).logprobs(LOGITS[:, :1], torch.tensor([[2]]))
    torch.testing.assert_close(lp, torch.tensor([[math.log(0.3 / 0.7)]]))
    # top-p 0.5: 0.4 alone does not reach it, 0.4 + 0.3 does
    rules = SamplingRules(top_p=0.5)
    assert rules.logprobs(LOGITS[:, :1], torch.tensor([[1]]))[0, 0] == float("-inf")
    torch.testing.assert_close(rules.logprobs(LOGITS[:, :1], torch.tensor([[3]])), torch.tensor([[math.log(4 / 7)]]))
    # entropy and forbidden mass of the EOS ban
    rules = SamplingRules(banned_ids=(3,))
    kept = torch.tensor([1, 2, 3]) / 6
    torch.testing.assert_close(rules.entropy(LOGITS[:, :1]), -(kept * kept.log()).sum().reshape(1, 1))
    torch.testing.assert_close(rules.forbidden_mass(LOGITS[:, :1]), torch.tensor([[0.4]]))
    assert SamplingRules().forbidden_mass(LOGITS).abs().max() < 1e-6


def test_full_kl_under_rules_is_zero_for_equal_models_and_matches_by_hand():
    rules = SamplingRules(banned_ids=(3,))
    assert rules.full_kl(LOGITS, LOGITS.clone()).abs().max() < 1e-7
    ref = torch.log(torch.tensor([[[0.25, 0.25, 0.25, 0.25]] * 2]))
    p, q = torch.tensor([1, 2, 3]) / 6, torch.tensor([1, 1, 1]) / 3
    torch.testing.assert_close(rules.full_kl(LOGITS, ref)[0, 0], (p * (p / q).log()).sum())


def test_rules_are_checked():
    with pytest.raises(ValueError, match="top_p"):
        SamplingRules(top_p=0.0)
    with pytest.raises(ValueError, match="temperature"):
        SamplingRules(temperature=-1.0)
    assert "EOS [3] banned for the first 4" in SamplingRules(eos_ids=(3,), min_new_tokens=4).description()


def test_kl_watch_fires_once_at_the_third_negative_step_in_a_row():
    watch = KLWatch()
    fired = [watch.update(kl) for kl in [0.5, -0.2, -0.3, 0.0, -0.2, -0.2, -0.2, -0.5, -0.05, -0.4, -0.4, -0.4]]
    assert fired == [False] * 6 + [True] + [False] * 5
    assert watch.negative_steps == 9


def test_whitening_over_processes_equals_whitening_the_whole_batch():
    """Two "processes" (threads) whiten their halves with an all-reduce; together they equal the one-process result."""
    torch.manual_seed(0)
    x, mask = torch.randn(6, 5), (torch.rand(6, 5) > 0.3).long()
    halves = [(x[:3], mask[:3]), (x[3:], mask[3:])]
    barrier, slots, results = threading.Barrier(2), [None, None], [None, None]

    def all_reduce(rank):
        def reduce(t):
            slots[rank] = t
            barrier.wait()
            total = slots[0] + slots[1]
            barrier.wait()
            return total
        return reduce

    def process(rank):
        results[rank] = masked_whiten(*halves[rank], sum_over_processes=all_reduce(rank))

    threads = [threading.Thread(target=process, args=(rank,)) for rank in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    torch.testing.assert_close(torch.cat(results), masked_whiten(x, mask), atol=1e-5, rtol=0)
    torch.testing.assert_close(masked_whiten(x, mask, restore_mean=True, sum_over_processes=lambda t: t),
                               masked_whiten(x, mask, restore_mean=True), atol=1e-6, rtol=0)


def test_score_and_kl_rewards_by_hand():
    kl = torch.tensor([[0.5, 1.0, 2.0, 9.0], [1.0, 1.0, 1.0, 1.0]])
    mask = torch.tensor([[1, 0, 1, 0], [0, 0, 0, 0]])  # a hole (tool token) and padding; an empty row
    rewards = score_and_kl_rewards(torch.tensor([3.0, 7.0]), kl, mask, kl_coef=0.1)
    torch.testing.assert_close(rewards, torch.tensor([[-0.05, 0.0, 3.0 - 0.2, 0.0], [0.0, 0.0, 0.0, 0.0]]))
    with pytest.raises(ValueError, match="scores"):
        score_and_kl_rewards(torch.ones(3), kl, mask, 0.1)


@pytest.mark.parametrize("estimator", ["k2", "k3"])
def test_a_banned_pad_label_gives_finite_gradients_when_masked(estimator):
    """PAD = EOS, EOS banned by min_new_tokens: the padding's label has log-prob -inf under the rules. Masked at the
    source it is 0, and the loss-mode KL's gradient stays finite (masked later, 0 · inf = NaN)."""
    from rlcli.rl.kl import kl_penalty

    eos = 1
    rules = SamplingRules(eos_ids=(eos,), min_new_tokens=4)
    logits = torch.randn(1, 4, 6, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    labels = torch.tensor([[4, 2, eos, eos]])  # two model tokens, then padding whose id is EOS
    mask = torch.tensor([[1, 1, 0, 0]])
    unmasked = rules.logprobs(logits, labels)
    assert torch.isinf(unmasked[0, 2:]).all()  # what the bug fed into the KL
    logp = rules.logprobs(logits, labels, mask=mask)
    assert (logp[0, 2:] == 0).all() and torch.isfinite(logp).all()
    ref = logp.detach() - 0.3
    kl = kl_penalty(logp, ref, estimator)
    torch.where(mask.bool(), kl, torch.zeros_like(kl)).sum().backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


def test_entropy_gradient_is_finite_with_banned_tokens():
    rules = SamplingRules(banned_ids=(0, 3))
    logits = torch.randn(2, 3, 5, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
    rules.entropy(logits).sum().backward()
    assert torch.isfinite(logits.grad).all()
    assert (logits.grad[..., [0, 3]] == 0).all()  # forbidden tokens: no gradient


def test_default_rules_restrict_nothing():
    # eos_ids alone ban nothing: min_new_tokens defaults to 0
    rules = SamplingRules(eos_ids=(3,))
    assert not rules.restricts and not rules.filters
    torch.testing.assert_close(rules.apply(LOGITS), LOGITS)


def test_rules_accept_their_boundary_values():
    # greedy (temperature 0), no top-k (0), no top-p (1.0), no minimum length (0) are all legal
    rules = SamplingRules(temperature=0.0, top_k=0, top_p=1.0, min_new_tokens=0)
    assert not rules.restricts
    for bad in (dict(top_k=-1), dict(min_new_tokens=-1), dict(top_p=1.5)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            SamplingRules(**bad)


def test_which_rules_restrict_and_filter():
    assert SamplingRules(banned_ids=(1,)).restricts and not SamplingRules(banned_ids=(1,)).filters
    assert SamplingRules(eos_ids=(3,), min_new_tokens=2).restricts
    assert not SamplingRules(min_new_tokens=2).restricts  # no EOS to ban
    for rules in (SamplingRules(top_k=1), SamplingRules(top_k=2), SamplingRules(top_p=0.9)):
        assert rules.filters and rules.restricts, rules


def test_descriptions_name_only_the_rules_in_force():
    assert SamplingRules().description() == "temperature 1"
    assert SamplingRules(min_new_tokens=2).description() == "temperature 1"
    assert SamplingRules(eos_ids=(3,)).description() == "temperature 1"
    assert SamplingRules(top_p=0.9).description() == "temperature 1, top-p 0.9"


def test_apply_on_a_batch_greedy_and_top_k_boundaries():
    z = LOGITS.expand(3, 2, 4)  # [B, T, V] with T = 2 < V = 4
    # temperature 0 (greedy) leaves the logits as they are: log-probs at temperature 1
    torch.testing.assert_close(SamplingRules(temperature=0.0).apply(z), z)
    # top-k 3 drops the least likely token; top-k 1 keeps the argmax alone; top-k = vocabulary keeps all
    inf = float("-inf")
    torch.testing.assert_close(SamplingRules(top_k=3).apply(z)[..., 0], torch.full((3, 2), inf))
    assert torch.isfinite(SamplingRules(top_k=3).apply(z)[..., 1:]).all()
    kept = torch.isfinite(SamplingRules(top_k=1).apply(z))
    assert kept[..., 3].all() and not kept[..., :3].any()
    torch.testing.assert_close(SamplingRules(top_k=4).apply(z), z)


def test_top_p_stops_as_soon_as_the_mass_is_reached():
    # four equally likely tokens (p = 0.25 exactly): top-p 0.5 keeps two, top-p 0.1 keeps the first alone
    z = torch.zeros(1, 4)
    assert int(torch.isfinite(SamplingRules(top_p=0.5).apply(z)).sum()) == 2
    assert int(torch.isfinite(SamplingRules(top_p=0.1).apply(z)).sum()) == 1
    # a peaked distribution, as a [B, T, V] batch: top-p 0.1 keeps only the most likely token (0.4), never the
    # runner-up
    kept = torch.isfinite(SamplingRules(top_p=0.1).apply(LOGITS))
    assert kept[..., 3].all() and not kept[..., :3].any()


def test_bans_reach_id_zero_and_ignore_ids_outside_the_vocabulary():
    z, inf = LOGITS.expand(3, 2, 4), float("-inf")  # [B, T, V]
    out = SamplingRules(banned_ids=(0, 4)).apply(z)
    assert (out[..., 0] == inf).all() and torch.isfinite(out[..., 1:]).all()
    out = SamplingRules(eos_ids=(0, 4), min_new_tokens=1).apply(z)
    assert (out[:, 0, 0] == inf).all() and torch.isfinite(out[:, 0, 1:]).all() and torch.isfinite(out[:, 1]).all()


def test_forbidden_mass_under_a_temperature_and_unnormalised_logits():
    # temperature 0.5 squares the probabilities: the banned EOS holds 0.16 / 0.30 of the tempered mass
    rules = SamplingRules(temperature=0.5, banned_ids=(3,))
    torch.testing.assert_close(rules.forbidden_mass(LOGITS + 1.0), torch.full((1, 2), 0.16 / 0.30))


def test_empty_batches_keep_their_shapes():
    rules, logits = SamplingRules(), torch.zeros(0, 3, 5)
    assert rules.logprobs(logits, torch.zeros(0, 3, dtype=torch.long)).shape == (0, 3)
    for out in (rules.entropy(logits), rules.full_kl(logits, logits), rules.forbidden_mass(logits)):
        assert out.shape == (0, 3)
