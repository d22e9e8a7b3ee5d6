"""Run tools (plain Python callables, ``str -> str``) so that nothing a tool does can crash or hang a run.

``ToolRunner`` calls a tool with a time limit and turns every outcome into text for the model plus a counted
``ToolOutcome``:

==================  =====================================================================================
ok                  the tool returned a string
error               it raised, ran out of memory, exited or died; the text is ``Error: <ExceptionType>: <message>``
                    (message cut short)
timeout             it ran past ``timeout_s`` and was stopped
unknown_tool        the model named a tool that does not exist
bad_output          it returned something other than ``str``: the value is converted (JSON for plain data,
                    ``str()`` otherwise, ``""`` for None) and a ``[note: ...]`` line tells the model so
malformed_call      the protocol could not read the call (bad JSON, no name, unclosed tag)
truncated           it returned a string longer than ``max_output_tokens`` tokens: cut, with a marker line
==================  =====================================================================================

Output is cut in characters before it is tokenised (at ``max(4096, 32 * max_output_tokens)`` characters, more
than that many tokens of any tokenizer's text), so a tool that returns 50 MB costs what 4 kB costs.

**Isolation ``fork``** (the default): each call runs in a forked child process. What it contains:

- *time*: at ``timeout_s`` the call and everything it started are killed.
- *memory*: the call may add at most ``memory_mb`` of address space to what the forked trainer already had
  (``RLIMIT_AS``, soft and hard, in the process that runs the tool); past it allocations fail with
  ``MemoryError`` and the call is an ``error``. Address space, not resident memory: a 4 GB ``bytearray`` fails
  although the kernel would have handed its pages out lazily. Memory the trainer had freed but still maps (free
  blocks of its heap) is already counted as its own, so a call can use that much on top: the cap stops a runaway
  allocation, it is not an exact budget. Up to ``max_parallel`` calls run at once.
- *prints*: file descriptors 1 and 2 of the call (and of every process it starts) are a pipe the trainer reads
  while it waits: nothing reaches the terminal, the bytes are counted (``ToolResult.printed_bytes``,
  ``ToolRunner.printed_bytes``) and the last ``PRINTED_TAIL_CHARS`` characters kept (``ToolResult.printed``).
  The model never sees them, except that a tool process that dies gets the last line it printed added to its
  error text (that is where a crash says why). stdin is ``/dev/null``.
- *processes*: the forked child makes itself a child subreaper (``prctl(PR_SET_CHILD_SUBREAPER)``) before it runs
  the tool. An orphan is re-parented to its nearest living subreaper ancestor, so whatever the call starts stays
  below the child even when it calls ``setsid`` or double-forks. When the call ends (answer or deadline) the trainer
  stops that whole subtree (``SIGSTOP`` on each process found, walking again until a walk finds nothing new: a
  process with a stop pending cannot complete a ``fork``), then ``SIGKILL``s all of it (``kill_process_tree``).
  Unprivileged, no cgroups; the walk reads ``/proc/<pid>/task/<tid>/children`` where the kernel has it, else the
  parent pid of every ``/proc/<pid>/stat``. When the tool returns with no child left (the usual case) the child
  says so, exits, and the walk is skipped. A tool that calls ``os._exit`` kills its descendants first (the child's
  ``os._exit`` is wrapped). Out of reach: descendants of a child that dies abruptly (a crash in C code, a signal)
  are re-parented above the trainer; work handed to another service (``systemd-run``, ``at``, a daemon over a
  socket). A second fork per call, to keep a subreaper that runs no tool code, would close the first gap at about
  twice the cost per call.
- *not contained*: the call runs with the trainer's user, files, network and environment variables. Tools are
  the recipe author's code; model-written code belongs in the built-in ``python`` tool, which sandboxes it.

Why fork and not the alternatives:

- a thread cannot be stopped: a ``while True`` tool would keep burning a core (and the GIL) for the rest of the run;
- a persistent ``spawn`` worker pool needs every tool, and every closure it captured, to be picklable and
  re-importable in a fresh interpreter (no torch import cost, but tools loaded from ``file.py:fn`` and factory
  closures often are not), and a hung worker must be replaced anyway;
- ``fork`` copies the parent copy-on-write in a few milliseconds, inherits the tools as they are (closures, a
  search index built at start-up), and only the result, already a string, crosses back through a pipe. The child
  never touches torch or CUDA, so forking a process that has them loaded is safe on Linux.

The price: a tool's changes to its own global state do not survive the call (each call starts from the parent's
state).

**Isolation ``inline``**: calls run in the trainer's process, one after another, for tools that must keep state
or are too fast to pay for a fork. Contained: *time*, on the main thread only: a ``SIGALRM`` timer interrupts the
call at ``timeout_s`` (and every second after, should the tool swallow it), which ends Python loops, sleeps and
blocking system calls as ``timeout``; a call stuck inside C code (a C extension, a pathological regex) or running
on another thread cannot be interrupted and holds the run until it returns (no timer is set when SIGALRM is
already in use). *Exits*: ``sys.exit`` and ``os._exit`` called by the tool are answered as errors. Not contained:
memory, prints, crashes in C code, signals, an exit through ``ctypes``: they end the trainer, which cannot
report them (no handler runs after ``os._exit`` or ``SIGKILL``).
"""

