"""The demo and pipeline scripts of recipes/ take their ``--out`` folder through rlcli's run-directory owner
(``recipes/_demo.py``): a file of the user's anywhere in a folder they use is never deleted, whatever interrupts
them; an earlier run of the script is replaced only once the new one's first stage has finished, and put back
before that; ``--resume`` keeps an earlier pipeline's progress."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.helpers import REPO, snapshot

SCRIPTS = [("recipes/calculator.py", "demo"), ("recipes/guess_number.py", "demo"),
           ("recipes/guess_number.py", "smollm2"), ("recipes/smollm2_tools.py", "pipeline")]


def _demo():
    spec = importlib.util.spec_from_file_location("recipes_demo", REPO / "recipes" / "_demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _start(script, command, out, log):
    """The script as a user starts it, in a process group of its own (its rlcli stages included)."""
    return subprocess.Popen([sys.executable, script, command, "--out", str(out)], cwd=REPO, stdout=log,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            env={**os.environ, "COLUMNS": "250", "HF_HUB_OFFLINE": "1"})


def _stop(proc, sig=signal.SIGKILL):
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass
    return proc.wait(timeout=60)


@pytest.mark.parametrize("script,command", SCRIPTS)
@pytest.mark.parametrize("where", ["mine.txt", "{stage}/notes.txt"])
def test_a_script_never_deletes_a_file_of_the_users(tmp_path, script, command, where):
    """Beside the stages or inside one (``ppo/notes.txt``: the old guard looked at top-level names only, then
    deleted the whole folder): the script refuses the folder, naming the file, and it stays untouched."""
    stage = "eval-base" if "smollm2_tools" in script else "sft"
    mine = tmp_path / where.format(stage=stage)
    mine.parent.mkdir(parents=True, exist_ok=True)
    mine.write_text("keep me")
    log = tmp_path.parent / f"{tmp_path.name}.log"
    with log.open("w") as f:
        proc = _start(script, command, tmp_path, f)
        deadline = time.time() + 120
        while proc.poll() is None and mine.exists() and time.time() < deadline:
            time.sleep(0.1)
        code = _stop(proc) if proc.poll() is None else proc.returncode
    text = log.read_text()
    assert mine.exists() and mine.read_text() == "keep me", text[-2000:]
    assert code != 0 and "did not write" in text and str(tmp_path) in text, text[-2000:]
    assert where.format(stage=stage) in text and "Traceback" not in text
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == sorted(
        {where.format(stage=stage), *([stage] if "/" in where else [])})


def _fake_stage(out, name, content, *, fail=None):
    """What an rlcli stage leaves in ``out/name``: its manifest and a file; ``fail``: an exception raised after it
    started writing (an interrupt)."""
    from rlcli import rundir

    def stage(*args):
        owner = rundir.RunDir(out / name, "SFTRecipe", main=True)
        owner.lock()
        owner.take_over()
        owner.claim("model.safetensors")
        (out / name / "model.safetensors").write_text(content)
        if fail is not None:
            owner.release(ok=False)
            raise fail
        owner.finish()
        return 1.0

    return stage


def test_an_interrupted_script_puts_the_earlier_run_back_and_keeps_the_users_file(tmp_path, monkeypatch, capsys):
    demo = _demo()
    out = tmp_path / "demo"
    runs, files = frozenset({"sft", "ppo"}), frozenset({"summary.json"})

    monkeypatch.setattr(demo, "rlcli", _fake_stage(out, "sft", "old"))
    with demo.take_out_dir(out, script="x demo", runs=runs, files=files) as folder:
        folder.rlcli("sft")
        (out / "summary.json").write_text("old")
    before = snapshot(out)

    # interrupted in its first stage: the earlier run comes back byte for byte; a file the user put in the
    # folder meanwhile stays
    monkeypatch.setattr(demo, "rlcli", _fake_stage(out, "sft", "new", fail=KeyboardInterrupt()))
    with pytest.raises(SystemExit) as stopped:
        with demo.take_out_dir(out, script="x demo", runs=runs, files=files) as folder:
            assert not (out / "sft").exists()  # moved aside, not deleted
            (out / "notes.txt").write_text("written while the script ran")
            folder.rlcli("sft")
    assert stopped.value.code == 130 and f"{out} holds the earlier run again" in capsys.readouterr().err
    assert (out / "notes.txt").read_text() == "written while the script ran"
    (out / "notes.txt").unlink()
    assert snapshot(out) == before
    assert not list(tmp_path.glob(".rlcli-trash-*"))

    # interrupted after its first stage finished: the new run stands, the earlier one is gone
    monkeypatch.setattr(demo, "rlcli", _fake_stage(out, "sft", "new"))
    with pytest.raises(SystemExit):
        with demo.take_out_dir(out, script="x demo", runs=runs, files=files) as folder:
            folder.rlcli("sft")
            sys.exit(130)
    assert (out / "sft" / "model.safetensors").read_text() == "new" and not (out / "summary.json").exists()
    assert not list(tmp_path.glob(".rlcli-trash-*"))


def test_a_folder_the_script_did_not_write_is_refused(tmp_path, capsys):
    from rlcli import rundir

    demo = _demo()
    run = tmp_path / "run"  # an rlcli run directory given as --out
    rundir.claim(run, "metrics.jsonl")
    manifest = json.loads((run / rundir.MANIFEST).read_text())
    (run / rundir.MANIFEST).write_text(json.dumps({**manifest, "recipe": "SFTRecipe"}))
    (run / "metrics.jsonl").write_text("{}\n")
    before = snapshot(run)
    with pytest.raises(SystemExit) as exc:
        with demo.take_out_dir(run, script="x demo", runs=frozenset({"sft"})):
            pass
    assert "another `rlcli sft` run" in str(exc.value.code)
    assert snapshot(run) == before


def test_an_earlier_script_without_a_manifest_is_replaced_and_resume_keeps_progress(tmp_path):
    demo = _demo()
    old = tmp_path / "demo"  # as an earlier version of a script left it: its names only
    (old / "sft").mkdir(parents=True)
    (old / "demo_summary.json").write_text("{}")
    with demo.take_out_dir(old, script="x demo", runs=frozenset({"sft", "ppo"}),
                           files=frozenset({"demo_summary.json"})) as folder:
        assert not (old / "sft").exists() and not (old / "demo_summary.json").exists()
        folder.dir.commit()
    assert sorted(p.name for p in old.iterdir()) == [".rlcli-run.json"]

    pipe = tmp_path / "pipe"
    pipe.mkdir()
    (pipe / "pipeline.json").write_text(json.dumps({"seconds": {"sft": 12.0}, "summaries": {}}))
    (pipe / "sft").mkdir()
    with demo.Pipeline(pipe, script="x pipeline", runs=frozenset({"sft"}), record="pipeline.json",
                       resume=True) as run:
        assert run.times == {"sft": 12.0}
        assert (pipe / "sft").is_dir()  # --resume keeps what the earlier run finished
        run.stage("sft", pipe / "sft", "sft")  # done already: not run again
    assert json.loads((pipe / "pipeline.json").read_text())["seconds"] == {"sft": 12.0}


def test_a_stage_returns_its_time_and_a_failed_one_exits_with_its_code(capsys):
    module = _demo()
    assert module.rlcli("sft", "configs/tiny/sft.yaml", "--dry-run") > 0
    with pytest.raises(SystemExit) as exc:
        module.rlcli("sft", "configs/tiny/sft.yaml", "train.batch_size=-1", "--dry-run")
    assert exc.value.code == 2  # rlcli's code for a bad recipe
    assert "$ rlcli sft configs/tiny/sft.yaml train.batch_size=-1" in capsys.readouterr().out


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_real_demo_stopped_keeps_the_earlier_run_and_the_users_file(tmp_path, signum):
    """The calculator demo over an earlier demo's folder, with the user's notes beside it in the parent: Ctrl-C or
    SIGTERM (to the script and its rlcli stage, as a terminal or `kill -- -PGID` sends it) once the SFT stage has
    started."""
    demo = _demo()
    out = tmp_path / "demo"
    runs = frozenset({"sft", "eval-sft", "ppo", "eval-ppo"})
    files = frozenset({"ppo_curve.png", "demo_summary.json"})
    with demo.take_out_dir(out, script="calculator.py demo", runs=runs, files=files) as folder:
        _fake_stage(out, "sft", "earlier demo")()
        folder.dir.commit()
        (out / "demo_summary.json").write_text("{}")
    (tmp_path / "notes.txt").write_text("mine")
    before = snapshot(out)
    log = tmp_path / "demo.log"
    with log.open("w") as f:
        proc = _start("recipes/calculator.py", "demo", out, f)
        deadline = time.time() + 180
        while proc.poll() is None and "rlcli sft" not in log.read_text().replace("$ rlcli sft", "") and \
                time.time() < deadline:
            time.sleep(0.2)
        code = _stop(proc, signum)
    text = log.read_text()
    assert code == 128 + signum, text[-2000:]
    assert "holds the earlier run again" in text and "Traceback" not in text, text[-2000:]
    assert snapshot(out) == before, text[-2000:]
    assert (tmp_path / "notes.txt").read_text() == "mine"
    assert not list(tmp_path.glob(".rlcli-trash-*"))
