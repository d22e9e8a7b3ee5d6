"""What a run may do to its ``output_dir``, through the real CLI: it never deletes a file rlcli did not write,
refuses the working directory, and says what to do with a directory it cannot use."""

from __future__ import annotations

import json
import os
import shutil
import stat

import pytest

from tests.helpers import REPO, copy_run, invoke_cli, plain, run_cli, snapshot

TINY = "configs/tiny/sft.yaml"
QUICK = ["train.max_steps=2", "train.save_every=null", "data.eval_fraction=0", "logging.progress=false"]


def _workdir(tmp_path):
    """A working directory like a user's checkout: recipes, data, notes."""
    work = tmp_path / "work"
    work.mkdir()
    shutil.copytree(REPO / "configs", work / "configs")
    shutil.copytree(REPO / "data" / "tiny", work / "data" / "tiny")
    (work / "notes.txt").write_text("my notes")
    return work


def _listing(path):
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


def test_output_dir_dot_is_refused_and_nothing_is_deleted(tmp_path):
    work = _workdir(tmp_path)
    before = _listing(work)
    for out in (".", str(work), str(tmp_path)):
        res = run_cli("sft", TINY, f"output_dir={out}", "overwrite_output_dir=true", *QUICK, cwd=work)
        err = plain(res.stderr)
        assert res.returncode == 2, res.stderr[-2000:]
        assert "command line: output_dir" in err and "working directory" in err, err
        assert "Traceback" not in res.stderr
        assert _listing(work) == before
    res = run_cli("sft", TINY, "output_dir=.", *QUICK, "--dry-run", cwd=work)
    assert res.returncode == 2 and "working directory" in plain(res.stderr)


def test_foreign_file_beside_a_run_survives_overwrite(tmp_path):
    work = _workdir(tmp_path)
    out = work / "runs" / "a"
    res = run_cli("sft", TINY, f"output_dir={out}", *QUICK, cwd=work)
    assert res.returncode == 0, res.stderr[-2000:]
    (out / "notes.md").write_text("what I learned from run a")
    res = run_cli("sft", TINY, f"output_dir={out}", "overwrite_output_dir=true", *QUICK, cwd=work)
    err = plain(res.stderr)
    assert res.returncode == 2, res.stderr[-2000:]
    assert "notes.md" in err and "did not write" in err, err
    assert (out / "notes.md").read_text() == "what I learned from run a"
    assert (out / "model.safetensors").exists() and (out / "metrics.jsonl").exists()  # the run is untouched too


def test_overwrite_replaces_every_file_of_the_previous_run(tmp_path):
    work = _workdir(tmp_path)
    out = work / "runs" / "a"
    res = run_cli("sft", TINY, f"output_dir={out}", "train.max_steps=3", "train.save_every=1", "data.eval_fraction=0",
                  "logging.progress=false", cwd=work)
    assert res.returncode == 0, res.stderr[-2000:]
    assert (out / "checkpoints" / "step-00000002").is_dir()
    res = run_cli("sft", TINY, f"output_dir={out}", "overwrite_output_dir=true", *QUICK, cwd=work)
    assert res.returncode == 0, res.stderr[-2000:]
    assert not (out / "checkpoints").exists()  # the old run's checkpoints went with it
    assert [m["step"] for m in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())] == [1, 2]
    manifest = json.loads((out / ".rlcli-run.json").read_text())
    assert manifest["state"] == "finished" and "checkpoints" not in manifest["files"]
    assert set(manifest["files"]) >= {"recipe.yaml", "metrics.jsonl", "model.safetensors", "config.json"}


