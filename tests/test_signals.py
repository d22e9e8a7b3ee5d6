"""Runs stopped from outside, through the real CLI as a SLURM job runs it (output to a file, not a terminal):
SIGTERM (``scancel``, a time limit, preemption) and SIGUSR1 (``#SBATCH --signal``) write a checkpoint at the end of
the step in progress and stop there, so ``--resume`` continues bit for bit; a signal before the first step stops
at once and puts back a run being replaced."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from tests.helpers import REPO, plain, read_metrics, run_cli, snapshot

PPO = "configs/tiny/ppo.yaml"
FAST = ["model.config.n_layer=2", "model.config.n_embd=64", "model.config.n_head=2", "ppo.batch_size=16",
        "ppo.mini_batch_size=16", "generation.max_new_tokens=16", "ppo.steps=6", "train.save_every=null"]
TIMING = ("time_", "tokens_per_s")


def _start(args, log):
    return subprocess.Popen([sys.executable, "-m", "rlcli", *args], cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                            text=True, env={**os.environ, "COLUMNS": "250", "HF_HUB_OFFLINE": "1"})


def _signal_when(args, ready, signum, log_path, timeout=240):
    """Start ``rlcli ARGS`` (output to ``log_path``), send ``signum`` once ``ready()``; its exit code and output."""
    with open(log_path, "w") as log:
        proc = _start(args, log)
        deadline = time.time() + timeout
        while not ready() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        proc.send_signal(signum)
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    return code, plain(open(log_path).read())


def _logged(out, n):
    def ready():
        path = out / "metrics.jsonl"
        return path.exists() and path.read_text().count("\n") >= n
    return ready


def _untimed(rows):
    return [{k: v for k, v in r.items() if not k.startswith(TIMING)} for r in rows]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("signals") / "whole"
    res = run_cli("ppo", PPO, f"output_dir={out}", *FAST)
    assert res.returncode == 0, res.stderr[-3000:]
    return read_metrics(out)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1])
def test_a_signal_mid_run_checkpoints_the_step_and_resume_is_exact(uninterrupted, tmp_path, signum):
    out = tmp_path / "run"
    args = ["ppo", PPO, f"output_dir={out}", *FAST]
    code, text = _signal_when(args, _logged(out, 2), signum, tmp_path / "run.log")
    assert code == 128 + signum, text[-3000:]
    steps = [m["step"] for m in read_metrics(out)]
    stopped = steps[-1]
    assert 2 <= stopped < 6 and steps == list(range(1, stopped + 1)), text
    ckpt = out / "checkpoints" / f"step-{stopped:08d}"
    assert ckpt.is_dir() and sorted(p.name for p in (out / "checkpoints").iterdir()) == [ckpt.name]
    name = signal.Signals(signum).name
    assert f"stopped by {name} at the end of step {stopped}, after writing a checkpoint there" in text, text
    assert "--resume" in text and "Traceback" not in text
    assert not (out / "model.safetensors").exists()  # stopped, not finished

    res = run_cli(*args, "--resume")
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"resuming at step {stopped}" in plain(res.stdout)
    assert _untimed(read_metrics(out)) == _untimed(uninterrupted)


def test_sigterm_before_the_first_step_puts_the_replaced_run_back(tmp_path):
    """An overwrite stopped after the old run was moved aside and before the new one stands (here: in the held-out
    evaluation at the start, whose reward waits): the old run comes back byte for byte, exit 143, one message."""
    out = tmp_path / "run"
    res = run_cli("sft", "configs/tiny/sft.yaml", f"output_dir={out}", "train.max_steps=2", "train.save_every=null",
                  "data.eval_fraction=0", "logging.progress=false")
    assert res.returncode == 0, res.stderr[-3000:]
    before = snapshot(out)
    marker = tmp_path / "scoring"
    reward = tmp_path / "slow.py"
    reward.write_text(f"import pathlib, time\n\ndef score(responses):\n    pathlib.Path({str(marker)!r}).touch()\n"
                      "    time.sleep(30)\n    return [0.0] * len(responses)\n")
    args = ["ppo", PPO, f"output_dir={out}", "overwrite_output_dir=true", *FAST, f"reward.function={reward}:score",
            "data.eval_fraction=0.1", "eval.at_start=true", "eval.max_prompts=4"]
    code, text = _signal_when(args, marker.exists, signal.SIGTERM, tmp_path / "run.log")
    assert code == 143, text[-3000:]
    assert "stopped by SIGTERM" in text and "holds the run this one was replacing again, as it was" in text, text
    assert "Traceback" not in text
    assert snapshot(out) == before
    assert not list(tmp_path.glob(".rlcli-trash-*"))


def test_output_to_a_file_gets_plain_progress_lines(tmp_path):
    """No terminal (a SLURM log): a plain line per logging.progress_every_s (0: every step) and at the last step,
    where a bar cannot redraw itself; none of the bar's drawing characters."""
    res = run_cli("sft", "configs/tiny/sft.yaml", f"output_dir={tmp_path / 'a'}", "train.max_steps=4",
                  "train.save_every=null", "data.eval_fraction=0", "logging.progress_every_s=0")
    assert res.returncode == 0, res.stderr[-2000:]
    lines = [line for line in res.stdout.splitlines() if line.startswith("sft ")]
    assert [line.split(",")[0] for line in lines] == ["sft 1/4 (25%)", "sft 2/4 (50%)", "sft 3/4 (75%)",
                                                       "sft 4/4 (100%)"], res.stdout
    assert all(" elapsed, " in line and " left: loss " in line for line in lines), lines
    assert "━" not in res.stdout
    res = run_cli("sft", "configs/tiny/sft.yaml", f"output_dir={tmp_path / 'b'}", "train.max_steps=4",
                  "train.save_every=null", "data.eval_fraction=0")  # the default: every 30 s, and the last step
    assert [line.split(",")[0] for line in res.stdout.splitlines() if line.startswith("sft ")] == ["sft 4/4 (100%)"]
