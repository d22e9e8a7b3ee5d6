"""Problems found early and said once: each is one error paragraph naming the key and the file, a non-zero exit,
no traceback, and, where nothing needs loading to see it, found by ``--dry-run``."""

from __future__ import annotations

import importlib.util
import os
import re

import pytest

from rlcli.config.errors import Problem
from rlcli.config.loader import load_recipe
from rlcli.config.sft import SFTRecipe
from tests.helpers import REPO, plain, read_metrics, run_cli

TINY = "configs/tiny/sft.yaml"
QUICK = ["train.max_steps=3", "data.eval_fraction=0", "logging.progress=false", "train.save_every=null"]


def _fails(res, code, *fragments):
    err = plain(res.stderr)
    assert res.returncode == code, res.stderr[-2000:]
    for fragment in fragments:
        assert fragment in err, (fragment, err)
    assert "Traceback" not in res.stderr + res.stdout
    return err


@pytest.mark.parametrize("dry_run", [True, False])
def test_output_dir_that_is_a_file(tmp_path, dry_run):
    target = tmp_path / "results.txt"
    target.write_text("mine")
    res = run_cli("sft", TINY, f"output_dir={target}", *QUICK, *(["--dry-run"] if dry_run else []))
    _fails(res, 2, f"command line: output_dir: {target} is a file, not a directory")
    assert target.read_text() == "mine"
    res = run_cli("sft", TINY, f"output_dir={target / 'run'}", *QUICK, "--dry-run")
    _fails(res, 2, f"output_dir: {target / 'run'} cannot be created: {target} is a file")


def test_output_dir_not_writable_or_on_a_read_only_file_system(tmp_path, monkeypatch):
    """Through the check itself: the tests run as root, who may write anywhere."""
    from rlcli import rundir

    recipe = load_recipe(SFTRecipe, REPO / TINY, [f"output_dir={tmp_path / 'a' / 'run'}"])
    monkeypatch.setattr(rundir.os, "access", lambda path, mode: False)
    assert rundir.RunDir.of(recipe).problems() == [Problem(
        "output_dir", f"{tmp_path / 'a' / 'run'} cannot be created: {tmp_path} is not writable by this user")]

    class ReadOnly:
        f_flag = os.ST_RDONLY

    monkeypatch.setattr(rundir.os, "statvfs", lambda path: ReadOnly())
    assert rundir.RunDir.of(recipe).problems()[0].message.endswith(f"{tmp_path} is on a read-only file system")


def test_wrong_type_in_model_config_is_found_by_dry_run(tmp_path):
    res = run_cli("sft", TINY, f"output_dir={tmp_path / 'o'}", "model.config.n_layer=two", "--dry-run")
    _fails(res, 2, "command line: model.config.n_layer: expected an integer", "got str 'two'")
    recipe = tmp_path / "r.yaml"
    recipe.write_text((REPO / TINY).read_text().replace("n_layer: 2", "n_layer: 2.5"))
    res = run_cli("sft", str(recipe), f"output_dir={tmp_path / 'o'}", "--dry-run", cwd=REPO)
    _fails(res, 2, f"{recipe}:11: model.config.n_layer: expected an integer")


@pytest.mark.parametrize("command, recipe", [("sft", TINY), ("rm", "configs/tiny/rm.yaml")])
def test_nan_loss_stops_with_the_step(tmp_path, command, recipe):
    out = tmp_path / "nan"
    res = run_cli(command, recipe, f"output_dir={out}", *QUICK, "optim.learning_rate=1e30", "optim.warmup_steps=0",
                  "optim.lr_scheduler=constant")
    err = _fails(res, 1, "is nan (not a finite number)", "saved no model", "optim.learning_rate")
    step = int(re.search(r"training loss at step (\d+) is nan", err).group(1))
    assert step > 1 and max(m["step"] for m in read_metrics(out)) == step - 1  # the NaN step is not logged
    assert not (out / "model.safetensors").exists()


def test_recipe_that_is_not_utf8(tmp_path):
    recipe = tmp_path / "latin1.yaml"
    recipe.write_bytes((REPO / TINY).read_text().replace("# Tiny", "# Tiny caf\xe9", 1).encode("latin-1"))
    res = run_cli("sft", str(recipe), "--dry-run")
    _fails(res, 2, f"{recipe}:1: not UTF-8 text: byte 0xe9", "save the file as UTF-8")


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is not None, reason="tensorboard is installed here")
def test_missing_tracker_package_is_found_by_dry_run(tmp_path):
    res = run_cli("sft", TINY, f"output_dir={tmp_path / 'o'}", "logging.report_to=[tensorboard]", "--dry-run")
    _fails(res, 2, "command line: logging.report_to.0: tensorboard is not installed",
           "pip install tensorboard", "rlcli[tensorboard]")


def test_critic_settings_with_a_critic_free_estimator_are_a_note(monkeypatch):
    """One recipe for several estimators (bench/compare_estimators.py overrides ppo.advantage on the calculator's):
    the critic section is not an error with GRPO, the dry run says it is not used; a critic.model without a separate
    critic is an error."""
    from tests.helpers import invoke_cli

    code, out, _ = invoke_cli("ppo", "configs/tiny/grpo.yaml", "critic.learning_rate=1e-3", "critic.warmup_steps=2",
                              "ppo.advantage=grpo", "ppo.group_size=4", "--dry-run", monkeypatch=monkeypatch)
    assert code == 0, out
    assert "critic.learning_rate, critic.warmup_steps not used: ppo.advantage=grpo trains no critic" in plain(out)
    code, out, err = invoke_cli("ppo", "configs/tiny/ppo.yaml", "critic.separate=false", "critic.model.name_or_path=x",
                                "--dry-run", monkeypatch=monkeypatch)
    assert code == 2 and "critic.separate: true" in plain(out + err)