def test_saved_model_files_get_the_umask_mode(tmp_path):
    """safetensors writes 0600 whatever the umask; every file of a run is readable like the others."""
    out = tmp_path / "run"
    res = run_cli("sft", TINY, f"output_dir={out}", *QUICK, "lora.r=4")  # LoRA: adapter_model.safetensors and base/
    assert res.returncode == 0, res.stderr[-2000:]
    mask = os.umask(0)
    os.umask(mask)
    modes = {str(p.relative_to(out)): stat.S_IMODE(p.stat().st_mode) for p in out.rglob("*") if p.is_file()}
    assert "adapter_model.safetensors" in modes and "base/model.safetensors" in modes
    assert {name: mode for name, mode in modes.items() if mode != 0o666 & ~mask} == {}


def test_existing_directory_with_other_files_is_refused(tmp_path):
    work = _workdir(tmp_path)
    res = run_cli("sft", TINY, "output_dir=data", *QUICK, "--dry-run", cwd=work)
    err = plain(res.stderr)
    assert res.returncode == 2 and "output_dir: data holds files rlcli did not write (tiny)" in err, err


# --- nothing lost: inputs are checked before an earlier run is touched; one run per directory ---------------------


@pytest.fixture
def finished_run(finished_sft_run):
    """A finished tiny SFT run with a checkpoint (copied by each test that changes it)."""
    return finished_sft_run


def test_a_run_whose_input_is_in_its_output_dir_is_refused(finished_run, tmp_path, monkeypatch):
    out = copy_run(finished_run, tmp_path)
    (out / "sft.jsonl").write_bytes((REPO / "data" / "tiny" / "sft.jsonl").read_bytes())
    before = snapshot(out)
    cases = [
        (["model.architecture=null", "model.config=null", f"model.name_or_path={out}"], "model.name_or_path"),
        ([f"data.path={out}/sft.jsonl"], "data.path"),
    ]
    for overrides, key in cases:
        for extra in ([], ["--dry-run"]):
            code, _, err = invoke_cli("sft", TINY, f"output_dir={out}", "overwrite_output_dir=true", *overrides,
                                      *QUICK, *extra, monkeypatch=monkeypatch)
            err = plain(err)
            assert code == 2, err
            assert f"command line: {key}" in err and "is inside output_dir" in err, err
            assert snapshot(out) == before


BAD_ROW = '{"prompt": "a", "completion": "b"}\n{"prompt": "c"}\n'


def test_overwrite_with_a_bad_input_keeps_the_old_run(finished_run, tmp_path, monkeypatch):
    """Each input fails after the old run would have been deleted before: now it is untouched."""
    out = copy_run(finished_run, tmp_path)
    before = snapshot(out)
    bad_data = tmp_path / "bad.jsonl"
    bad_data.write_text(BAD_ROW)
    broken_model = tmp_path / "broken-model"
    broken_model.mkdir()
    (broken_model / "config.json").write_text('{"model_type": "gpt2", "n_embd": 64, "n_head": 2}')  # no weights
    cases = [
        ([f"data.path={bad_data}"], "bad.jsonl:2: no value for 'completion'"),
        (["model.architecture=null", "model.config=null", f"model.name_or_path={broken_model}"], "broken-model"),
    ]
    for overrides, fragment in cases:
        code, _, err = invoke_cli("sft", TINY, f"output_dir={out}", "overwrite_output_dir=true", *overrides, *QUICK,
                                  monkeypatch=monkeypatch)
        assert code == 1 and fragment in plain(err), err
        assert snapshot(out) == before
        assert not list(tmp_path.glob(".rlcli-trash-*"))


def test_overwrite_moves_the_old_run_aside_until_the_new_one_stands(finished_run, tmp_path):
    out = copy_run(finished_run, tmp_path)
    old_weights = (out / "model.safetensors").read_bytes()
    res = run_cli("sft", TINY, f"output_dir={out}", "overwrite_output_dir=true", "seed=7", *QUICK)
    assert res.returncode == 0, res.stderr[-2000:]
    assert (out / "model.safetensors").read_bytes() != old_weights
    assert "seed: 7" in (out / "recipe.yaml").read_text()
    assert not list(tmp_path.glob(".rlcli-trash-*")) and not (out / ".rlcli-old").exists()
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == [".rlcli-run.json"]  # lock released


