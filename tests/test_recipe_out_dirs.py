"""The demo and pipeline scripts of recipes/ take their ``--out`` folder over through one guard
(``recipes/_demo.py:take_out_dir``): a folder of the user's is never deleted, one the script wrote is replaced, and
``--resume`` keeps an earlier pipeline's progress."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest

from tests.conftest import REPO

SCRIPTS = [("recipes/calculator.py", "demo"), ("recipes/guess_number.py", "demo"),
           ("recipes/guess_number.py", "smollm2"), ("recipes/smollm2_tools.py", "pipeline")]


def _take_out_dir():
    spec = importlib.util.spec_from_file_location("recipes_demo", REPO / "recipes" / "_demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.take_out_dir


@pytest.mark.parametrize("script,command", SCRIPTS)
def test_a_script_never_deletes_a_folder_of_the_users(tmp_path, script, command):
    (tmp_path / "mine.txt").write_text("keep me")
    res = subprocess.run([sys.executable, script, command, "--out", str(tmp_path)], cwd=REPO, capture_output=True,
                         text=True, timeout=120, check=False)
    assert res.returncode != 0 and "did not write" in res.stderr and str(tmp_path) in res.stderr, res.stderr
    assert "Traceback" not in res.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.txt"]
    assert (tmp_path / "mine.txt").read_text() == "keep me"


def test_a_folder_the_script_wrote_is_replaced_and_resume_keeps_progress(tmp_path):
    take_out_dir = _take_out_dir()
    demo = tmp_path / "demo"
    (demo / "sft").mkdir(parents=True)
    (demo / "sft" / "model.bin").write_text("old")
    assert take_out_dir(demo, owned=frozenset({"sft", "eval-sft"})) == {}
    assert demo.is_dir() and not any(demo.iterdir())  # the earlier demo's outputs are gone

    pipe = tmp_path / "pipe"
    pipe.mkdir()
    (pipe / "pipeline.json").write_text(json.dumps({"seconds": {"sft": 12.0}}))
    (pipe / "sft").mkdir()
    assert take_out_dir(pipe, record="pipeline.json", resume=True) == {"seconds": {"sft": 12.0}}
    assert (pipe / "sft").is_dir()  # --resume keeps what the earlier run finished
    assert take_out_dir(pipe, record="pipeline.json") == {}
    assert not any(pipe.iterdir())

    new = tmp_path / "new" / "deeper"
    take_out_dir(new)
    assert new.is_dir()


def test_a_stage_returns_its_time_and_a_failed_one_exits_with_its_code(capsys):
    spec = importlib.util.spec_from_file_location("recipes_demo", REPO / "recipes" / "_demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.rlcli("sft", "configs/tiny/sft.yaml", "--dry-run") > 0
    with pytest.raises(SystemExit) as exc:
        module.rlcli("sft", "configs/tiny/sft.yaml", "train.batch_size=-1", "--dry-run")
    assert exc.value.code == 2  # rlcli's code for a bad recipe
    assert "$ rlcli sft configs/tiny/sft.yaml train.batch_size=-1" in capsys.readouterr().out
