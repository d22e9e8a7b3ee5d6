"""``--resume`` through the real CLI: it refuses settings that would change the run it continues, cuts the run's
JSONL files back to the checkpoint (a torn last line included), and says what to do when there is nothing to
resume."""

from __future__ import annotations

import json
import shutil

import pytest

from rlcli.config.loader import load_recipe, recipe_to_yaml
from rlcli.config.errors import UserError
from tests.helpers import REPO, copy_run, invoke_cli, kill_when, plain, read_metrics, run_cli, snapshot

SFT = "configs/tiny/sft.yaml"
QUICK = ["train.max_steps=4", "train.save_every=2", "data.eval_fraction=0", "logging.progress=false"]


@pytest.fixture
def sft_run(finished_sft_run):
    """A finished run of ``QUICK`` (tests/conftest.py: FINISHED_SFT); a test that changes it works on a copy."""
    return finished_sft_run


def test_resume_refuses_changed_settings_and_lists_them(sft_run):
    before = (sft_run / "recipe.yaml").read_text()
    for flag in ("--dry-run", None):
        res = run_cli("sft", SFT, f"output_dir={sft_run}", *QUICK, "train.batch_size=16", "optim.learning_rate=1e-2",
                      "--resume", *([flag] if flag else []))
        err = plain(res.stderr)
        assert res.returncode == 2, res.stderr[-2000:]
        assert "2 setting(s) differ" in err, err
        assert "command line: optim.learning_rate: 0.003 -> 0.01" in err, err
        assert "command line: train.batch_size: 32 -> 16" in err, err
        assert "another output_dir" in err and "Traceback" not in res.stderr
    assert (sft_run / "recipe.yaml").read_text() == before  # nothing recorded for a run that did not happen


def test_resume_accepts_more_steps_and_logging_changes(sft_run, tmp_path):
    out = copy_run(sft_run, tmp_path, "more")
    res = run_cli("sft", SFT, f"output_dir={out}", *QUICK, "train.max_steps=6", "train.save_every=3",
                  "logging.log_every=2", "train.keep_checkpoints=1", "--resume")
    assert res.returncode == 0, res.stderr[-2000:]
    assert "resuming at step 4" in plain(res.stdout)  # the finished run's last step kept a checkpoint
    assert [m["step"] for m in read_metrics(out)] == [1, 2, 3, 4, 6]  # step 5 not logged any more
    assert "max_steps: 6" in (out / "recipe.yaml").read_text()


def test_a_finished_run_keeps_a_checkpoint_at_its_last_step_and_a_longer_resume_goes_on_from_it(tmp_path):
    """5 steps, a checkpoint every 2: the last step's checkpoint (step 5) is kept too, so --resume with more steps
    continues from step 5 instead of recomputing step 5 from step 4."""
    out = tmp_path / "odd"
    args = ["sft", SFT, f"output_dir={out}", "train.save_every=2", "data.eval_fraction=0", "logging.progress=false"]
    res = run_cli(*args, "train.max_steps=5")
    assert res.returncode == 0, res.stderr[-2000:]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000004", "step-00000005"]
    first = read_metrics(out)
    res = run_cli(*args, "train.max_steps=7", "--resume")
    assert res.returncode == 0, res.stderr[-2000:]
    assert "resuming at step 5" in plain(res.stdout)
    got = read_metrics(out)
    assert [m["step"] for m in got] == list(range(1, 8)) and got[:5] == first


def test_torn_metrics_line_is_dropped_on_resume(sft_run, tmp_path):
    out = copy_run(sft_run, tmp_path, "torn")
    expected = read_metrics(out)
    with (out / "metrics.jsonl").open("a") as f:
        f.write('{"step": 5, "loss": 1.2')  # a kill in the middle of a write
    manifest = json.loads((out / ".rlcli-run.json").read_text())
    (out / ".rlcli-run.json").write_text(json.dumps({**manifest, "state": "running"}))  # as the killed run left it
    shutil.rmtree(out / "checkpoints" / "step-00000004")  # (killed before its step-4 checkpoint)
    res = run_cli("sft", SFT, f"output_dir={out}", *QUICK, "--resume")
    assert res.returncode == 0, res.stderr[-2000:]
    got = read_metrics(out)
    assert [m["step"] for m in got] == [1, 2, 3, 4]
    assert [m["loss"] for m in got] == [m["loss"] for m in expected]


