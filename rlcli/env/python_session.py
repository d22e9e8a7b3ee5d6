"""``builtin:python_session``: a persistent, sandboxed Python interpreter per episode (a stateful environment).

The episode's one tool, ``python(code)``, runs code in the same interpreter call after call, so variables,
imports and functions persist (a notebook, not a script). The interpreter is started at the first call, inside the
same bubblewrap sandbox as the ``python`` tool (``rlcli.env.sandbox._sandbox_command``: no network, no host
files but the system and the interpreter, read-only, its own pid namespace, a clean environment), with the same
limits: ``RLIMIT_AS`` = ``memory_mb``, files (its printed output included) capped at ``max_file_mb``, processes
capped, a wall-clock limit of ``timeout_s`` per call. ``RLIMIT_CPU`` is ``cpu_s`` for the whole session.

A call that runs past ``timeout_s``, or an interpreter that dies (memory, CPU), ends the session: the call is
answered with what happened, and the next call starts a fresh interpreter (the model is told its variables are
gone). ``reset`` and ``_close`` (the episode's end) stop the interpreter and delete its working directory.

Without a working bubblewrap (``sandbox_problem()``), constructing it fails unless ``allow_unsandboxed``
(``env.environment: {spec: builtin:python_session, options: {allow_unsandboxed: true}}``), exactly as the python
tool.
"""

from __future__ import annotations

import json
import math
import os
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from rlcli.env.sandbox import (
    BWRAP,
    CLEAN_PATH,
    MAX_PROCESSES,
    SANDBOX_OPT_IN,
    _kill_marked,
    _sandbox_command,
    _user_processes,
    sandbox_problem,
)

OUTPUT_FILE = ".output"

# The interpreter's main loop, run with -I -c inside the sandbox. Requests (one JSON line each: {"code": ...}) come
# on a private copy of stdin and replies go to a private copy of stdout; the code's own stdin is /dev/null and its
# stdout and stderr are a file that RLIMIT_FSIZE bounds and that is emptied before every call. A last expression's
# value is printed, as in a notebook.
_SERVER = """
import ast, json, linecache, os, resource, sys, traceback
memory, cpu, fsize = {memory}, {cpu}, {fsize}
resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
resource.setrlimit(resource.RLIMIT_NPROC, (int(sys.argv[1]), int(sys.argv[1])))
requests = os.fdopen(os.dup(0), "r", encoding="utf-8")
replies = os.fdopen(os.dup(1), "w", encoding="utf-8", buffering=1)
null = os.open(os.devnull, os.O_RDONLY)
os.dup2(null, 0)
out = os.open("{output}", os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
os.dup2(out, 1)
os.dup2(out, 2)
sys.stdin = open(0, encoding="utf-8", closefd=False)
sys.stdout = open(1, "w", encoding="utf-8", errors="backslashreplace", buffering=1, closefd=False)
sys.stderr = open(2, "w", encoding="utf-8", errors="backslashreplace", buffering=1, closefd=False)
sys.argv = ["session"]
namespace = {{"__name__": "__main__", "__builtins__": __builtins__}}
for number, line in enumerate(requests, 1):
    code = json.loads(line)["code"]
    os.ftruncate(1, 0)
    os.lseek(1, 0, os.SEEK_SET)
    name = "<cell %d>" % number
    linecache.cache[name] = (len(code), None, code.splitlines(True), name)
    try:
        tree = ast.parse(code, name, "exec")
        last = tree.body.pop() if tree.body and isinstance(tree.body[-1], ast.Expr) else None
        exec(compile(tree, name, "exec"), namespace)
        if last is not None:
            value = eval(compile(ast.Expression(last.value), name, "eval"), namespace)
            if value is not None:
                print(repr(value))
    except SyntaxError as exc:
        traceback.print_exception(type(exc), exc, None)
    except SystemExit as exc:
        print("[SystemExit: %s; the session goes on]" % (exc.code,))
    except BaseException as exc:
        traceback.print_exception(type(exc), exc, exc.__traceback__.tb_next)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
    replies.write("{{}}\\n")
"""


