"""The PPO learner (rlcli/ppo/learner.py) on a tiny model: consistent log-probs, masked tool tokens, the Python API,
the loss assembly on hand-computed numbers; and what keeps a step from breaking the policy: the KL guard before each
optimizer step, the critic (separate, warmed up, its own learning rate), the critic's health statistics, dropout
switched off by the learner."""

from __future__ import annotations

import math
import copy
import dataclasses

import pytest
import torch
from accelerate import Accelerator

from rlcli.config.common import LoraConfig, ModelConfig, OptimConfig
from rlcli.config.ppo import CriticConfig, KLConfig, PPOAlgo
from rlcli.models.generation import sample
from rlcli.models.loading import apply_lora, load_model, load_tokenizer
from rlcli.models.value_head import ValueHead, ValueHeadModel, disable_dropout, load_value_head_model
from rlcli.padding import left_pad
from rlcli.ppo.build import optimizer_groups
from rlcli.ppo.learner import KL_GUARD_FACTOR, PPOLearner
from rlcli.rl import Rollout, SamplingRules
from rlcli.optim import make_optimizer
from rlcli.rl.losses import explained_variance
from tests.helpers import TINY_GPT2_CONFIG

CFG = ModelConfig(architecture="gpt2", config=TINY_GPT2_CONFIG)


def _setup(lora: bool = False, lr: float = 1e-3, kl_coef: float = 0.05, **algo):
    torch.manual_seed(0)
    tok = load_tokenizer(CFG, "left")
    lm = load_model(CFG, "causal", tok)
    disable_dropout(lm)
    ref = None
    if lora:
        lm = apply_lora(lm, LoraConfig(r=4), "causal")
    else:
        import copy

        ref = ValueHeadModel(copy.deepcopy(lm).eval().requires_grad_(False), None)
    policy = ValueHeadModel(lm, ValueHead(64) if algo.get("advantage", "gae") == "gae" else None)
    a = PPOAlgo(**{"batch_size": 8, "mini_batch_size": 4, "micro_batch_size": 2, **algo})
    opt, sched = make_optimizer(policy.parameters(), OptimConfig(learning_rate=lr), 100)
    learner = PPOLearner(policy, ref_model=ref, algo=a, kl=KLConfig(coef=kl_coef), rules=SamplingRules(), optimizer=opt,
                         scheduler=sched, accelerator=Accelerator(cpu=True), max_grad_norm=1.0)
    return tok, policy, learner


def _rollout(tok, policy, n=8, new=12):
    q, qm = left_pad([tok(f"prompt {i}" * (1 + i % 3))["input_ids"] for i in range(n)], tok.pad_token_id)
    out = sample(policy.pretrained, q, qm, new, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                 generator=torch.Generator().manual_seed(0))
    return Rollout(q, qm, out.response_ids, out.response_mask, torch.zeros_like(out.response_ids)), out


def test_first_step_has_zero_kl_and_unit_ratio():
    tok, policy, learner = _setup(lr=1e-9)
    rollout, out = _rollout(tok, policy)
    fwd = learner.rollout_forward(rollout)
    mask = rollout.response_mask.bool()
    # the sampler's log-probs are the training forward's log-probs (same positions, temperature, no dropout)
    assert torch.allclose(fwd.pi_logprobs[mask], out.logprobs[mask], atol=1e-5)
    stats = learner.step(rollout, torch.ones(8))
    assert stats["kl"] == pytest.approx(0.0, abs=1e-5)
    assert stats["ratio"] == pytest.approx(1.0, abs=1e-4) and stats["policy_clipfrac"] == 0.0


def test_rewarded_tokens_become_more_likely():
    tok, policy, learner = _setup(lr=1e-2)
    rollout, _ = _rollout(tok, policy)
    scores = torch.tensor([1.0, -1.0] * 4)
    before = learner.rollout_forward(rollout).pi_logprobs
    for _ in range(3):
        learner.step(rollout, scores)
    after = learner.rollout_forward(rollout).pi_logprobs
    m = rollout.model_mask.float()
    delta = ((after - before) * m).sum(1) / m.sum(1)
    assert delta[0::2].mean() > 0 > delta[1::2].mean()


