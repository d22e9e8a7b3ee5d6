"""Held-out evaluation inside ``rlcli ppo`` (``eval:``, ``eval.keep_best``): logged at the chosen steps, the best
policy kept, no effect on training, the same numbers on 1 or 2 processes, bad settings refused by --dry-run."""

from __future__ import annotations

import json
import math

import pytest

from rlcli.config.loader import load_recipe
from rlcli.config.ppo import PPORecipe
from tests.helpers import REPO, accelerate_launch, invoke_cli, read_metrics

TINY = "configs/tiny/ppo.yaml"
FAST = ["model.config.n_layer=2", "model.config.n_embd=64", "model.config.n_head=2", "ppo.batch_size=16",
        "ppo.mini_batch_size=16", "generation.max_new_tokens=12", "logging.progress=false", "ppo.steps=4"]
EVAL = ["data.eval_fraction=0.1", "eval.every=2", "eval.at_start=true", "eval.samples_per_prompt=2",
        "eval.temperature=1.0", "eval.pass_threshold=2", "eval.keep_best=eval/reward_mean"]
TIMING = ("time_", "tokens_per_s")


def _train(out, *overrides, monkeypatch):
    import rlcli.trainers.ppo as ppo

    monkeypatch.chdir(REPO)
    ppo.train(load_recipe(PPORecipe, TINY, [f"output_dir={out}", *FAST, *overrides]))
    return read_metrics(out)


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    try:
        out = tmp_path_factory.mktemp("eval") / "run"
        return out, _train(out, *EVAL, monkeypatch=mp)
    finally:
        mp.undo()


def test_held_out_metrics_at_the_chosen_steps_and_best_kept(evaluated):
    out, metrics = evaluated
    steps = {m["step"]: m for m in metrics}
    assert sorted(steps) == [0, 1, 2, 3, 4]
    evaluated_at = [s for s, m in steps.items() if "eval/reward_mean" in m]
    assert evaluated_at == [0, 2, 4]
    for s in evaluated_at:
        m = steps[s]
        assert {"eval/reward_std", "eval/pass@2", "eval/response_length", "eval/stopped_fraction"} <= set(m)
        assert 0 <= m["eval/pass@2"] <= 1 and 0 < m["eval/response_length"] <= 12
        assert all(math.isfinite(v) for k, v in m.items() if k.startswith("eval/"))
    # best/: the policy of the evaluation with the highest eval/reward_mean (the first of equals), loadable
    values = [(steps[s]["eval/reward_mean"], -s) for s in evaluated_at]
    value, neg_step = max(values)
    best = json.loads((out / "best" / "best.json").read_text())
    assert best == {"step": -neg_step, "metric": "eval/reward_mean", "value": value}
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out / "best")
    assert (out / "best" / "critic" / "value_head.safetensors").exists()  # the final output's layout
    assert (out / "curves.png").stat().st_size > 1000  # reward, KL, length and eval/pass@2 against the step


def test_best_and_the_final_policy_have_one_layout_with_lora_on_a_from_scratch_base(tmp_path, monkeypatch):
    """One save function for both: best/ held a merged model while the final save held the adapter and base/."""
    out = tmp_path / "lora"
    _train(out, *EVAL, "lora.r=4", "ppo.steps=2", "eval.every=1", monkeypatch=monkeypatch)
    best = out / "best"
    layout = sorted(str(p.relative_to(best)) for p in best.rglob("*") if p.name != "best.json")
    assert {"adapter_config.json", "adapter_model.safetensors", "base/config.json", "base/model.safetensors",
            "critic/adapter_config.json", "critic/base/config.json", "critic/value_head.safetensors",
            "tokenizer.json"} <= set(layout), layout
    assert "model.safetensors" not in layout
    assert [name for name in layout if not (out / name).exists()] == []  # the final save: the same files
    from peft import AutoPeftModelForCausalLM

    for where in (out, best, out / "critic", best / "critic"):
        config = json.loads((where / "adapter_config.json").read_text())
        assert config["base_model_name_or_path"] == str((where / "base").resolve())
        AutoPeftModelForCausalLM.from_pretrained(where)


