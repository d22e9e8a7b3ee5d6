"""``rlcli ppo`` through the real entry point: the reward rises with a sane KL, outputs load, resume is exact,
2 processes work, T5 and LoRA train, and recipes dry-run offline."""

from __future__ import annotations

import json
import shutil
import sys

import pytest
import torch

from tests.helpers import REPO, accelerate_launch, kill_when, mean, plain, read_metrics, run, run_cli, run_drift_bound

TINY = "configs/tiny/ppo.yaml"
# a faster variant of the shipped recipe for tests: same task, smaller model and batch
FAST = ["model.config.n_layer=2", "model.config.n_embd=64", "model.config.n_head=2", "ppo.batch_size=32",
        "ppo.mini_batch_size=16", "ppo.micro_batch_size=16", "optim.learning_rate=1e-3", "logging.progress=false",
        "generation.max_new_tokens=24"]


@pytest.fixture(scope="module")
def ppo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ppo") / "run"
    res = run_cli("ppo", TINY, f"output_dir={out}", "ppo.steps=24", "train.save_every=12", *FAST)
    assert res.returncode == 0, res.stderr[-3000:]
    return out


def test_reward_rises_and_kl_stays_sane(ppo_run):
    metrics = read_metrics(ppo_run)
    assert [m["step"] for m in metrics] == list(range(1, 25))
    start = mean([m["reward_mean"] for m in metrics[:3]])
    end = mean([m["reward_mean"] for m in metrics[-3:]])
    assert end > 3 * max(start, 0.05), (start, end)
    assert all(m["kl"] >= -0.1 for m in metrics), [round(m["kl"], 3) for m in metrics]
    assert metrics[0]["kl"] == pytest.approx(0.0, abs=1e-4)  # policy == reference before the first update
    assert metrics[-1]["kl_negative_steps"] == 0
    assert all(m["sampler_logprob_diff"] < 1e-4 for m in metrics)  # the sampler and the training forward agree
    wanted = {"reward_mean", "reward_std", "kl", "kl_coef", "entropy", "policy_clipfrac", "value_clipfrac", "approx_kl",
              "explained_variance", "response_length", "stopped_fraction", "time_generate", "time_score",
              "time_forward", "time_optimize", "tokens_per_s", "loss_policy", "loss_value", "lr"}
    assert wanted <= set(metrics[-1]), wanted - set(metrics[-1])


def test_outputs_load(ppo_run):
    from transformers import AutoModelForCausalLM

    from rlcli.models.value_head import load_value_head_model

    assert AutoModelForCausalLM.from_pretrained(ppo_run) is not None
    policy = load_value_head_model(ppo_run)
    ids = torch.tensor([[5, 6, 7]])
    logits, values = policy(ids, torch.ones_like(ids), ids, torch.ones_like(ids))
    assert logits.shape[:2] == values.shape == (1, 3)
    samples = [json.loads(line) for line in (ppo_run / "samples.jsonl").read_text().splitlines()]
    assert samples and {"step", "prompt", "response", "reward"} <= set(samples[0])


def test_resume_after_kill_is_exact(ppo_run, tmp_path):
    out = tmp_path / "run"
    ckpt = out / "checkpoints" / "step-00000012"
    kill_when(["ppo", TINY, f"output_dir={out}", "ppo.steps=24", "train.save_every=12", *FAST], ckpt.exists,
              timeout=300, poll=0.05)
    assert ckpt.exists()
    res = run_cli("ppo", TINY, f"output_dir={out}", "ppo.steps=24", "train.save_every=12", *FAST, "--resume")
    assert res.returncode == 0, res.stderr[-3000:]
    keys = ("reward_mean", "kl", "loss_policy", "loss_value", "kl_coef", "entropy")
    expected = [{k: m[k] for k in keys} for m in read_metrics(ppo_run)]
    got = [{k: m[k] for k in keys} for m in read_metrics(out)]
    assert got == expected


