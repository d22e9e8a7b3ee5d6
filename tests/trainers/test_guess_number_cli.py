"""The shipped stateful-environment example (recipes/guess_number.py, configs/guess_number*.yaml) end to end: its
recipes pass --dry-run, and a tiny model fine-tuned for a few steps plays through ``rlcli env-rollout`` and trains
through ``rlcli ppo`` with the environment's own reward."""

from __future__ import annotations

import json
import re

import pytest

from rlcli.plugins import load_module_file
from tests.helpers import REPO, invoke_cli, plain, read_metrics, run_cli

recipe = load_module_file(REPO / "recipes" / "guess_number.py")
GuessNumber, game_summary, play, halves = recipe.GuessNumber, recipe.game_summary, recipe.play, recipe.halves

SMALL = ["model.config.n_layer=1", "model.config.n_embd=64", "model.config.n_head=2"]


def test_the_game_and_its_demonstrations():
    import random

    game = GuessNumber()
    game.reset(target=20, prompt="ignored")
    assert [game.guess(g) for g in (16, "24", 20)] == ["higher: 17-31", "lower: 17-23", "correct"]
    assert game.done and game.get_reward() == 1.0  # binary search: every try halved (the unused ones count)
    game.reset(target=20)  # a lucky win: half for the win; of the other half, 3 fifths (16 and the 2 unused tries)
    assert [game.guess(g) for g in (16, 30, 20)] == ["higher: 17-31", "lower: 17-29", "correct"]
    assert game.get_reward() == pytest.approx(0.5 + 0.5 * (1 + 2) / 5)
    game.reset(target=1)
    assert [game.guess(g) for g in (31, 30, 29, 28)] == ["lower: 1-30", "lower: 1-29", "lower: 1-28", "lower: 1-27"]
    assert not game.done
    assert game.guess(27) == "lower: 1-26" and game.done and game.get_reward() == 0.0  # five tries, lost
    game.reset(target=9)  # binary search that gave up after two tries: two fifths of the halving half
    assert [game.guess(g) for g in (16, 8)] == ["lower: 1-15", "higher: 9-15"]
    assert game.get_reward() == pytest.approx(0.5 * 2 / 5)
    # a lost game scores under 0.5 however it was played: 0.5 is the win threshold (eval.pass_threshold)
    game.reset(target=2)
    for g in (16, 8, 4, 1, 3):
        game.guess(g)
    assert game.done and not game.won and game.get_reward() == pytest.approx(0.5 * 4 / 5)
    assert halves(16, 1, 31) and not halves(15, 1, 31) and halves(5, 5, 6) and halves(6, 5, 6)
    assert not halves(40, 1, 31) and halves(7, 7, 7)
    assert game.guess(16) == "the game is over"
    game.reset(target=3)
    with pytest.raises(ValueError, match="not a whole number"):  # answered as an error text, not a try
        game.guess("sixteen")
    assert game.tries == 0
    # a binary-search demonstration always wins within five tries
    wins = [play(t, random.Random(t), random_fraction=0.0)[-1]["text"] for t in range(1, 32)]
    assert wins == ["correct<response>"] * 31


@pytest.fixture(scope="module")
def sft_model(tmp_path_factory):
    out = tmp_path_factory.mktemp("guess") / "sft"
    # enough to learn the call format and a first guess or two (episodes cut to 80 tokens), not to play well
    res = run_cli("sft", "configs/guess_number_sft.yaml", f"output_dir={out}", *SMALL, "train.max_steps=50",
                  "train.save_every=null", "eval.every=null", "data.eval_fraction=0", "logging.progress=false",
                  "data.max_rows=800", "train.batch_size=16", "data.max_length=80", "optim.learning_rate=5e-3")
    assert res.returncode == 0, res.stderr[-3000:]
    return out


