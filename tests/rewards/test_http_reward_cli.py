"""``rlcli serve-reward`` + ``reward.url`` through the real entry points, on loopback: a tiny PPO run scored by the
served reward equals the same run scored in-process (metrics and samples, all but timings); a service (``rlcli
serve-reward`` in a process of its own) killed in the middle of a run ends it in one error (exit 1, no traceback),
and ``--resume`` against another service loses nothing. Slow: PPO against each kind of faulty service, and
env-rollout scored over HTTP."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager

import pytest

from tests.helpers import REPO, invoke_cli, plain, read_metrics, run_cli

pytest.importorskip("uvicorn")
pytest.importorskip("starlette")

TOKEN = "e2e-token-value-7f3a"
TINY = "configs/tiny/ppo.yaml"
STEPS = 4
FAST = ["model.config.n_layer=2", "model.config.n_embd=64", "model.config.n_head=2", "ppo.batch_size=32",
        "ppo.mini_batch_size=16", "ppo.micro_batch_size=16", "optim.learning_rate=1e-3", "logging.progress=false",
        "generation.max_new_tokens=24", f"ppo.steps={STEPS}", "train.save_every=2", "train.sample_every=1"]
TIMING = ("time_", "tokens_per_s")
# the served reward of recipes/sevens.py, which kills its own server (SIGKILL, mid-request) on its third call
DYING = '''
import os
import signal

CALLS = []


def score(responses):
    CALLS.append(len(responses))
    if len(CALLS) == 3:
        os.kill(os.getpid(), signal.SIGKILL)
    return [float(min(r.count("7"), 16)) for r in responses]
'''


def untimed(metrics: list[dict]) -> list[dict]:
    return [{k: v for k, v in m.items() if not k.startswith(TIMING)} for m in metrics]


@contextmanager
def serve_reward(*overrides: str, env: dict | None = None):
    """``rlcli serve-reward configs/serve_reward.yaml port=0 OVERRIDES`` in a process of its own; yields (process,
    scoring URL) once it listens; stopped (or killed) after."""
    proc = subprocess.Popen([sys.executable, "-m", "rlcli", "serve-reward", "configs/serve_reward.yaml", "port=0",
                             *overrides], cwd=REPO, env={**os.environ, **(env or {})}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    url, seen, deadline = None, [], time.monotonic() + 120
    try:
        while url is None and time.monotonic() < deadline and proc.poll() is None:
            try:
                line = lines.get(timeout=0.2)
            except queue.Empty:
                continue
            seen.append(line)
            if line.startswith("rlcli serve-reward: serving"):
                url = next(w for w in line.split() if w.startswith("http://"))
        assert url is not None, "".join(seen)
        yield proc, url
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def one_error(stderr: str) -> str:
    """The run's one error panel, flattened; fails on a traceback or a second panel."""
    assert "Traceback" not in stderr, stderr[-3000:]
    assert stderr.count("╭─ error") == 1, stderr[-3000:]
    return plain(stderr)


@pytest.fixture(scope="module")
def in_process(tmp_path_factory):
    out = tmp_path_factory.mktemp("inproc") / "run"
    res = run_cli("ppo", TINY, f"output_dir={out}", *FAST)
    assert res.returncode == 0, res.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def service():
    """recipes/sevens.py:score served with a token, from a thread of this process (the CLI's own start is tested
    with the dying service below: a process of its own costs seconds of imports)."""
    from tests.helpers import serving

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RLCLI_TEST_SERVE_TOKEN", TOKEN)
        sevens = f"{REPO / 'recipes' / 'sevens.py'}:score"
        with serving({"function": sevens}, token_env="RLCLI_TEST_SERVE_TOKEN") as url:
            yield url