def test_truncate_jsonl_keeps_rows_up_to_the_step(tmp_path):
    from rlcli.logging import truncate_jsonl

    path = tmp_path / "samples.jsonl"
    rows = [{"step": 1}, {"step": 2, "prompt": "a"}, {"step": 2, "prompt": "b"}, {"step": 3}, {"note": "no step"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 3, "resp')
    assert truncate_jsonl(path, 2) == 4
    assert [json.loads(line) for line in path.read_text().splitlines()] == rows[:3] + [rows[4]]
    path.write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(UserError, match=r"samples.jsonl:2: not a JSON object"):
        truncate_jsonl(path, 1)
    truncate_jsonl(tmp_path / "missing.jsonl", 3)  # nothing to cut
    assert not (tmp_path / "missing.jsonl").exists()


def _fabricated_run(tmp_path, schema, recipe_file, overrides):
    """An output dir as a run with a checkpoint at step 2 leaves it (recipe copies and manifest; no weights are
    needed: the recipe check comes before anything is loaded)."""
    out = tmp_path / "run"
    recipe = load_recipe(schema, REPO / recipe_file, [f"output_dir={out}", *overrides])
    ckpt = out / "checkpoints" / "step-00000002"
    ckpt.mkdir(parents=True)
    for path in (out / "recipe.yaml", ckpt / "recipe.yaml"):
        path.write_text(recipe_to_yaml(recipe))
    (out / ".rlcli-run.json").write_text(json.dumps({"files": ["checkpoints", "recipe.yaml"],
                                                     "recipe": schema.__name__, "state": "running", "pid": 1 << 22}))
    return out


@pytest.mark.parametrize("command, recipe_file, change, fragment", [
    ("rm", "configs/tiny/rm.yaml", "train.center_penalty=0.1", "train.center_penalty: 0.0 -> 0.1"),
    ("ppo", "configs/tiny/ppo.yaml", "kl.coef=0.5", "kl.coef: 0.05 -> 0.5"),
])
def test_rm_and_ppo_resume_refuse_changed_settings(tmp_path, command, recipe_file, change, fragment):
    from rlcli.config.ppo import PPORecipe
    from rlcli.config.rm import RMRecipe

    schema = {"rm": RMRecipe, "ppo": PPORecipe}[command]
    out = _fabricated_run(tmp_path, schema, recipe_file, [])
    res = run_cli(command, recipe_file, f"output_dir={out}", change, "logging.progress=false", "--resume")
    err = plain(res.stderr)
    assert res.returncode == 2, res.stderr[-2000:]
    assert f"command line: {fragment}" in err, err
    assert "Traceback" not in res.stderr


def test_a_run_killed_before_its_first_checkpoint_says_what_to_do_and_is_reused(tmp_path):
    out = tmp_path / "early"
    args = ["sft", SFT, f"output_dir={out}", "train.save_every=100", "logging.progress=false"]
    metrics = out / "metrics.jsonl"
    kill_when(args, lambda: metrics.exists() and metrics.read_text().count("\n") >= 2, poll=0.05)
    assert not (out / "checkpoints").exists()
    res = run_cli(*args, "--resume")
    err = plain(res.stderr)
    assert res.returncode == 1 and "stopped before its first checkpoint" in err, err
    assert "without --resume" in err
    res = run_cli(*args, "train.max_steps=2")
    assert res.returncode == 0, res.stderr[-2000:]
    assert "starting over" in plain(res.stdout)
    assert [m["step"] for m in read_metrics(out)] == [1, 2]
    # a finished run is not reused that way: it holds a model
    res = run_cli(*args, "train.max_steps=2")
    assert res.returncode == 1 and "already holds a run" in plain(res.stderr)
    assert "overwrite_output_dir=true" in plain(res.stderr)


def test_resume_never_goes_backwards(sft_run, tmp_path, monkeypatch):
    """A finished 4-step run (checkpoint at step 2) resumed to 3 steps is refused (or has nothing to do) and nothing
    changes: no "2/3"... "4/3" progress, no finished weights replaced by older ones, no metrics.jsonl cut."""
    out = tmp_path / "finished"
    shutil.copytree(sft_run, out)
    before = snapshot(out)
    args = ["sft", SFT, f"output_dir={out}", *QUICK]
    code, _, err = invoke_cli(*args, "train.max_steps=3", "--resume", monkeypatch=monkeypatch)
    err = plain(err)
    assert code == 2 and "command line: train.max_steps" in err and "finished at step 4" in err, err
    assert snapshot(out) == before
    code, _, err = invoke_cli(*args, "--resume", monkeypatch=monkeypatch)
    assert code == 0 and "nothing to do" in plain(err), err
    assert snapshot(out) == before
    # a run killed after its checkpoint at step 2: a resume to 2 steps or fewer is refused too
    manifest = json.loads((out / ".rlcli-run.json").read_text())
    (out / ".rlcli-run.json").write_text(json.dumps({**manifest, "state": "running"}))
    shutil.rmtree(out / "checkpoints" / "step-00000004")
    before = snapshot(out)
    code, _, err = invoke_cli(*args, "train.max_steps=2", "--resume", monkeypatch=monkeypatch)
    err = plain(err)
    assert code == 2 and "newest checkpoint" in err and "at step 2" in err and "above 2" in err, err
    assert snapshot(out) == before


def test_a_finished_run_without_checkpoint_gets_advice_that_leads_somewhere(tmp_path, monkeypatch):
    out = tmp_path / "nockpt"
    res = run_cli("sft", SFT, f"output_dir={out}", "train.max_steps=2", "train.save_every=null",
                  "data.eval_fraction=0", "logging.progress=false")
    assert res.returncode == 0, res.stderr[-2000:]
    args = ["sft", SFT, f"output_dir={out}", "train.max_steps=2", "train.save_every=null", "data.eval_fraction=0",
            "logging.progress=false"]
    code, _, err = invoke_cli(*args, "--resume", monkeypatch=monkeypatch)
    err = plain(err)
    assert code == 1 and "finished and kept no checkpoint" in err and "model.name_or_path=" in err, err
    assert "without --resume" not in err
    code, _, err = invoke_cli(*args, monkeypatch=monkeypatch)
    err = plain(err)
    assert code == 1 and "kept no checkpoint" in err and "pass --resume" not in err, err


def test_resume_under_another_command_names_the_run_kind(sft_run, monkeypatch):
    code, _, err = invoke_cli("ppo", "configs/tiny/ppo.yaml", f"output_dir={sft_run}", "--resume",
                              monkeypatch=monkeypatch)
    err = plain(err)
    assert code == 1 and "holds an `rlcli sft` run" in err and "differ" not in err, err
