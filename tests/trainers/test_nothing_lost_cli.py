"""Bad input, full disks and damaged checkpoints through the real CLI: one paragraph, exit 1 or 2, no traceback,
and nothing in output_dir changed (every file byte for byte) or lost."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess

import pytest

from tests.helpers import REPO, invoke_cli, plain, read_metrics, run_cli, snapshot

SFT = "configs/tiny/sft.yaml"
PPO = "configs/tiny/ppo.yaml"
QUICK = ["data.eval_fraction=0", "logging.progress=false"]


@pytest.fixture
def finished_run(finished_sft_run):
    """A finished 4-step tiny SFT run, checkpoints at steps 2 and 4 (copied by each test that changes it)."""
    return finished_sft_run


NULL_FIRST = 'null\n{"prompt": "a", "completion": "b"}\n'

# (command, recipe, overrides, data file text or None, exit code, fragments of the message, fragments it must not hold)
BAD = [
    ("sft", SFT, ["data.path=DATA"], NULL_FIRST, 2, ["data.path", "data.jsonl:1: expected a JSON object", "null"], []),
    ("sft", SFT, ["data.max_length=200"], None, 2, ["data.max_length", "128 positions", "n_positions"], []),
    ("ppo", PPO, ["generation.max_new_tokens=200"], None, 2, ["generation.max_new_tokens", "128 positions",
                                                                  "at most 127"], []),
    ("sft", SFT, ["lora.target_modules=[q_proj]"], None, 2, ["lora.target_modules", "'q_proj' names no module",
                                                              "c_attn"], []),
    ("sft", SFT, ["model.config.n_head=3"], None, 2, ["model.config.n_head", "n_embd=128", "multiple of 3"], []),
    ("sft", SFT, ["model.config.n_head=0"], None, 2, ["model.config.n_head", "at least one"], []),
    ("sft", SFT, ["optim.learning_rate=.inf"], None, 2, ["optim.learning_rate", "finite"], []),
    ("sft", SFT, ["train.batch_size=true"], None, 2, ["train.batch_size", "not a boolean"], []),
    ("sft", SFT, ["model.architecture=nonexistent"], None, 2, ["unknown architecture 'nonexistent'", "gpt2"],
     ["did you mean ?"]),
    ("sft", SFT, ["data.path=/nowhere/x.jsonl"], None, 2, ["data.path", "/nowhere/x.jsonl does not exist"],
     ["relative to the working directory"]),
]


@pytest.mark.parametrize("command, recipe, overrides, data_text, code, fragments, absent", BAD,
                         ids=[" ".join(b[2]) for b in BAD])
def test_bad_input_changes_nothing(finished_run, tmp_path, monkeypatch, command, recipe, overrides, data_text, code,
                                   fragments, absent):
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    before = snapshot(out)
    data = tmp_path / "data.jsonl"
    if data_text is not None:
        data.write_text(data_text)
    overrides = [o.replace("DATA", str(data)) for o in overrides]
    for extra in (["--dry-run"], []):
        got, _, err = invoke_cli(command, recipe, f"output_dir={out}", "overwrite_output_dir=true", *QUICK,
                                 *overrides, *extra, monkeypatch=monkeypatch)
        err = plain(err)
        assert got == code, err
        for fragment in fragments:
            assert fragment in err, (fragment, err)
        for fragment in absent:
            assert fragment not in err, (fragment, err)
        assert snapshot(out) == before
    assert not list(tmp_path.glob(".rlcli-trash-*"))


def test_a_null_first_row_is_an_error_not_a_crash(tmp_path):
    """datasets' JSON reader segfaults on it (exit 139); rlcli reads every line first."""
    from rlcli.data.sources import load_rows
    from rlcli.config.errors import UserError

    data = tmp_path / "rows.jsonl"
    data.write_text(NULL_FIRST)
    with pytest.raises(UserError, match=r"rows.jsonl:1: expected a JSON object .*got null"):
        load_rows(str(data))


def test_output_dir_with_a_tilde_is_the_home_directory():
    from rlcli.config.loader import load_recipe
    from rlcli.config.sft import SFTRecipe

    recipe = load_recipe(SFTRecipe, REPO / SFT, ["output_dir=~/runs/x"])
    assert recipe.output_dir == os.path.expanduser("~/runs/x") and "~" not in recipe.output_dir


# --- full disks and damaged checkpoints ----------------------------------------------------------------------------


def _mount_tmpfs(path, size):
    path.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    return res.returncode == 0


