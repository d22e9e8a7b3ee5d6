"""Built-in tools: ``calculator``, ``python`` and ``search``.

Every entry of ``BUILTIN_TOOLS`` is a *factory* that takes the tool's options as keyword arguments and returns the
tool (a ``str -> str`` callable): ``BUILTIN_TOOLS["search"](corpus_path="wiki.txt")``. ``load_tool`` (in
``rlcli.env.tools``) resolves recipe names through it. ``calculator`` and ``python`` also exist as ready-made
module-level tools with default options.

``python`` runs model-written code inside bubblewrap (no network, no host files but the system, no other
processes); where bubblewrap cannot run, building it fails unless the recipe opts in with
``{spec: python, options: {allow_unsandboxed: true}}`` (see ``make_python_tool``).

Tools signal failure by raising; ``ToolRunner`` turns the exception into ``Error: <Type>: <message>`` for the model.
"""

from __future__ import annotations

import ast
import functools
import math
import operator
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

# ---------------------------------------------------------------------------------------------------------------
# calculator

MAX_EXPRESSION_CHARS = 500
MAX_INT_BITS = 4096  # about 1233 decimal digits: every operation on such numbers takes microseconds

_BINARY_OPS = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: pow,
}
_UNARY_OPS = {ast.USub: operator.neg, ast.UAdd: operator.pos}


def calculator(expression: str) -> str:
    """Evaluate an arithmetic expression: numbers, + - * / // % **, unary minus and parentheses.

    Args:
        expression: the expression to evaluate, e.g. "(3 + 4) * 2 ** 3".
    """
    expression = expression.strip()
    if len(expression) > MAX_EXPRESSION_CHARS:
        raise ValueError(f"expression longer than {MAX_EXPRESSION_CHARS} characters")
    try:
        tree = ast.parse(expression, mode="eval")
    except SyntaxError as err:
        raise ValueError(f"not an arithmetic expression: {err.msg}") from None
    return _format_number(_evaluate(tree.body))


def make_calculator_tool() -> Callable[[str], str]:
    """The calculator has no options; this factory exists so every built-in is made the same way."""
    return calculator


def _evaluate(node: ast.AST) -> int | float:
    # Walks the AST itself (never eval): only number literals and the listed operators are accepted.
    if isinstance(node, ast.Constant):
        if isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
            return _check_size(node.value)
        raise ValueError(f"unsupported literal {node.value!r}: only numbers are allowed")
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY_OPS:
        return _UNARY_OPS[type(node.op)](_evaluate(node.operand))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY_OPS:
        left, right = _evaluate(node.left), _evaluate(node.right)
        if isinstance(node.op, ast.Pow):
            _check_power(left, right)
        return _check_size(_BINARY_OPS[type(node.op)](left, right))
    raise ValueError(f"unsupported syntax: {type(node).__name__}; only numbers, + - * / // % ** and parentheses")


def _check_power(base: int | float, exponent: int | float) -> None:
    # Refuse before computing: 9**9**9 would take minutes and gigabytes.
    if isinstance(base, int) and isinstance(exponent, int) and exponent > 0 and abs(base) > 1:
        if abs(base).bit_length() * exponent > MAX_INT_BITS:
            raise ValueError(f"result too large: more than {MAX_INT_BITS} bits")
    elif abs(exponent) > 10_000 and abs(base) not in (0, 1):
        raise ValueError("exponent too large")


def _check_size(value: int | float) -> int | float:
    if isinstance(value, int) and value.bit_length() > MAX_INT_BITS:
        raise ValueError(f"result too large: more than {MAX_INT_BITS} bits")
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError("result is not a finite number")
    if isinstance(value, complex):
        raise ValueError("result is a complex number")
    return value


def _format_number(value: int | float) -> str:
    if isinstance(value, float):
        if value.is_integer() and abs(value) < 1e15:
            return str(int(value))
        return f"{value:.12g}"
    return str(value)