def test_tool_tokens_get_no_gradient_signal():
    """Tool output is forced text, not the policy's choice: no part of the policy's loss (the clipped surrogate, the
    entropy bonus, the KL) may send gradient through a tool token's position, while every model token gets some.

    The gradient of the loss with respect to the head's input at each response position (what ``token_stats`` turns
    into that token's log-prob and entropy) is captured during a real ``learner.step``: it is exactly 0 at every tool
    position and non-zero at every model position of the first minibatch (ratio 1 there, so nothing is clipped).
    A loss whose token mask ignored the tool mask would put gradient on the tool positions (the entropy bonus, on here,
    does so whatever the advantages); advantages over the tool tokens would change the model tokens the step counts."""
    tok, policy, learner = _setup(lr=1e-3, entropy_coef=0.01)
    rollout, _ = _rollout(tok, policy)
    tool = torch.zeros_like(rollout.response_ids)
    tool[:, 3:6] = rollout.response_mask[:, 3:6]
    with_tools = Rollout(rollout.query_ids, rollout.query_mask, rollout.response_ids, rollout.response_mask, tool)
    assert tool.sum() > 0 and with_tools.model_mask.sum() > tool.sum()

    captured = []  # per training micro-batch: (the response mask it saw, d loss / d head input [rows, R, H])
    forward = policy.forward

    def recording_forward(query_ids, query_mask, response_ids, response_mask, **kwargs):
        hidden, values = forward(query_ids, query_mask, response_ids, response_mask, **kwargs)
        if kwargs.get("hidden") and hidden.requires_grad:
            entry = [response_mask.clone(), None]
            hidden.register_hook(lambda grad, entry=entry: entry.__setitem__(1, grad.detach().clone()))
            captured.append(entry)
        return hidden, values

    policy.forward = recording_forward
    stats = learner.step(with_tools, torch.tensor([1.0, -1.0] * 4))
    del policy.forward
    assert len(captured) >= 2  # micro-batches of 2 rows; the first two make the first minibatch of 4
    for i, (response_mask, grad) in enumerate(captured):
        per_position = grad.abs().sum(-1)  # [rows, R]
        tool_positions = torch.zeros_like(response_mask, dtype=torch.bool)
        tool_positions[:, 3:6] = response_mask[:, 3:6].bool()
        model_positions = response_mask.bool() & ~tool_positions
        assert torch.equal(per_position[tool_positions], torch.zeros_like(per_position[tool_positions])), i
        if i < 2:  # the first minibatch: before any optimizer step, every model token's ratio is 1
            assert (per_position[model_positions] > 0).all(), i
    assert stats["tool_tokens"] == pytest.approx(float(tool.sum()) / 8)
    assert stats["model_tokens"] == pytest.approx(float(with_tools.model_mask.sum()) / 8)

    fwd = learner.rollout_forward(with_tools)  # after an update, so the policy differs from the reference
    # log-probs and KL exist on model tokens only, and the reward puts nothing on tool tokens
    assert (fwd.kl * with_tools.model_mask).abs().sum() > 0 and (fwd.kl * tool).abs().sum() == 0
    assert (fwd.pi_logprobs * tool).abs().sum() == 0
    from rlcli.rl import score_and_kl_rewards

    rewards = score_and_kl_rewards(torch.ones(8), torch.randn_like(fwd.kl), with_tools.model_mask, 0.05)
    assert (rewards * tool).abs().sum() == 0


def test_lora_reference_is_the_base_with_adapter_disabled():
    tok, policy, learner = _setup(lora=True, lr=1e-2)
    rollout, _ = _rollout(tok, policy)
    for _ in range(2):
        stats = learner.step(rollout, torch.tensor([1.0, -1.0] * 4))
    fwd = learner.rollout_forward(rollout)
    mask = rollout.response_mask.bool()
    assert not torch.allclose(fwd.pi_logprobs[mask], fwd.ref_logprobs[mask])
    # the reference equals the untouched base model
    with policy.reference():
        logits, _ = policy(rollout.query_ids, rollout.query_mask, rollout.response_ids, rollout.response_mask)
    from rlcli.rl import logprobs_from_logits

    assert torch.allclose(logprobs_from_logits(logits, rollout.response_ids)[mask], fwd.ref_logprobs[mask], atol=1e-5)
    assert stats["kl"] != 0  # (off-policy here: the rollout is reused, so its sign is not meaningful)


def test_step_from_ids_api_and_save_load(tmp_path):
    tok, policy, learner = _setup(lr=1e-2)
    queries = [torch.tensor(tok("hello")["input_ids"]), torch.tensor(tok("hi there")["input_ids"])] * 4
    responses = [torch.tensor(tok(" world")["input_ids"]), torch.tensor(tok("!!")["input_ids"])] * 4
    masks = [torch.tensor([1, 1, 0, 0, 1, 1]), torch.tensor([1, 1])] * 4
    before = {n: p.detach().clone() for n, p in policy.named_parameters()}
    stats = learner.step_from_ids(queries, responses, [1.0, 0.0] * 4, response_masks=masks, pad_token_id=tok.pad_token_id)
    assert stats["tool_tokens"] == pytest.approx(1.0)
    assert any(not torch.equal(before[n], p) for n, p in policy.named_parameters())
    policy.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    again = load_value_head_model(tmp_path)
    ids = torch.tensor([[5, 6, 7]])
    m = torch.ones_like(ids)
    a, va = policy(ids, m, ids, m)
    b, vb = again(ids, m, ids, m)
    assert torch.allclose(a, b, atol=1e-5) and torch.allclose(va, vb, atol=1e-5)


def test_non_finite_scores_skip_every_step():
    from rlcli.ppo.learner import NonFiniteLossError

    tok, policy, learner = _setup()
    rollout, _ = _rollout(tok, policy)
    before = {n: p.detach().clone() for n, p in policy.named_parameters()}
    with pytest.raises(NonFiniteLossError, match="non-finite") as error:
        learner.step(rollout, torch.full((8,), float("nan")))
    # the error names what was non-finite and where, not a learning rate
    assert "non-finite policy and value loss (epoch 1, minibatch 1)" in str(error.value)
    assert "learning rate" not in str(error.value)
    assert all(torch.equal(before[n], p) for n, p in policy.named_parameters()), "no optimizer step on a NaN loss"


