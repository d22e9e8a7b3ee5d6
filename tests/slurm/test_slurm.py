"""SLURM templates (slurm/*.sbatch).

- Always (fast): the templates parse, carry the directives users expect, and single_node.sbatch runs outside
  SLURM as a plain script (argument handling + `accelerate launch` of 2 CPU processes, on a --dry-run).
- Slow, opt-in (``RLCLI_SLURM_TEST=1 pytest tests/slurm -m slow``): tests/slurm/run_slurm_test.sh starts a real
  Slurm (munged, slurmctld, two slurmds on localhost), submits both templates as CPU jobs with sbatch and checks
  their outputs. It needs root and the Debian packages slurmctld, slurmd, slurm-client and munge (the script
  installs them with --install; set RLCLI_SLURM_INSTALL=1 to pass it).
"""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from tests.helpers import REPO, plain

TEMPLATES = ("single_node.sbatch", "multi_node.sbatch")
SCRIPT = REPO / "tests" / "slurm" / "run_slurm_test.sh"


@pytest.mark.parametrize("name", TEMPLATES)
def test_template_parses_and_asks_for_gpus(name):
    path = REPO / "slurm" / name
    subprocess.run(["bash", "-n", str(path)], check=True)
    text = path.read_text()
    assert "#SBATCH --gpus-per-node=" in text and "#SBATCH --ntasks-per-node=1" in text
    assert "accelerate.commands.launch" in text and "--multi_gpu" in text
    # a warning before the time limit, to checkpoint and requeue; a requeued job resumes
    assert "#SBATCH --signal=B:USR1@" in text and "#SBATCH --requeue" in text and "scontrol requeue" in text
    assert "SLURM_RESTART_COUNT" in text and "--resume" in text
    if name == "multi_node.sbatch":
        for piece in ("srun", "SLURM_NNODES", "SLURM_NODEID", "scontrol show hostnames", "--main_process_ip"):
            assert piece in text


@pytest.mark.parametrize("name", TEMPLATES)
def test_the_usage_examples_name_keys_that_exist(name, tmp_path, monkeypatch):
    """Each `sbatch slurm/NAME COMMAND CONFIG KEY=VALUE ...` of a template's header passes --dry-run (the single-node
    one said ppo.learning_rate, which is optim.learning_rate)."""
    from tests.helpers import invoke_cli

    examples = [line.split("sbatch", 1)[1].split("#")[0].split() for line in (REPO / "slurm" / name).read_text()
                .splitlines() if line.startswith("#   ") and " sbatch " in line and f"slurm/{name}" in line]
    examples = [words[words.index(f"slurm/{name}") + 1:] for words in examples]
    examples = [words for words in examples if len(words) >= 2]
    assert examples
    for command, config, *overrides in examples:
        overrides = [o for o in overrides if not o.startswith("output_dir=")]
        code, out, err = invoke_cli(command, config, *overrides, f"output_dir={tmp_path / 'out'}", "--dry-run",
                                    monkeypatch=monkeypatch)
        assert code == 0, (command, config, overrides, plain(err))


