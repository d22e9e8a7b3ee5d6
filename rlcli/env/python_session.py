"""``builtin:python_session``: a persistent, sandboxed Python interpreter per episode (a stateful environment).

The episode's one tool, ``python(code)``, runs code in the same interpreter call after call, so variables,
imports and functions persist (a notebook, not a script). The interpreter is an ``rlcli.env.sandbox.Interpreter``,
the python tool's sandbox with the same limits (memory, file size, printed output, the process limit), started at
the first call; the wall-clock limit ``timeout_s`` is per call, ``RLIMIT_CPU`` = ``cpu_s`` for the whole session.

A call that runs past ``timeout_s``, or an interpreter that dies (memory, CPU), ends the session: the call is
answered with what happened, and the next call starts a fresh interpreter (the model is told its variables are
gone). ``reset`` and ``_close`` (the episode's end) stop the interpreter and delete its working directory.
Without a working bubblewrap it is refused unless ``allow_unsandboxed``, exactly as the python tool.
"""

from __future__ import annotations

import json
import selectors
import time

from rlcli.env import sandbox

# The interpreter's main loop, run after the sandbox's limits. Requests (one JSON line each: {"code": ...}) come on a
# private copy of stdin and replies go to a private copy of stdout; the code's own stdin is /dev/null and its stdout
# and stderr are the sandbox's output file, which RLIMIT_FSIZE bounds and which is emptied before every call. A last
# expression's value is printed, as in a notebook.
_SERVER = """
import ast, json, linecache, os, sys, traceback
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
""".format(output=sandbox.OUTPUT_FILE)


class PythonSession:
    """A stateful environment with one tool, ``python``: a sandboxed interpreter that keeps its variables for the
    whole episode (see the module docstring). Options (``env.environment.options``) are this constructor's
    arguments."""

    def __init__(self, timeout_s: float = 5.0, memory_mb: int = 512, max_output_chars: int = 2000,
                 max_file_mb: int = 1, cpu_s: float = 60.0, allow_unsandboxed: bool = False):
        self._bwrap = sandbox.resolve_bwrap("python session", "env.environment", allow_unsandboxed)
        self._timeout_s = timeout_s
        self._limits = sandbox.Limits(memory_mb=memory_mb, cpu_s=cpu_s, max_file_mb=max_file_mb,
                                      max_output_chars=max_output_chars)
        self._interpreter: sandbox.Interpreter | None = None
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
        if self._interpreter is None:
            self._interpreter = sandbox.Interpreter(_SERVER, self._limits, self._bwrap, talk=True)
        interpreter = self._interpreter
        note, self._lost = self._lost, ""
        try:
            interpreter.process.stdin.write((json.dumps({"code": code}) + "\n").encode())
            interpreter.process.stdin.flush()
            answered = self._wait_for_reply()
        except BrokenPipeError:
            answered = False
        except BaseException:  # the trainer's own time limit (or Ctrl-C) interrupted the wait: stop the code
            self._close()
            raise
        output = interpreter.output()
        if answered is None:
            self._close()
            self._lost = ("[the previous call ran past the time limit: the session was restarted, its variables are "
                          "gone]")
            raise TimeoutError(f"{sandbox.timed_out(self._timeout_s)}; the session was restarted and its variables "
                               "are gone")
        if not answered:
            # a moment to exit by itself, so that its own exit code or signal is told, not the kill
            how = str(interpreter.stop()) if interpreter.exited_within(5) else "it stopped answering"
            self._close()
            self._lost = "[the previous session ended: this is a new one, its variables are gone]"
            output = f"{output}\n[the session ended ({how}); the next call starts a new one]".strip()
        if note:
            output = f"{note}\n{output}"
        return output if output.strip() else "(no output)"

    def _close(self) -> None:
        """Stop the interpreter (and all it started) and delete its working directory."""
        interpreter, self._interpreter = self._interpreter, None
        if interpreter is not None:
            interpreter.close()

    def __del__(self):
        try:
            self._close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    def _wait_for_reply(self) -> bool | None:
        """True once the interpreter answered, False when it ended first, None at the time limit."""
        stdout = self._interpreter.process.stdout
        deadline = time.monotonic() + self._timeout_s
        with selectors.DefaultSelector() as selector:
            selector.register(stdout, selectors.EVENT_READ)
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                if not selector.select(timeout=left):
                    continue
                return bool(stdout.readline())
