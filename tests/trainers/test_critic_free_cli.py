"""``rlcli ppo`` with critic-free estimators (GRPO, RLOO, REINFORCE++, Dr. GRPO's settings): learning, no value head
anywhere, exact resume, two processes, recipe checks."""

from __future__ import annotations

import shutil

import pytest
import torch

from tests.helpers import accelerate_launch, mean, plain, read_metrics, run_cli

GRPO = "configs/tiny/grpo.yaml"
FAST = ["model.config.n_layer=2", "model.config.n_embd=64", "model.config.n_head=2", "ppo.batch_size=32",
        "ppo.mini_batch_size=16", "ppo.micro_batch_size=16", "ppo.group_size=4", "optim.learning_rate=1e-3",
        "logging.progress=false", "generation.max_new_tokens=24"]
VALUE_KEYS = {"value_mean", "explained_variance", "loss_value", "value_clipfrac"}


@pytest.fixture(scope="module")
def grpo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("grpo") / "run"
    res = run_cli("ppo", GRPO, f"output_dir={out}", "ppo.steps=24", "train.save_every=12", *FAST)
    assert res.returncode == 0, res.stderr[-3000:]
    return out


def test_grpo_learns_without_a_value_head(grpo_run):
    m = read_metrics(grpo_run)
    assert len(m) == 24 and all(x["estimator"] == "grpo" for x in m)
    start, end = mean([x["reward_mean"] for x in m[:3]]), mean([x["reward_mean"] for x in m[-3:]])
    assert end > 4 * max(start, 0.05), (start, end)
    assert m[0]["kl"] == pytest.approx(0.0, abs=1e-4) and all(x["kl"] >= -0.1 for x in m)
    assert "loss_kl" in m[-1] and not VALUE_KEYS & set(m[-1])  # KL in the loss (k3); no critic statistics
    assert not (grpo_run / "value_head.safetensors").exists() and not (grpo_run / "value_head.json").exists()
    weights = torch.load(grpo_run / "checkpoints" / "step-00000012" / "model.pt", weights_only=True)
    assert weights and not any("value_head" in k for k in weights)
    # the optimizer holds the LM's parameters and nothing else (a value head would add its weight and bias)
    from transformers import AutoModelForCausalLM

    optimizer = torch.load(grpo_run / "checkpoints" / "step-00000012" / "optimizer.pt", weights_only=True)
    lm = AutoModelForCausalLM.from_pretrained(grpo_run)
    assert sum(len(g["params"]) for g in optimizer["param_groups"]) == len(list(lm.parameters()))


def test_grpo_resume_is_exact(grpo_run, tmp_path):
    """--resume from the step-12 checkpoint redoes steps 13-24 with the same numbers."""
    copy = tmp_path / "copy"
    shutil.copytree(grpo_run, copy)
    res = run_cli("ppo", GRPO, f"output_dir={copy}", "ppo.steps=24", "train.save_every=12", *FAST, "--resume")
    assert res.returncode == 0, res.stderr[-3000:]
    keys = ("reward_mean", "kl", "loss_policy", "loss_kl", "entropy")
    assert [{k: x[k] for k in keys} for x in read_metrics(copy)] == [{k: x[k] for k in keys}
                                                                   for x in read_metrics(grpo_run)]


@pytest.mark.parametrize("settings", [
    ["ppo.advantage=rloo"],
    ["ppo.advantage=reinforce_pp"],
    ["ppo.advantage=reinforce_pp", "ppo.group_size=1", "ppo.batch_size=32"],
    # Dr. GRPO: no std scaling, a constant normaliser
    ["ppo.advantage=grpo", "ppo.advantage_scaling=none", "ppo.loss_aggregation=constant"],
])
@pytest.mark.slow
def test_other_estimators_learn(settings, tmp_path):
    out = tmp_path / "run"
    res = run_cli("ppo", GRPO, f"output_dir={out}", "ppo.steps=16", "train.save_every=null", *FAST, *settings)
    assert res.returncode == 0, res.stderr[-3000:]
    m = read_metrics(out)
    assert all(x["kl"] >= -0.1 for x in m) and not VALUE_KEYS & set(m[-1])
    assert mean([x["reward_mean"] for x in m[-3:]]) > 2 * max(mean([x["reward_mean"] for x in m[:3]]), 0.05)


def test_grpo_with_two_processes(tmp_path):
    """Each process samples whole groups (2 prompts × 4 completions of 16 episodes each); statistics cover both."""
    out = tmp_path / "ddp"
    res = accelerate_launch("--cpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
                            "--dynamo_backend", "no", "-m", "rlcli", "ppo", GRPO, f"output_dir={out}", "ppo.steps=12",
                            "train.save_every=null", *FAST, "ppo.micro_batch_size=8", timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    m = read_metrics(out)
    assert len(m) == 12 and all(x["episodes"] == 32 for x in m)
    assert m[0]["kl"] == pytest.approx(0.0, abs=1e-4) and all(x["kl"] >= -0.1 for x in m)
    assert mean([x["reward_mean"] for x in m[-3:]]) > mean([x["reward_mean"] for x in m[:3]])


def test_estimator_settings_are_checked():
    cases = [
        (["ppo.group_size=1"], "grpo compares completions of the same prompt, so it needs ppo.group_size >= 2"),
        (["ppo.group_size=6"], "ppo.batch_size=64 must be a multiple of ppo.group_size × processes = 6 × 1"),
        (["ppo.advantage=rloo", "ppo.group_size=1"], "rloo compares completions"),
        (["kl.mode=loss", "kl.estimator=full"], "kl.estimator=full works only with kl.mode=reward"),
        (["ppo.advantage=reinforce_pp", "ppo.group_size=1", "ppo.advantage_scaling=group"],
         "ppo.advantage_scaling=group needs ppo.group_size >= 2"),
    ]
    for overrides, message in cases:
        res = run_cli("ppo", GRPO, *overrides, "--dry-run")
        assert res.returncode == 2 and message in plain(res.stderr), (overrides, plain(res.stderr)[-1500:])
    res = run_cli("ppo", GRPO, "ppo.advantage=rloo", "ppo.group_size=4", "--dry-run")
    assert res.returncode == 0 and "no value head; 16 prompts × 4 completions; scaling none" in plain(res.stdout)


def test_grpo_with_one_update_per_batch_learns_without_the_policy_pass(tmp_path):
    """One epoch of one minibatch (GRPO's usual settings): the run says pi_old comes from the training forward, the
    first-ratio check runs once (step 1, an eval-mode probe of one micro-batch), the sampler still agrees with the
    trainer, and it learns."""
    out = tmp_path / "run"
    res = run_cli("ppo", GRPO, f"output_dir={out}", "ppo.steps=16", *FAST, "ppo.mini_batch_size=32", "ppo.epochs=1",
                  "optim.learning_rate=3e-3", "train.save_every=null")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "π_old from the training forward" in plain(res.stdout)
    m = read_metrics(out)
    assert [x["step"] for x in m if "ratio_first" in x] == [1] and m[0]["ratio_first"] == pytest.approx(1.0, abs=1e-4)
    assert all(x["sampler_logprob_diff"] < 1e-4 for x in m)
    assert all(x["kl"] >= -0.1 for x in m) and all(0 <= x["train_pad_fraction"] < 0.5 for x in m)
    start, end = mean([x["reward_mean"] for x in m[:3]]), mean([x["reward_mean"] for x in m[-3:]])
    assert end > 3 * max(start, 0.05), (start, end)
