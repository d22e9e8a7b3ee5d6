import math

import pytest
import torch

from rlcli.rl.kl import KL_ESTIMATORS, AdaptiveKLController, FixedKLController, kl_penalty

# d = logp - ref = [-0.5, 0.5, 0]
LOGP = torch.tensor([[-1.0, -0.5, -2.0]])
REF = torch.tensor([[-0.5, -1.0, -2.0]])


@pytest.mark.parametrize(
    "estimator, expected",
    [
        ("k1", [-0.5, 0.5, 0.0]),
        ("abs", [0.5, 0.5, 0.0]),
        ("k2", [0.125, 0.125, 0.0]),
        ("mse", [0.125, 0.125, 0.0]),
        # (r - 1) - log r with r = e^{0.5}: 1.6487213 - 1 - 0.5; with r = e^{-0.5}: 0.6065307 - 1 + 0.5
        ("k3", [0.1487213, 0.1065307, 0.0]),
    ],
)
def test_token_estimators_by_hand(estimator, expected):
    torch.testing.assert_close(kl_penalty(LOGP, REF, estimator), torch.tensor([expected]))


def _exact_kl_loop(logits, ref_logits):
    # Plain-Python KL(p || q) over the vocabulary for every position.
    out = []
    for row, ref_row in zip(logits.tolist(), ref_logits.tolist()):
        out_row = []
        for z, w in zip(row, ref_row):
            lse_z = math.log(sum(math.exp(v) for v in z))
            lse_w = math.log(sum(math.exp(v) for v in w))
            out_row.append(sum(math.exp(a - lse_z) * ((a - lse_z) - (b - lse_w)) for a, b in zip(z, w)))
        out.append(out_row)
    return torch.tensor(out)


def test_full_by_hand():
    # p = softmax([1,2,3]) = [0.0900306, 0.2447285, 0.6652410]; log p - log q = [-2, 0, 2] for q = softmax([3,2,1]).
    logits = torch.tensor([[[1.0, 2.0, 3.0]]])
    ref_logits = torch.tensor([[[3.0, 2.0, 1.0]]])
    dummy = torch.zeros(1, 1)
    out = kl_penalty(dummy, dummy, "full", logits=logits, ref_logits=ref_logits)
    torch.testing.assert_close(out, torch.tensor([[1.1504208]]))


def test_full_matches_vocabulary_loop_and_temperature():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 6, generator=g) * 2
    ref_logits = torch.randn(2, 3, 6, generator=g) * 2
    dummy = torch.zeros(2, 3)
    out = kl_penalty(dummy, dummy, "full", logits=logits, ref_logits=ref_logits)
    torch.testing.assert_close(out, _exact_kl_loop(logits, ref_logits))
    out_t = kl_penalty(dummy, dummy, "full", logits=logits, ref_logits=ref_logits, temperature=0.5)
    torch.testing.assert_close(out_t, _exact_kl_loop(logits / 0.5, ref_logits / 0.5))
    same = kl_penalty(dummy, dummy, "full", logits=logits, ref_logits=logits.clone())
    assert torch.all(same == 0)


def test_full_with_banned_tokens():
    # The policy puts no mass on token 2, so the reference's opinion of it does not matter.
    dummy = torch.zeros(1, 1)
    logits = torch.tensor([[[0.0, 0.0, float("-inf")]]])
    ref_logits = torch.tensor([[[0.0, math.log(3.0), 5.0]]])
    # p = [1/2, 1/2, 0], q over the first two after renormalising by 1 + 3 + e^5
    z = 1.0 + 3.0 + math.exp(5.0)
    expected = 0.5 * math.log(0.5 / (1 / z)) + 0.5 * math.log(0.5 / (3 / z))
    out = kl_penalty(dummy, dummy, "full", logits=logits, ref_logits=ref_logits)
    torch.testing.assert_close(out, torch.tensor([[expected]]))