from __future__ import annotations

import ctypes
import importlib
import importlib.util
import json
import multiprocessing
import multiprocessing.connection
import os
import resource
import signal
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from enum import Enum
from pathlib import Path
from typing import Any, Literal, NamedTuple

from rlcli.config.plugins import load_module_file
from rlcli.env.protocols import Malformed, ToolCall

Tool = Callable[..., str]

ERROR_MESSAGE_CHARS = 200
PRINTED_TAIL_CHARS = 500
DEFAULT_MEMORY_MB = 1024


class ToolOutcome(str, Enum):
    OK = "ok"
    ERROR = "error"
    TIMEOUT = "timeout"
    UNKNOWN_TOOL = "unknown_tool"
    BAD_OUTPUT = "bad_output"
    MALFORMED_CALL = "malformed_call"
    TRUNCATED = "truncated"


@dataclass(frozen=True)
class ToolResult:
    """The text the model gets back (before the protocol wraps it) and how the call went."""

    output: str
    status: ToolOutcome
    seconds: float = 0.0
    printed_bytes: int = 0
    """Bytes the call wrote to stdout and stderr (fork isolation; they never reach the terminal)."""
    printed: str = ""
    """The last ``PRINTED_TAIL_CHARS`` characters of them."""


def error_text(exc: BaseException) -> str:
    """``Error: <ExceptionType>: <first line of the message, cut short>``."""
    message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    if len(message) > ERROR_MESSAGE_CHARS:
        message = message[:ERROR_MESSAGE_CHARS] + "..."
    return f"Error: {type(exc).__name__}: {message}" if message else f"Error: {type(exc).__name__}"