# ---------------------------------------------------------------------------------------------------------------
# python

# Runs inside the sandbox interpreter before the user's code: limits first, then the code as __main__ from main.py,
# with tracebacks that start at the user's code (the launcher's own frame is skipped).
# The process limit (RLIMIT_NPROC) counts every process of the user, so it is this user's count at the call plus
# ``max_processes`` (passed in argv[1]); a fork bomb stops there.
_LAUNCHER = """
import resource, sys, traceback
memory, cpu, fsize = {memory}, {cpu}, {fsize}
resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
resource.setrlimit(resource.RLIMIT_NPROC, (int(sys.argv[1]), int(sys.argv[1])))
sys.argv = ["main.py"]
with open("main.py", encoding="utf-8") as f:
    source = f.read()
try:
    exec(compile(source, "main.py", "exec"), {{"__name__": "__main__", "__builtins__": __builtins__}})
except SystemExit:
    raise
except BaseException as exc:
    traceback.print_exception(type(exc), exc, exc.__traceback__.tb_next)
    open(".raised", "w").close()  # the traceback says what happened: no exit code after it
    sys.exit(1)
"""

CLEAN_PATH = "/usr/local/bin:/usr/bin:/bin"
MAX_PROCESSES = 32
"""Processes (threads included) model-written code may add to this user's count at the time of a call."""


def _user_processes() -> int:
    """Processes and threads of this user now (what RLIMIT_NPROC counts)."""
    uid, count = os.getuid(), 0
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.stat(f"/proc/{entry}").st_uid == uid:
                    count += len(os.listdir(f"/proc/{entry}/task"))
            except OSError:
                continue
    return count


def _pids_cgroup(limit: int) -> Path | None:
    """A fresh cgroup under this process's own, holding at most ``limit`` processes (the pids controller, v2 or
    v1), for a call's process tree; None where this process may not make one (the usual case without root or
    delegation: RLIMIT_NPROC is then the only process limit)."""
    import uuid

    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":
            root = Path("/sys/fs/cgroup") if Path("/sys/fs/cgroup/cgroup.controllers").exists() \
                else Path("/sys/fs/cgroup/unified")
        elif "pids" in controllers.split(","):
            root = Path("/sys/fs/cgroup/pids")
        else:
            continue
        parent = root / path.lstrip("/")
        if not (parent / "cgroup.procs").exists():
            continue
        group = parent / f"rlcli-python-{uuid.uuid4().hex[:12]}"
        try:
            group.mkdir()
            (group / "pids.max").write_text(str(limit))
            return group
        except OSError:
            try:
                group.rmdir()
            except OSError:
                pass
    return None


def _drop_cgroup(group: Path | None) -> None:
    if group is None:
        return
    for _ in range(100):  # the killed processes leave it within moments
        try:
            group.rmdir()
            return
        except OSError:
            time.sleep(0.01)


def _outcome(returncode: int, sandboxed: bool, raised: bool) -> str:
    """How the code ended, when not normally: the same words with and without the sandbox (bubblewrap reports a
    child killed by signal N as exit code 128 + N)."""
    number = -returncode if returncode < 0 else (returncode - 128 if sandboxed and returncode > 128 else 0)
    if number:
        try:
            return f"[killed by signal {signal.Signals(number).name}]"
        except ValueError:
            pass
    if returncode != 0 and not raised:
        return f"[exit code {returncode}]"
    return ""

BWRAP = "bwrap"
"""The bubblewrap executable the python tool sandboxes code with (looked up on PATH)."""

SANDBOX_OPT_IN = "options: {allow_unsandboxed: true}"


def sandbox_problem() -> str | None:
    """Why the python tool cannot sandbox code on this machine, or None when it can.

    Checked once per process by running an empty program in the real sandbox: bubblewrap must be installed and
    allowed to create namespaces (unprivileged user namespaces, which some containers and hardened kernels refuse).
    """
    return _sandbox_problem(BWRAP)