def test_single_node_template_runs_outside_slurm(tmp_path):
    """The same script, run with bash: 2 CPU processes through accelerate launch, on a dry run."""
    env = {**os.environ, "RLCLI_CPU": "1", "RLCLI_NPROC": "2", "RLCLI_PORT": "29731", "COLUMNS": "250",
           "HF_HUB_OFFLINE": "1", "RLCLI_PYTHON": shutil.which("python") or "python"}
    env.pop("SLURM_JOB_ID", None)
    res = subprocess.run(["bash", str(REPO / "slurm" / "single_node.sbatch"), "sft", "configs/tiny/sft.yaml",
                          f"output_dir={tmp_path / 'out'}", "--dry-run"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False)
    out = plain(res.stdout + res.stderr)
    assert res.returncode == 0, out
    assert "2 process(es) (CPU)" in out  # the template's header
    assert "micro-batch 16 × 2 process(es)" in out  # rlcli's own count: two processes really started
    assert "dry run OK" in out


def test_single_node_template_reads_the_environment(tmp_path):
    env = {**os.environ, "RLCLI_COMMAND": "sft", "RLCLI_CONFIG": "configs/tiny/sft.yaml", "RLCLI_ARGS": "--dry-run",
           "RLCLI_OUTPUT_DIR": str(tmp_path / "out"), "RLCLI_CPU": "1", "COLUMNS": "250", "HF_HUB_OFFLINE": "1",
           "RLCLI_PYTHON": shutil.which("python") or "python"}
    res = subprocess.run(["bash", str(REPO / "slurm" / "single_node.sbatch")], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=300, check=False)
    out = plain(res.stdout + res.stderr)
    assert res.returncode == 0, out
    assert "1 process(es)" in out and f"output_dir: {tmp_path / 'out'}" in out and "dry run OK" in out


@pytest.mark.slow  # three runs, ~50 s: the step-end checkpoint itself is in the default suite (tests/test_signals.py)
def test_sigusr1_checkpoints_requeues_and_the_requeued_job_resumes_exactly(tmp_path):
    """single_node.sbatch run with bash as SLURM runs it (output to a file): SIGUSR1 to the script, as
    ``--signal=B:USR1@300`` sends it before the time limit, makes rlcli checkpoint the step in progress and stop; the
    script asks for a requeue (a stand-in scontrol records it); run again as the requeued job
    (SLURM_RESTART_COUNT=1), it resumes, and metrics.jsonl is the uninterrupted run's."""
    import signal
    import time

    from tests.helpers import read_metrics, run_cli

    args = ["sft", "configs/tiny/sft.yaml", "train.max_steps=12", "train.save_every=null", "data.eval_fraction=0"]
    whole = tmp_path / "whole"
    res = run_cli(*args, f"output_dir={whole}")
    assert res.returncode == 0, res.stderr[-2000:]

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(f"#!/bin/sh\necho \"$@\" >> {tmp_path / 'scontrol.log'}\n")
    (bin_dir / "scontrol").chmod(0o755)
    out = tmp_path / "run"
    env = {**os.environ, "RLCLI_CPU": "1", "COLUMNS": "250", "HF_HUB_OFFLINE": "1", "SLURM_JOB_ID": "4242",
           "PATH": f"{bin_dir}:{os.environ['PATH']}", "RLCLI_PYTHON": shutil.which("python") or "python"}
    env.pop("SLURM_RESTART_COUNT", None)
    cmd = ["bash", str(REPO / "slurm" / "single_node.sbatch"), *args, f"output_dir={out}"]
    log = tmp_path / "job.log"
    with log.open("w") as f:
        job = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT)
        metrics = out / "metrics.jsonl"
        deadline = time.time() + 240
        while job.poll() is None and time.time() < deadline and not (
                metrics.exists() and metrics.read_text().count("\n") >= 2):
            time.sleep(0.02)
        job.send_signal(signal.SIGUSR1)
        code = job.wait(timeout=240)
    text = plain(log.read_text())
    assert code == 138, text[-3000:]
    stopped = read_metrics(out)[-1]["step"]
    assert (out / "checkpoints" / f"step-{stopped:08d}").is_dir() and stopped < 12, text
    assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", "4242"]
    assert "requeued, to go on with --resume" in text

    res = subprocess.run(cmd, cwd=REPO, env={**env, "SLURM_RESTART_COUNT": "1"}, capture_output=True, text=True,
                         timeout=300, check=False)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert f"resuming at step {stopped}" in plain(res.stdout)
    timing = ("tokens_per_s",)
    assert [{k: v for k, v in m.items() if k not in timing} for m in read_metrics(out)] == \
        [{k: v for k, v in m.items() if k not in timing} for m in read_metrics(whole)]
    assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", "4242"]  # no second requeue


def _slurm_test_enabled() -> str | None:
    if os.environ.get("RLCLI_SLURM_TEST") != "1":
        return "set RLCLI_SLURM_TEST=1 to start a real Slurm on this machine"
    if os.geteuid() != 0:
        return "needs root (munged, slurmctld and slurmd run here)"
    if shutil.which("slurmctld") is None and os.environ.get("RLCLI_SLURM_INSTALL") != "1":
        return "slurmctld is not installed (apt-get install slurmctld slurmd slurm-client munge, or RLCLI_SLURM_INSTALL=1)"
    return None


@pytest.mark.slow
@pytest.mark.skipif(_slurm_test_enabled() is not None, reason=_slurm_test_enabled() or "")
def test_sbatch_templates_on_a_real_slurm():
    args = ["bash", str(SCRIPT)] + (["--install"] if os.environ.get("RLCLI_SLURM_INSTALL") == "1" else [])
    res = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=900, check=False)
    if res.returncode == 77:
        pytest.skip(res.stdout.strip().splitlines()[-1] if res.stdout.strip() else "skipped by the script")
    assert res.returncode == 0, res.stdout[-6000:] + res.stderr[-3000:]
    assert "PASSED" in res.stdout
