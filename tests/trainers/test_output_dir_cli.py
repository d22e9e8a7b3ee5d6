"""What a run may do to its ``output_dir``, through the real CLI: it never deletes a file rlcli did not write,
refuses the working directory, and says what to do with a directory it cannot use."""

from __future__ import annotations

import json
import os
import shutil
import stat

from tests.conftest import REPO, plain, run_cli

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