class PythonSession:
    """A stateful environment with one tool, ``python``: a sandboxed interpreter that keeps its variables for the
    whole episode (see the module docstring). Options (``env.environment.options``) are this constructor's
    arguments."""

    def __init__(self, timeout_s: float = 5.0, memory_mb: int = 512, max_output_chars: int = 2000,
                 max_file_mb: int = 1, cpu_s: float = 60.0, allow_unsandboxed: bool = False):
        problem = sandbox_problem()
        if problem is not None and not allow_unsandboxed:
            raise ValueError(
                f"the python session cannot sandbox model-written code: {problem}. Install bubblewrap "
                f"(Debian/Ubuntu: apt-get install bubblewrap), or accept running the code with the trainer's "
                f"permissions (its files, network and environment variables are then reachable) by giving "
                f"env.environment {SANDBOX_OPT_IN}")
        self._bwrap = shutil.which(BWRAP) if problem is None else None
        self._timeout_s = timeout_s
        self._max_output_chars = max_output_chars
        self._server = _SERVER.format(memory=memory_mb * 2**20, cpu=math.ceil(cpu_s), fsize=max_file_mb * 2**20,
                                      output=OUTPUT_FILE)
        self._process: subprocess.Popen | None = None
        self._workdir: str | None = None
        self._marker = ""
        self._lost = ""  # why the last interpreter ended, told to the model with the next call's output

    @property
    def sandboxed(self) -> bool:
        return self._bwrap is not None

    def reset(self, **row) -> None:
        """A fresh session (nothing of an earlier episode is left); the interpreter starts with the first call."""
        self._close()
        self._lost = ""

    def python(self, code: str) -> str:
        """Run Python code in this episode's persistent interpreter; variables, imports and functions stay defined
        for the next call. Returns what the code printed (stdout and stderr) and the value of a last expression.

        Args:
            code: the Python code to run.
        """
        if self._process is None:
            self._start()
        note, self._lost = self._lost, ""
        try:
            self._process.stdin.write((json.dumps({"code": code}) + "\n").encode())
            self._process.stdin.flush()
            answered = self._wait_for_reply()
        except BrokenPipeError:
            answered = False
        except BaseException:  # the trainer's own time limit (or Ctrl-C) interrupted the wait: stop the code
            self._close()
            raise
        output = self._read_output()
        if answered is None:
            self._close()
            self._lost = "[the previous call ran past the time limit: the session was restarted, its variables are gone]"
            raise TimeoutError(f"the code did not finish within {self._timeout_s:g} s; the session was restarted "
                               "and its variables are gone")
        if not answered:
            how = self._ended()
            self._close()
            self._lost = "[the previous session ended: this is a new one, its variables are gone]"
            output = f"{output}\n[the session ended ({how}); the next call starts a new one]".strip()
        if note:
            output = f"{note}\n{output}"
        return output if output.strip() else "(no output)"

    def _close(self) -> None:
        """Stop the interpreter (and all it started) and delete its working directory."""
        process, workdir = self._process, self._workdir
        self._process = self._workdir = None
        if process is not None:
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            if self._bwrap is None:
                _kill_marked(self._marker)
            process.wait()
            for stream in (process.stdin, process.stdout):
                try:
                    stream.close()
                except OSError:
                    pass
        if workdir is not None:
            shutil.rmtree(workdir, ignore_errors=True)

    def __del__(self):
        try:
            self._close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    # the interpreter ------------------------------------------------------------------------------------------

    def _start(self) -> None:
        self._workdir = tempfile.mkdtemp(prefix="rlcli_session_")
        self._marker = f"RLCLI_TOOL_CALL={uuid.uuid4().hex}"
        command = [sys.executable, "-I", "-c", self._server, str(_user_processes() + MAX_PROCESSES)]
        if self._bwrap is not None:
            command = _sandbox_command(self._bwrap, self._workdir) + command
        self._process = subprocess.Popen(
            command, cwd=self._workdir, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            env={"PATH": CLEAN_PATH, "HOME": self._workdir, "TMPDIR": self._workdir, "LC_ALL": "C.UTF-8",
                 **({} if self._bwrap is not None else dict([self._marker.split("=", 1)]))},
            start_new_session=True)

    def _wait_for_reply(self) -> bool | None:
        """True once the interpreter answered, False when it ended first, None at the time limit."""
        deadline = time.monotonic() + self._timeout_s
        with selectors.DefaultSelector() as selector:
            selector.register(self._process.stdout, selectors.EVENT_READ)
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                if not selector.select(timeout=left):
                    continue
                line = self._process.stdout.readline()
                return bool(line)

    def _read_output(self) -> str:
        path = Path(self._workdir or "", OUTPUT_FILE)
        try:
            with open(path, "rb") as f:
                data = f.read(8 * self._max_output_chars + 4096)
        except OSError:
            return ""
        output = data.decode("utf-8", errors="replace")
        if len(output) > self._max_output_chars:  # keep the start of the output and the end of a traceback
            cap = self._max_output_chars
            output = f"{output[: cap // 2]}\n[... output truncated ...]\n{output[-(cap - cap // 2):]}"
        return output

    def _ended(self) -> str:
        try:
            code = self._process.wait(timeout=5) if self._process is not None else None
        except subprocess.TimeoutExpired:
            code = None
        if code is None:
            return "it stopped answering"
        number = -code if code < 0 else (code - 128 if self._bwrap is not None and code > 128 else 0)
        if number:
            try:
                return f"killed by signal {signal.Signals(number).name}"
            except ValueError:
                pass
        return f"exit code {code}"
