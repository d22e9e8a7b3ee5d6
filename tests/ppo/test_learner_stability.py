"""What keeps a PPO step from breaking the policy: the KL guard before each optimizer step, the critic (separate,
warmed up, its own learning rate), the critic's health statistics, dropout switched off by the learner."""

from __future__ import annotations

import copy

import pytest
import torch
from accelerate import Accelerator

from rlcli.config.common import OptimConfig
from rlcli.config.ppo import CriticConfig, KLConfig, PPOAlgo
from rlcli.models.loading import load_model, load_tokenizer
from rlcli.models.value_head import ValueHead, ValueHeadModel
from rlcli.ppo.build import optimizer_groups
from rlcli.ppo.learner import KL_GUARD_FACTOR, PPOLearner
from rlcli.rl import SamplingRules
from rlcli.rl.losses import explained_variance
from rlcli.optim import make_optimizer
from tests.trainers.test_ppo_learner import CFG, _rollout, _setup


def _record_minibatches(learner):
    """Wrap the learner so that each minibatch's pre-step approx-KL and whether it was applied are recorded."""
    events = []
    accumulate, step = learner._accumulate_minibatch, learner.par.clip_and_step

    def recording_accumulate(*args, **kwargs):
        stats = accumulate(*args, **kwargs)
        events.append({"kl": stats["approx_kl"], "applied": False})
        return stats

    def recording_step(*args, **kwargs):
        events[-1]["applied"] = True
        return step(*args, **kwargs)

    learner._accumulate_minibatch = recording_accumulate
    learner.par.clip_and_step = recording_step
    return events


def test_the_kl_guard_refuses_the_minibatch_over_the_limit_before_it_steps():
    """16 minibatch steps at a high learning rate drive the policy far from pi_old. The guard applies a minibatch only
    while its own approx-KL (measured by its forward, before its step) is within 1.5 × target; the first one over it
    is not applied and nothing after it runs."""
    target = 0.002
    tok, policy, learner = _setup(lr=3e-2, batch_size=16, mini_batch_size=4, micro_batch_size=4, epochs=4,
                                  target_approx_kl=target)
    rollout, _ = _rollout(tok, policy, n=16)
    events = _record_minibatches(learner)
    stats = learner.step(rollout, torch.linspace(-1.0, 1.0, 16))
    assert stats["early_stopped"] == 1.0
    applied = [e for e in events if e["applied"]]
    assert len(applied) == stats["optimizer_steps"] < 16
    assert all(e["kl"] <= KL_GUARD_FACTOR * target for e in applied)
    refused = events[len(applied)]
    assert not refused["applied"] and refused["kl"] > KL_GUARD_FACTOR * target
    assert len(events) == len(applied) + 1  # nothing ran after the refused minibatch
    assert stats["approx_kl_max"] == pytest.approx(refused["kl"], rel=1e-6)
    assert KL_GUARD_FACTOR == 1.5


def test_without_the_guard_the_same_step_overshoots():
    """The same batch and settings with the old epoch-mean check (emulated: a target no epoch mean reaches, then the
    guard's limit compared with the KL after the update): every minibatch steps and the policy ends far past the
    limit; with the guard it ends within a few × the limit."""
    target = 0.002
    results = {}
    for guarded in (True, False):
        tok, policy, learner = _setup(lr=3e-2, batch_size=16, mini_batch_size=4, micro_batch_size=4, epochs=4,
                                      target_approx_kl=target if guarded else 100.0)
        rollout, _ = _rollout(tok, policy, n=16)
        results[guarded] = learner.step(rollout, torch.linspace(-1.0, 1.0, 16))
    assert results[False]["optimizer_steps"] == 16 and results[False]["early_stopped"] == 0.0
    unguarded, guarded = results[False]["approx_kl_after"], results[True]["approx_kl_after"]
    assert unguarded > 20 * KL_GUARD_FACTOR * target, unguarded
    assert guarded < unguarded / 5, (guarded, unguarded)


