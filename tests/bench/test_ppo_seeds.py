"""bench/ppo_seeds.py's critic check: the pooled explained variance, computed from the statistics a PPO step logs."""

from __future__ import annotations

import pytest
import torch

from rlcli.rl.losses import explained_variance
from tests.helpers import load_bench


def _logged(values: torch.Tensor, returns: torch.Tensor, step: int) -> dict:
    """What metrics.jsonl holds of one step with a critic: means and root-mean-squares over its model tokens (one
    episode of len(values) tokens)."""
    error = returns - values
    return {"step": step, "episodes": 1.0, "model_tokens": float(len(values)), "value_mean": values.mean().item(),
            "return_mean": returns.mean().item(), "value_error": error.square().mean().sqrt().item(),
            "return_std": returns.std(unbiased=False).item(),
            "explained_variance": explained_variance(values, returns, torch.ones_like(values)).item()}


def test_pooled_explained_variance_weighs_each_step_by_its_return_variance():
    ppo_seeds = load_bench("ppo_seeds")
    torch.manual_seed(0)
    # a step whose returns vary (the critic follows them) and one where they barely do (its noise is larger)
    returns_a = torch.linspace(0.0, 1.0, 40)
    values_a = returns_a + 0.1 * torch.randn(40)
    returns_b = 0.95 + 0.01 * torch.randn(40)
    values_b = 0.95 + 0.02 * torch.randn(40)
    a, b = _logged(values_a, returns_a, 10), _logged(values_b, returns_b, 11)
    assert a["explained_variance"] > 0.8 and b["explained_variance"] < -1.0
    # by hand: Σ SS of the errors around their step's mean / Σ SS of the returns around theirs
    ss = lambda x: (x - x.mean()).square().sum().item()  # noqa: E731
    expected = 1 - (ss(returns_a - values_a) + ss(returns_b - values_b)) / (ss(returns_a) + ss(returns_b))
    assert ppo_seeds.pooled_explained_variance([a, b]) == pytest.approx(expected, rel=1e-4)
    assert ppo_seeds.pooled_explained_variance([a]) == pytest.approx(a["explained_variance"], rel=1e-4)
    # a step's own mean is taken out: a critic off by a constant that moves from step to step is not penalised,
    # and one that only follows the mean from step to step gets no credit
    shifted = _logged(values_b + 0.3, returns_b + 0.3, 12)
    flat = _logged(torch.full((40,), 0.95), returns_b, 13)
    assert ppo_seeds.pooled_explained_variance([shifted]) == pytest.approx(b["explained_variance"], rel=1e-3)
    assert ppo_seeds.pooled_explained_variance([flat]) == pytest.approx(0.0, abs=1e-4)
    # steps weigh by their tokens (model tokens per episode × episodes)
    assert ppo_seeds.pooled_explained_variance([dict(a, episodes=3.0), b]) == pytest.approx(
        1 - (3 * ss(returns_a - values_a) + ss(returns_b - values_b)) / (3 * ss(returns_a) + ss(returns_b)), rel=1e-4)
    # returns that do not vary at all: undefined, not a division by zero
    assert ppo_seeds.pooled_explained_variance([dict(b, return_std=0.0)]) != ppo_seeds.pooled_explained_variance(
        [dict(b, return_std=0.0)])


def test_the_critic_check_pools_every_window_of_steps_from_step_10():
    ppo_seeds = load_bench("ppo_seeds")
    window = ppo_seeds.EV_WINDOW
    torch.manual_seed(0)
    returns = torch.linspace(0.0, 1.0, 40)
    good = _logged(returns + 0.1 * torch.randn(40), returns, 0)
    bad = _logged(returns + 0.5 * torch.randn(40), returns, 0)
    assert good["explained_variance"] > 0 > bad["explained_variance"]
    # steps 1-9 (bad, ignored), 10-16 good, 17 bad, and a step without critic statistics (not counted)
    rows = ([dict(bad, step=s) for s in range(1, 10)] + [dict(good, step=s) for s in range(10, 17)]
            + [dict(bad, step=17), {"step": 18, "reward_mean": 0.0}])
    stats = ppo_seeds.critic_stats(rows)
    assert len(stats["pooled_ev_from_10"]) == 8 - window + 1
    assert stats["pooled_ev_from_10"][0] == pytest.approx(good["explained_variance"], rel=1e-4)
    assert stats["min_pooled_ev_from_10"] == pytest.approx(
        ppo_seeds.pooled_explained_variance([*[good] * (window - 1), bad]), rel=1e-4)
    assert stats["min_ev_from_10"] == pytest.approx(bad["explained_variance"])
    assert ppo_seeds.critic_stats(rows[:9 + window - 1])["pooled_ev_from_10"] == []  # fewer steps than a window
    assert ppo_seeds.critic_stats(rows, start=11)["pooled_ev_from_10"][0] == pytest.approx(
        good["explained_variance"], rel=1e-4)
    assert len(ppo_seeds.critic_stats(rows, start=11)["pooled_ev_from_10"]) == 7 - window + 1
    assert ppo_seeds.critic_stats(rows, start=17)["min_ev_from_10"] == pytest.approx(bad["explained_variance"])