def test_update_does_not_depend_on_micro_batch_size():
    """Every token of a minibatch weighs the same: 2 micro-batches of 2 rows (sorted by length) and 1 of 4 give
    the same update, up to float summation order. (With equal-weight micro-batch means they would differ: the
    responses here have different lengths.)"""
    params = []
    for micro in (4, 2, 1):
        tok, policy, learner = _setup(lr=1e-2)
        learner.algo = learner.algo.model_copy(update={"micro_batch_size": micro})
        # plain SGD: AdamW divides by sqrt(v), which turns float-order noise in near-zero gradients into full steps
        learner.optimizer = torch.optim.SGD(policy.parameters(), lr=0.1)
        learner.scheduler = torch.optim.lr_scheduler.LambdaLR(learner.optimizer, lambda _: 1.0)
        rollout, out = _rollout(tok, policy)
        assert len(set(rollout.response_mask.sum(1).tolist())) > 1  # lengths differ, or the test proves nothing
        learner.step(rollout, torch.tensor([1.0, -1.0, 0.5, 2.0, -0.5, 0.0, 1.5, -2.0]))
        params.append(torch.cat([p.detach().flatten() for p in policy.parameters()]))
    start = _setup()[1]
    moved = (params[0] - torch.cat([p.detach().flatten() for p in start.parameters()])).abs().max()
    assert moved > 1e-3  # the step did change the weights
    for other in params[1:]:
        assert (other - params[0]).abs().max() < 1e-5 * float(moved), ((other - params[0]).abs().max(), moved)


def test_kl_watch_flags_a_stale_sampler_once():
    """A deliberately broken sampler: it keeps drawing from the initial weights while the policy trains (a weight
    sync that never happens). The mean KL, E_stale[log pi - log ref] = -KL(ref || pi), goes negative; the learner
    flags it exactly once, at the third step in a row below -0.1, and counts every such step. (One micro-batch per
    minibatch: the same updates in fewer passes, see test_update_does_not_depend_on_micro_batch_size.)"""
    tok, policy, learner = _setup(lr=3e-3, micro_batch_size=4)
    stale = learner.ref_model.pretrained  # the initial weights
    q, qm = left_pad([tok(f"prompt {i}")["input_ids"] for i in range(8)], tok.pad_token_id)
    kls, warnings, counts = [], [], []
    for step in range(10):
        out = sample(stale, q, qm, 16, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                     generator=torch.Generator().manual_seed(step))
        rollout = Rollout(q, qm, out.response_ids, out.response_mask, torch.zeros_like(out.response_ids))
        stats = learner.step(rollout, torch.randn(8, generator=torch.Generator().manual_seed(100 + step)))
        kls.append(stats["kl"])
        warnings.append(stats["kl_warning"])
        counts.append(stats["kl_negative_steps"])
    assert sum(warnings) == 1, (kls, warnings)
    first = warnings.index(1.0)
    assert all(k < -0.1 for k in kls[first - 2 : first + 1]), kls
    assert counts[-1] == sum(k < -0.1 for k in kls) >= 3
    # the count survives a checkpoint
    state = learner.state_dict()
    _, _, fresh = _setup()
    fresh.load_state_dict(state)
    assert fresh.kl_watch.negative_steps == counts[-1] and fresh.kl_watch.warned


def test_kl_watch_stays_quiet_on_an_honest_run():
    tok, policy, learner = _setup(lr=3e-3, micro_batch_size=4)
    for step in range(6):
        rollout, _ = _rollout(tok, policy)
        stats = learner.step(rollout, torch.randn(8, generator=torch.Generator().manual_seed(step)))
        assert stats["kl"] >= -0.1 and stats["kl_warning"] == 0.0 and stats["kl_negative_steps"] == 0.0


def test_a_token_the_rules_forbid_is_refused():
    """A rollout built by hand that breaks its own rules (EOS before min_new_tokens) is an error naming the token."""
    from rlcli.ppo.learner import ForbiddenTokenError

    tok, policy, learner = _setup()
    learner.rules = SamplingRules(eos_ids=(tok.eos_token_id,), min_new_tokens=4)
    q, qm = left_pad([tok("hi")["input_ids"]] * 8, tok.pad_token_id)
    r = torch.tensor([[5, 6, tok.eos_token_id]] * 8)
    with pytest.raises(ForbiddenTokenError, match=r"episode 0, response token 2 \(id 1\).*EOS \[1\] banned"):
        learner.step(Rollout(q, qm, r, torch.ones_like(r), torch.zeros_like(r)), torch.zeros(8))


def test_reinforce_pp_with_group_scaling_runs():
    """A recipe the schema accepts runs: reinforce_pp + advantage_scaling=group gets the scores it scales by (the
    arithmetic: tests/rl/test_estimators.py)."""
    tok, policy, learner = _setup(advantage="reinforce_pp", group_size=2, advantage_scaling="group", kl_coef=0.0)
    rollout, _ = _rollout(tok, policy)
    stats = learner.step(rollout, torch.arange(8.0))
    assert stats["skipped_minibatches"] == 0 and stats["estimator"] == "reinforce_pp"


def test_entropy_bonus_raises_the_entropy():
    """ppo.entropy_coef: with every advantage 0 (equal scores) and no KL, the entropy bonus is the only gradient."""
    tok, policy, learner = _setup(advantage="grpo", group_size=2, kl_coef=0.0, entropy_coef=1.0, lr=1e-2)
    rollout, _ = _rollout(tok, policy)
    before = learner.rollout_forward(rollout).entropy[rollout.model_mask.bool()].mean()
    stats = learner.step(rollout, torch.ones(8))
    after = learner.rollout_forward(rollout).entropy[rollout.model_mask.bool()].mean()
    assert stats["loss_entropy"] > 0 and after > before + 1e-3, (before, after)