@functools.cache
def _sandbox_problem(bwrap: str) -> str | None:
    path = shutil.which(bwrap)
    if path is None:
        return f"bubblewrap ({bwrap}) is not installed"
    with tempfile.TemporaryDirectory(prefix="rlcli_python_") as workdir:
        try:
            proc = subprocess.run(_sandbox_command(path, workdir) + [sys.executable, "-I", "-c", "pass"],
                                  stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30, check=False)
        except (OSError, subprocess.TimeoutExpired) as err:
            return f"{path} could not be run: {err}"
    if proc.returncode != 0:
        reason = next((line for line in proc.stderr.splitlines() if line.strip()), f"exit code {proc.returncode}")
        return f"{path} cannot create its sandbox here ({reason.strip()})"
    return None


def _sandbox_command(bwrap: str, workdir: str) -> list[str]:
    """bubblewrap arguments that run a command with: no network (an empty network namespace: not even the host's
    loopback), its own pid namespace (it sees only its own processes; when bwrap dies, the kernel kills every process
    inside, ``setsid`` or not) that dies with its parent, a clean environment, no capabilities, the system
    (``/usr``) and this interpreter's prefixes read-only, ``workdir`` as the only writable place, and nothing else of
    the host's file system (no ``/etc``, ``/home``, ``/tmp``, ``/sys``; a fresh ``/proc`` and a minimal ``/dev``)."""
    cmd = [bwrap, "--unshare-all", "--die-with-parent", "--new-session", "--cap-drop", "ALL", "--clearenv"]
    for key, value in {"PATH": CLEAN_PATH, "HOME": workdir, "TMPDIR": workdir,
                       "LC_ALL": "C.UTF-8"}.items():
        cmd += ["--setenv", key, value]
    cmd += ["--ro-bind", "/usr", "/usr"]
    for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(top):  # merged /usr: /bin -> usr/bin
            cmd += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            cmd += ["--ro-bind", top, top]
    for path in _interpreter_dirs():
        cmd += ["--ro-bind", path, path]
    return cmd + ["--dev", "/dev", "--proc", "/proc", "--bind", workdir, workdir, "--chdir", workdir,
                  "--remount-ro", "/"]


def _interpreter_dirs() -> list[str]:
    """Where this interpreter, its standard library and its site-packages live, when outside /usr (a venv, pyenv,
    conda): the sandbox runs the same Python, with the same packages, read-only."""
    candidates = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix,
                  os.path.dirname(os.path.realpath(sys.executable))}
    candidates |= {os.path.realpath(c) for c in candidates}
    dirs = sorted(c for c in candidates if os.path.isdir(c) and c != "/" and not _inside(c, "/usr"))
    return [d for d in dirs if not any(other != d and _inside(d, other) for other in dirs)]


def _inside(path: str, parent: str) -> bool:
    return path == parent or path.startswith(parent.rstrip("/") + "/")


