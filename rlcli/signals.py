"""Stopping a run from outside: Ctrl-C, ``kill`` / ``scancel`` / a SLURM time limit or preemption, and SLURM's
warning before the limit.

SIGINT stops at once; SIGTERM and SIGUSR1 wait, once the training loop has begun, for the end of the step in progress,
where the run writes a checkpoint and stops (:class:`Stopped`). The command exits with 128 + the signal's number.
The handlers are installed for a command's length (:func:`handled`); the step loop asks :func:`requested` at each
step's end (``trainers.run.Run.checkpoint``); a thread ends a process whose main thread is blocked past
``UNHANDLED_S``. In detail: docs/internals.md, "rlcli/signals.py".
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import threading
import time
from collections.abc import Iterator

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
UNHANDLED_S = 3.0


class Stopped(BaseException):
    """The run stopped on ``signum``; ``step`` and ``checkpoint``: where, when it wrote one first. A BaseException,
    like KeyboardInterrupt, so that no ``except Exception`` on the way takes it for a failure of its own."""

    def __init__(self, signum: int, step: int | None = None, checkpoint=None):
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        super().__init__(f"stopped by {name(signum)}")


def name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


class _State:
    installed = False
    deferring = False  # in a step loop: a stop signal waits for the step's end
    requested: int | None = None
    shielded = 0  # cleanup in progress (the run is ending anyway): signals do not cut it short
    handled = 0  # stop signals the main thread has handled (the listener compares)


_state = _State()


def _on_stop(signum, frame) -> None:
    _state.handled += 1
    if _state.shielded or _state.deferring:
        if _state.requested is None:
            _state.requested = signum
            if _state.deferring and not _state.shielded:
                from rlcli.launch import is_main_process

                if is_main_process():
                    from rlcli.logging import console

                    console.print(f"[yellow]{name(signum)}[/]: stopping at the end of this step, after a checkpoint "
                                  "(Ctrl-C stops at once, without one)")
        return
    raise Stopped(signum)


def _on_interrupt(signum, frame) -> None:
    if not _state.shielded:
        raise KeyboardInterrupt


@contextlib.contextmanager
def handled() -> Iterator[None]:
    """The handlers of this module for the length of a command (the process's own are restored after). A no-op
    outside the main thread, where Python cannot install handlers."""
    if threading.current_thread() is not threading.main_thread() or _state.installed:
        yield
        return
    previous = {s: signal.getsignal(s) for s in (*STOP_SIGNALS, signal.SIGINT)}
    _state.installed, _state.requested, _state.deferring = True, None, False
    read, write = os.pipe()
    os.set_blocking(write, False)
    previous_fd = signal.set_wakeup_fd(write, warn_on_full_buffer=False)
    listener = threading.Thread(target=_listen, args=(read,), name="rlcli-signals", daemon=True)
    try:
        for s in STOP_SIGNALS:
            signal.signal(s, _on_stop)
        signal.signal(signal.SIGINT, _on_interrupt)
        listener.start()
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        signal.set_wakeup_fd(previous_fd)
        os.close(write)  # the listener reads the end of the pipe, and ends
        _state.installed, _state.deferring, _state.requested = False, False, None


def _listen(read: int) -> None:
    """The thread that hears each signal as it arrives, and ends a process whose main thread cannot take a stop
    that should be immediate (it is blocked outside Python)."""
    try:
        while True:
            data = os.read(read, 64)
            if not data:
                return
            for signum in data:
                if signum not in STOP_SIGNALS:
                    continue
                handled, deadline = _state.handled, time.monotonic() + UNHANDLED_S
                while _state.handled == handled and time.monotonic() < deadline:
                    select.select([], [], [], 0.05)
                if _state.handled == handled and not _state.deferring and not _state.shielded:
                    world = int(os.environ.get("WORLD_SIZE", "1"))
                    who = f"process {os.environ.get('RANK', '?')} of {world}" if world > 1 else "rlcli"
                    os.write(2, f"{who}: stopped by {name(signum)} while it waited outside Python (for another "
                                "process, or a device)\n".encode())
                    os._exit(128 + signum)
    finally:
        os.close(read)


def defer_to_step_end() -> None:
    """From now on (a run's steps are about to begin) a stop signal waits for the end of the step in progress."""
    _state.deferring = True


def requested() -> int | None:
    """The stop signal received so far (None: none), for the step loop to stop at this step's end."""
    return _state.requested


@contextlib.contextmanager
def shielded() -> Iterator[None]:
    """Cleanup that must not be cut short (putting a replaced run back, releasing the directory): a signal that
    arrives meanwhile is noted, not raised; the run is ending anyway."""
    _state.shielded += 1
    try:
        yield
    finally:
        _state.shielded -= 1
