"""The examples users come for, as offline twins through the real entry point: the StackExchange chain
(SFT -> reward model -> PPO, with the reward model as a LoRA adapter on the policy's base: multi-adapter RLHF) and
detoxification (a toxicity classifier's "nothate" logit as the reward, prompts from a nested field). Fewer steps than
the shipped tiny recipes (README figures) to keep the suite quick; the workstation recipes dry-run offline."""

from __future__ import annotations

import importlib.util
import json

import pytest

from tests.helpers import REPO, invoke_cli as cli, mean, plain, read_metrics, run_cli

CHAIN = "configs/tiny/chain"
FAST = ["logging.progress=false", "train.save_every=null"]


def _recipe_module(name: str):
    spec = importlib.util.spec_from_file_location(f"recipes_{name}", REPO / "recipes" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """The three stages, each pointed at the previous one's output."""
    root = tmp_path_factory.mktemp("chain")
    sft, rm, ppo = root / "sft", root / "rm", root / "ppo"
    res = run_cli("sft", f"{CHAIN}/sft.yaml", f"output_dir={sft}", "train.max_steps=60", "model.config.n_embd=64",
                  "model.config.n_head=2", *FAST)
    assert res.returncode == 0, res.stderr[-3000:]
    res = run_cli("rm", f"{CHAIN}/rm.yaml", f"output_dir={rm}", f"model.name_or_path={sft}", "train.max_steps=30",
                  "eval.every=null", *FAST)
    assert res.returncode == 0, res.stderr[-3000:]
    res = run_cli("ppo", f"{CHAIN}/ppo.yaml", f"output_dir={ppo}", f"model.name_or_path={sft}",
                  f"reward.adapter={rm}", "ppo.steps=10", "optim.learning_rate=2e-3", *FAST)
    assert res.returncode == 0, res.stderr[-3000:]
    return sft, rm, ppo


@pytest.mark.slow
def test_chain_each_stage_learns(chain):
    sft, rm, ppo = chain
    losses = [m["loss"] for m in read_metrics(sft)]
    assert losses[-1] < 0.6 * losses[0], losses
    assert read_metrics(rm)[-1]["eval_accuracy"] >= 0.95  # helpful vs unhelpful answers, held-out pairs
    m = read_metrics(ppo)
    assert len(m) == 10 and all(x["kl"] >= -0.1 for x in m)
    assert m[0]["kl"] == pytest.approx(0.0, abs=1e-4)  # LoRA B = 0: the policy starts as the reference
    start, end = mean([x["reward_mean"] for x in m[:3]]), mean([x["reward_mean"] for x in m[-3:]])
    assert end > start + 0.5, (start, end)  # the reward adapter's score (normalised) rises


def test_chain_ppo_saves_only_the_policy_adapter(chain):
    from peft import PeftConfig

    _, _, ppo = chain
    # the policy's adapter, and the separate critic's (its own adapter and value head) in critic/
    assert (ppo / "adapter_config.json").exists() and (ppo / "critic" / "value_head.safetensors").exists()
    assert (ppo / "critic" / "adapter_config.json").exists()
    assert not (ppo / "reward").exists()  # the reward adapter shared the base but is not part of the policy
    assert PeftConfig.from_pretrained(str(ppo)).task_type == "CAUSAL_LM"


def test_chain_ppo_scores_equal_the_reward_model_on_its_own(chain):
    """The rewards PPO logged (from the adapter on the policy's base) are what the reward model, loaded as a model of
    its own, gives the same texts."""
    import torch

    from rlcli.rewards.reward_model import RewardModelScorer

    _, rm, ppo = chain
    rows = [json.loads(line) for line in (ppo / "samples.jsonl").read_text().splitlines()]
    scorer = RewardModelScorer.from_pretrained(str(rm), normalize=True)
    got = scorer([r["prompt"] + r["response"] for r in rows])
    assert torch.allclose(got, torch.tensor([r["reward"] for r in rows]), atol=1e-4)


def test_workstation_chain_recipes_dry_run(chain, monkeypatch):
    """configs/chain/*.yaml offline: stage 1 as it is; stages 2 and 3 read the earlier stages' outputs, so they are
    pointed at the tiny chain's, with lengths that fit the tiny model's positions (--dry-run checks them against the
    model's config); everything else is the workstation recipe's own: hub data, fields, sizes."""
    sft, rm, _ = chain
    for args in (("sft", "configs/chain/sft.yaml"),
                 ("rm", "configs/chain/rm.yaml", f"model.name_or_path={sft}", "data.max_length=64"),
                 ("ppo", "configs/chain/ppo.yaml", f"model.name_or_path={sft}", f"reward.adapter={rm}",
                  "generation.max_new_tokens=32")):
        code, out, err = cli(*args, "--dry-run", monkeypatch=monkeypatch)
        assert code == 0 and "dry run OK" in out, (args, err)
    # stage 2's reward adapter and another base: refused before anything loads, naming the key
    code, _, err = cli("ppo", "configs/chain/ppo.yaml", "model.name_or_path=Qwen/Qwen2.5-0.5B", f"reward.adapter={rm}",
                       "--dry-run", monkeypatch=monkeypatch)
    assert code == 2 and "reward.adapter:" in plain(err) and "was trained on base" in plain(err), err


@pytest.mark.slow
def test_detox_twin_learns(tmp_path):
    detox = _recipe_module("detox")
    classifier, sft, ppo = tmp_path / "classifier", tmp_path / "sft", tmp_path / "ppo"
    assert detox.train_classifier(classifier)["held_out_accuracy"] >= 0.95
    res = run_cli("sft", "configs/tiny/sft.yaml", "data.path=data/tiny/detox/sft.jsonl", f"output_dir={sft}",
                  "train.max_steps=100", "eval.every=null", "data.max_length=48", *FAST)
    assert res.returncode == 0, res.stderr[-3000:]
    res = run_cli("ppo", "configs/tiny/detox.yaml", f"output_dir={ppo}", f"model.name_or_path={sft}",
                  f"reward.model={classifier}", "ppo.steps=8", *FAST)
    assert res.returncode == 0, res.stderr[-3000:]
    m = read_metrics(ppo)
    assert all(x["kl"] >= -0.1 for x in m)
    start, end = m[0]["reward_mean"], mean([x["reward_mean"] for x in m[-2:]])
    assert end > start + 0.5, (start, end)  # the nothate logit
    before, after = detox.evaluate(str(sft), str(classifier), n=128), detox.evaluate(str(ppo), str(classifier), n=128)
    assert before["toxic_fraction"] > 0.1 and after["toxic_fraction"] < 0.5 * before["toxic_fraction"], (before, after)
    rows = [json.loads(line) for line in (ppo / "samples.jsonl").read_text().splitlines()]
    assert all(r["prompt"] for r in rows)  # prompts came from prompt.text


def test_workstation_detox_recipe_dry_runs(monkeypatch):
    code, out, err = cli("ppo", "configs/detox.yaml", "--dry-run", monkeypatch=monkeypatch)
    assert code == 0 and "dry run OK" in out, err