def test_k3_and_full_are_non_negative():
    g = torch.Generator().manual_seed(2)
    logp = -torch.rand(8, 16, generator=g) * 5
    ref = -torch.rand(8, 16, generator=g) * 5
    assert torch.all(kl_penalty(logp, ref, "k3") >= 0)
    assert torch.all(kl_penalty(logp, logp, "k3") == 0)
    logits = torch.randn(8, 16, 5, generator=g)
    ref_logits = logits + 1e-4 * torch.randn(8, 16, 5, generator=g)
    assert torch.all(kl_penalty(logp, ref, "full", logits=logits, ref_logits=ref_logits) >= 0)


def test_full_without_logits_raises():
    with pytest.raises(ValueError, match="logits"):
        kl_penalty(LOGP, REF, "full")


def test_unknown_estimator_names_the_valid_ones():
    with pytest.raises(ValueError) as info:
        kl_penalty(LOGP, REF, "k4")
    for name in KL_ESTIMATORS:
        assert name in str(info.value)


def test_fixed_controller():
    ctl = FixedKLController(0.05)
    ctl.update(100.0, 256)
    assert ctl.value == 0.05
    other = FixedKLController(0.0)
    other.load_state_dict(ctl.state_dict())
    assert other.value == 0.05


@pytest.mark.parametrize(
    "current_kl, expected",
    [
        (9.0, 0.1 * (1 + 0.2 * 256 / 10000)),  # e = 9/6 - 1 = 0.5, clipped to 0.2 -> 0.100512
        (6.6, 0.1 * (1 + 0.1 * 256 / 10000)),  # e = 0.1 -> 0.100256
        (6.0, 0.1),  # on target
        (5.4, 0.1 * (1 - 0.1 * 256 / 10000)),  # e = -0.1 -> 0.099744
        (0.0, 0.1 * (1 - 0.2 * 256 / 10000)),  # e = -1, clipped to -0.2 -> 0.099488
    ],
)
def test_adaptive_controller_worked_example(current_kl, expected):
    ctl = AdaptiveKLController(init_kl_coef=0.1, target=6.0, horizon=10000)
    ctl.update(current_kl, n_steps=256)
    assert ctl.value == pytest.approx(expected, rel=1e-12)


def test_adaptive_controller_numbers_and_state():
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    ctl.update(torch.tensor(9.0), 256)
    assert ctl.value == pytest.approx(0.100512)
    ctl.update(3.0, 256)
    assert ctl.value == pytest.approx(0.100512 * 0.99488)
    restored = AdaptiveKLController(0.5, target=6.0, horizon=10000)
    restored.load_state_dict(ctl.state_dict())
    assert restored.value == ctl.value


def test_adaptive_controller_rejects_bad_settings():
    with pytest.raises(ValueError, match="target.*horizon"):
        AdaptiveKLController(0.1, target=0.0, horizon=-1)


def test_full_needs_both_logits_and_a_positive_temperature():
    logits = torch.zeros(1, 1, 3)
    with pytest.raises(ValueError, match="both logits and ref_logits"):
        kl_penalty(LOGP, REF, "full", logits=logits)
    with pytest.raises(ValueError, match="both logits and ref_logits"):
        kl_penalty(LOGP, REF, "full", ref_logits=logits)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        kl_penalty(LOGP, REF, "full", logits=logits, ref_logits=logits, temperature=0.0)


def test_full_kl_gradient_pulls_the_policy_logits_towards_the_reference():
    # p = softmax([1, 2, 3]), q = softmax([3, 2, 1]): d KL / d z_i = p_i * ((log p_i - log q_i) - KL)
    logits = torch.tensor([[[1.0, 2.0, 3.0]]], requires_grad=True)
    ref_logits = torch.tensor([[[3.0, 2.0, 1.0]]])
    kl = kl_penalty(torch.zeros(1, 1), torch.zeros(1, 1), "full", logits=logits, ref_logits=ref_logits)
    kl.sum().backward()
    p = torch.softmax(torch.tensor([1.0, 2.0, 3.0]), -1)
    expected = p * (torch.tensor([-2.0, 0.0, 2.0]) - 1.1504208)
    torch.testing.assert_close(logits.grad, expected[None, None])
    assert logits.grad[0, 0, 2] > 0  # descending the KL lowers the logit the reference likes least


