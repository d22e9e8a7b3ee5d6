"""The sandbox (rlcli/env/sandbox.py) as both its users see it, the one-shot ``python`` tool and the persistent
``python_session``: each way out that a plain subprocess leaves open is closed for both, both stop a fork bomb at the
same process limit, and without a working bubblewrap both refuse to build unless the recipe opts in (the run header
says so)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import pytest

from rlcli.config.env import EnvConfig
from rlcli.env import sandbox
from rlcli.env.build import check_env, sandbox_notes
from rlcli.env.builtin_tools import make_python_tool
from rlcli.env.python_session import PythonSession
from rlcli.env.sandbox import sandbox_problem
from rlcli.env.tools import load_tool

PROBLEM = sandbox_problem()
needs_sandbox = pytest.mark.skipif(
    PROBLEM is not None,
    reason=f"the python tool cannot sandbox code on this machine: {PROBLEM} (.ci/run installs bubblewrap)")
KINDS = ["tool", "session"]


@dataclass
class Runner:
    """Runs code the way one user of the sandbox does; ``end`` is the episode's end (the tool has none: its
    interpreter ends with each call)."""

    run: Callable[[str], str]
    end: Callable[[], None]
    sandboxed: bool

    def __call__(self, code: str) -> str:
        return self.run(code)


def make_runner(kind: str, sandboxed: bool = True, **options) -> Runner:
    if kind == "tool":
        python = make_python_tool(allow_unsandboxed=not sandboxed, **options)
        return Runner(python, lambda: None, python.sandboxed)
    session = PythonSession(allow_unsandboxed=not sandboxed, **options)
    return Runner(session.python, session.reset, session.sandboxed)


@pytest.fixture(params=KINDS)
def python(request):
    runner = make_runner(request.param, timeout_s=5.0)
    yield runner
    runner.end()


def run_lines(python, code: str) -> list[str]:
    return python(code).splitlines()


@needs_sandbox
def test_host_files_are_out_of_reach(python, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("trainer data")
    out = run_lines(python, f"""
for path in ["/etc/passwd", {str(secret)!r}, {os.path.abspath(__file__)!r}, "/root/.bashrc"]:
    try:
        open(path).read()
        print("READ", path)
    except OSError as err:
        print("blocked", type(err).__name__)
for path in [{str(tmp_path / "escaped.txt")!r}, "/usr/escaped.txt", "/escaped.txt", "/tmp/escaped.txt"]:
    try:
        open(path, "w").write("x")
        print("WROTE", path)
    except OSError as err:
        print("blocked", type(err).__name__)
open("mine.txt", "w").write("ok")
print(open("mine.txt").read())
""")
    assert not [line for line in out if line.startswith(("READ", "WROTE"))], out
    assert len([line for line in out if line.startswith("blocked")]) == 8 and out[-1] == "ok"
    assert not (tmp_path / "escaped.txt").exists()
    assert python.sandboxed


@needs_sandbox
def test_no_network(python):
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        listener.setblocking(False)
        port = listener.getsockname()[1]
        out = python(f"""
import socket
try:
    socket.create_connection(("127.0.0.1", {port}), timeout=2)
    print("CONNECTED")
except OSError as err:
    print("blocked", type(err).__name__)
""")
        with pytest.raises(BlockingIOError):  # nothing ever knocked
            listener.accept()
    assert out.startswith("blocked"), out


@needs_sandbox
def test_ctypes_reaches_nothing_outside(python):
    # ctypes skips every Python-level check; only the kernel's namespaces stop it
    out = run_lines(python, f"""
import ctypes
libc = ctypes.CDLL(None)
print("open", libc.open(b"/etc/passwd", 0))
print("kill", libc.kill({os.getpid()}, 0))
""")
    assert out == ["open -1", "kill -1"]  # no such file, and no such process in its pid namespace


@needs_sandbox
def test_trainer_secrets_are_invisible(python, monkeypatch):
    key = f"fake-wandb-key-{uuid.uuid4().hex}"
    monkeypatch.setenv("WANDB_API_KEY", key)
    # /proc/<pid>/environ shows a process's environment as it started: a stand-in trainer started with the key
    trainer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"],
                               env={**os.environ, "WANDB_API_KEY": key})
    try:
        out = python(f"""