def test_a_first_ratio_off_1_is_warned_once():
    """The ratio π/π_old of a step's first minibatch is 1 unless the training forward computes something else than
    the rollout forward (here: dropout switched back on in the policy)."""
    tok, policy, learner = _setup()
    rollout, _ = _rollout(tok, policy)
    stats = learner.step(rollout, torch.arange(8.0))
    assert abs(stats["ratio_first"] - 1.0) < 1e-5 and stats["ratio_warning"] == 0.0
    for module in policy.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.5
    warnings = [learner.step(rollout, torch.arange(8.0))["ratio_warning"] for _ in range(2)]
    assert warnings == [1.0, 0.0]


def test_a_non_finite_gradient_norm_skips_the_minibatch():
    """Finite losses, an overflow inside the backward pass: the minibatch is counted and not stepped."""
    tok, policy, learner = _setup()
    rollout, _ = _rollout(tok, policy)
    calls = []
    weight = policy.pretrained.transformer.wte.weight

    def overflow_once(grad):
        calls.append(1)
        return grad * float("inf") if len(calls) == 1 else grad

    handle = weight.register_hook(overflow_once)
    stats = learner.step(rollout, torch.arange(8.0))
    handle.remove()
    assert stats["skipped_minibatches"] == 1.0
    assert all(torch.isfinite(p).all() for p in policy.parameters())


# --- the loss assembly on hand-computed numbers (tests that catch a wrong sign) ---------------------------------------

def _critic_free_setup(kl: KLConfig, lr: float = 1e-3, **algo):
    """A learner without value head (critic-free), plain SGD and no gradient clipping, so that an update is exactly
    -lr × the gradient."""
    import copy

    torch.manual_seed(0)
    tok = load_tokenizer(CFG, "left")
    lm = load_model(CFG, "causal", tok)
    disable_dropout(lm)
    ref = ValueHeadModel(copy.deepcopy(lm).eval().requires_grad_(False), None)
    policy = ValueHeadModel(lm, None)
    a = PPOAlgo(**{"batch_size": 8, "mini_batch_size": 4, "micro_batch_size": 2, "group_size": 2, **algo})
    opt = torch.optim.SGD(policy.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    learner = PPOLearner(policy, ref_model=ref, algo=a, kl=kl, rules=SamplingRules(), optimizer=opt,
                         scheduler=sched, accelerator=Accelerator(cpu=True), max_grad_norm=None)
    return tok, policy, learner


# two groups of two; row 2 has a tool token at index 1, row 1 padding at index 2. The 9s sit where the mask is 0.
CF_MASK = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 0, 1], [1, 1, 1]], dtype=torch.float32)
CF_KL = torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 9.0], [1.0, 9.0, 0.0], [0.5, 0.5, 0.0]])  # masked sums 2, 0, 1, 1
CF_SCORES = torch.tensor([1.0, 1.0, 0.0, 2.0])
# beta = 0.5: per-token rewards -0.5 * KL_t, plus the score on the last model token
CF_REWARDS = torch.tensor([[-0.5, -0.5, 1.0], [0.0, 1.0, 0.0], [-0.5, 0.0, 0.0], [-0.25, -0.25, 2.0]])
CF_RETURNS = torch.tensor([[0.0, 0.5, 1.0], [1.0, 1.0, 0.0], [-0.5, 0.0, 0.0], [1.5, 1.75, 2.0]])


def _critic_free_advantages(learner, scores, fwd, mask):
    """The learner's steps 3-4 on given scores and forward results: its estimator (rlcli.rl.estimators), fed the
    KL its mode puts in the reward and the inputs it assembles."""
    return learner.estimator.advantages(scores, learner._kl_in_reward(fwd.kl), mask, learner._advantage_inputs(fwd))


def _forward(kl: torch.Tensor):
    from rlcli.rl.types import RolloutForward

    zeros = torch.zeros_like(kl)
    return RolloutForward(pi_logprobs=zeros, values=None, ref_logprobs=zeros, kl=kl, entropy=zeros,
                          forbidden_mass=zeros)


@pytest.mark.parametrize("estimator, per_row", [
    # sequence rewards = score - beta * sum KL = [0, 1, -0.5, 1.5]; group means 0.5 and 0.5
    ("grpo", [-0.5, 0.5, -1.0, 1.0]),
    # leave-one-out with two per group: the baseline is the other completion's sequence reward
    ("rloo", [-1.0, 1.0, -2.0, 2.0]),
])
def test_critic_free_sequence_reward_is_the_score_minus_beta_times_the_kl(estimator, per_row):
    """The policy pays beta for every nat it moves away from the reference: of two completions with the same score,
    the one with more KL gets the lower advantage (a flipped sign here must fail)."""
    _, _, learner = _critic_free_setup(KLConfig(coef=0.5, mode="reward", estimator="k1"), advantage=estimator,
                                       batch_size=4, advantage_scaling="none")
    rewards, advantages, returns = _critic_free_advantages(learner, CF_SCORES, _forward(CF_KL), CF_MASK)
    torch.testing.assert_close(advantages, torch.tensor(per_row)[:, None] * CF_MASK)
    torch.testing.assert_close(rewards, CF_REWARDS)
    torch.testing.assert_close(returns, CF_RETURNS)
    assert advantages[0, 0] < advantages[1, 0]  # same score, more KL: worse


