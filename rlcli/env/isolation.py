"""The processes a tool call runs in: a deadline, a memory cap, and nothing left behind (``ToolRunner`` uses it).

- ``run_forked(jobs, timeout_s, memory_bytes)``: each job in a forked child, all at once. The child makes itself a
  subreaper, so whatever the job starts stays below it (``setsid`` and double forks included); at its answer or its
  deadline that whole tree is stopped and killed (``kill_process_tree``). Its address space may grow by
  ``memory_bytes`` (``RLIMIT_AS``); its stdout and stderr are a pipe that is counted and whose tail is kept; stdin is
  ``/dev/null``.
- ``run_inline(job, timeout_s)``: in this process; ``SIGALRM`` interrupts Python code on the main thread at the
  deadline (``InlineTimeout``), and ``os._exit`` from the job raises ``ExitCalled`` instead of ending the process.

Why fork, what each mode contains and what it does not: docs/environments.md, "How tool calls are contained".
"""

from __future__ import annotations

import ctypes
import multiprocessing
import multiprocessing.connection
import os
import resource
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple

PRINTED_TAIL_CHARS = 500


class Ran(NamedTuple):
    """How one job went. ``answer``: what it returned, None when it never answered (it ran past its deadline, or
    its process died: ``exitcode``). ``seconds``: the job's own time when it answered, else the time waited.
    ``printed_bytes`` / ``printed``: what a forked job wrote to stdout and stderr, and the last
    ``PRINTED_TAIL_CHARS`` characters of it."""

    answer: Any
    seconds: float
    timed_out: bool = False
    exitcode: int | None = None
    printed_bytes: int = 0
    printed: str = ""

    @property
    def death(self) -> str:
        """How a forked job's process ended: ``killed by signal SIGSEGV``, ``exit code 3``."""
        code = self.exitcode
        return f"killed by signal {_signal_name(-code)}" if code is not None and code < 0 else f"exit code {code}"


class InlineTimeout(BaseException):
    """Raised into an inline job at its deadline; a BaseException so that a job's ``except Exception`` lets it
    through."""


class ExitCalled(BaseException):
    """Raised instead of ending this process when an inline job calls ``os._exit``."""

    def __init__(self, code):
        super().__init__(code)
        self.code = code


# ---------------------------------------------------------------------------------------------------------------
# inline


def run_inline(job: Callable[[], Any], timeout_s: float) -> Ran:
    """Run ``job()`` in this process, interrupted at ``timeout_s`` where ``SIGALRM`` can reach it."""
    start = time.monotonic()
    alarm = _Alarm(timeout_s)
    try:
        with _ExitGuard(), alarm:
            answer = job()
    except InlineTimeout:
        alarm.disarm()  # the alarm may have fired inside __exit__, before it restored the old handler
        return Ran(None, time.monotonic() - start, timed_out=True)
    return Ran(answer, time.monotonic() - start)


class _Alarm:
    """Raise ``InlineTimeout`` in the main thread after ``timeout_s``, then every second until disarmed. Does
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
            raise InlineTimeout


class _ExitGuard:
    """While an inline job runs, ``os._exit`` called from its thread raises ``ExitCalled`` instead of ending the
    trainer. Other threads, and processes forked meanwhile (whose ``multiprocessing`` ends with ``os._exit``), get
    the real one."""

    def __enter__(self):
        self.real_exit = os._exit
        owner = (os.getpid(), threading.get_ident())
        real_exit = self.real_exit

        def guarded_exit(code):
            if (os.getpid(), threading.get_ident()) == owner:
                raise ExitCalled(code)
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


def run_forked(jobs: Sequence[Callable[[], Any]], timeout_s: float, memory_bytes: int) -> list[Ran]:
    """Start every job in its own process, wait for all of them at once (draining their prints), kill what is left.
    A job's answer comes back pickled through a pipe."""
    for stream in (sys.stdout, sys.stderr):  # else the children would inherit, and print, the parent's buffers
        try:
            stream.flush()
        except (AttributeError, OSError, ValueError):
            pass
    calls: list[_ForkedCall] = []
    try:
        for job in jobs:
            calls.append(_ForkedCall(job, memory_bytes))
        _wait_all(calls, timeout_s)
    finally:
        for call in calls:
            call.close()
    return [call.ran() for call in calls]


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
    """One job in a forked process (``_call_main``), watched through its result pipe, its stdout + stderr pipe
    and a pidfd (readable once the process has ended, whatever its children still hold open)."""

    _context = multiprocessing.get_context("fork") if "fork" in multiprocessing.get_all_start_methods() else None

    def __init__(self, job: Callable[[], Any], memory_bytes: int):
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
            args=(job, result_sender, print_sender, memory_bytes, os.getpid()))
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

    def ran(self) -> Ran:
        tail = self.printed_tail.decode("utf-8", errors="replace")[-PRINTED_TAIL_CHARS:]
        printed = {"printed_bytes": self.printed_bytes, "printed": tail}
        if self.result is not None:
            answer, seconds, _ = self.result
            return Ran(answer, seconds, **printed)
        seconds = (self.ended or time.monotonic()) - self.started
        return Ran(None, seconds, timed_out=not self.done, exitcode=self.exitcode, **printed)


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return str(number)


def _call_main(job: Callable[[], Any], result_sender, print_fd: int, memory_bytes: int, trainer_pid: int) -> None:
    """The forked child: contain the job (see the module docstring), run it, send ``(answer, seconds,
    nothing_left)``; then exit, or, when processes the job started are still alive, wait for the trainer to kill
    the tree. Always ends with ``os._exit``."""
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
        answer = job()
        seconds = time.monotonic() - start
        alone = _no_children_left()
        result_sender.send((answer, seconds, alone))
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