import os
seen = [name for name in os.environ if "WANDB" in name]
for pid in [{trainer.pid}, {os.getpid()}] + [p for p in os.listdir("/proc") if p.isdigit()]:
    try:
        with open(f"/proc/{{pid}}/environ", "rb") as f:
            if {key!r}.encode() in f.read():
                seen.append(pid)
    except OSError:
        pass
print("seen", seen)
""")
    finally:
        trainer.kill()
        trainer.wait()
    assert out == "seen []\n"


def _alive_with(marker: str) -> list[int]:
    """Pids of running (not zombie) processes whose command line contains ``marker``."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                if marker.encode() not in f.read():
                    continue
            with open(f"/proc/{entry}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] != "Z":
                    pids.append(int(entry))
        except OSError:
            continue
    return pids


DAEMON = """
import os, sys, time
if os.fork() == 0:
    os.setsid()  # its own session and process group: a process-group kill misses it
    os.execv(sys.executable, [sys.executable, "-c", "import time; time.sleep(60)", "{marker}"])
time.sleep(0.5)
print("started")
"""


@pytest.mark.parametrize("sandboxed", [True, False], ids=["sandboxed", "unsandboxed"])
@pytest.mark.parametrize("then", ["", "while True: pass"], ids=["returns", "hangs"])
@pytest.mark.parametrize("kind", KINDS)
def test_setsid_descendants_die_with_the_interpreter(kind, then, sandboxed, monkeypatch):
    """The tool's interpreter ends with the call, the session's with the episode or at a call's time limit."""
    if sandboxed and PROBLEM is not None:
        pytest.skip(PROBLEM)
    if not sandboxed:  # the plain subprocess: its setsid() grandchild must not outlive the call
        monkeypatch.setattr(sandbox, "BWRAP", "rlcli-test-no-such-bwrap")
    runner = make_runner(kind, sandboxed, timeout_s=2.0)
    assert runner.sandboxed == sandboxed
    marker = f"rlcli-sandbox-test-{uuid.uuid4().hex}"
    try:
        if then:
            with pytest.raises(TimeoutError):
                runner.run(DAEMON.format(marker=marker) + then)
        else:
            assert runner.run(DAEMON.format(marker=marker)) == "started\n"
            runner.end()
        for _ in range(100):
            if not _alive_with(marker):
                break
            time.sleep(0.02)
        else:
            pytest.fail(f"a process the code started outlived its interpreter: {_alive_with(marker)}")
    finally:
        runner.end()
        for pid in _alive_with(marker):
            os.kill(pid, 9)


def test_without_a_sandbox_the_recipe_must_opt_in(monkeypatch, tmp_path):
    monkeypatch.setattr(sandbox, "BWRAP", "rlcli-test-no-such-bwrap")
    assert sandbox_problem() == "bubblewrap (rlcli-test-no-such-bwrap) is not installed"
    with pytest.raises(ValueError, match=r"cannot sandbox .* options: \{allow_unsandboxed: true\}"):
        make_python_tool()
    with pytest.raises(ValueError, match="allow_unsandboxed"):
        load_tool("python")
    with pytest.raises(ValueError) as refused:
        PythonSession()
    assert str(refused.value).startswith("the python session cannot sandbox model-written code: bubblewrap "
                                         "(rlcli-test-no-such-bwrap) is not installed. Install bubblewrap")
    assert str(refused.value).endswith("by giving env.environment options: {allow_unsandboxed: true}")
    cfg = EnvConfig(tools={"Python": "python", "Calc": "calculator"})
    [problem] = check_env(cfg)
    assert problem.key == "env.tools.Python"
    assert problem.message.startswith("the python tool cannot sandbox model-written code: bubblewrap "
                                      "(rlcli-test-no-such-bwrap) is not installed. Install bubblewrap")
    assert problem.message.endswith("by giving this tool options: {allow_unsandboxed: true}")

    opted_in = EnvConfig(tools={"Python": {"spec": "python", "options": {"allow_unsandboxed": True}}})
    assert check_env(opted_in) == []
    python = load_tool("python", allow_unsandboxed=True)
    assert not python.sandboxed and python("print(6 * 7)") == "42\n"
    session = PythonSession(allow_unsandboxed=True)
    assert not session.sandboxed and session.python("6 * 7") == "42\n"
    session.reset()
    assert sandbox_notes(opted_in)[0].startswith("tool Python: UNSANDBOXED: model-written code runs with this user's "
                                                 "files, network and environment (bubblewrap")

    # installed but refused by the kernel or the container (no user namespaces): the probe says why
    fake = tmp_path / "bwrap"
    fake.write_text("#!/bin/sh\necho 'bwrap: No permissions to creating new namespace' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setattr(sandbox, "BWRAP", str(fake))
    assert sandbox_problem() == (f"{fake} cannot create its sandbox here "
                                 "(bwrap: No permissions to creating new namespace)")


@needs_sandbox
def test_header_says_how_tools_are_contained():
    cfg = EnvConfig(tools={"Python": "python"}, tool_memory_mb=256)
    assert check_env(cfg) == []
    sandboxed = ("tool Python: model-written code runs in a bubblewrap sandbox (no network, no host files but the "
                 "system, own pid namespace, clean environment)")
    forked = ("tool calls: forked, killed with all they started after 10 s, up to 256 MB more memory each, prints "
              "counted, not shown")
    assert sandbox_notes(cfg) == [sandboxed, forked]
    inline = EnvConfig(tools={"Calc": "calculator"}, tool_isolation="inline", tool_timeout_s=2)
    assert sandbox_notes(inline) == [("tool calls: inline in this process; Python code is interrupted after 2 s, a "
                                      "call stuck in C code is not, a crash ends the run")]


ENDED = "[the session ended ({}); the next call starts a new one]"
ENDINGS = {
    "tool": [
        ("import ctypes; ctypes.string_at(0)", "[killed by signal SIGSEGV]"),
        ("import os; os.kill(os.getpid(), 9)", "[killed by signal SIGKILL]"),
        ("import sys; sys.exit(3)", "[exit code 3]"),
        ("print('partial', flush=True); import sys; sys.exit(4)", "partial\n\n[exit code 4]"),
        ("raise SystemExit(0)", "(no output)"),
    ],
    "session": [  # SystemExit is caught (the session goes on): os._exit ends it
        ("import ctypes; ctypes.string_at(0)", ENDED.format("killed by signal SIGSEGV")),
        ("import os; os.kill(os.getpid(), 9)", ENDED.format("killed by signal SIGKILL")),
        ("import os; os._exit(3)", ENDED.format("exit code 3")),
        ("print('partial', flush=True); import os; os._exit(4)", "partial\n\n" + ENDED.format("exit code 4")),
        ("raise SystemExit(0)", "[SystemExit: 0; the session goes on]\n"),
    ],
}


@pytest.mark.parametrize("sandboxed", [True, False], ids=["sandboxed", "unsandboxed"])
@pytest.mark.parametrize("kind", KINDS)
def test_a_crash_or_an_exit_code_is_reported_alike_in_both_modes(kind, sandboxed, monkeypatch):
    """bubblewrap reports a child killed by signal N as exit code 128 + N: both say the signal, as a plain
    subprocess does."""
    if sandboxed and PROBLEM is not None:
        pytest.skip(PROBLEM)
    if not sandboxed:
        monkeypatch.setattr(sandbox, "BWRAP", "rlcli-test-no-such-bwrap")
    runner = make_runner(kind, sandboxed, timeout_s=5.0)
    assert runner.sandboxed == sandboxed
    try:
        for code, expected in ENDINGS[kind]:
            assert runner.run(code) == expected, code
            runner.end()
        assert runner.run("1/0").endswith("ZeroDivisionError: division by zero\n")  # a traceback says it all
    finally:
        runner.end()


FORK_BOMB = """
import os, time
for i in range(200):
    try:
        pid = os.fork()
    except OSError as exc:
        print("stopped after", i, type(exc).__name__)
        break
    if pid == 0:
        time.sleep(2)
        os._exit(0)
else:
    print("forked 200")
"""


def _process_limit_binds() -> bool:
    """RLIMIT_NPROC binds all but root; root needs a pids cgroup."""
    if os.getuid() != 0:
        return True
    group = sandbox._pids_cgroup(1)
    sandbox._drop_cgroup(group)
    return group is not None


@needs_sandbox
def test_a_fork_bomb_stops_at_the_process_limit(python):
    """The session's interpreter is in the pids cgroup too: as root (exempt from RLIMIT_NPROC) it could fork 200."""
    if not _process_limit_binds():
        pytest.skip("root is exempt from RLIMIT_NPROC, and no pids cgroup can be made here")
    out = python(FORK_BOMB)
    assert out.startswith("stopped after") and "BlockingIOError" in out, out
    assert int(out.split()[2]) <= sandbox.MAX_PROCESSES + 8


@needs_sandbox
def test_a_session_s_processes_count_against_one_limit_across_calls():
    """The limit holds for the whole session, not afresh at each call."""
    if not _process_limit_binds():
        pytest.skip("root is exempt from RLIMIT_NPROC, and no pids cgroup can be made here")
    session = PythonSession(timeout_s=5.0)
    spawn = """
import subprocess, sys
started = []
for i in range({n}):
    try:
        started.append(subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"]))
    except OSError as exc:
        print("stopped after", i, type(exc).__name__)
        break
else:
    print("started", {n})
"""
    try:
        assert session.python(spawn.format(n=20)) == "started 20\n"
        out = session.python(spawn.format(n=20))
        assert out.startswith("stopped after") and int(out.split()[2]) <= sandbox.MAX_PROCESSES + 8 - 20, out
    finally:
        session.reset()


@needs_sandbox
@pytest.mark.parametrize("kind", KINDS)
def test_long_output_keeps_its_start_and_its_end(kind):
    runner = make_runner(kind, timeout_s=5.0, max_output_chars=100)
    try:
        out = runner.run("print('é' * 8000 + 'END')")
    finally:
        runner.end()
    assert out == "é" * 50 + "\n[... output truncated ...]\n" + "é" * 46 + "END\n"


@needs_sandbox
def test_the_sandbox_init_process_has_a_clean_environment(python):
    out = python("print(open('/proc/1/environ').read().replace(chr(0), ' '))")
    assert f"PATH={sandbox.CLEAN_PATH} " in out and os.environ["PATH"] not in out


def test_every_run_with_a_python_tool_says_how_it_is_contained(monkeypatch, capsys):
    """Not only --dry-run: building the environment prints it, loudly when unsandboxed."""
    from types import SimpleNamespace

    from rlcli.env import build

    monkeypatch.setattr(sandbox, "BWRAP", "rlcli-test-no-such-bwrap")
    monkeypatch.setattr(build, "TextEnvironment", lambda *a, **k: SimpleNamespace(runner=SimpleNamespace()))
    monkeypatch.setattr(build, "build_protocol", lambda *a, **k: SimpleNamespace(system_prompt=lambda tools: ""))
    monkeypatch.setenv("COLUMNS", "250")
    cfg = EnvConfig(tools={"Python": {"spec": "python", "options": {"allow_unsandboxed": True}}})
    build.build_environment(cfg, None, None, rules=None, max_new_tokens=8)
    out = " ".join(capsys.readouterr().out.split())
    assert "warning: tool Python: UNSANDBOXED" in out and "allow_unsandboxed: true" in out