def test_critic_free_group_scaling_divides_the_scores_by_their_std_never_the_kl():
    # scores [1, 1 | 0, 2]: group stds (unbiased) 0 and sqrt(2); summed KL [2, 0 | 1, 1], minus the group means: [1, -1
    # | 0, 0], times beta 0.5. The first group's scores agree: its advantages are the KL's alone (-0.5, +0.5), not
    # the KL difference divided by the spread of the sequence rewards (which made them ±0.71 before)
    _, _, learner = _critic_free_setup(KLConfig(coef=0.5, mode="reward", estimator="k1"), advantage="grpo",
                                       batch_size=4, advantage_scaling="group")
    _, advantages, _ = _critic_free_advantages(learner, CF_SCORES, _forward(CF_KL), CF_MASK)
    s2 = 2.0**0.5
    expected = torch.tensor([-0.5, 0.5, -1.0 / s2, 1.0 / s2])[:, None] * CF_MASK
    torch.testing.assert_close(advantages, expected, rtol=1e-5, atol=1e-5)


def test_reinforce_pp_advantages_are_returns_to_go_of_the_kl_penalised_rewards():
    # group-mean baseline on the scores first: [1, 1 | 0, 2] -> [0, 0 | -1, 1]; then -0.5 * KL_t per token
    _, _, learner = _critic_free_setup(KLConfig(coef=0.5, mode="reward", estimator="k1"), advantage="reinforce_pp",
                                       batch_size=4, advantage_scaling="none")
    rewards, advantages, returns = _critic_free_advantages(learner, CF_SCORES, _forward(CF_KL), CF_MASK)
    expected_rewards = torch.tensor([[-0.5, -0.5, 0.0], [0.0, 0.0, 0.0], [-0.5, 0.0, -1.0], [-0.25, -0.25, 1.0]])
    expected_returns = torch.tensor([[-1.0, -0.5, 0.0], [0.0, 0.0, 0.0], [-1.5, 0.0, -1.0], [0.5, 0.75, 1.0]])
    torch.testing.assert_close(rewards, expected_rewards)
    torch.testing.assert_close(advantages, expected_returns)
    torch.testing.assert_close(returns, expected_returns)


def test_loss_mode_keeps_the_kl_out_of_the_reward():
    _, _, learner = _critic_free_setup(KLConfig(coef=0.5, mode="loss", estimator="k3"), advantage="grpo",
                                       batch_size=4, advantage_scaling="none")
    rewards, advantages, _ = _critic_free_advantages(learner, CF_SCORES, _forward(CF_KL), CF_MASK)
    # sequence rewards are the scores [1, 1 | 0, 2]: advantages [0, 0 | -1, 1]
    torch.testing.assert_close(advantages, torch.tensor([0.0, 0.0, -1.0, 1.0])[:, None] * CF_MASK)
    torch.testing.assert_close(rewards, torch.tensor([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.0],
                                                      [0.0, 0.0, 2.0]]))


def _kl_loss_update(coef: float):
    """One optimizer step whose only gradient is the loss-mode KL: equal scores give GRPO advantages of 0, the
    reference is the policy with perturbed weights. Returns (mask, KL before, KL after, parameter change)."""
    tok, policy, learner = _critic_free_setup(KLConfig(coef=coef, mode="loss", estimator="k3"), lr=0.05,
                                              advantage="grpo", mini_batch_size=8, micro_batch_size=4, epochs=1)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in learner.ref_model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    rollout, _ = _rollout(tok, policy)
    before = torch.cat([p.detach().flatten() for p in policy.parameters()])
    kl_before = learner.rollout_forward(rollout).kl
    stats = learner.step(rollout, torch.zeros(8))
    kl_after = learner.rollout_forward(rollout).kl
    delta = torch.cat([p.detach().flatten() for p in policy.parameters()]) - before
    return rollout.model_mask.float(), kl_before, kl_after, delta, stats


def test_loss_mode_kl_gradient_pulls_the_policy_towards_the_reference():
    """The KL term of the loss carries a gradient (a detached KL term must fail), it points towards
    the reference (the KL falls after one step that has no other signal), and it scales with beta."""
    mask, kl_before, kl_after, delta, stats = _kl_loss_update(coef=1.0)
    assert stats["loss_policy"] == 0.0 and stats["loss_kl"] > 0
    assert delta.abs().max() > 0, "the KL term gave no gradient"
    assert (kl_after * mask).sum() < 0.9 * (kl_before * mask).sum()
    # one SGD step is -lr * beta * grad(KL): twice the beta, twice the step
    _, _, _, delta2, _ = _kl_loss_update(coef=2.0)
    # (up to the rounding of p - lr * g in float32)
    assert (delta2 - 2 * delta).abs().max() < 1e-3 * delta.abs().max()