def test_no_target_no_guard_and_no_extra_pass():
    tok, policy, learner = _setup(lr=3e-2, batch_size=8, mini_batch_size=4, micro_batch_size=4, epochs=2)
    rollout, _ = _rollout(tok, policy)
    stats = learner.step(rollout, torch.linspace(-1.0, 1.0, 8))
    assert stats["optimizer_steps"] == 4 and stats["early_stopped"] == 0.0 and "approx_kl_after" not in stats


def _critic_learner(warmup: int, critic_lr: float | None = None, lr: float = 1e-2):
    torch.manual_seed(0)
    tok = load_tokenizer(CFG, "left")
    lm = load_model(CFG, "causal", tok)
    critic = ValueHeadModel(copy.deepcopy(lm), ValueHead(64, init_std=0.1))
    ref = ValueHeadModel(copy.deepcopy(lm).eval().requires_grad_(False), None)
    policy = ValueHeadModel(lm, None, critic=critic)
    opt, sched = make_optimizer(optimizer_groups(policy.named_parameters(), critic_lr), OptimConfig(learning_rate=lr),
                                100)
    learner = PPOLearner(policy, ref_model=ref, algo=PPOAlgo(batch_size=8, mini_batch_size=4, micro_batch_size=2),
                         kl=KLConfig(coef=0.05), rules=SamplingRules(), optimizer=opt, scheduler=sched,
                         accelerator=Accelerator(cpu=True), max_grad_norm=1.0,
                         critic=CriticConfig(separate=True, warmup_steps=warmup))
    return tok, policy, learner


def test_a_separate_critic_learns_alone_during_warmup_then_both_learn():
    tok, policy, learner = _critic_learner(warmup=1)
    assert policy.has_values and policy.value_head is None
    groups = {g["name"]: g for g in learner.optimizer.param_groups}
    critic_ids = {id(p) for p in policy.critic.parameters()}
    assert {id(p) for p in groups["critic"]["params"]} == critic_ids
    assert not critic_ids & {id(p) for p in groups["policy"]["params"]}
    rollout, _ = _rollout(tok, policy)
    scores = torch.linspace(0.0, 1.0, 8)

    def snapshot():
        return ([p.detach().clone() for p in policy.pretrained.parameters()],
                [p.detach().clone() for p in policy.critic.parameters()])

    pol0, crit0 = snapshot()
    stats = learner.step(rollout, scores)
    pol1, crit1 = snapshot()
    assert stats["critic_warmup"] == 1.0 and stats["lr"] == pytest.approx(1e-2)  # the rate comes back after the step
    assert all(torch.equal(a, b) for a, b in zip(pol0, pol1)), "the policy moved during the critic's warm-up"
    assert any(not torch.equal(a, b) for a, b in zip(crit0, crit1)), "the critic did not learn"
    stats = learner.step(rollout, scores)
    pol2, _ = snapshot()
    assert "critic_warmup" not in stats
    assert any(not torch.equal(a, b) for a, b in zip(pol1, pol2)), "the policy did not move after the warm-up"


def test_the_critic_has_a_learning_rate_of_its_own():
    _, _, learner = _critic_learner(warmup=0, critic_lr=3e-3)
    lrs = {g["name"]: g["lr"] for g in learner.optimizer.param_groups}
    assert lrs == {"policy": 1e-2, "critic": 3e-3}
    assert learner.scheduler.get_last_lr() == [1e-2, 3e-3]


def test_the_value_loss_of_a_separate_critic_does_not_reach_the_policy():
    """With the policy's own value head, the value loss flows into the shared trunk; with a separate critic the policy
    gets the policy loss's gradient only (advantages 0 here: none at all)."""
    tok, policy, learner = _critic_learner(warmup=0)
    rollout, _ = _rollout(tok, policy)
    mb = rollout.index(torch.arange(4))
    hidden, values = learner.model(mb.query_ids, mb.query_mask, mb.response_ids, mb.response_mask, hidden=True)
    (values.square().sum()).backward()
    assert all(p.grad is None for p in policy.pretrained.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in policy.critic.parameters())


