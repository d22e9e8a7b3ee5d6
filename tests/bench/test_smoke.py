"""Every benchmark in ``bench/`` runs end to end at a tiny size, so that a renamed or removed rlcli function fails
here and not the next time someone measures. The figures are not checked (they are the benchmark's business), only
that the script finishes and prints its report.

Not run here: ``trl_compare.py`` / ``trl011_ppo.py`` need TRL virtualenvs built from PyPI (their cheap parts are
tested in ``test_trl_compare.py`` / ``test_trl011_ppo.py``, and ``--help`` below imports them); ``gpu.sh``
needs a CUDA GPU; ``multiprocess_exit.sh`` repeats a two-process PPO run 15 times, which is what it measures."""

from __future__ import annotations

import sys

import pytest

from tests.helpers import run

TINY_PPO = ["configs/tiny/ppo.yaml", "ppo.batch_size=8", "ppo.mini_batch_size=4", "ppo.epochs=1",
            "generation.max_new_tokens=4", "generation.min_new_tokens=4"]
PPO_STEPS = ["ppo.steps=2", "ppo.batch_size=8", "ppo.mini_batch_size=4", "ppo.epochs=1", "generation.max_new_tokens=4"]

SCRIPTS = {
    "ppo_step": (lambda tmp: [*TINY_PPO, "--steps", "1", "--warmup", "0", "--matmul-seconds", "0.01"],
                 "forward calls optimise/policy/grad"),
    "sft_throughput": (lambda tmp: ["--device", "cpu", "--seq-len", "16", "--micro-batch", "2", "--steps", "1",
                                    "--warmup", "0", "--config", "hidden_size=32", "intermediate_size=64",
                                    "num_hidden_layers=1", "num_attention_heads=2", "num_key_value_heads=1",
                                    "vocab_size=128"], "MFU"),
    "env_rollout": (lambda tmp: ["--scratch", "--episodes", "2", "--batch", "2", "--warmup", "0",
                                 "--max-new-tokens", "4", "--max-length", "64", "--kv-episodes", "2",
                                 "--kv-turns", "2", "--kv-new-tokens", "2"], "tool call cost"),
    "padding": (lambda tmp: ["configs/tiny/sft.yaml", "--micro", "1", "2"], "head positions"),
    "truncated_sampling": (lambda tmp: ["--steps", "1", "--out", str(tmp), "ppo.batch_size=8",
                                        "ppo.mini_batch_size=4", "generation.max_new_tokens=4"], "mass_outside_top_k"),
    "memory": (lambda tmp: ["configs/tiny/sft.yaml", "train.batch_size=4", "train.micro_batch_size=4",
                            "--setting", "", "--steps", "2"], "peak RSS steps"),
    "multi_adapter_memory": (lambda tmp: ["--size", "tiny", "--modes", "adapter"], "peak_rss_mib"),
    "ppo_seeds": (lambda tmp: ["tiny", "--seeds", "0", "--out", str(tmp), "--set", *PPO_STEPS], "over 1 seeds"),
    "compare_estimators": (lambda tmp: ["tiny", "--seeds", "0", "--only", "grpo", "--out", str(tmp),
                                        "--set", *PPO_STEPS, "ppo.group_size=4"], "estimator"),
}


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_bench_script_runs_at_a_tiny_size(script, tmp_path):
    args, expected = SCRIPTS[script]
    done = run([sys.executable, f"bench/{script}.py", *args(tmp_path)], timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert expected in done.stdout, done.stdout[-3000:]


@pytest.mark.parametrize("script", ["trl_compare", "trl011_ppo"])
def test_bench_scripts_needing_trl_import_and_parse(script):
    done = run([sys.executable, f"bench/{script}.py", "--help"], timeout=120)
    assert done.returncode == 0 and "usage:" in done.stdout, done.stderr[-3000:]