def make_python_tool(
    timeout_s: float = 5.0, memory_mb: int = 512, max_output_chars: int = 2000, max_file_mb: int = 1,
    allow_unsandboxed: bool = False,
) -> Callable[[str], str]:
    """A tool that runs Python code in a fresh, sandboxed interpreter and returns what it printed.

    Each call: a new temporary working directory (deleted afterwards), this interpreter with ``-I`` (no user site,
    no PYTHON* variables, no current directory on ``sys.path``), ``RLIMIT_AS`` = ``memory_mb``, ``RLIMIT_CPU`` and a
    wall-clock limit of ``timeout_s``, files (stdout included) capped at ``max_file_mb``. stdout and stderr come back
    together, cut to ``max_output_chars`` (its start and its end are kept). Running past the time limit raises
    ``TimeoutError``.

    The interpreter runs inside bubblewrap (see ``_sandbox_command``): no network, no host files but the system and
    the interpreter (read-only) and the working directory, no view of other processes or of the trainer's
    environment, and nothing it starts outlives the call. Without a working bubblewrap (``sandbox_problem()``) this
    raises ``ValueError`` unless ``allow_unsandboxed``: then the code runs in a plain subprocess with the trainer's
    user, files and network (only the limits above, a clean environment and its own process group).
    """
    problem = sandbox_problem()
    if problem is not None and not allow_unsandboxed:
        raise ValueError(
            f"the python tool cannot sandbox model-written code: {problem}. Install bubblewrap (Debian/Ubuntu: "
            f"apt-get install bubblewrap), or accept running the code with the trainer's permissions (its files, "
            f"network and environment variables are then reachable) by giving this tool {SANDBOX_OPT_IN}"
        )
    bwrap = shutil.which(BWRAP) if problem is None else None
    launcher = _LAUNCHER.format(
        # the CPU limit is only a backstop behind the wall-clock one (threads can burn CPU faster than wall time)
        memory=memory_mb * 2**20, cpu=math.ceil(timeout_s) + 1, fsize=max_file_mb * 2**20
    )

    def python(code: str) -> str:
        """Run Python code in a sandboxed interpreter and return its printed output (stdout and stderr).

        Args:
            code: the Python program to run; use print() to show results.
        """
        with tempfile.TemporaryDirectory(prefix="rlcli_python_") as workdir:
            Path(workdir, "main.py").write_text(code, encoding="utf-8")
            out_path = Path(workdir, ".output")
            import uuid

            marker = f"RLCLI_TOOL_CALL={uuid.uuid4().hex}"  # finds what the code left running (unsandboxed)
            command = [sys.executable, "-I", "-c", launcher, str(_user_processes() + MAX_PROCESSES)]
            if bwrap is not None:
                command = _sandbox_command(bwrap, workdir) + command
            group = _pids_cgroup(MAX_PROCESSES + 8)  # + bwrap's own processes
            if group is not None:  # joined before the exec: bwrap forks its child at once
                command = ["/bin/sh", "-c", '{ echo $$ > "$0"; } 2>/dev/null; exec "$@"', str(group / "cgroup.procs"),
                           *command]
            with open(out_path, "wb") as out:
                # stdout goes to a file, not a pipe: RLIMIT_FSIZE then bounds what a print loop can produce. The
                # environment is a clean one for bwrap too (its init process is visible as /proc/1 inside)
                proc = subprocess.Popen(
                    command,
                    cwd=workdir,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    env={"PATH": CLEAN_PATH, "HOME": workdir, "TMPDIR": workdir, "LC_ALL": "C.UTF-8",
                         **({} if bwrap is not None else dict([marker.split("=", 1)]))},
                    start_new_session=True,  # its own process group, killed as a whole on timeout
                )
                try:
                    returncode = _wait_then_kill_group(proc, timeout_s)
                finally:
                    if bwrap is None:
                        _kill_marked(marker)  # a setsid() descendant left the process group
                    _drop_cgroup(group)
            if returncode is None or returncode == -signal.SIGXCPU or (bwrap is not None
                                                                       and returncode == 128 + signal.SIGXCPU):
                raise TimeoutError(f"the code did not finish within {timeout_s:g} s")
            output = out_path.read_bytes().decode("utf-8", errors="replace")
            raised = Path(workdir, ".raised").exists()
        if len(output) > max_output_chars:  # keep both ends: the start of the output and the end of a traceback
            head, tail = output[: max_output_chars // 2], output[-(max_output_chars - max_output_chars // 2):]
            output = f"{head}\n[... output truncated ...]\n{tail}"
        outcome = _outcome(returncode, bwrap is not None, raised)
        if outcome:
            output = f"{output}\n{outcome}" if output.strip() else outcome
        return output if output.strip() else "(no output)"

    python.sandboxed = bwrap is not None
    return python


def _kill_marked(marker: str) -> None:
    """Kill every process of this user whose environment holds ``marker`` (the unsandboxed code's descendants that
    left its process group with setsid; a process that replaced its environment is out of reach)."""
    needle = marker.encode()
    for _ in range(3):  # a process may fork while the others are killed
        found = False
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) == os.getpid():
                continue
            try:
                with open(f"/proc/{entry}/environ", "rb") as f:
                    if needle not in f.read().split(b"\0"):
                        continue
                os.kill(int(entry), signal.SIGKILL)
                found = True
            except (OSError, ValueError):
                continue
        if not found:
            return