def test_a_run_scored_by_the_served_reward_equals_the_in_process_run(in_process, service, tmp_path):
    out = tmp_path / "served"
    res = run_cli("ppo", TINY, f"output_dir={out}", *FAST, "reward.function=null", f"reward.url={service}",
                  "reward.token_env=RLCLI_TEST_TOKEN", "reward.batch_size=8", "reward.max_concurrency=3",
                  env={"RLCLI_TEST_TOKEN": TOKEN})
    assert res.returncode == 0, res.stderr[-3000:]
    served, local = read_metrics(out), read_metrics(in_process)
    assert len(served) == STEPS and untimed(served) == untimed(local)
    assert len({m["reward_mean"] for m in served}) > 1  # scores that moved: a constant reward would prove little
    assert (out / "samples.jsonl").read_text() == (in_process / "samples.jsonl").read_text()
    recipe = (out / "recipe.yaml").read_text()
    assert "token_env: RLCLI_TEST_TOKEN" in recipe
    for text in [res.stdout, res.stderr, recipe, *(p.read_text() for p in out.glob("*.jsonl"))]:
        assert TOKEN not in text


def test_a_service_killed_mid_run_stops_it_in_one_error_and_resume_loses_nothing(in_process, service, tmp_path):
    plugin = tmp_path / "dying.py"
    plugin.write_text(DYING)
    out = tmp_path / "run"
    with serve_reward(f"reward.function={plugin}:score") as (dying, url):
        start = time.monotonic()
        res = run_cli("ppo", TINY, f"output_dir={out}", *FAST, "reward.function=null", f"reward.url={url}",
                      "reward.retries=2", "reward.retry_backoff_s=0.2", "reward.timeout_s=10", timeout=240)
        assert dying.wait(10) == -signal.SIGKILL  # it died on the third step's request
    text = one_error(res.stderr)
    assert res.returncode == 1
    assert f"reward.url: the reward service {url} failed for responses 0-31 of a batch" in text
    assert "connection refused" in text and "3 attempts" in text and "--resume" in text
    assert time.monotonic() - start < 120
    assert [m["step"] for m in read_metrics(out)] == [1, 2]
    # the same run, resumed against another service (another port, with a token): as if nothing had happened
    res = run_cli("ppo", TINY, f"output_dir={out}", *FAST, "reward.function=null", f"reward.url={service}",
                  "reward.token_env=RLCLI_TEST_TOKEN", "--resume", env={"RLCLI_TEST_TOKEN": TOKEN})
    assert res.returncode == 0, res.stderr[-3000:]
    assert untimed(read_metrics(out)) == untimed(read_metrics(in_process))


def test_dry_run_checks_the_service_keys(monkeypatch):
    monkeypatch.setenv("RLCLI_TEST_TOKEN", "")
    code, _, err = invoke_cli("ppo", TINY, "reward.function=null", "reward.url=http://127.0.0.1:9/score",
                              "reward.token_env=RLCLI_TEST_TOKEN", "reward.label=1", "--dry-run",
                              monkeypatch=monkeypatch)
    assert code == 2 and "reward.label: not used with reward.url" in plain(err)
    code, _, err = invoke_cli("ppo", TINY, "reward.function=null", "reward.url=http://127.0.0.1:9/score",
                              "reward.token_env=RLCLI_TEST_TOKEN", "--dry-run", monkeypatch=monkeypatch)
    assert code == 2 and "reward.token_env: the environment variable RLCLI_TEST_TOKEN is empty" in plain(err)
    code, _, err = invoke_cli("env-rollout", "configs/calculator_eval.yaml", "model.name_or_path=null",
                              "model.architecture=gpt2", "reward.function=null", "reward.url=https://127.0.0.1:9/x",
                              "reward.token_env=RLCLI_TEST_TOKEN", "--dry-run", monkeypatch=monkeypatch)
    assert code == 2 and "reward.token_env: the environment variable RLCLI_TEST_TOKEN is empty" in plain(err)
    monkeypatch.setenv("RLCLI_TEST_TOKEN", TOKEN)
    code, out, err = invoke_cli("ppo", TINY, "reward.function=null", "reward.url=http://127.0.0.1:9/score",
                                "reward.token_env=RLCLI_TEST_TOKEN", "--dry-run", monkeypatch=monkeypatch)
    assert code == 0 and "dry run OK" in out and TOKEN not in out + err