def test_a_full_disk_at_a_checkpoint_keeps_the_previous_one(tmp_path):
    """A real full file system (a small tmpfs, where this machine lets the test mount one): one checkpoint fits,
    the second does not."""
    disk = tmp_path / "disk"
    if not _mount_tmpfs(disk, "8M"):
        pytest.skip("cannot mount a tmpfs here (see the injected ENOSPC test)")
    try:
        out = disk / "run"
        res = run_cli("sft", SFT, f"output_dir={out}", "train.max_steps=6", "train.save_every=2", *QUICK)
        err = plain(res.stderr)
        assert res.returncode == 1, res.stderr[-3000:]
        assert f"no space left on {out}/checkpoints/step-00000004.tmp" in err and "Traceback" not in res.stderr, err
        assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000002"]
        from rlcli.checkpoint import verify_checkpoint

        assert verify_checkpoint(out / "checkpoints" / "step-00000002") is None
    finally:
        subprocess.run(["umount", str(disk)])


def test_an_injected_full_disk_is_one_paragraph_and_loses_nothing(finished_run, tmp_path, monkeypatch):
    """ENOSPC injected into the checkpoint write, the manifest write and the final save of a run replacing a
    finished one: each time exit 1, 'no space left on <path>', and the finished run comes back untouched."""
    import pathlib

    import torch

    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    before = snapshot(out)
    real_save, real_write = torch.save, pathlib.Path.write_text

    def full_save(obj, f, *a, **k):
        if "checkpoints" in str(f):
            raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 1234 vs 1180")
        return real_save(obj, f, *a, **k)

    def full_manifest(self, *a, **k):
        if self.name == ".rlcli-run.json.tmp" and (out / "metrics.jsonl").exists():
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(self, *a, **k)

    for patch, where in ((("torch.save", full_save),), "checkpoints/step-00000002.tmp"), \
                         ((("pathlib.Path.write_text", full_manifest),), ".rlcli-run.json.tmp"):
        with monkeypatch.context() as m:
            for target, fake in patch:
                m.setattr(target, fake)
            code, _, err = invoke_cli("sft", SFT, f"output_dir={out}", "overwrite_output_dir=true",
                                      "train.max_steps=4", "train.save_every=2", *QUICK, monkeypatch=monkeypatch)
        err = plain(err)
        assert code == 1 and "no space left on" in err and where in err, err
        assert snapshot(out) == before
        assert not list(tmp_path.glob(".rlcli-trash-*"))


def test_resume_skips_a_damaged_newest_checkpoint(finished_run, tmp_path):
    """A torn newest checkpoint is named and skipped: the resume goes on from the one before, exactly as a resume that
    never had the torn one (the same steps, losses and weights)."""
    resume = ["sft", SFT, "train.max_steps=6", "train.save_every=2", *QUICK, "--resume"]
    runs = {}
    for name in ("torn", "clean"):
        out = runs[name] = tmp_path / name
        shutil.copytree(finished_run, out)
        manifest = json.loads((out / ".rlcli-run.json").read_text())
        (out / ".rlcli-run.json").write_text(json.dumps({**manifest, "state": "running"}))  # killed in a save
        ckpts = sorted((out / "checkpoints").iterdir())
        assert [c.name for c in ckpts] == ["step-00000002", "step-00000004"]  # the last step's too
        if name == "torn":
            model = ckpts[-1] / "model.pt"
            model.write_bytes(model.read_bytes()[:1000])  # a torn write
        else:
            shutil.rmtree(ckpts[-1])  # as if step 4's checkpoint had never been begun
    expected = read_metrics(finished_run)
    res = run_cli(*resume, f"output_dir={runs['torn']}")
    out_text = plain(res.stdout + res.stderr)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "step-00000004 cannot be read (model.pt" in out_text and "resuming from step-00000002" in out_text
    assert "resuming at step 2" in out_text
    res = run_cli(*resume, f"output_dir={runs['clean']}")
    assert res.returncode == 0, res.stderr[-3000:]
    got, clean = read_metrics(runs["torn"]), read_metrics(runs["clean"])
    assert [m["step"] for m in got] == [1, 2, 3, 4, 5, 6]
    assert [m["loss"] for m in got] == [m["loss"] for m in clean]  # the same computation: exact
    # step 3's loss is computed from the step-2 checkpoint's weights, as the finished run computed it
    assert [m["loss"] for m in got[:3]] == pytest.approx([m["loss"] for m in expected[:3]])
    assert (runs["torn"] / "model.safetensors").read_bytes() == (runs["clean"] / "model.safetensors").read_bytes()