def _wait_then_kill_group(proc: subprocess.Popen, timeout_s: float) -> int | None:
    """Wait up to ``timeout_s`` for ``proc``, then kill its process group; the exit code, or None on timeout."""
    deadline = time.monotonic() + timeout_s
    timed_out = False
    # WNOWAIT: notice the exit without reaping, so the pid (= the group id) stays reserved until the kill below and
    # the kill cannot reach a process that reused it. The kill ends anything the code left running in its group (in
    # the sandbox: bwrap, whose death takes the whole pid namespace with it).
    try:
        while os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:
            if time.monotonic() >= deadline:
                timed_out = True
                break
            time.sleep(0.005)
    finally:  # also when an inline tool's time limit interrupts the wait
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        returncode = proc.wait()
    return None if timed_out else returncode


def python(code: str) -> str:
    """Run Python code in a sandboxed interpreter and return its printed output (stdout and stderr).

    Args:
        code: the Python program to run; use print() to show results.
    """
    # built on first use, so that importing this module never fails on a machine without bubblewrap
    return _default_python_tool()(code)


@functools.cache
def _default_python_tool() -> Callable[[str], str]:
    return make_python_tool()


# ---------------------------------------------------------------------------------------------------------------
# search


def make_search_tool(corpus_path: str | os.PathLike, k1: float = 1.5, b: float = 0.75) -> Callable[[str], str]:
    """A tool that returns the passage of a local text corpus that best matches a query (BM25).

    The corpus is a UTF-8 text file with one passage per paragraph (passages separated by blank lines). It is read
    and indexed once, here.
    """
    path = Path(corpus_path)
    if not path.is_file():
        raise ValueError(f"search corpus {str(path)!r} is not a file")
    passages = [p.strip() for p in re.split(r"\n\s*\n", path.read_text(encoding="utf-8")) if p.strip()]
    if not passages:
        raise ValueError(f"search corpus {str(path)!r} has no passages")
    index = _BM25([_terms(p) for p in passages], k1=k1, b=b)

    def search(query: str) -> str:
        """Search the corpus and return the passage that best matches the query.

        Args:
            query: words to look for.
        """
        scores = index.scores(_terms(query))
        best = max(range(len(passages)), key=lambda i: (scores[i], -i))
        return passages[best] if scores[best] > 0 else "No results found."

    return search


def _terms(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


class _BM25:
    def __init__(self, docs: list[list[str]], k1: float, b: float):
        self.k1, self.b = k1, b
        self.tfs = [Counter(d) for d in docs]
        self.lengths = [len(d) for d in docs]
        self.avg_length = sum(self.lengths) / len(docs) or 1.0
        df = Counter(term for d in docs for term in set(d))
        n = len(docs)
        self.idf = {term: math.log(1 + (n - f + 0.5) / (f + 0.5)) for term, f in df.items()}

    def scores(self, query: list[str]) -> list[float]:
        out = []
        for tf, length in zip(self.tfs, self.lengths):
            norm = self.k1 * (1 - self.b + self.b * length / self.avg_length)
            terms = (t for t in set(query) if t in tf)
            out.append(sum(self.idf.get(t, 0.0) * tf[t] * (self.k1 + 1) / (tf[t] + norm) for t in terms))
        return out


BUILTIN_TOOLS: dict[str, Callable[..., Callable[..., str]]] = {
    "calculator": make_calculator_tool,
    "python": make_python_tool,
    "search": make_search_tool,
}