# --- slow: every kind of faulty service, through the real entry point ----------------------------------------------


def _fault_cases():
    from tests.helpers import answer, drop

    def info(handler, request):
        answer(body={"scores": [float(min(r.count("7"), 16)) for r in request["responses"]],
                     "info": [{"sevens": r.count("7")} for r in request["responses"]]})(handler, request)

    def nan(handler, request):
        scores = ["1.0"] * (len(request["responses"]) - 1) + ["NaN"]
        answer(body=('{"scores": [' + ", ".join(scores) + "]}").encode())(handler, request)

    return {
        "5xx then success": ([answer(503, {"error": "warming up"}), drop, info], None),
        "slow": ([answer(delay=4.0)], "timed out"),
        "wrong count": ([answer(body={"scores": [1.0]})], "with 1 scores for 32 responses"),
        "NaN": ([nan], "not finite numbers at 1 of 32 responses (first: nan at response 31)"),
        "not JSON": ([answer(body=b"<html>oops</html>")], "not JSON"),
        "wrong token": ([answer(401, {"error": "missing or wrong bearer token"})], "HTTP 401"),
    }


@pytest.mark.slow
@pytest.mark.parametrize("case", ["5xx then success", "slow", "wrong count", "NaN", "not JSON", "wrong token"])
def test_ppo_against_a_faulty_service_ends_in_one_error_or_completes(case, tmp_path):
    from tests.helpers import Service

    script, says = _fault_cases()[case]
    svc = Service(*script)
    try:
        out = tmp_path / "run"
        res = run_cli("ppo", TINY, f"output_dir={out}", *FAST, "ppo.steps=2", "reward.function=null",
                      f"reward.url={svc.url}", "reward.retries=2", "reward.retry_backoff_s=0.1", "reward.timeout_s=1",
                      "reward.token_env=RLCLI_TEST_TOKEN", env={"RLCLI_TEST_TOKEN": TOKEN}, timeout=240)
    finally:
        svc.close()
    if says is None:
        assert res.returncode == 0, res.stderr[-3000:]
        samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
        assert all(s["reward_info"] == {"sevens": s["response"].count("7")} for s in samples)
        return
    text = one_error(res.stderr)
    assert res.returncode == 1 and says in text and svc.url in text and TOKEN not in res.stdout + res.stderr


@pytest.mark.slow
def test_env_rollout_scored_by_a_served_reward(tmp_path):
    plugin = tmp_path / "lengths.py"
    plugin.write_text("def score(answers, rows):\n    return [len(a) + 0.5 * len(r['answer']) for a, r in "
                      "zip(answers, rows)]\n")
    common = ["model.name_or_path=null", "model.architecture=gpt2", "model.tokenizer=byte", "data.max_rows=16",
              "batch_size=8", "show=0", "model.config={n_layer: 2, n_embd: 64, n_head: 2, n_positions: 256}"]
    local = tmp_path / "local"
    res = run_cli("env-rollout", "configs/calculator_eval.yaml", f"output_dir={local}", *common,
                  f"reward.function={plugin}:score")
    assert res.returncode == 0, res.stderr[-3000:]
    with serve_reward(f"reward.function={plugin}:score") as (_, url):
        served = tmp_path / "served"
        res = run_cli("env-rollout", "configs/calculator_eval.yaml", f"output_dir={served}", *common,
                      "reward.function=null", f"reward.url={url}", "reward.batch_size=3")
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [[json.loads(line) for line in (d / "episodes.jsonl").read_text().splitlines()] for d in (local, served)]
    assert len(rows[0]) == 16 and rows[0] == rows[1]
    assert len({r["reward"] for r in rows[0]}) > 1  # answers and rows reached the served function