def test_step_normalises_and_clips_the_scores():
    """Running normalisation, then score_clip, as the step reports them (score_used_mean)."""
    tok, policy, learner = _setup(lr=1e-9, score_norm="running", score_clip=1.5)
    rollout, _ = _rollout(tok, policy)
    stats = learner.step(rollout, torch.tensor([0.0] * 7 + [8.0]))
    # mean 1, unbiased std sqrt(8): seven of (0 - 1) / sqrt(8) = -0.3536, one (8 - 1) / sqrt(8) = 2.47 -> 1.5
    assert stats["score_used_mean"] == pytest.approx((7 * -1 / 8**0.5 + 1.5) / 8, abs=1e-6)
    assert stats["reward_mean"] == pytest.approx(1.0)
    assert learner.steps_done == 1 and learner.score_moments.count == 8
    assert 0 <= stats["time_forward"] < 60 and 0 <= stats["time_optimize"] < 60
    # equal scores: std 0 -> divided by 1e-8, giving 0 (not 0 / 0)
    tok, policy, learner = _setup(lr=1e-9, score_norm="running")
    stats = learner.step(rollout, torch.full((8,), 3.0))
    assert stats["score_used_mean"] == 0.0


def test_whitened_rewards_keep_their_mean():
    tok, policy, learner = _setup(lr=1e-9, whiten_rewards=True)
    rollout, _ = _rollout(tok, policy)
    stats = learner.step(rollout, torch.ones(8))
    # KL is 0 at the first step: the rewards are the 8 scores on the last tokens; whitening rescales but keeps the mean
    tokens = float(rollout.model_mask.sum())
    assert stats["token_reward_mean"] == pytest.approx(8 / tokens, rel=1e-4)


def test_value_head_learns_towards_the_returns():
    tok, policy, learner = _setup(lr=1e-2)
    rollout, _ = _rollout(tok, policy)
    head = [p.detach().clone() for p in policy.value_head.parameters()]
    m = rollout.model_mask.float()
    before = (learner.rollout_forward(rollout).values * m).sum() / m.sum()
    for _ in range(3):
        stats = learner.step(rollout, torch.full((8,), 2.0))  # returns near 2 everywhere (gamma 1, KL ~ 0)
    after = (learner.rollout_forward(rollout).values * m).sum() / m.sum()
    assert stats["loss_value"] > 0
    assert any(not torch.equal(a, b.detach()) for a, b in zip(head, policy.value_head.parameters()))
    assert after > before + 0.1, (before, after)


def test_reinforce_pp_without_groups_uses_the_raw_scores():
    _, _, learner = _critic_free_setup(KLConfig(coef=0.5, mode="reward", estimator="k1"), advantage="reinforce_pp",
                                       batch_size=4, group_size=1, advantage_scaling="none")
    rewards, advantages, _ = _critic_free_advantages(learner, CF_SCORES, _forward(CF_KL), CF_MASK)
    torch.testing.assert_close(rewards, CF_REWARDS)
    torch.testing.assert_close(advantages, CF_RETURNS)


def test_a_non_finite_kl_part_alone_is_named():
    """Each part of the loss is checked on its own: a NaN in the reference's log-probs (loss-mode KL) with a finite
    policy loss skips every minibatch and the error names the KL part, not the policy."""
    from rlcli.ppo.learner import NonFiniteLossError

    tok, policy, learner = _setup(advantage="grpo", group_size=2)
    rollout, _ = _rollout(tok, policy)
    honest = learner.rollout_forward

    def poisoned(r, **kwargs):
        fwd = honest(r, **kwargs)
        return dataclasses.replace(fwd, ref_logprobs=torch.full_like(fwd.ref_logprobs, float("nan")))

    learner.rollout_forward = poisoned
    with pytest.raises(NonFiniteLossError) as error:
        learner.step(rollout, torch.arange(8.0))
    assert "non-finite kl loss (epoch 1, minibatch 1)" in str(error.value), str(error.value)


def test_no_entropy_term_without_entropy_coef():
    tok, policy, learner = _setup(advantage="grpo", group_size=2)
    rollout, _ = _rollout(tok, policy)
    stats = learner.step(rollout, torch.arange(8.0))
    assert "loss_entropy" not in stats and "loss_kl" in stats and "policy_dual_clipfrac" not in stats


# --- one optimizer step per batch: the training forward's log-probs are pi_old ----------------------------------------


def _one_update_pair(lora: bool, rules: SamplingRules, **algo):
    """Two learners from the same seed, one reusing the training forward's log-probs, one running the policy's
    rollout forward; and the same rollout for both (drawn by the first)."""
    setups = []
    for reuse in (True, False):
        tok, policy, learner = _setup(lora=lora, advantage="grpo", group_size=2, lr=1e-2, **algo)
        learner.rules = rules
        learner.reuse_training_pass = reuse
        setups.append((policy, learner))
    q, qm = left_pad([tok(f"prompt {i}" * (1 + i % 3))["input_ids"] for i in range(8)], tok.pad_token_id)
    out = sample(setups[0][0].pretrained, q, qm, 12, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                 generator=torch.Generator().manual_seed(0), rules=rules)
    rollout = Rollout(q, qm, out.response_ids, out.response_mask, torch.zeros_like(out.response_ids),
                      sampler_logprobs=out.logprobs)
    return setups, rollout


