"""``rlcli env-rollout`` and ``rlcli ppo`` with an ``env:`` section, end to end on a quickly fine-tuned tiny model
that really calls the calculator."""

from __future__ import annotations

import json

import pytest

from tests.helpers import plain, read_metrics, run_cli

SMALL = ["model.config.n_layer=2", "model.config.n_embd=64", "model.config.n_head=2"]


@pytest.fixture(scope="module")
def sft_model(tmp_path_factory):
    out = tmp_path_factory.mktemp("calc") / "sft"
    res = run_cli("sft", "configs/calculator_sft.yaml", f"output_dir={out}", *SMALL, "train.max_steps=150",
                  "train.save_every=null", "eval.every=null", "data.eval_fraction=0", "logging.progress=false",
                  "optim.learning_rate=3e-3", "data.max_rows=2000")
    assert res.returncode == 0, res.stderr[-3000:]
    return out


def test_env_rollout_shows_and_writes_episodes(sft_model, tmp_path):
    out = tmp_path / "eval"
    res = run_cli("env-rollout", "configs/calculator_eval.yaml", f"model.name_or_path={sft_model}", f"output_dir={out}",
                  "data.max_rows=40", "show=2")
    assert res.returncode == 0, res.stderr[-3000:]
    text = plain(res.stdout)
    assert "legend" in text and "prompt" in text and "tool" in text and "env-rollout summary" in text
    episodes = [json.loads(line) for line in (out / "episodes.jsonl").read_text().splitlines()]
    summary = json.loads((out / "summary.json").read_text())
    assert len(episodes) == 40 == summary["episodes"]
    with_tool = [e for e in episodes if e["tool_calls"]]
    assert with_tool, "the fine-tuned model should call the calculator in some episodes"
    for e in episodes:
        assert "".join(s["text"] for s in e["segments"]) == e["text"]
        assert e["reward"] in (0.0, 1.0) and e["meta"]["answer"]
    e = with_tool[0]
    assert [s["source"] for s in e["segments"]][:3] == ["prompt", "model", "tool"]
    assert e["tool_calls"][0]["name"] == "Calculator"
    # episodes are SFT data as they are (segments format)
    assert summary["tool_use_rate"] == pytest.approx(len(with_tool) / 40)


def test_ppo_through_the_environment(sft_model, tmp_path):
    out = tmp_path / "ppo"
    res = run_cli("ppo", "configs/calculator.yaml", f"model.name_or_path={sft_model}", f"output_dir={out}",
                  "ppo.steps=3", "ppo.batch_size=16", "ppo.mini_batch_size=8", "ppo.micro_batch_size=8",
                  "logging.progress=false", "train.save_every=null", "eval.max_prompts=16", "eval.every=2", "eval.at_start=false")
    assert res.returncode == 0, res.stderr[-3000:]
    metrics = read_metrics(out)
    assert len(metrics) == 3
    # held-out evaluation through the same environment (configs/calculator.yaml's eval section), at steps 2 and 3
    assert [m["step"] for m in metrics if "eval/reward_mean" in m] == [2, 3]
    assert {"eval/tool_use_rate", "eval/turns_per_episode", "eval/submitted_fraction"} <= set(metrics[-1])
    for m in metrics:
        assert m["kl"] >= -0.1
        assert {"tool_use_rate", "tool_calls_per_episode", "submitted_fraction", "tool_ok"} <= set(m)
    assert sum(m["tool_tokens"] for m in metrics) > 0, "tool output must appear in the rollouts (masked)"
    assert max(m["tool_use_rate"] for m in metrics) > 0
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert samples and "answer" in samples[0] and "tool_calls" in samples[0]


def test_critic_free_ppo_through_the_environment(sft_model, tmp_path):
    """RLOO through the calculator environment: groups of 4 episodes per prompt, tool tokens masked, no value head."""
    out = tmp_path / "rloo"
    res = run_cli("ppo", "configs/calculator.yaml", f"model.name_or_path={sft_model}", f"output_dir={out}",
                  "ppo.advantage=rloo", "ppo.group_size=4", "ppo.steps=3", "ppo.batch_size=16",
                  "ppo.mini_batch_size=8", "ppo.micro_batch_size=8", "logging.progress=false", "train.save_every=null",
                  "eval.at_start=false", "eval.max_prompts=16")
    assert res.returncode == 0, res.stderr[-3000:]
    metrics = read_metrics(out)
    assert len(metrics) == 3 and all(m["estimator"] == "rloo" and m["kl"] >= -0.1 for m in metrics)
    assert sum(m["tool_tokens"] for m in metrics) > 0 and "value_mean" not in metrics[-1]
    assert not (out / "value_head.safetensors").exists()


def test_env_recipes_dry_run_and_bad_tools(sft_model, tmp_path):
    # stage 2 recipes point at stage 1's output; before it exists, the dry run says so
    res = run_cli("ppo", "configs/calculator.yaml", "model.name_or_path=runs/not-trained-yet/sft", "--dry-run")
    assert res.returncode == 2 and "model.name_or_path" in plain(res.stderr)
    model = f"model.name_or_path={sft_model}"
    for args in (("ppo", "configs/calculator.yaml", model), ("ppo", "configs/calculator_rloo.yaml", model),
                 ("env-rollout", "configs/calculator_eval.yaml", model),
                 ("sft", "configs/calculator_sft.yaml")):
        res = run_cli(*args, "--dry-run")
        assert res.returncode == 0, (args, res.stderr[-2000:])
    res = run_cli("env-rollout", "configs/calculator_eval.yaml", model, "env.tools.Calculator=nosuch", "--dry-run")
    assert res.returncode == 2 and "env.tools.Calculator" in plain(res.stderr) and "not a built-in tool" in plain(res.stderr)
    res = run_cli("ppo", "configs/calculator.yaml", model, "env.protocl=json", "--dry-run")
    assert res.returncode == 2 and "did you mean 'protocol'" in plain(res.stderr)