def test_dry_runs_offline():
    # configs/imdb.yaml as shipped passes without tensorboard installed (TensorBoard is a commented line there), and
    # offline it says the hub ids a run would need from the cache
    for recipe in (TINY, "configs/tiny/ppo_t5.yaml", "configs/imdb.yaml"):
        res = run_cli("ppo", recipe, "--dry-run")
        assert res.returncode == 0, (recipe, res.stderr)
        assert "dry run OK" in res.stdout
    assert "'lvwerra/gpt2-imdb'" in plain(res.stdout) and "HF_HUB_OFFLINE is set" in plain(res.stdout)


def test_t5_policy_trains(tmp_path):
    out = tmp_path / "t5"
    res = run_cli("ppo", "configs/tiny/ppo_t5.yaml", f"output_dir={out}", "ppo.steps=10", "logging.progress=false",
                  "train.save_every=null", "model.config.d_model=64", "model.config.d_ff=128", "model.config.num_heads=2",
                  "optim.learning_rate=1e-3")
    assert res.returncode == 0, res.stderr[-3000:]
    m = read_metrics(out)
    assert mean([x["reward_mean"] for x in m[-3:]]) > 3 * max(mean([x["reward_mean"] for x in m[:2]]), 0.05)
    assert all(x["kl"] >= -0.1 for x in m)


def test_lora_policy_trains_against_disabled_adapter(tmp_path):
    out = tmp_path / "lora"
    res = run_cli("ppo", TINY, f"output_dir={out}", "ppo.steps=6", *FAST, "lora.r=8", "optim.learning_rate=5e-3",
                  "train.save_every=null")
    assert res.returncode == 0, res.stderr[-3000:]
    m = read_metrics(out)
    assert m[0]["kl"] == pytest.approx(0.0, abs=1e-5)  # LoRA B starts at 0: adapter on == adapter off
    assert m[-1]["kl"] > 0.01  # the adapter moved the policy away from the disabled-adapter reference
    assert (out / "adapter_config.json").exists() and (out / "critic" / "value_head.safetensors").exists()
    # the separate critic: an adapter of its own on its own copy of the base, laid out as the policy (the base built
    # from scratch beside it in critic/base: no hub holds it) with its value head
    assert (out / "critic" / "adapter_config.json").exists() and (out / "critic" / "base" / "config.json").exists()
    assert not (out / "value_head.safetensors").exists()
    from rlcli.models.value_head import load_value_head_model

    policy = load_value_head_model(out)
    ids = torch.tensor([[5, 6, 7]])
    _, values = policy(ids, torch.ones_like(ids), ids, torch.ones_like(ids))
    assert values.shape == (1, 3) and policy.critic.is_peft


