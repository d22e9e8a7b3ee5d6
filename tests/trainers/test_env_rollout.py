"""``rlcli env-rollout`` and its output dir: a new rollout replaces the previous one's files through the manifest
(one that fails puts the previous one back, so old episodes never sit beside a new recipe), and it never replaces a
training run."""

from __future__ import annotations

import json

from tests.helpers import plain, run_cli, snapshot

RECIPE = "configs/calculator_eval.yaml"
SCRATCH = ["model.name_or_path=null", "model.architecture=gpt2", "model.tokenizer=byte",
           "model.config={n_layer: 1, n_embd: 32, n_head: 2, n_positions: 256}", "data.max_rows=4", "batch_size=2",
           "generation.max_new_tokens=8", "show=0"]
REWARDS = '''
calls = []


def constant(responses):
    return [0.5] * len(responses)


def fails_on_second_batch(responses):
    calls.append(1)
    if len(calls) > 1:
        raise RuntimeError("the grader crashed")
    return [0.0] * len(responses)
'''


def test_a_failed_rollout_puts_the_previous_one_back(tmp_path):
    """The reward raising after the old rollout was moved aside: the old episodes come back, byte for byte, and
    nothing of the failed rollout stays beside them."""
    plugin = tmp_path / "rewards.py"
    plugin.write_text(REWARDS)
    out = tmp_path / "eval"
    res = run_cli("env-rollout", RECIPE, f"output_dir={out}", *SCRATCH, f"reward.function={plugin}:constant")
    assert res.returncode == 0, res.stderr[-3000:]
    assert len((out / "episodes.jsonl").read_text().splitlines()) == 4 and (out / "summary.json").exists()
    before = snapshot(out)
    res = run_cli("env-rollout", RECIPE, f"output_dir={out}", *SCRATCH,
                  f"reward.function={plugin}:fails_on_second_batch")
    assert res.returncode == 1 and "the grader crashed" in plain(res.stderr), res.stderr[-3000:]
    assert "Traceback" not in res.stderr
    assert snapshot(out) == before
    assert not list(tmp_path.glob(".rlcli-trash-*"))


def test_a_rollout_never_replaces_a_training_run(tmp_path):
    out = tmp_path / "sft"
    res = run_cli("sft", "configs/tiny/sft.yaml", f"output_dir={out}", "train.max_steps=1", "train.save_every=null",
                  "data.eval_fraction=0", "logging.progress=false")
    assert res.returncode == 0, res.stderr[-3000:]
    before = sorted(p.name for p in out.iterdir())
    res = run_cli("env-rollout", RECIPE, f"output_dir={out}", *SCRATCH)
    assert res.returncode == 1 and "holds a training run" in plain(res.stderr), res.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == before


SCORING = '''
def prompt_is_the_rows(prompts, rows):
    return [1.0 if p == r["prompt"] else 0.0 for p, r in zip(prompts, rows)]
'''


def test_episodes_are_scored_as_ppo_scores_them(tmp_path):
    """env-rollout scores as PPO does (both call rlcli.rewards.scoring.score_episodes): the reward sees the whole
    prompt, not only its first segment (system prompt and few-shot prefix), and reward.missing_eos_penalty applies, so
    accept_min_reward filters on the reward PPO trains on."""
    plugin = tmp_path / "scoring.py"
    plugin.write_text(SCORING)
    out = tmp_path / "eval"
    res = run_cli("env-rollout", RECIPE, f"output_dir={out}", *SCRATCH, f"reward.function={plugin}:prompt_is_the_rows",
                  "reward.missing_eos_penalty=-3.0", "env.describe_tools=true", "data.max_rows=6",
                  "model.config={n_layer: 1, n_embd: 32, n_head: 2, n_positions: 512}", "env.max_length=400")
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "episodes.jsonl").read_text().splitlines()]
    assert len(rows) == 6
    for row in rows:
        stopped = row["finish_reason"] in ("submit", "eos")
        assert row["reward"] == (1.0 if stopped else -3.0), row["finish_reason"]
    assert any(row["reward"] == -3.0 for row in rows)  # an 8-token budget: episodes that never stopped


def test_a_prompt_longer_than_max_length_is_one_paragraph(tmp_path):
    res = run_cli("env-rollout", RECIPE, f"output_dir={tmp_path / 'eval'}", *SCRATCH, "env.describe_tools=true",
                  "env.max_length=128")
    text = plain(res.stderr)
    assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr[-2000:]
    assert "env.max_length" in text and "leaves no room to generate" in text
