"""bench/trl011_ppo.py's cheap parts, without the TRL 0.11 venv: its pins, the PPOConfig it hands TRL for the tiny
recipe (the same PPO as rlcli's), what it refuses, the prompts it gives TRL (rlcli's, in rlcli's order) and the
figures it reports."""

from __future__ import annotations


import pytest

from tests.helpers import REPO, load_bench


@pytest.fixture(scope="module")
def bench():
    return load_bench("trl011_ppo")


def tiny(*overrides: str):
    from rlcli.config.loader import load_recipe
    from rlcli.config.ppo import PPORecipe

    return load_recipe(PPORecipe, REPO / "configs" / "tiny" / "ppo.yaml", ["critic.separate=false", *overrides])


def test_torch_is_installed_alone_and_the_stack_pinned(bench):
    first, second = bench.install_commands("python")
    assert first[-1:] == [f"torch=={bench.TORCH_VERSION}"]
    assert f"trl=={bench.TRL_VERSION}" in second and f"torch=={bench.TORCH_VERSION}" in second
    assert {f"{n}=={v}" for n, v in bench.TRL_STACK.items()} <= set(second)
    assert all("==" in arg for arg in second[second.index("install") + 2:])


def test_mismatched_ignores_the_local_tag(bench):
    want = {"torch": "2.13.0", "trl": "0.11.4"}
    assert bench.mismatched({"torch": "2.13.0+cpu", "trl": "0.11.4"}, want) == {}
    assert bench.mismatched({"torch": "2.13.0+cpu"}, want) == {"trl": None}
    assert bench.mismatched({"torch": "2.12.0", "trl": "0.11.4"}, want) == {"torch": "2.12.0"}


def test_ppo_config_is_the_recipes_ppo(bench):
    recipe = tiny("ppo.micro_batch_size=16")
    cfg = bench.ppo_config(recipe, steps=3)
    p = recipe.ppo
    # TRL 0.11's mini_batch_size is the forward micro-batch; its optimizer steps on mini_batch × accumulation
    assert cfg["mini_batch_size"] * cfg["gradient_accumulation_steps"] == p.mini_batch_size == 32
    assert cfg["mini_batch_size"] == 16 and cfg["batch_size"] == 64 and cfg["ppo_epochs"] == 4
    assert cfg["adap_kl_ctrl"] is False and cfg["init_kl_coef"] == recipe.kl.coef and cfg["kl_penalty"] == "kl"
    assert (cfg["gamma"], cfg["lam"], cfg["cliprange"], cfg["cliprange_value"], cfg["vf_coef"]) == (
        p.gamma, p.lam, p.clip_range, p.clip_range_value, p.vf_coef)
    assert cfg["learning_rate"] == recipe.optim.learning_rate and cfg["max_grad_norm"] == recipe.optim.max_grad_norm
    assert cfg["ratio_threshold"] > 1e6 and cfg["early_stopping"] is False


def test_the_tiny_recipe_is_accepted_and_what_trl_lacks_is_refused(bench):
    assert bench.refusals(tiny()) == []
    assert bench.refusals(tiny("model.config.n_embd=256")) == []
    said = " ".join(bench.refusals(tiny("kl.adaptive=true", "ppo.entropy_coef=0.01", "generation.min_new_tokens=2")))
    assert "fixed KL" in said and "entropy_coef" in said and "plain sampling" in said
    assert bench.refusals(tiny("ppo.advantage=grpo", "ppo.group_size=4", "kl.estimator=k3"))
    assert "value head shares" in " ".join(bench.refusals(tiny("critic.separate=true")))


def test_trl_gets_rlcli_prompts_in_rlcli_order(bench):
    from rlcli.models.loading import load_tokenizer
    from rlcli.ppo.evaluation import held_out_prompts
    from rlcli.seeds import index_stream

    recipe = tiny()
    tokenizer = load_tokenizer(recipe.model)
    rows, _, column, _ = held_out_prompts(recipe)
    ids = bench.step_prompt_ids(recipe, tokenizer, rows, column, steps=2)
    assert [len(s) for s in ids] == [64, 64]
    second = index_stream(len(rows), recipe.seed, 64, 64)
    assert [tokenizer.decode(q) for q in ids[1]] == [rows[i][column] for i in second]
    kw = bench.generation_kwargs(recipe, tokenizer)
    assert kw["top_k"] == 0 and kw["top_p"] == 1.0 and kw["do_sample"] and kw["max_new_tokens"] == 32
    assert kw["pad_token_id"] != kw["eos_token_id"]


def test_summary_leaves_out_each_runs_first_step(bench):
    runs = [{"step_seconds": [9.0, 2.0, 4.0], "cpu_seconds": [8.0, 1.0, 3.0], "peak_rss_steps": 5,
             "peak_rss_run": 6, "seconds": 20.0},
            {"step_seconds": [8.0, 3.0, 5.0], "cpu_seconds": [7.0, 2.0, 2.0], "peak_rss_steps": 7, "peak_rss_run": 7,
             "seconds": 30.0}]
    s = bench.summary(runs)
    assert s == {"step_seconds": 3.5, "step_cpu_seconds": 2.0, "peak_rss_steps": 7, "peak_rss_run": 7,
                 "process_seconds": 25.0}


def test_phase_means_after_the_first_step(bench):
    rlcli = [{"metrics": [{"step": 0, "eval": 1}, {"reward_mean": 0.0, "time_generate": 9.0, "time_score": 0.0,
                                                    "time_forward": 9.0, "time_optimize": 9.0},
                          {"reward_mean": 1.0, "time_generate": 1.0, "time_score": 0.0, "time_forward": 2.0,
                           "time_optimize": 3.0}]}]
    assert bench.phase_means("rlcli", rlcli) == {"generate": 1.0, "score": 0.0, "rollout forward": 2.0,
                                                 "optimise": 3.0}
    assert bench.per_step(rlcli[0], "reward_mean") == [0.0, 1.0]
