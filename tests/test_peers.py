"""One failing process stops the run (``rlcli.peers``), through the real CLI with 2 CPU processes (gloo): a reward
function that raises on process 1, a tool that cannot be built on process 1, and process 1 killed; every process
exits within seconds, the error names the process and what failed, and nothing half-written is left (a run being
replaced comes back). And the watch that stops a process whose peer failed without exiting."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from tests.helpers import REPO, kill_tree, plain, run, snapshot

PPO = "configs/tiny/ppo.yaml"
TWO = ["--cpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
       "-q", "-m", "rlcli", "ppo", PPO]
FAST = ["model.config.n_layer=2", "model.config.n_embd=64", "model.config.n_head=2", "ppo.batch_size=16",
        "ppo.mini_batch_size=16", "generation.max_new_tokens=12", "logging.progress=false", "ppo.steps=6",
        "train.save_every=null"]


def _launch(args, log, env=None):
    return subprocess.Popen([sys.executable, "-m", "accelerate.commands.launch", *args], cwd=REPO, stdout=log,
                            stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "COLUMNS": "250", "HF_HUB_OFFLINE": "1", **(env or {})})


def _wait(proc, timeout):
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(proc)
        proc.wait()
        raise


def _finished_run(out):
    """A finished run's directory as rlcli leaves it (its manifest and files; the weights need not be real)."""
    import json

    from rlcli import rundir

    rundir.claim(out, "model.safetensors", "metrics.jsonl", "recipe.yaml")
    for name in ("model.safetensors", "metrics.jsonl", "recipe.yaml"):
        (out / name).write_text(f"the finished run's {name}")
    manifest = json.loads((out / rundir.MANIFEST).read_text())
    (out / rundir.MANIFEST).write_text(json.dumps({**manifest, "recipe": "PPORecipe", "state": "finished"}))


def _half_written(path):
    return [p for p in path.rglob("*") if p.name.endswith(".tmp")]


RAISES = '''import os, pathlib, time

calls = []


def score(responses):
    calls.append(1)
    if os.environ.get("RANK") == "1" and len(calls) == 2:
        pathlib.Path(os.environ["FAILED_AT"]).write_text(str(time.time()))
        raise ValueError("the grader crashed")
    return [float(r.count("7")) for r in responses]
'''


def test_a_reward_that_raises_on_one_process_stops_every_process_naming_it(tmp_path):
    """Overwriting a finished run: process 1's reward raises at step 2, before the new run's first checkpoint.
    Both processes end within 30 s of it; process 1 says what failed, the main process that process 1 of 2 failed
    and the run stopped everywhere; the finished run is back byte for byte."""
    out = tmp_path / "run"
    _finished_run(out)
    before = snapshot(out)
    reward = tmp_path / "raises.py"
    reward.write_text(RAISES)
    failed_at = tmp_path / "failed_at"
    log = tmp_path / "run.log"
    with log.open("w") as f:
        proc = _launch([*TWO, f"output_dir={out}", "overwrite_output_dir=true", *FAST,
                        f"reward.function={reward}:score"], f, env={"FAILED_AT": str(failed_at)})
        code = _wait(proc, 300)
    ended = time.time()
    text = plain(log.read_text())
    assert code == 1, text[-3000:]
    assert ended - float(failed_at.read_text()) < 30, text[-3000:]
    assert "error (process 1 of 2)" in text and "raised ValueError: the grader crashed" in text, text
    assert "process 1 of 2: reward.function" in text and "The run stopped on every process" in text, text
    assert "Traceback" not in text
    assert snapshot(out) == before
    assert not list(tmp_path.glob(".rlcli-trash-*")) and not _half_written(tmp_path)


TOOL = '''import os


def make(**options):
    if os.environ.get("RANK") == "1":
        raise RuntimeError("the tool's server is down on this machine")
    return lambda text: "ok"
'''


def test_a_tool_that_cannot_be_built_on_one_process_stops_every_process_naming_it(tmp_path):
    tools = tmp_path / "tools.py"
    tools.write_text(TOOL)
    out = tmp_path / "run"
    start = time.time()
    res = run([sys.executable, "-m", "accelerate.commands.launch", *TWO, f"output_dir={out}", *FAST,
               f"env.tools={{Lookup: {{spec: {tools}:make, options: {{retries: 1}}}}}}", "generation.max_new_tokens=12",
               "env.max_length=100"], timeout=300)
    text = plain(res.stdout + res.stderr)
    assert res.returncode == 1, text[-3000:]
    assert "error (process 1 of 2)" in text and "the tool's server is down on this machine" in text, text
    assert time.time() - start < 90, text  # process 0 waited for process 1 at the rendezvous: not for long
    assert "Traceback" not in text


def test_a_killed_process_stops_the_others_naming_it(tmp_path):
    reward = tmp_path / "pid.py"
    pid_file = tmp_path / "pid"
    reward.write_text("import os, pathlib\n\ndef score(responses):\n    if os.environ.get('RANK') == '1':\n"
                      f"        pathlib.Path({str(pid_file)!r}).write_text(str(os.getpid()))\n"
                      "    return [float(r.count('7')) for r in responses]\n")
    out = tmp_path / "run"
    log = tmp_path / "run.log"
    with log.open("w") as f:
        proc = _launch([*TWO, f"output_dir={out}", *FAST, "ppo.steps=30", f"reward.function={reward}:score"], f)
        deadline = time.time() + 240
        metrics = out / "metrics.jsonl"
        while proc.poll() is None and time.time() < deadline and not (
                pid_file.exists() and metrics.exists() and metrics.read_text().count("\n") >= 2):
            time.sleep(0.05)
        os.kill(int(pid_file.read_text()), signal.SIGKILL)
        killed = time.time()
        code = _wait(proc, 120)
    text = plain(log.read_text())
    assert code == 1 and time.time() - killed < 30, text[-3000:]
    # process 0 names it by its stopped heartbeat (best effort: "another process" when the store cannot tell), the
    # launcher by its exit status
    assert "was lost without an error of its own" in text and "the run stopped on every process" in text, text
    assert "process 1 of 2 was killed by SIGKILL" in text, text
    assert "Traceback" not in text and not _half_written(out)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("mode", ["collective", "python"])
def test_a_peer_that_fails_without_exiting_cannot_hang_the_others(mode):
    """Process 1 announces a failure and stays alive: process 0, blocked in a collective (gloo waits for ever for a
    peer that does not exit), is ended by its watch naming the failure; busy in Python, it gets PeerFailed."""
    script = REPO / "tests" / "peers_two_process.py"
    start = time.time()
    res = run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(_free_port()), str(script), mode], env={"PYTHONPATH": str(REPO)}, timeout=120)
    text = plain(res.stdout + res.stderr)
    assert time.time() - start < 60, text
    if mode == "collective":
        assert "error: process 1 of 2: RuntimeError: the grader crashed; this process (process 0 of 2) could not " \
               "stop by itself" in text, text[-3000:]
    else:
        assert "process 0 stopped after" in text and "process 1 of 2: RuntimeError: the grader crashed" in text, text