class ToolRunner:
    """Calls tools by name with limits (see the module docstring); keeps ``counts`` of every ``ToolOutcome`` (as
    strings) and ``printed_bytes`` (all calls together) for logging.

    Args:
        tools: name -> callable. A string argument is passed positionally; a dict (JSON protocol) as keywords.
        timeout_s: wall-clock limit per call (inline: Python code on the main thread only).
        max_output_tokens: outputs longer than this many tokens are cut and marked ``truncated``. Counted with
            ``tokenizer`` when given, else as 4 characters per token.
        tokenizer: the policy's tokenizer, for the token count above.
        isolation: ``"fork"`` (default) or ``"inline"`` (in-process), see the module docstring.
        max_parallel: how many forked calls run at once in ``run_many``.
        memory_mb: address space a forked call may add to the trainer's (fork isolation only).
    """

    def __init__(
        self,
        tools: Mapping[str, Tool],
        *,
        timeout_s: float = 10.0,
        max_output_tokens: int = 64,
        tokenizer=None,
        isolation: Literal["fork", "inline"] = "fork",
        max_parallel: int = 16,
        memory_mb: int = DEFAULT_MEMORY_MB,
    ):
        if isolation not in ("fork", "inline"):
            raise ValueError(f"isolation must be 'fork' or 'inline', got {isolation!r}")
        if isolation == "fork" and "fork" not in multiprocessing.get_all_start_methods():
            raise ValueError("isolation='fork' needs a platform with fork (Linux); use isolation='inline'")
        if memory_mb <= 0:
            raise ValueError(f"memory_mb must be positive, got {memory_mb}")
        for name, fn in tools.items():
            if not callable(fn):
                raise ValueError(f"tool {name!r} is not callable: {fn!r}")
        self.tools = dict(tools)
        self.timeout_s = timeout_s
        self.max_output_tokens = max_output_tokens
        self.tokenizer = tokenizer
        self.isolation = isolation
        self.max_parallel = max(1, max_parallel)
        self.memory_mb = memory_mb
        # Output is cut to this many characters before anything else (the forked child sends no more, and no more is
        # tokenised): 32 characters per token is more than any tokenizer's tokens hold on ordinary text.
        self.max_output_chars = max(4096, 32 * max_output_tokens)
        self.counts: Counter[str] = Counter()
        self.printed_bytes = 0

    def run(self, name: str, arguments: str | dict[str, Any]) -> ToolResult:
        return self.run_many([ToolCall(name, arguments)])[0]

    def malformed(self, reason: str) -> ToolResult:
        return self._count(ToolResult(f"Error: malformed tool call: {reason}", ToolOutcome.MALFORMED_CALL))

    def run_many(self, calls: Sequence[ToolCall | Malformed]) -> list[ToolResult]:
        """Run calls (forked ones concurrently, up to ``max_parallel`` at a time); results in the same order."""
        results: list[ToolResult | None] = [None] * len(calls)
        pending: list[tuple[int, Tool, ToolCall]] = []
        for i, call in enumerate(calls):
            if isinstance(call, Malformed):
                results[i] = self.malformed(call.reason)
            elif call.name not in self.tools:
                available = ", ".join(sorted(self.tools)) or "none"
                results[i] = self._count(ToolResult(
                    f"Error: unknown tool {call.name!r}; available tools: {available}", ToolOutcome.UNKNOWN_TOOL))
            else:
                pending.append((i, self.tools[call.name], call))
        for start in range(0, len(pending), self.max_parallel):
            chunk = pending[start:start + self.max_parallel]
            if self.isolation == "inline":
                raw = [_call_inline(fn, call.arguments, self.timeout_s) for _, fn, call in chunk]
            else:
                raw = _run_forked([(fn, call.arguments) for _, fn, call in chunk], self.timeout_s,
                                  self.max_output_chars, self.memory_mb)
            for (i, _, _), r in zip(chunk, raw):
                result = self._truncate(ToolResult(r.text, r.status, r.seconds), r.cut_chars)
                if r.note:  # after truncation, so the model always sees it
                    output = f"{result.output}\n{r.note}" if result.output else r.note
                    result = ToolResult(output, result.status, r.seconds)
                self.printed_bytes += r.printed_bytes
                results[i] = self._count(replace(result, printed_bytes=r.printed_bytes, printed=r.printed))
        return results  # type: ignore[return-value]

    def _truncate(self, result: ToolResult, cut_chars: int = 0) -> ToolResult:
        """Cut to ``max_output_tokens``; ``cut_chars``: characters the child already dropped before sending."""
        # Only what the tool itself returned is capped; our own error texts are short by construction.
        if result.status not in (ToolOutcome.OK, ToolOutcome.BAD_OUTPUT):
            return result
        text, cap = result.output, self.max_output_tokens
        if len(text) > self.max_output_chars:  # inline outputs arrive whole: never tokenise megabytes
            cut_chars += len(text) - self.max_output_chars
            text = text[: self.max_output_chars]
        if self.tokenizer is not None:
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            if len(ids) <= cap and not cut_chars:
                return result
            kept, dropped = self.tokenizer.decode(ids[:cap]), f"{max(0, len(ids) - cap)} tokens"
        else:
            if len(text) <= 4 * cap and not cut_chars:
                return result
            kept, dropped = text[: 4 * cap], f"{max(0, len(text) - 4 * cap)} characters"
        if cut_chars:
            dropped += f" and {cut_chars} more characters"
        status = ToolOutcome.TRUNCATED if result.status is ToolOutcome.OK else result.status
        return ToolResult(f"{kept}\n[truncated: {dropped} cut]", status, result.seconds)

    def _count(self, result: ToolResult) -> ToolResult:
        self.counts[result.status.value] += 1
        return result


