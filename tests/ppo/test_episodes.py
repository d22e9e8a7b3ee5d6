"""The one collector of episodes (``ppo.rollout.play_episodes``) behind rollouts and evaluation, their one set of
tool statistics, and the learner's typed batch (``ppo.learner.LearnerBatch``)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

from rlcli.config.loader import load_recipe
from rlcli.config.ppo import PPORecipe
from rlcli.models.engines import LocalEngine
from rlcli.ppo.learner import LearnerBatch, _trim
from rlcli.ppo.rollout import Episodes, env_metrics, tool_counts, tool_rates
from rlcli.rl import Rollout
from tests.helpers import REPO

TINY = "configs/tiny/ppo.yaml"
SMALL = ["model.config.n_layer=1", "model.config.n_embd=32", "model.config.n_head=2", "ppo.batch_size=8",
         "ppo.mini_batch_size=8", "generation.max_new_tokens=6", "logging.progress=false"]


@pytest.fixture(scope="module")
def setup():
    """A tiny PPO run's ``RolloutSetup``; its evaluation samples like its rollouts (same temperature and length)."""
    from rlcli.data.prompts import load_prompt_rows
    from rlcli.models.loading import load_tokenizer
    from rlcli.ppo.build import build_learner, rollout_setup

    mp = pytest.MonkeyPatch()
    mp.chdir(REPO)
    try:
        recipe = load_recipe(PPORecipe, TINY, [*SMALL, "eval.temperature=1.0", "eval.max_new_tokens=6",
                                               "eval.batch_size=4", "eval.samples_per_prompt=2",
                                               "data.eval_fraction=0.1"])
        set_seed(recipe.seed)
        tokenizer = load_tokenizer(recipe.model, padding_side="left")
        rows, column = load_prompt_rows(recipe.data)
        accelerator = Accelerator(cpu=True)
        _, _, reward, learner = build_learner(recipe, accelerator, tokenizer, "causal", optimizer_steps=1)
        yield rollout_setup(recipe, accelerator, tokenizer, rows, column, accelerator.unwrap_model(learner.model),
                            reward, learner.rules)
    finally:
        mp.undo()


def test_a_step_collects_its_episodes_with_the_shared_collector(setup):
    """``collect_episodes`` is ``play_episodes`` on the step's rows with the step's generator."""
    from rlcli.ppo.rollout import collect_episodes, play_episodes
    from rlcli.seeds import index_stream, rollout_generator

    recipe = setup.recipe
    ep = collect_episodes(setup, step=2)
    per_step = recipe.ppo.batch_size // recipe.ppo.group_size
    rows = [setup.rows[i] for i in index_stream(len(setup.rows), recipe.seed, per_step, per_step)
            for _ in range(recipe.ppo.group_size)]
    again = play_episodes(setup, rows, setup.column, recipe.generation, setup.rules, None,
                          LocalEngine(setup.policy.pretrained), rollout_generator(recipe.seed, 2, 0))
    assert torch.equal(ep.rollout.response_ids, again.rollout.response_ids)
    assert torch.equal(ep.scores, again.scores) and ep.prompts == again.prompts and ep.stopped == again.stopped


def test_evaluation_sums_the_episodes_the_collector_makes(setup):
    """Evaluation under the rollouts' sampling settings gets, for a batch and its generator, exactly the episodes the
    collector makes: its sums are theirs."""
    from rlcli.ppo.evaluation import EVAL_SEED_OFFSET, Evaluator
    from rlcli.ppo.rollout import play_episodes

    rows = setup.rows[:4]
    evaluator = Evaluator.build(setup, rows, setup.column)
    assert evaluator.gen == setup.recipe.generation and evaluator.rules == setup.rules
    engine = LocalEngine(setup.policy.pretrained)
    batch = [r for r in rows for _ in range(2)]
    sums = evaluator._batch(engine, 1, batch)
    g = torch.Generator().manual_seed(setup.recipe.seed * 1_000_003 + EVAL_SEED_OFFSET + 1)
    ep = play_episodes(setup, batch, setup.column, setup.recipe.generation, setup.rules, None, engine, g)
    scores = ep.scores.double()
    passed = (scores.view(-1, 2) >= evaluator.cfg.pass_threshold).any(dim=1).sum()
    expected = [8, 4, scores.sum(), (scores**2).sum(), passed, ep.rollout.response_mask.sum(), sum(ep.stopped),
                0, 0, 0, 0]
    assert sums.tolist() == [float(x) for x in expected]