def test_evaluation_changes_nothing_in_training(evaluated, tmp_path, monkeypatch):
    """Training with eval logs exactly what training without it logs (eval draws no training randomness), given
    the same training prompts (the held-out fraction is taken out of both: data.eval_fraction alone evaluates at
    the end only, so eval.every and at_start are what this run drops)."""
    _, with_eval = evaluated
    without = _train(tmp_path / "plain", "data.eval_fraction=0.1", monkeypatch=monkeypatch)
    strip = [{k: v for k, v in m.items() if not k.startswith(("eval/", *TIMING))} for m in with_eval if m["step"]]
    assert strip == [{k: v for k, v in m.items() if not k.startswith(("eval/", *TIMING))} for m in without]
    # the default: evaluated at the end only, greedily; deterministic
    assert [m["step"] for m in without if "eval/reward_mean" in m] == [4]
    again = _train(tmp_path / "again", "data.eval_fraction=0.1", monkeypatch=monkeypatch)
    assert {k: v for k, v in again[-1].items() if k.startswith("eval/")} == \
        {k: v for k, v in without[-1].items() if k.startswith("eval/")}


def test_bad_eval_settings_are_refused_by_dry_run(monkeypatch):
    code, _, err = invoke_cli("ppo", TINY, "eval.every=2", "--dry-run", monkeypatch=monkeypatch)
    assert code == 2 and "eval" in err and "held-out prompts" in err and "data.eval_fraction" in err
    code, _, err = invoke_cli("ppo", TINY, "eval.keep_best=eval/reward_mean", "--dry-run", monkeypatch=monkeypatch)
    assert code == 2 and "eval.keep_best" in err
    code, _, err = invoke_cli("ppo", TINY, "data.eval_fraction=0.1", "eval.keep_best=eval/acc", "--dry-run",
                              monkeypatch=monkeypatch)
    assert code == 2 and "eval.keep_best" in err and "eval/pass@1" in err
    code, _, err = invoke_cli("ppo", TINY, "data.eval_fraction=0.1", "eval.keep_best=eval/tool_use_rate",
                              "--dry-run", monkeypatch=monkeypatch)
    assert code == 2 and "no env" in err
    code, out, _ = invoke_cli("ppo", TINY, "data.eval_fraction=0.1", "eval.keep_best=eval/pass@1", "--dry-run",
                              monkeypatch=monkeypatch)
    assert code == 0, out


@pytest.mark.slow
def test_two_processes_evaluate_like_one(tmp_path, monkeypatch):
    """The held-out numbers do not depend on the process count (batches dealt in turn, summed in order)."""
    one = _train(tmp_path / "one", *EVAL, "eval.batch_size=4", monkeypatch=monkeypatch)
    res = accelerate_launch("--cpu", "--num_processes", "2", "-m", "rlcli", "ppo", TINY,
                            f"output_dir={tmp_path / 'two'}", *FAST, *EVAL, "eval.batch_size=4")
    assert res.returncode == 0, res.stderr[-3000:]
    two = read_metrics(tmp_path / "two")
    first = lambda ms: {k: v for k, v in ms[0].items() if k.startswith("eval/")}  # noqa: E731  step 0: same weights
    assert first(one) == first(two)


def test_the_demo_plot_reads_a_run_with_a_step_0_evaluation(evaluated, tmp_path):
    """metrics.jsonl's step-0 row holds only eval/ keys: readers of the training keys skip it (the calculator demo's
    plot once failed on it)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("calculator_recipe", REPO / "recipes" / "calculator.py")
    calculator = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(calculator)
    out, _ = evaluated
    calculator.plot(out / "metrics.jsonl", tmp_path / "curve.png")
    assert (tmp_path / "curve.png").stat().st_size > 1000