@pytest.mark.parametrize("estimator", ["k1", "abs", "k2", "k3"])
def test_token_estimators_have_the_gradient_of_the_policy_log_prob(estimator):
    # d/d logp at d = logp - ref = 0.5: k1 1, abs sign(d) = 1, k2 d = 0.5, k3 1 - e^{-d} = 1 - e^{-0.5}
    logp = torch.tensor([[-0.5]], requires_grad=True)
    kl_penalty(logp, torch.tensor([[-1.0]]), estimator).sum().backward()
    expected = {"k1": 1.0, "abs": 1.0, "k2": 0.5, "k3": 1 - math.exp(-0.5)}[estimator]
    assert logp.grad.item() == pytest.approx(expected, rel=1e-6)


def test_adaptive_controller_boundaries():
    for bad in (dict(init_kl_coef=0.0, target=6.0, horizon=10), dict(init_kl_coef=0.1, target=6.0, horizon=0)):
        with pytest.raises(ValueError, match="must be > 0"):
            AdaptiveKLController(**bad)
    # small targets and horizons are legal
    ctl = AdaptiveKLController(init_kl_coef=0.5, target=0.5, horizon=1)
    ctl.update(0.6, n_steps=1)  # e = 0.6 / 0.5 - 1 = 0.2
    assert ctl.value == pytest.approx(0.5 * 1.2)


def test_kl_watch_starts_clean():
    from rlcli.rl.kl import KLWatch

    assert KLWatch().state_dict() == {"negative_steps": 0, "streak": 0, "warned": False}


def test_kl_watch_threshold_is_strict():
    from rlcli.rl.kl import KLWatch

    watch = KLWatch(threshold=-0.1, patience=1)
    assert watch.update(-0.1) is False and watch.negative_steps == 0  # at the threshold: not below it
    assert watch.update(-0.11) is True and watch.negative_steps == 1


def test_k3_is_clamped_as_verl_clamps_it():
    """k3 = e^x - 1 - x with x = log π_ref - log π clamped to ±20, and the value to at most 10: without the clamps
    d = -30 gives 1e13 and d = -100 infinity."""
    from rlcli.rl.kl import K3_CLAMP, LOG_RATIO_CLAMP

    assert (LOG_RATIO_CLAMP, K3_CLAMP) == (20.0, 10.0)
    logp = torch.tensor([[-130.0, -31.0, -1.0, -2.0, -1.0]])
    ref = torch.tensor([[-30.0, -1.0, -3.0, -1.0, -4.0]])
    # d = log π - log π_ref: -100, -30, 2, -1, 3 -> x = 100, 30, -2, 1, -3
    out = kl_penalty(logp, ref, "k3")
    x = torch.tensor([-2.0, 1.0, -3.0])
    want_small = torch.expm1(x) - x  # 0.1353 + 1, e - 2 = 0.718, 2.0498: under the cap
    torch.testing.assert_close(out[0, 2:], want_small)
    assert out[0, 0] == K3_CLAMP and out[0, 1] == K3_CLAMP
    # x = -25 is clamped to -20: e^-20 - 1 + 20 = 19.000000002 -> capped at 10 as well; x = -9: 8.0001 (no clamp)
    edge = kl_penalty(torch.tensor([[5.0, 4.0]]), torch.tensor([[-20.0, -5.0]]), "k3")
    torch.testing.assert_close(edge, torch.tensor([[10.0, float(torch.expm1(torch.tensor(-9.0))) + 9.0]]))
    # inside the clamps the gradient is the unclamped one; beyond them it is 0
    lp = torch.tensor([-1.0, -130.0], requires_grad=True)
    kl_penalty(lp, torch.tensor([-2.0, -30.0]), "k3").sum().backward()
    # d/dlogπ of e^(ref - logπ) - 1 - (ref - logπ) = 1 - e^(ref - logπ) = 1 - e^-1 at the first token
    torch.testing.assert_close(lp.grad, torch.tensor([1 - math.exp(-1.0), 0.0]))