def test_recipes_pass_dry_run(sft_model, monkeypatch):
    model = f"model.name_or_path={sft_model}"
    for args in (("ppo", "configs/guess_number.yaml", model), ("env-rollout", "configs/guess_number_eval.yaml", model),
                 ("sft", "configs/guess_number_sft.yaml")):
        code, _, err = invoke_cli(*args, "--dry-run", monkeypatch=monkeypatch)
        assert code == 0, (args, err[-2000:])
    # a class that does not resolve, and a PPO recipe with no reward at all, are named before any weights load
    code, _, err = invoke_cli("ppo", "configs/guess_number.yaml", model, "env.environment=recipes/guess_number.py:Nope",
                              "--dry-run", monkeypatch=monkeypatch)
    assert code == 2 and "env.environment" in plain(err) and "Nope" in plain(err) and "Traceback" not in err
    code, _, err = invoke_cli("ppo", "configs/guess_number.yaml", model, "env.environment=null",
                              "env.tools={Calculator: calculator}", "--dry-run", monkeypatch=monkeypatch)
    assert code == 2 and "reward: give one of reward.function" in plain(err)


def test_env_rollout_plays_the_game(sft_model, tmp_path):
    out = tmp_path / "eval"
    res = run_cli("env-rollout", "configs/guess_number_eval.yaml", f"model.name_or_path={sft_model}",
                  f"output_dir={out}", "data.max_rows=24", "batch_size=24", "show=1")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "env-rollout summary" in plain(res.stdout) and "env_reward_mean" in plain(res.stdout)
    episodes = [json.loads(line) for line in (out / "episodes.jsonl").read_text().splitlines()]
    assert len(episodes) == 24
    for e in episodes:
        # the environment's reward is the episode's reward (no reward section); its answers are masked tool text
        assert e["reward"] == pytest.approx(e["env_reward"]) and 0.0 <= e["reward"] <= 1.0 and "env_error" not in e
        assert "".join(s["text"] for s in e["segments"]) == e["text"]
        answers = [c["output"] for c in e["tool_calls"] if c["status"] == "ok"]
        assert all(re.fullmatch(r"(higher|lower): \d+-\d+|correct|the game is over", a) for a in answers), answers
        if e["env_reward"] >= 0.5:  # a win
            assert e["finish_reason"] == "done" and answers[-1] == "correct"
    assert any(e["tool_calls"] for e in episodes), "the fine-tuned model should guess in some episodes"
    summary = game_summary(out / "episodes.jsonl")
    assert summary["episodes"] == 24 and 0.0 <= summary["success_rate"] <= 1.0


def test_grpo_through_the_stateful_environment(sft_model, tmp_path):
    out = tmp_path / "grpo"
    res = run_cli("ppo", "configs/guess_number.yaml", f"model.name_or_path={sft_model}", f"output_dir={out}",
                  "ppo.steps=2", "ppo.batch_size=16", "ppo.group_size=4", "ppo.mini_batch_size=8",
                  "ppo.micro_batch_size=8", "logging.progress=false", "train.save_every=null", "eval.every=2",
                  "eval.at_start=false", "eval.max_prompts=8")
    assert res.returncode == 0, res.stderr[-3000:]
    metrics = read_metrics(out)
    assert len(metrics) == 2 and all(m["estimator"] == "grpo" for m in metrics)
    for m in metrics:
        assert {"env_done_fraction", "env_errors", "tool_calls_per_episode"} <= set(m) and m["env_errors"] == 0
        assert 0.0 <= m["reward_mean"] <= 1.0
    assert sum(m["tool_tokens"] for m in metrics) > 0, "the environment's answers are in the rollouts (masked)"
    assert "eval/reward_mean" in metrics[-1]
    assert (out / "model.safetensors").exists() or any(out.glob("*.safetensors"))


@pytest.mark.slow
def test_ppo_with_a_value_head_resumes_through_the_environment(sft_model, tmp_path):
    out = tmp_path / "gae"
    common = [f"model.name_or_path={sft_model}", f"output_dir={out}", "ppo.advantage=gae", "ppo.group_size=1",
              "ppo.batch_size=16", "ppo.mini_batch_size=8", "ppo.micro_batch_size=8", "logging.progress=false",
              "train.save_every=1", "eval.at_start=false", "eval.every=100", "eval.max_prompts=8"]
    res = run_cli("ppo", "configs/guess_number.yaml", *common, "ppo.steps=2")
    assert res.returncode == 0, res.stderr[-3000:]
    res = run_cli("ppo", "configs/guess_number.yaml", *common, "ppo.steps=3", "--resume")
    assert res.returncode == 0, res.stderr[-3000:]
    metrics = read_metrics(out)
    assert [m["step"] for m in metrics] == [1, 2, 3] and "value_mean" in metrics[-1]