class _Raw(NamedTuple):
    """A call's result before truncation. ``note`` explains a converted non-string result; ``cut_chars`` counts the
    characters a forked child dropped so as not to push megabytes through the pipe; ``printed*``: what the call
    wrote to stdout and stderr."""

    status: ToolOutcome
    text: str
    note: str
    seconds: float
    cut_chars: int = 0
    printed_bytes: int = 0
    printed: str = ""


class _InlineTimeout(BaseException):
    """Raised into an inline tool at its deadline; a BaseException so that a tool's ``except Exception`` lets it
    through."""


class _ToolExited(BaseException):
    def __init__(self, code):
        super().__init__(code)
        self.code = code


def _invoke(fn: Tool, arguments: str | dict[str, Any]) -> tuple[ToolOutcome, str, str]:
    """-> (status, text, note); the note explains a conversion of a non-string result."""
    try:
        value = fn(**arguments) if isinstance(arguments, dict) else fn(arguments)
        return _coerce(value)
    except _InlineTimeout:
        raise
    except _ToolExited as exc:
        text = (f"Error: the tool called os._exit({exc.code}); it runs inside the trainer (isolation inline), so it "
                "was stopped instead")
        return ToolOutcome.ERROR, text, ""
    except BaseException as exc:  # noqa: BLE001 - SystemExit and KeyboardInterrupt from a tool are errors too
        return ToolOutcome.ERROR, error_text(exc), ""


def _coerce(value: Any) -> tuple[ToolOutcome, str, str]:
    if isinstance(value, str):
        return ToolOutcome.OK, value, ""
    type_name = type(value).__name__
    if value is None:
        return ToolOutcome.BAD_OUTPUT, "", "[note: the tool returned None, expected str]"
    if isinstance(value, bytes):
        text = value.decode("utf-8", errors="replace")
    elif isinstance(value, (dict, list, tuple, int, float, bool)):
        try:
            text = json.dumps(value, ensure_ascii=False)
        except (TypeError, ValueError):
            text = str(value)
    else:
        text = str(value)
    return ToolOutcome.BAD_OUTPUT, text, f"[note: the tool returned {type_name}, expected str; converted]"


def _timeout_text(timeout_s: float) -> str:
    return f"Error: TimeoutError: the tool did not finish within {timeout_s:g} s"


# ---------------------------------------------------------------------------------------------------------------
# inline


def _call_inline(fn: Tool, arguments, timeout_s: float) -> _Raw:
    start = time.monotonic()
    alarm = _Alarm(timeout_s)
    try:
        with _ExitGuard(), alarm:
            status, text, note = _invoke(fn, arguments)
    except _InlineTimeout:
        alarm.disarm()  # the alarm may have fired inside __exit__, before it restored the old handler
        status, text, note = ToolOutcome.TIMEOUT, _timeout_text(timeout_s), ""
    return _Raw(status, text, note, time.monotonic() - start)