def _history(calls: int, turns: int, finish: str):
    return SimpleNamespace(tool_calls=[object()] * calls, num_turns=turns, finish_reason=finish, env_reward=None,
                           env_error=None, answer=None)


def test_tool_statistics_are_counted_once_for_rollouts_and_evaluation():
    histories = [_history(2, 3, "submit"), _history(0, 1, "length"), _history(1, 2, "submit")]
    assert tool_counts(histories) == [2, 3, 6, 2]  # with a call, calls, turns, submitted
    empty = torch.zeros(3, 1)
    ep = Episodes(Rollout(empty, empty, empty, empty, empty), torch.zeros(3), [], [], [], histories, None, 0.0, 0.0)
    assert ep.tool_counts() == tool_counts(histories)
    rates = tool_rates(ep.tool_counts(), 3)
    assert rates == {"tool_use_rate": 2 / 3, "tool_calls_per_episode": 1.0, "turns_per_episode": 2.0,
                     "submitted_fraction": 2 / 3}
    assert tool_rates(ep.tool_counts(), 3, prefix="eval/") == {f"eval/{k}": v for k, v in rates.items()}
    # the training metrics of the same episodes (one process): the same rates
    env = SimpleNamespace(last_stats=SimpleNamespace(pad_fraction=0.25, tool_outcomes={"ok": 3}))
    learner = SimpleNamespace(sum_over_processes=lambda *v: [float(x) for x in v], procs=1)
    metrics = env_metrics(histories, env, learner)
    assert {k: metrics[k] for k in rates} == rates
    assert metrics["pad_fraction"] == 0.25 and metrics["tool_ok"] == 3 and metrics["tool_error"] == 0
    no_tools = Episodes(ep.rollout, ep.scores, [], [], [], None, None, 0.0, 0.0)
    assert no_tools.tool_counts() == [0, 0, 0, 0]


def test_a_learner_batch_slices_every_field_alike():
    """``LearnerBatch.select``: the rows' episodes in every field, cut to the micro-batch's longest response."""
    g = torch.Generator().manual_seed(0)
    b, q, r = 5, 4, 7
    lengths = torch.tensor([7, 2, 3, 5, 1])
    response_mask = (torch.arange(r) < lengths[:, None]).long()
    query_mask = torch.ones(b, q, dtype=torch.long)
    query_mask[1, :2] = 0
    rollout = Rollout(torch.randint(0, 50, (b, q), generator=g), query_mask,
                      torch.randint(0, 50, (b, r), generator=g) * response_mask, response_mask,
                      torch.zeros(b, r, dtype=torch.long))
    fields = [torch.randn(b, r, generator=g) * response_mask for _ in range(5)]
    batch = LearnerBatch(rollout, *fields)
    rows = torch.tensor([4, 1, 2])
    micro = batch.select(rows)
    trimmed, width = _trim(rollout.index(rows))
    assert width == 3 and micro.rollout.response_ids.shape == (3, 3) and micro.batch_size == 3
    assert torch.equal(micro.rollout.response_ids, trimmed.response_ids)
    assert torch.equal(micro.rollout.query_ids, trimmed.query_ids)
    for name, full in zip(("old_logprobs", "values", "ref_logprobs", "advantages", "returns"), fields):
        assert torch.equal(getattr(micro, name), full[rows, :width]), name
    # row i of every field is episode rows[i]
    assert torch.equal(micro.advantages[0], fields[3][4, :3]) and torch.equal(micro.returns[1], fields[4][1, :3])
    without_critic = LearnerBatch(rollout, fields[0], None, *fields[2:]).select(rows)
    assert without_critic.values is None
