"""The output-dir manifest: rlcli deletes only what it wrote, whatever else sits in the directory."""

from __future__ import annotations

import json
import os
import stat

from rlcli import rundir


def test_claimed_names_are_owned_and_everything_else_is_foreign(tmp_path):
    out = tmp_path / "run"
    rundir.claim(out, "metrics.jsonl", "checkpoints/step-00000002")
    (out / "metrics.jsonl").write_text("")
    (out / "checkpoints" / "step-00000002").mkdir(parents=True)
    (out / "notes.txt").write_text("mine")
    (out / "config.json").write_text("{}")  # a name rlcli could write, but this run did not claim it
    assert rundir.owned(out) == {"metrics.jsonl", "checkpoints", rundir.MANIFEST}
    assert rundir.foreign(out) == ["config.json", "notes.txt"]
    rundir.remove_owned(out)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "notes.txt"]


def test_a_claim_is_recorded_before_the_file_exists(tmp_path):
    rundir.claim(tmp_path, "samples.jsonl")
    assert json.loads((tmp_path / rundir.MANIFEST).read_text())["files"] == ["samples.jsonl"]
    (tmp_path / "samples.jsonl").write_text("{}\n")  # written after a kill-safe claim
    assert rundir.foreign(tmp_path) == []


def test_run_without_manifest_owns_only_the_names_rlcli_used_to_write(tmp_path):
    for name in ("recipe.yaml", "metrics.jsonl", "model.safetensors", "data.jsonl"):
        (tmp_path / name).write_text("x")
    (tmp_path / "checkpoints").mkdir()
    assert rundir.is_legacy_run(tmp_path)
    assert rundir.foreign(tmp_path) == ["data.jsonl"]
    rundir.adopt_legacy(tmp_path)
    assert not rundir.is_legacy_run(tmp_path)
    assert set(rundir.read_manifest(tmp_path)["files"]) == {"recipe.yaml", "metrics.jsonl", "model.safetensors",
                                                             "checkpoints"}
    rundir.remove_owned(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["data.jsonl"]


def test_a_directory_without_rlcli_files_owns_nothing(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("my own metrics")  # no recipe.yaml, no manifest: not a run
    assert rundir.owned(tmp_path) == set()
    rundir.remove_owned(tmp_path)
    assert (tmp_path / "metrics.jsonl").exists()


def test_the_manifest_records_the_state_and_the_lock_its_holder(tmp_path):
    owner = rundir.RunDir(tmp_path, "SFTRecipe", main=True)
    owner.lock()
    assert rundir.holder(tmp_path) == os.getpid()
    owner.take_over()
    assert rundir.read_manifest(tmp_path)["state"] == "running"
    assert rundir.read_manifest(tmp_path)["recipe"] == "SFTRecipe"
    owner.finish()
    assert rundir.read_manifest(tmp_path)["state"] == "finished"
    assert not (tmp_path / rundir.LOCK).exists()


def test_apply_umask_gives_safetensors_files_the_usual_mode(tmp_path):
    from safetensors.torch import save_file
    import torch

    path = tmp_path / "model.safetensors"
    save_file({"w": torch.zeros(2)}, str(path))
    rundir.apply_umask(path)
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask


def test_a_recipe_and_readme_alone_are_not_an_older_run(tmp_path):
    (tmp_path / "recipe.yaml").write_text("output_dir: x\n")
    (tmp_path / "README.md").write_text("mine")
    assert not rundir.is_legacy_run(tmp_path)
    assert rundir.foreign(tmp_path) == ["README.md", "recipe.yaml"]
    (tmp_path / "metrics.jsonl").write_text("")  # now it is an older run, but README.md is still the user's
    assert rundir.is_legacy_run(tmp_path) and rundir.foreign(tmp_path) == ["README.md"]
    (tmp_path / "adapter_config.json").write_text("{}")  # ... unless it is the model card peft wrote
    assert rundir.foreign(tmp_path) == []


def test_files_inside_checkpoints_that_rlcli_did_not_write_are_foreign(tmp_path):
    rundir.claim(tmp_path, "checkpoints")
    (tmp_path / "checkpoints" / "step-00000002").mkdir(parents=True)
    (tmp_path / "checkpoints" / "step-00000004.tmp").mkdir()
    (tmp_path / "checkpoints" / "best").mkdir()
    assert rundir.foreign(tmp_path) == ["checkpoints/best"]


def test_take_over_moves_a_run_aside_and_a_failure_puts_it_back(tmp_path):
    out = tmp_path / "run"
    rundir.claim(out, "model.safetensors", "recipe.yaml")
    (out / "model.safetensors").write_bytes(b"old weights")
    (out / "recipe.yaml").write_text("old")
    (out / "notes.txt").write_text("mine")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    owner = rundir.RunDir(out, "SFTRecipe", main=True)
    owner.lock()
    owner.take_over()
    assert sorted(p.name for p in out.iterdir()) == sorted([rundir.MANIFEST, rundir.LOCK, "notes.txt"])
    owner.claim("recipe.yaml", "metrics.jsonl")  # the new run begins ...
    (out / "recipe.yaml").write_text("new")
    (out / "metrics.jsonl").write_text("{}\n")
    owner.release(ok=False)  # ... and fails before its first checkpoint
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert not list(tmp_path.glob(".rlcli-trash-*"))
    with rundir.RunDir(out, "SFTRecipe", main=True) as owner:
        owner.lock()
        owner.take_over()
        owner.claim("recipe.yaml")
        (out / "recipe.yaml").write_text("new")
        owner.commit()  # the new run's first checkpoint: the old run goes
        assert not list(tmp_path.glob(".rlcli-trash-*"))
        owner.release(ok=False)
    assert (out / "recipe.yaml").read_text() == "new" and not (out / "model.safetensors").exists()


def test_a_process_of_an_earlier_run_that_still_writes_keeps_the_directory(tmp_path):
    """Every process of a run but the main one holds the writers' lock while it writes: a new run is refused while
    one of them lives, even after the main process is gone; the last one out removes the lock files."""
    from rlcli.config.errors import UserError

    out = tmp_path / "run"
    main = rundir.RunDir(out, "SFTRecipe", main=True)
    main.lock()
    other = rundir.RunDir(out, "SFTRecipe", main=False)
    other.take_over()  # joins: a shared lock on .rlcli-writers
    main.release(ok=False)  # the main process is gone (its lock with it)
    try:
        rundir.RunDir(out, "SFTRecipe", main=True).lock()
    except UserError as exc:
        assert "a process of an earlier run there is still running" in str(exc)
    else:
        raise AssertionError("a new run took a directory a live process still writes into")
    other.release(ok=True)
    again = rundir.RunDir(out, "SFTRecipe", main=True)
    again.lock()
    again.release(ok=True)
    assert list(out.iterdir()) == []  # the last one out took the lock files with it