@pytest.mark.slow
def test_two_processes_learn_and_resume_exactly(tmp_path):
    """`accelerate launch --cpu --num_processes 2` with the global batch of the one-process fixture run: it learns,
    statistics cover both processes, and --resume on two processes reproduces the run exactly."""
    out = tmp_path / "ddp"
    cmd = ["--cpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "-m", "rlcli", "ppo", TINY, f"output_dir={out}", "ppo.steps=24", "train.save_every=12", *FAST,
           "ppo.micro_batch_size=8"]
    res = accelerate_launch(*cmd, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "2 processes" in plain(res.stdout)
    two = read_metrics(out)
    assert len(two) == 24 and all(m["episodes"] == 32 for m in two)  # statistics cover both processes' episodes
    assert all(m["kl"] >= -0.1 for m in two)
    assert two[0]["kl"] == pytest.approx(0.0, abs=1e-4)  # every process's reference equals the broadcast policy
    start = mean([m["reward_mean"] for m in two[:3]])
    end_two = mean([m["reward_mean"] for m in two[-6:]])
    # each process samples its own episodes, so the curve is another draw of the one-process curve (seeds 0-3 end
    # at 6.0-7.4 on one process, 2.2-7.4 on two): that it learns is checked here, that an update on the same
    # episodes is the same on 1 and 2 processes by test_two_processes_update_like_one
    assert end_two > 3 * max(start, 0.05), (start, end_two)
    assert (out / "checkpoints" / "step-00000012" / "rng-1.pt").exists()
    # --resume with two processes: back to the step-12 checkpoint, steps 13-24 again, the same numbers. The run is
    # marked as a killed run leaves it: a finished run resumed to its own length has nothing to do
    manifest = json.loads((out / ".rlcli-run.json").read_text())
    (out / ".rlcli-run.json").write_text(json.dumps({**manifest, "state": "running"}))
    shutil.rmtree(out / "checkpoints" / "step-00000024")  # (the last step's checkpoint: killed before it)
    res = accelerate_launch(*cmd, "--resume", timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resuming at step 12" in plain(res.stdout)
    keys = ("reward_mean", "kl", "loss_policy", "loss_value", "entropy")
    assert [{k: m[k] for k in keys} for m in read_metrics(out)] == [{k: m[k] for k in keys} for m in two]


def test_bad_reward_function_is_reported(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def score(responses):\n    return [1.0]\n")
    res = run_cli("ppo", TINY, f"output_dir={tmp_path / 'o'}", f"reward.function={bad}:score", "ppo.steps=1", *FAST)
    assert res.returncode == 1 and "returned 1 scores for" in plain(res.stderr) and "Traceback" not in res.stderr
    res = run_cli("ppo", TINY, f"output_dir={tmp_path / 'o2'}", f"reward.function={bad}:nope", "--dry-run")
    assert res.returncode == 2 and "no attribute 'nope'" in plain(res.stderr)
    res = run_cli("ppo", TINY, "ppo.mini_batch_size=48", "--dry-run")
    assert res.returncode == 2 and "ppo.batch_size=64 must be a multiple of ppo.mini_batch_size=48" in plain(res.stderr)


@pytest.mark.slow
def test_reward_model_from_rlcli_rm_trains(tmp_path):
    """PPO against a reward model trained by `rlcli rm` on the tiny preference task (sorting digits)."""
    rm_dir = tmp_path / "rm"
    res = run_cli("rm", "configs/tiny/rm.yaml", f"output_dir={rm_dir}", "train.max_steps=60", "train.save_every=null",
                  "logging.progress=false")
    assert res.returncode == 0, res.stderr[-3000:]
    out = tmp_path / "ppo"
    # a random policy writes bytes the reward model scores all alike (std ~0.01): the signal appears only once
    # digits do, so a higher learning rate and a light KL penalty (measured: seeds 0 and 1 go -1.73 -> 1.3-1.8)
    res = run_cli("ppo", TINY, f"output_dir={out}", "reward.function=null", f"reward.model={rm_dir}",
                  "reward.normalize=true", "data.path=data/tiny/rm.jsonl", "ppo.steps=24", *FAST,
                  "generation.max_new_tokens=12", "optim.learning_rate=3e-3", "kl.coef=0.01", "train.save_every=null")
    assert res.returncode == 0, res.stderr[-3000:]
    m = read_metrics(out)
    assert len(m) == 24 and all(x["kl"] >= -0.1 for x in m)
    assert mean([x["reward_mean"] for x in m[-3:]]) > mean([x["reward_mean"] for x in m[:3]]) + 1.0


def test_min_new_tokens_equal_to_max_new_tokens_keeps_the_kl_honest(tmp_path):
    """The classic TRL settings: EOS banned at every response position. Before rlcli replayed that ban in the loss,
    this run's mean KL fell to -23 by step 24 (the policy was paid for moving probability onto the EOS it never
    emits) and reward learning stalled. Now the KL stays >= 0, p(EOS) does not drift up, and the reward rises."""
    out = tmp_path / "min"
    res = run_cli("ppo", TINY, f"output_dir={out}", "ppo.steps=40", *FAST, "generation.min_new_tokens=24",
                  "train.save_every=null")
    assert res.returncode == 0, res.stderr[-3000:]
    m = read_metrics(out)
    assert len(m) == 40
    assert all(x["kl"] >= -0.1 for x in m), [round(x["kl"], 2) for x in m]
    assert all(x["response_length"] == 24 for x in m)
    eos_start = mean([x["forbidden_mass"] for x in m[:3]])
    eos_end = mean([x["forbidden_mass"] for x in m[-3:]])
    assert eos_end <= 1.5 * eos_start + 0.002, (eos_start, eos_end)  # p(EOS) under the unrestricted policy
    assert mean([x["reward_mean"] for x in m[-3:]]) > 3 * max(mean([x["reward_mean"] for x in m[:3]]), 0.05)


def test_negative_kl_warning_names_the_causes(tmp_path, monkeypatch, capsys):
    """A deliberately broken sampler (it keeps sampling from the initial weights, as a sync that never happens
    would): the run prints one warning panel naming the likely causes and counts the steps in kl_negative_steps."""
    import rlcli.ppo.rollout as rollout
    import rlcli.trainers.ppo as ppo
    from rlcli.config.loader import load_recipe
    from rlcli.config.ppo import PPORecipe

    real_generate, stale = rollout.generate, {}

    def stale_generate(engine, *args, **kwargs):
        if "engine" not in stale:  # a copy of the engine (its model included) as it was at step 1
            import copy

            stale["engine"] = copy.deepcopy(engine)
        return real_generate(stale["engine"], *args, **kwargs)

    monkeypatch.setattr(rollout, "generate", stale_generate)
    monkeypatch.chdir(REPO)
    recipe = load_recipe(PPORecipe, TINY, [f"output_dir={tmp_path / 'run'}", "ppo.steps=12", *FAST,
                                           "optim.learning_rate=3e-3", "train.save_every=null"])
    ppo.train(recipe)
    text = plain(capsys.readouterr().out)
    assert text.count("negative KL") == 1 and "cannot be negative" in text and "dropout" in text
    m = read_metrics(tmp_path / "run")
    assert m[-1]["kl_negative_steps"] >= 3 and min(x["kl"] for x in m) < -0.1


@pytest.mark.parametrize("estimator", ["gae", "grpo", "grpo:1"])
def test_two_processes_update_like_one(estimator, tmp_path):
    """The same 32 episodes, split over 2 processes or on one: after 3 PPO steps (2 epochs each, gradient clipping,
    whitening over all processes; grpo:1 one epoch, where the training forward gives pi_old) the weights agree to
    float noise."""
    import socket

    script = REPO / "tests" / "trainers" / "ppo_two_process_step.py"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    one = run([sys.executable, str(script), estimator, str(tmp_path / "one.pt")], timeout=300)
    assert one.returncode == 0, one.stderr[-2000:]
    two = run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
               str(script), estimator, str(tmp_path / "two.pt")], timeout=300)
    assert two.returncode == 0, two.stderr[-2000:]
    assert "procs 2" in two.stdout
    a, b = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    # 3 PPO steps × epochs optimizer steps (one minibatch) of a GPT-2 with n_embd 64 (MLP 256), 2 layers
    steps = 3 * int(estimator.partition(":")[2] or 2)
    for k in a:
        assert (a[k] - b[k]).abs().max().item() <= run_drift_bound(a[k], width=256, layers=2, steps=steps), k


def test_the_value_head_can_share_the_policys_trunk(tmp_path):
    """critic.separate=false: one model, a value head on its last hidden state, saved beside the LM."""
    out = tmp_path / "shared"
    res = run_cli("ppo", TINY, f"output_dir={out}", "ppo.steps=3", *FAST, "critic.separate=false",
                  "train.save_every=null")
    assert res.returncode == 0, res.stderr[-3000:]
    assert (out / "value_head.safetensors").exists() and not (out / "critic").exists()
    from rlcli.models.value_head import load_value_head_model

    policy = load_value_head_model(out)
    assert policy.value_head is not None and policy.critic is None
    assert "explained_variance" in read_metrics(out)[-1]