@pytest.mark.parametrize("lora", [False, True], ids=["reference-copy", "lora"])
def test_one_update_per_batch_reuses_the_training_forward_with_the_same_result(lora):
    """GRPO with one epoch and one minibatch: no policy pass before the update, and the same update and statistics
    as with it (the old log-probs are the training forward's own, detached: a ratio of 1 with the gradient of
    log pi). pi_old 1 % off (checked by making it so) changes the update and fails here."""
    rules = SamplingRules(eos_ids=(1,), min_new_tokens=3)  # so the forbidden mass is not 0
    setups, rollout = _one_update_pair(lora, rules, mini_batch_size=8, micro_batch_size=3, epochs=1)
    (p_reuse, reuse), (p_full, full) = setups
    assert reuse.reuses_training_pass(8) and not full.reuses_training_pass(8)
    calls = []
    hook = p_reuse.pretrained.register_forward_hook(lambda *a: calls.append(torch.is_grad_enabled()))
    before = [p.detach().clone() for p in p_reuse.parameters() if p.requires_grad]
    scores = torch.tensor([0.0, 1.0, 2.0, 0.5, 1.0, 1.0, 3.0, 0.0])
    s_reuse = reuse.step(rollout, scores)
    hook.remove()
    s_full = full.step(rollout, scores)
    # the policy ran with autograd for the 3 training micro-batches, and without it once: the first step's probe of
    # one micro-batch for ratio_first; LoRA's reference pass runs it without autograd too
    assert calls.count(True) == 3 and calls.count(False) == 1 + (3 if lora else 0), calls
    moved = 0.0
    for a, b, b0 in zip([p for p in p_reuse.parameters() if p.requires_grad],
                        [p for p in p_full.parameters() if p.requires_grad], before):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        moved = max(moved, float((a.detach() - b0).abs().max()))
    assert moved > 1e-4, "the update did not move the policy"
    for key in ("kl", "kl_per_token", "kl_penalty_per_token", "entropy", "forbidden_mass", "sampler_logprob_diff",
                "loss_policy", "loss_kl", "ratio", "reward_mean"):
        assert s_reuse[key] == pytest.approx(s_full[key], rel=1e-4, abs=1e-6), key
    assert s_full["forbidden_mass"] > 0 and s_reuse["sampler_logprob_diff"] < 1e-4
    # the first step's ratio: from the rollout forward, or (reuse) from an eval-mode probe of the first micro-batch
    assert s_full["ratio_first"] == pytest.approx(1.0, abs=1e-5) and s_reuse["ratio_first"] == pytest.approx(1.0,
                                                                                                              abs=1e-5)
    # the next step starts from a non-zero KL, computed the same way in both
    s2 = [learner.step(rollout, scores) for _, learner in setups]
    assert s2[0]["kl"] == pytest.approx(s2[1]["kl"], rel=1e-4) and abs(s2[0]["kl"]) > 1e-3
    # the probe is the first step's only: later steps of the shortcut report no ratio_first (1 by construction)
    assert "ratio_first" not in s2[0] and "ratio_first" in s2[1]


def test_the_training_record_keeps_numbers_not_the_graph():
    """The shortcut's record of the training forward holds plain numbers: a recorded tensor that kept the autograd
    graph would keep every micro-batch's activations alive until the step ends."""
    from types import SimpleNamespace

    from rlcli.ppo.learner import TrainingRecord

    record = TrainingRecord.zeros_like(torch.zeros(4, 5))
    logits = torch.randn(2, 3, requires_grad=True)
    stats = SimpleNamespace(logprobs=logits * 2, entropy=logits.exp(), forbidden_mass=None)
    record.write(torch.tensor([1, 3]), stats)
    assert not any(t.requires_grad for t in vars(record).values())
    torch.testing.assert_close(record.pi_logprobs[[1, 3], :3], (logits * 2).detach())
    assert record.pi_logprobs[[0, 2]].abs().sum() == 0 and record.pi_logprobs[:, 3:].abs().sum() == 0


@pytest.mark.parametrize("kl, algo", [
    (KLConfig(coef=0.05), {"mini_batch_size": 4, "epochs": 1}),                    # two optimizer steps a batch
    (KLConfig(coef=0.05), {"mini_batch_size": 8, "epochs": 2}),                    # two epochs
    (KLConfig(coef=0.05, mode="reward"), {"mini_batch_size": 8, "epochs": 1}),     # the advantages need the KL first
    (KLConfig(coef=0.05, mode="reward", estimator="full"), {"mini_batch_size": 8, "epochs": 1}),  # two models a chunk
], ids=["two-minibatches", "two-epochs", "kl-in-reward", "full-kl"])
def test_other_settings_keep_the_rollout_forward(kl, algo):
    _, _, learner = _critic_free_setup(kl, advantage="grpo", **algo)
    assert not learner.reuses_training_pass(8)
    _, _, one = _critic_free_setup(KLConfig(coef=0.05), advantage="grpo", mini_batch_size=8, epochs=1)
    assert one.reuses_training_pass(8) and not one.reuses_training_pass(16)
    _, _, gae = _setup(mini_batch_size=8, epochs=1)
    assert not gae.reuses_training_pass(8)  # the critic's values are needed before the update