class _Alarm:
    """Raise ``_InlineTimeout`` in the main thread after ``timeout_s``, then every second until disarmed. Does
    nothing off the main thread (signals are only delivered there) or when SIGALRM already has another user."""

    def __init__(self, timeout_s: float):
        self.timeout_s = timeout_s
        self.armed = False
        self.previous_handler = None

    def __enter__(self):
        if (threading.current_thread() is threading.main_thread() and hasattr(signal, "setitimer")
                and signal.getsignal(signal.SIGALRM) in (signal.SIG_DFL, signal.SIG_IGN)
                and signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)):
            self.previous_handler = signal.signal(signal.SIGALRM, self._on_alarm)
            self.armed = True
            signal.setitimer(signal.ITIMER_REAL, self.timeout_s, 1.0)
        return self

    def __exit__(self, *exc_info) -> None:
        self.disarm()

    def disarm(self) -> None:
        if self.armed:
            self.armed = False  # first: from here on a late alarm is ignored
            signal.setitimer(signal.ITIMER_REAL, 0.0)
            signal.signal(signal.SIGALRM, self.previous_handler)

    def _on_alarm(self, signum, frame) -> None:
        if self.armed:
            raise _InlineTimeout


class _ExitGuard:
    """While an inline tool runs, ``os._exit`` called from its thread raises ``_ToolExited`` instead of ending the
    trainer. Other threads, and processes forked meanwhile (whose ``multiprocessing`` ends with ``os._exit``), get
    the real one."""

    def __enter__(self):
        self.real_exit = os._exit
        owner = (os.getpid(), threading.get_ident())
        real_exit = self.real_exit

        def guarded_exit(code):
            if (os.getpid(), threading.get_ident()) == owner:
                raise _ToolExited(code)
            real_exit(code)

        os._exit = guarded_exit
        return self

    def __exit__(self, *exc_info) -> None:
        os._exit = self.real_exit


# ---------------------------------------------------------------------------------------------------------------
# fork

_PR_SET_PDEATHSIG = 1
_PR_SET_CHILD_SUBREAPER = 36


def _prctl(option: int, value: int) -> None:
    ctypes.CDLL(None).prctl(option, value, 0, 0, 0)


def _run_forked(jobs: Sequence[tuple[Tool, Any]], timeout_s: float, max_chars: int, memory_mb: int) -> list[_Raw]:
    """Start every job in its own process, wait for all of them at once (draining their prints), kill what is left."""
    for stream in (sys.stdout, sys.stderr):  # else the children would inherit, and print, the parent's buffers
        try:
            stream.flush()
        except (AttributeError, OSError, ValueError):
            pass
    calls: list[_ForkedCall] = []
    try:
        for fn, arguments in jobs:
            calls.append(_ForkedCall(fn, arguments, max_chars, memory_mb * 2**20))
        _wait_all(calls, timeout_s)
    finally:
        for call in calls:
            call.close()
    return [call.raw(timeout_s) for call in calls]


def _wait_all(calls: Sequence[_ForkedCall], timeout_s: float) -> None:
    """Serve every call's pipes until each has answered, ended or passed its deadline. All are watched together: a
    call whose print pipe is full would otherwise stall while another call is waited for."""
    while True:
        now = time.monotonic()
        waiting = [c for c in calls if not c.done and now < c.started + timeout_s]
        if not waiting:
            return
        owners = {}
        for call in waiting:
            for handle in call.handles():
                owners[handle if isinstance(handle, int) else handle.fileno()] = (call, handle)
        deadline = min(c.started for c in waiting) + timeout_s
        ready = multiprocessing.connection.wait([h for _, h in owners.values()], timeout=max(0.0, deadline - now))
        for handle in ready:
            call, handle = owners[handle if isinstance(handle, int) else handle.fileno()]
            call.serve(handle)