def test_two_runs_started_together_into_one_dir_one_is_refused(tmp_path):
    """Started 0.1 s apart (both inside the window of an unlocked in-use check): exactly one runs, the other is told why, and
    the directory holds the winner's run only (its recipe, its metrics once each)."""
    import subprocess
    import sys
    import time

    for attempt in range(2):
        out = tmp_path / f"race{attempt}"
        procs = []
        for seed in (1, 2):
            args = ["sft", TINY, f"output_dir={out}", f"seed={seed}", "train.max_steps=6", "train.save_every=2",
                    "data.eval_fraction=0", "logging.progress=false"]
            procs.append(subprocess.Popen([sys.executable, "-m", "rlcli", *args], cwd=REPO, stdout=subprocess.PIPE,
                                          stderr=subprocess.PIPE, text=True, env={**os.environ, "COLUMNS": "250"}))
            time.sleep(0.1)
        results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
        codes = sorted(code for code, _ in results)
        assert codes == [0, 1], results
        loser = next(err for code, err in results if code == 1)
        assert ("is in use" in plain(loser) or "already holds a run" in plain(loser)) and "Traceback" not in loser
        winner_seed = 1 + [code for code, _ in results].index(0)
        assert f"seed: {winner_seed}" in (out / "recipe.yaml").read_text()
        assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == \
            [1, 2, 3, 4, 5, 6]
        assert not (out / "checkpoints" / "step-00000004.tmp").exists()


def test_a_held_lock_refuses_a_second_run_and_a_dead_holder_does_not(tmp_path, monkeypatch):
    import subprocess
    import sys

    out = tmp_path / "locked"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from rlcli import rundir; "
                               f"rundir.RunDir({str(out)!r}, 'x').lock(); print('held', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert holder.stdout.readline().strip() == "held"
        code, _, err = invoke_cli("sft", TINY, f"output_dir={out}", *QUICK, monkeypatch=monkeypatch)
        assert code == 1 and f"is in use: rlcli process {holder.pid} is running there" in plain(err), err
    finally:
        holder.kill()
        holder.wait()
    from rlcli import rundir

    owner = rundir.RunDir(out, "SFTRecipe", main=True)
    owner.lock()  # the kernel dropped the dead holder's lock
    owner.release(ok=True)
    assert list(out.iterdir()) == []  # the lock file goes with the lock
    fresh = tmp_path / "fresh"
    owner = rundir.RunDir(fresh, "SFTRecipe", main=True)
    owner.lock()
    owner.release(ok=False)
    assert not fresh.exists()  # a directory the lock made, left empty, goes with it


def test_a_users_recipe_and_readme_are_not_taken_for_a_run(tmp_path, monkeypatch):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "recipe.yaml").write_text("output_dir: runs/x\n")
    (out / "README.md").write_text("my notes")
    before = snapshot(out)
    for extra in ([], ["overwrite_output_dir=true"]):
        code, _, err = invoke_cli("sft", TINY, f"output_dir={out}", *extra, *QUICK, monkeypatch=monkeypatch)
        err = plain(err)
        assert code == 2 and "did not write (README.md, recipe.yaml)" in err, err
        assert snapshot(out) == before


def test_a_file_put_inside_checkpoints_is_never_deleted(finished_run, tmp_path, monkeypatch):
    out = copy_run(finished_run, tmp_path)
    (out / "checkpoints" / "my-notes.txt").write_text("keep me")
    before = snapshot(out)
    code, _, err = invoke_cli("sft", TINY, f"output_dir={out}", "overwrite_output_dir=true", *QUICK,
                              monkeypatch=monkeypatch)
    err = plain(err)
    assert code == 2 and "checkpoints/my-notes.txt" in err and "did not write" in err, err
    assert snapshot(out) == before
