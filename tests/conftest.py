"""Shared test helpers: run the real CLI, write recipes, read metrics."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# One BLAS thread for tests and the CLI runs they start: tiny models gain nothing from more, and on small shared
# machines thread hand-offs can cost milliseconds per matmul.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

# the tiny GPT-2 of the tests' own models (a model section: TINY_GPT2; its config: TINY_GPT2_CONFIG)
TINY_GPT2_CONFIG = {"n_layer": 2, "n_embd": 64, "n_head": 2, "n_positions": 128}
TINY_GPT2 = {"architecture": "gpt2", "tokenizer": "byte", "config": TINY_GPT2_CONFIG}


def mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (Linux /proc), collected before anything is killed (orphans lose the link)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], list(children.get(pid, []))
    while todo:
        child = todo.pop()
        found.append(child)
        todo += children.get(child, [])
    return found


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL ``proc`` and every process under it (torch.distributed.run starts its workers in sessions of their
    own), so a hung launcher's workers cannot outlive the test and hold the ports the next test needs."""
    for pid in [proc.pid, *_descendants(proc.pid)]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def run(cmd: list[str], *, cwd: Path = REPO, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run a command as a user would (wide terminal, hub offline); on a timeout, :func:`kill_tree`."""
    full_env = {**os.environ, "COLUMNS": "250", "HF_HUB_OFFLINE": "1", **(env or {})}
    with subprocess.Popen(cmd, cwd=cwd, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_tree(proc)
            out, err = proc.communicate()
            raise subprocess.TimeoutExpired(cmd, timeout, out, err) from None
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def run_cli(*args: str, cwd: Path = REPO, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run ``python -m rlcli ARGS`` (see :func:`run`)."""
    return run([sys.executable, "-m", "rlcli", *args], cwd=cwd, env=env, timeout=timeout)


def invoke_cli(*args: str, monkeypatch) -> tuple[int, str, str]:
    """``rlcli ARGS`` in this process -> (exit code, stdout, stderr), for dry runs and bad input: no new process
    paying the import time each. An exception that escaped the CLI (a traceback a user would see) fails the test."""
    from typer.testing import CliRunner

    from rlcli.cli import app

    monkeypatch.chdir(REPO)
    monkeypatch.setenv("COLUMNS", "250")
    result = CliRunner().invoke(app, list(args))
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, result.stderr


def kill_when(args: list[str], ready, *, timeout: float = 120, poll: float = 0.02) -> None:
    """Start ``python -m rlcli ARGS``, wait until ``ready()`` (or the run ends, or ``timeout``), then SIGKILL it:
    a run killed at a chosen moment (just after a checkpoint, mid-run), as a crash or the OOM killer would."""
    import time

    proc = subprocess.Popen([sys.executable, "-m", "rlcli", *args], cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env={**os.environ, "COLUMNS": "250", "HF_HUB_OFFLINE": "1"})
    deadline = time.time() + timeout
    while not ready() and proc.poll() is None and time.time() < deadline:
        time.sleep(poll)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def accelerate_launch(*args: str, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run ``accelerate launch ARGS`` (see :func:`run`)."""
    return run([sys.executable, "-m", "accelerate.commands.launch", *args], env=env, timeout=timeout)


def plain(text: str) -> str:
    """Output with rich box characters removed and whitespace collapsed, for substring assertions."""
    return re.sub(r"\s+", " ", re.sub(r"[│╭╮╰╯─]", " ", text)).strip()


def snapshot(path: Path) -> dict[str, bytes | None]:
    """Every file and directory under ``path`` (relative name -> bytes, None for a directory): to assert that a
    command changed nothing there, byte for byte."""
    path = Path(path)
    if not path.exists():
        return {}
    return {str(p.relative_to(path)): (None if p.is_dir() else p.read_bytes()) for p in sorted(path.rglob("*"))}


def write_yaml(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def read_metrics(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(output_dir) / "metrics.jsonl").read_text().splitlines() if line.strip()]


@pytest.fixture
def repo() -> Path:
    return REPO


def float32_rounding_bound(reference: torch.Tensor, *, width: int, layers: int) -> float:
    """How far two float32 evaluations of the same network may differ from rounding alone, for comparisons of one
    computation done two ways (a batch vs one row, a LoRA adapter merged vs applied, another machine's CPU kernels,
    thread count or attention path: each sums in another order).

    Higham's worst-case bound for a length-``width`` dot product is γ = width·ε (ε = 2^-23); a network stacks
    ``layers`` + 1 such reductions (the head included), and softmax and normalisation layers can amplify an
    input's relative error a few times (×4 here). Relative to the outputs' magnitude (at least 1). A real bug (another
    token read, an adapter not applied) moves scores by orders of magnitude more: the tests also check the compared
    values are spread out that far."""
    eps = torch.finfo(torch.float32).eps
    return 4 * (layers + 1) * width * eps * max(1.0, float(reference.abs().max()))