class _ForkedCall:
    """One tool call in a forked process (``_call_main``), watched through its result pipe, its stdout + stderr pipe
    and a pidfd (readable once the process has ended, whatever its children still hold open)."""

    _context = multiprocessing.get_context("fork") if "fork" in multiprocessing.get_all_start_methods() else None

    def __init__(self, fn: Tool, arguments, max_chars: int, memory_bytes: int):
        self.started = time.monotonic()
        self.result_pipe, result_sender = self._context.Pipe(duplex=False)
        self.print_fd, print_sender = os.pipe()
        self.result: tuple | None = None
        self.done = False
        self.ended = None
        self.printed_bytes = 0
        self.printed_tail = bytearray()
        self.process = self._context.Process(
            target=_call_main,
            args=(fn, arguments, result_sender, print_sender, max_chars, memory_bytes, os.getpid()))
        try:
            self.process.start()
        finally:
            # ours must go, so that only the call's processes hold the writing ends, and before the next call forks,
            # so that it does not inherit them
            result_sender.close()
            os.close(print_sender)
        os.set_blocking(self.print_fd, False)
        try:
            self.exit_handle = os.pidfd_open(self.process.pid)  # the child cannot be reaped yet: nobody waited
        except (AttributeError, OSError):  # Linux < 5.3: the sentinel, which the child's own children may hold open
            self.exit_handle = self.process.sentinel
        self._open = [self.result_pipe, self.print_fd, self.exit_handle]

    def handles(self) -> list:
        return list(self._open)

    def serve(self, handle) -> None:
        if handle == self.print_fd:  # ints (fds) compare by value; Connections by identity
            self._drain()
            return
        if handle == self.exit_handle:
            self._open.remove(handle)
            if self.result_pipe in self._open and self.result_pipe.poll(0):
                self._receive()  # sent just before it ended
        else:
            self._receive()
        self.done, self.ended = True, time.monotonic()

    def _receive(self) -> None:
        try:
            self.result = self.result_pipe.recv()
        except Exception:  # noqa: BLE001 - EOF, or a half-written message from a process killed mid-send
            pass
        self._open.remove(self.result_pipe)

    def _drain(self) -> None:
        while self.print_fd in self._open:
            try:
                chunk = os.read(self.print_fd, 65536)
            except BlockingIOError:
                return
            if not chunk:
                self._open.remove(self.print_fd)
                return
            self.printed_bytes += len(chunk)
            self.printed_tail = (self.printed_tail + chunk)[-4 * PRINTED_TAIL_CHARS:]

    def close(self) -> None:
        """Kill the process and everything below it (unless it said nothing is left and is exiting by itself), then
        collect the last prints and close the pipes."""
        if self.result is not None and self.result[-1]:  # nothing else left: it exits right after sending
            self.process.join(timeout=1.0)
        if self.process.exitcode is None:
            kill_process_tree(self.process.pid)
            self.process.join(timeout=5.0)
        self._drain()
        self.result_pipe.close()
        os.close(self.print_fd)
        if isinstance(self.exit_handle, int) and self.exit_handle != self.process.sentinel:
            os.close(self.exit_handle)
        self._open = []
        self.exitcode = self.process.exitcode
        if self.exitcode is not None:
            self.process.close()

    def raw(self, timeout_s: float) -> _Raw:
        tail = self.printed_tail.decode("utf-8", errors="replace")[-PRINTED_TAIL_CHARS:]
        printed = {"printed_bytes": self.printed_bytes, "printed": tail}
        seconds = (self.ended or time.monotonic()) - self.started
        if self.result is not None:
            status, text, note, tool_seconds, cut, _ = self.result
            return _Raw(ToolOutcome(status), text, note, tool_seconds, cut, **printed)
        if not self.done:
            return _Raw(ToolOutcome.TIMEOUT, _timeout_text(timeout_s), "", seconds, **printed)
        code = self.exitcode
        how = f"killed by signal {_signal_name(-code)}" if code is not None and code < 0 else f"exit code {code}"
        text = f"Error: the tool process died ({how})"
        last_line = next((line.strip() for line in reversed(tail.splitlines()) if line.strip()), "")
        if last_line:
            text += f"; its last printed line: {last_line[:ERROR_MESSAGE_CHARS]}"
        return _Raw(ToolOutcome.ERROR, text, "", seconds, **printed)


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return str(number)


