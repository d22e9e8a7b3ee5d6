"""Messages that say what is true: a problem caused by a key set on the command line is blamed on the command line,
not on the recipe file's line of another key; a failed overwrite says DIR holds the run it put back, not "saved no
model in DIR"; an absolute path is not followed by "(relative to the working directory)"."""

from __future__ import annotations

from tests.helpers import REPO, invoke_cli, plain, run_cli, snapshot

PPO = "configs/tiny/ppo.yaml"


def test_a_problem_caused_by_a_key_on_the_command_line_is_blamed_on_the_command_line(monkeypatch):
    for override, says, not_says in (
            ("ppo.mini_batch_size=48", "command line (ppo.mini_batch_size): ppo.batch_size=64 must be a multiple of "
                                       "ppo.mini_batch_size=48", f"{PPO}:32"),
            ("model.config.n_positions=16", "command line (model.config.n_positions): generation.max_new_tokens: 33 "
                                            "tokens", f"{PPO}:18")):
        code, _, err = invoke_cli("ppo", PPO, override, "--dry-run", monkeypatch=monkeypatch)
        err = plain(err)
        assert code == 2 and says in err and not_says not in err, err


def test_a_failed_overwrite_says_the_old_run_is_back_not_that_the_directory_holds_no_model(tmp_path):
    out = tmp_path / "run"
    args = ["sft", "configs/tiny/sft.yaml", f"output_dir={out}", "train.save_every=null", "data.eval_fraction=0",
            "logging.progress=false"]
    res = run_cli(*args, "train.max_steps=2")
    assert res.returncode == 0, res.stderr[-2000:]
    before = snapshot(out)
    res = run_cli(*args, "overwrite_output_dir=true", "train.max_steps=4", "optim.learning_rate=1e6",
                  "optim.max_grad_norm=null", "optim.warmup_steps=0")
    err = plain(res.stderr)
    assert res.returncode == 1 and "is nan (not a finite number)" in err, err
    assert "saved no model in" not in err and f"{out} holds the run this one was replacing again, as it was" in err
    assert snapshot(out) == before


def test_relative_to_the_working_directory_only_after_a_relative_path(monkeypatch):
    code, _, err = invoke_cli("ppo", PPO, "reward.function=/nowhere/x.py:score", "--dry-run", monkeypatch=monkeypatch)
    err = plain(err)
    assert code == 2 and "file /nowhere/x.py does not exist" in err and "relative to" not in err, err
    code, _, err = invoke_cli("ppo", PPO, "reward.function=nowhere/x.py:score", "--dry-run", monkeypatch=monkeypatch)
    assert code == 2 and f"file nowhere/x.py does not exist (relative to {REPO})" in plain(err), err