def test_warmup_needs_a_critic_group():
    tok, policy, learner = _setup()
    with pytest.raises(ValueError, match="group named 'critic'"):
        PPOLearner(policy, algo=learner.algo, kl=learner.kl_cfg, rules=SamplingRules(), optimizer=learner.optimizer,
                   scheduler=learner.scheduler, accelerator=Accelerator(cpu=True), max_grad_norm=None,
                   critic=CriticConfig(separate=True, warmup_steps=2))


def test_explained_variance_and_value_error_are_logged_and_a_bad_critic_is_warned_about_once():
    tok, policy, learner = _setup(lr=1e-9)
    rollout, _ = _rollout(tok, policy)
    mask = rollout.model_mask.float()
    fwd = learner.rollout_forward(rollout)
    scores = torch.linspace(0.0, 1.0, 8)
    _, _, returns = learner.estimator.advantages(scores, fwd.kl, mask, learner._advantage_inputs(fwd))
    stats = learner.step(rollout, scores)
    # the statistic over all processes' sums equals the single-process formula
    torch.testing.assert_close(torch.tensor(stats["explained_variance"]),
                               explained_variance(fwd.values, returns, mask), atol=1e-5, rtol=0)
    want_error = float(((returns - fwd.values).square() * mask).sum() / mask.sum()) ** 0.5
    assert stats["value_error"] == pytest.approx(want_error, rel=1e-4)
    # the first step's zero-initialised head explains nothing (0, not below 0); then, with every step counted as
    # below the threshold, the warning comes once, at the 5th step in a row
    assert stats["explained_variance"] == pytest.approx(0.0, abs=1e-6) and stats["ev_warning"] == 0.0
    learner.ev_watch.threshold = 10.0
    warnings = [learner.step(rollout, scores)["ev_warning"] for _ in range(7)]
    assert warnings == [0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0]


def test_the_learner_switches_dropout_off():
    """A policy built with dropout by someone else's code: the learner turns it off, so the first ratio is 1."""
    torch.manual_seed(0)
    tok = load_tokenizer(CFG, "left")
    cfg = CFG.model_copy(update={"config": {**CFG.config, "resid_pdrop": 0.5, "attn_pdrop": 0.5, "embd_pdrop": 0.5}})
    lm = load_model(cfg, "causal", tok)
    ref = ValueHeadModel(copy.deepcopy(lm).requires_grad_(False), None)
    policy = ValueHeadModel(lm, ValueHead(64))
    opt, sched = make_optimizer(policy.parameters(), OptimConfig(learning_rate=1e-9), 10)
    learner = PPOLearner(policy, ref_model=ref, algo=PPOAlgo(batch_size=8, mini_batch_size=4, micro_batch_size=2),
                         kl=KLConfig(coef=0.05), rules=SamplingRules(), optimizer=opt, scheduler=sched,
                         accelerator=Accelerator(cpu=True), max_grad_norm=1.0)
    assert all(m.p == 0.0 for m in list(policy.modules()) + list(ref.modules()) if isinstance(m, torch.nn.Dropout))
    rollout, _ = _rollout(tok, policy)
    stats = learner.step(rollout, torch.linspace(0.0, 1.0, 8))
    assert stats["ratio_first"] == pytest.approx(1.0, abs=1e-5) and stats["kl"] == pytest.approx(0.0, abs=1e-5)


def test_explained_variance_is_left_out_when_the_returns_hardly_vary():
    """Every episode scored alike (no KL yet, Monte-Carlo returns): the returns vary by less than the whitening floor,
    so there is nothing to explain; the statistic is not logged (a 0 or a huge negative number would mislead),
    return_std is."""
    tok, policy, learner = _setup(lr=1e-9, lam=1.0)
    rollout, _ = _rollout(tok, policy)
    stats = learner.step(rollout, torch.ones(8))
    assert "explained_variance" not in stats and stats["return_std"] < 1e-2
    stats = learner.step(rollout, torch.linspace(0.0, 1.0, 8))
    assert "explained_variance" in stats and stats["return_std"] > 0.1