def _call_main(fn: Tool, arguments, result_sender, print_fd: int, max_chars: int, memory_bytes: int,
               trainer_pid: int) -> None:
    """The forked child: contain the call (see the module docstring), run the tool, send
    ``(status, text, note, seconds, cut_chars, nothing_left)``; then exit, or, when processes the tool started are
    still alive, wait for the trainer to kill the tree. Always ends with ``os._exit``."""
    real_exit = os._exit
    code = 1
    try:
        os.setsid()  # off the terminal: Ctrl-C reaches the trainer, not the call
        _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != trainer_pid:  # the trainer died before the line above
            real_exit(1)
        _prctl(_PR_SET_CHILD_SUBREAPER, 1)  # orphans of the call come here, not to init
        stdin = os.open(os.devnull, os.O_RDONLY)
        os.dup2(stdin, 0)
        os.dup2(print_fd, 1)
        os.dup2(print_fd, 2)
        os.close(stdin)
        os.close(print_fd)
        # fresh objects on the new descriptors; the old ones hold the parent's unflushed text, never written here
        sys.stdout = open(1, "w", encoding="utf-8", errors="backslashreplace", buffering=1, closefd=False)
        sys.stderr = open(2, "w", encoding="utf-8", errors="backslashreplace", buffering=1, closefd=False)
        _limit_address_space(memory_bytes)
        os._exit = _exit_killing_descendants(real_exit)  # a tool's own os._exit must not orphan what it started
        start = time.monotonic()
        status, text, note = _invoke(fn, arguments)
        seconds = time.monotonic() - start
        alone = _no_children_left()
        result_sender.send((status.value, text[:max_chars], note, seconds, max(0, len(text) - max_chars), alone))
        code = 0
        if not alone:
            while True:  # keep the orphans' subreaper alive until the trainer has stopped and killed the tree
                signal.pause()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except BaseException:  # noqa: BLE001 - exiting regardless
                pass
        real_exit(code)


def _exit_killing_descendants(real_exit: Callable[[int], None]) -> Callable[[int], None]:
    """``os._exit`` for the call's process: kill what it started first (its orphans would escape the subreaper).
    Processes the tool forks inherit the wrapper but exit for real: a double fork must leave its daemon behind."""
    owner = os.getpid()

    def exit_(code: int) -> None:
        if os.getpid() == owner:
            kill_process_tree(owner, spare_root=True)
        real_exit(code)

    return exit_


def _limit_address_space(extra_bytes: int) -> None:
    # Relative to what the forked trainer already maps (a CUDA process maps tens of GB it never touches): an absolute
    # limit below that would make every allocation fail.
    with open("/proc/self/status") as f:
        current = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
    limit = current + extra_bytes
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))  # hard too: the tool cannot raise it back