def test_a_forbidden_token_is_refused_without_the_rollout_forward():
    from rlcli.ppo.learner import ForbiddenTokenError

    tok, policy, learner = _setup(advantage="grpo", group_size=2, mini_batch_size=8, epochs=1)
    assert learner.reuses_training_pass(8)
    learner.rules = SamplingRules(eos_ids=(tok.eos_token_id,), min_new_tokens=4)
    q, qm = left_pad([tok("hi")["input_ids"]] * 8, tok.pad_token_id)
    r = torch.tensor([[5, 6, 7]] * 5 + [[5, 6, tok.eos_token_id]] + [[5, 6, 7]] * 2)
    before = [p.detach().clone() for p in policy.parameters()]
    with pytest.raises(ForbiddenTokenError, match=r"episode 5, response token 2 \(id 1\).*EOS \[1\] banned"):
        learner.step(Rollout(q, qm, r, torch.ones_like(r), torch.zeros_like(r)), torch.arange(8.0))
    assert all(torch.equal(a, b) for a, b in zip(before, policy.parameters())), "stepped on a refused batch"


def test_train_pad_fraction_counts_the_padding_the_training_forwards_computed():
    """Four prompts of 2 tokens and four of 4, responses of 3: one micro-batch of 8 computes 8 × 7 positions for 48
    tokens; micro-batches of 4 hold rows of one length (sorted), so none is padding."""
    q = [torch.tensor([5, 6])] * 4 + [torch.tensor([5, 6, 7, 8])] * 4
    r = [torch.tensor([9, 10, 11])] * 8
    for micro, want in ((8, 1 - 48 / 56), (4, 0.0)):
        _, _, learner = _critic_free_setup(KLConfig(coef=0.05), advantage="grpo", mini_batch_size=8,
                                           micro_batch_size=micro, epochs=1)
        stats = learner.step_from_ids(q, r, torch.arange(8.0))
        assert stats["train_pad_fraction"] == pytest.approx(want), micro


# --- stability: the KL guard, the critic, dropout ---------------------------------------------------------------------


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
    # the clipped gradient norm is logged, the mean over the applied optimizer steps (clipping at 1.0 was possible)
    assert 0 < stats["grad_norm"] < 1e3
    assert stats["ppo_epochs"] == 2.0 and stats["skipped_minibatches"] == 0.0


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


def test_a_skipped_minibatch_during_the_warmup_gives_the_policy_its_learning_rate_back():
    """During the critic's warm-up the policy's group steps at rate 0; when the last minibatch's step is skipped (a
    non-finite gradient norm) the schedule does not move, so the rates must be put back by hand: else the policy would
    start its first real step at rate 0. A step whose every minibatch is skipped names each one by its place."""
    from rlcli.ppo.learner import NonFiniteLossError

    tok, policy, learner = _critic_learner(warmup=2)
    rollout, _ = _rollout(tok, policy)
    scores = torch.linspace(0.0, 1.0, 8)
    weight = next(policy.critic.parameters())
    calls, overflow_at = [], set()

    def hook(grad):
        calls.append(1)
        return grad * float("inf") if len(calls) in overflow_at else grad

    handle = weight.register_hook(hook)
    learner.step(rollout, scores)  # counts the backward passes of one step
    per_step = len(calls)
    overflow_at.add(2 * per_step)  # the last backward pass of the next step
    before = [p.detach().clone() for p in policy.pretrained.parameters()]
    stats = learner.step(rollout, scores)
    assert stats["critic_warmup"] == 1.0 and stats["skipped_minibatches"] == 1.0
    assert all(torch.equal(a, b) for a, b in zip(before, policy.pretrained.parameters()))
    rates = {g["name"]: g["lr"] for g in learner.optimizer.param_groups}
    assert rates == {"policy": pytest.approx(1e-2), "critic": pytest.approx(1e-2)}
    overflow_at.update(range(2 * per_step + 1, 4 * per_step))  # every backward pass of the next step
    with pytest.raises(NonFiniteLossError) as error:
        learner.step(rollout, scores)
    handle.remove()
    import re

    places = re.findall(r"non-finite gradient norm (?:inf|nan) \((epoch \d, minibatch \d)\)", str(error.value))
    assert places == ["epoch 1, minibatch 1", "epoch 1, minibatch 2", "epoch 2, minibatch 1"]


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
    # the statistics come from the rollout forward before the update: one epoch of one micro-batch per minibatch
    tok, policy, learner = _setup(lr=1e-9, epochs=1, micro_batch_size=4)
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


def test_kl_after_the_update_and_the_first_ratio_are_means_over_model_tokens():
    """``approx_kl_after`` is the mean of ½(log π − log π_old)² over model tokens, and ``ratio_first`` the mean of
    π/π_old: off-mask positions count for nothing however far apart, and no model token gives 0, not 0/0."""
    tok, policy, learner = _setup(lr=1e-9)
    rollout, _ = _rollout(tok, policy)
    mask = rollout.model_mask.float()
    now = learner.rollout_forward(rollout, reference_pass=False).pi_logprobs
    old = torch.where(mask.bool(), now + 0.3, now - 50.0)  # 0.3 nats on model tokens; far off elsewhere
    assert learner._approx_kl_after(rollout, old, mask) == pytest.approx(0.5 * 0.3**2, rel=1e-5)
    assert learner._ratio(now, old, mask) == pytest.approx(math.exp(-0.3), rel=1e-5)
    none = torch.zeros_like(mask)
    assert learner._approx_kl_after(rollout, old, none) == 0.0 and learner._ratio(now, old, none) == 0.0