def _no_children_left() -> bool:
    """Reap exited children; True when none is left (then no process of the call is alive: orphans come here)."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return True
        if pid == 0:
            return False


# ---------------------------------------------------------------------------------------------------------------
# process trees


def kill_process_tree(root: int, *, spare_root: bool = False) -> None:
    """SIGKILL ``root`` (unless ``spare_root``: a process cleaning up below itself) and every process below it.

    Everything is stopped first: ``SIGSTOP`` to each process found, walking the tree again until a walk finds
    nothing new. The kernel aborts a ``fork`` while a stop is pending, so once a process has been sent ``SIGSTOP``
    the next walk sees all of its children, and the last walk sees the whole tree. Stopped parents do not reap, so no
    pid of the set is freed (and reused) before the ``SIGKILL``. ``root`` itself must not be reaped yet by the
    caller.
    """
    tree = set()
    if not spare_root:
        tree.add(root)
        _send(root, signal.SIGSTOP)
    while True:
        new = _descendants(root) - tree
        if not new:
            break
        for pid in new:
            _send(pid, signal.SIGSTOP)
        tree |= new
    for pid in tree:
        _send(pid, signal.SIGKILL)


def _send(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _descendants(root: int) -> set[int]:
    children = _children_lister()
    found, frontier = set(), [root]
    while frontier:
        for kid in children(frontier.pop()):
            if kid not in found:
                found.add(kid)
                frontier.append(kid)
    return found


def _children_lister() -> Callable[[int], Iterable[int]]:
    """pid -> its children: from ``/proc/<pid>/task/*/children`` (CONFIG_PROC_CHILDREN), else from one scan of the
    parent pids in ``/proc/*/stat``."""
    if _HAS_CHILDREN_FILES:
        return _children_from_task_files
    by_parent: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                with open(f"/proc/{entry.name}/stat", "rb") as f:
                    parent = int(f.read().rsplit(b")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue  # gone meanwhile
            by_parent.setdefault(parent, []).append(int(entry.name))
    return lambda pid: by_parent.get(pid, ())


def _children_from_task_files(pid: int) -> list[int]:
    kids = []
    try:
        for task in os.scandir(f"/proc/{pid}/task"):
            with open(f"{task.path}/children") as f:
                kids += [int(k) for k in f.read().split()]
    except OSError:
        pass
    return kids


_HAS_CHILDREN_FILES = os.path.exists(f"/proc/{os.getpid()}/task/{os.getpid()}/children")


# ---------------------------------------------------------------------------------------------------------------
# loading


def load_tool(spec: str, **options: Any) -> Tool:
    """Resolve a tool from a recipe string.

    ``spec`` is a built-in name (``calculator``, ``python``, ``search``: ``options`` go to its factory, e.g.
    ``load_tool("search", corpus_path="wiki.txt")``), ``path/to/file.py:fn`` or ``package.module:fn``. With options, a
    non-built-in target is treated as a factory and called with them. Raises ``ValueError`` naming the spec.
    """
    from rlcli.env.builtin_tools import BUILTIN_TOOLS

    if spec in BUILTIN_TOOLS:
        try:
            return BUILTIN_TOOLS[spec](**options)
        except TypeError as err:
            raise ValueError(f"tool {spec!r}: bad options {sorted(options)}: {err}") from None
    if ":" not in spec:
        raise ValueError(
            f"tool {spec!r}: not a built-in tool ({', '.join(sorted(BUILTIN_TOOLS))}) and not of the form "
            "'path/to/file.py:function' or 'package.module:function'"
        )
    target, attr = spec.rsplit(":", 1)
    if not target or not attr:
        raise ValueError(f"tool {spec!r}: expected 'path/to/file.py:function' or 'package.module:function'")
    obj = _import_target(spec, target)
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ValueError(f"tool {spec!r}: {target!r} has no attribute {attr!r}") from None
    if options:
        try:
            obj = obj(**options)
        except Exception as err:  # noqa: BLE001 - any factory failure is a configuration error
            raise ValueError(f"tool {spec!r}: calling it with options {sorted(options)} failed: {error_text(err)}") \
                from None
    if not callable(obj):
        raise ValueError(f"tool {spec!r} is not callable (got {type(obj).__name__})")
    return obj


def _import_target(spec: str, target: str):
    if target.endswith(".py") or "/" in target or os.sep in target:
        path = Path(target)
        if not path.is_file():
            raise ValueError(f"tool {spec!r}: file {target!r} does not exist")
        try:
            module = load_module_file(path)
        except Exception as err:  # noqa: BLE001
            raise ValueError(f"tool {spec!r}: importing {target!r} failed: {error_text(err)}") from None
        if module is None:
            raise ValueError(f"tool {spec!r}: cannot import {target!r} as a Python file")
        return module
    try:
        return importlib.import_module(target)
    except Exception as err:  # noqa: BLE001
        raise ValueError(f"tool {spec!r}: cannot import module {target!r}: {error_text(err)}") from None
