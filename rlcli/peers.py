"""One failing process stops the run: what the processes of a multi-process run tell each other when one fails.

The process that fails first announces it in the run's rendezvous store (:func:`announce`) and exits; every process
runs a :class:`Watch` thread that beats a heartbeat and polls for such an announcement, and stops its own process
(:class:`PeerFailed`, then a hard exit) when one comes; a process that dies without a word is named by its stopped
heartbeat (:func:`silent_peers`). Everything here is a no-op in a run of one process. Why and how in detail:
docs/internals.md, "rlcli/peers.py".
"""

from __future__ import annotations

import ctypes
import os
import sys
import threading
import time

FAILED = "rlcli/failed"
BEAT = "rlcli/beat/"
GRACE_S = 5.0
HARD_EXIT_S = 20.0
MESSAGE_CHARS = 600


class PeerFailed(BaseException):
    """Another process of the run failed (raised into the main thread by the watch; the message is
    :func:`peer_failure`). A BaseException: no ``except Exception`` on the way takes it for a failure of its own."""


def _group():
    """(store, rank, world size) of the default process group, or None outside a multi-process run."""
    dist = sys.modules.get("torch.distributed")
    if dist is None or not dist.is_available() or not dist.is_initialized() or dist.get_world_size() < 2:
        return None
    try:
        store = dist.distributed_c10d._get_default_store()
    except (RuntimeError, ValueError, AttributeError):
        return None
    return store, dist.get_rank(), dist.get_world_size()


def _describe(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    if not isinstance(exc, Exception) or type(exc).__module__ != "rlcli.config.errors":
        text = f"{type(exc).__name__}: {text}"
    return text if len(text) <= MESSAGE_CHARS else text[: MESSAGE_CHARS - 3] + "..."


def announce(exc: BaseException) -> bool:
    """Tell the other processes that this one failed with ``exc`` (unless another failed first). True when this
    process is the first to fail (the one whose error the run reports)."""
    group = _group()
    if group is None or isinstance(exc, PeerFailed):
        return False
    store, rank, world = group
    line = f"process {rank} of {world}: {_describe(exc)}"
    try:
        store.set(f"{FAILED}/{rank}", _describe(exc))
        current = store.compare_set(FAILED, "", line)
    except Exception:  # noqa: BLE001 - the store went with a process that died: nothing to tell anyone
        return False
    current = current.decode(errors="replace") if isinstance(current, bytes) else str(current)
    return current == line


def main_failed_alike(exc: BaseException, wait_s: float = 1.5) -> bool:
    """In a process other than the main one: the main process failed with this same error (a plug-in or a setting
    that fails everywhere alike), so that it alone need say it. Waits up to ``wait_s`` for the main process's."""
    group = _group()
    if group is None or group[1] == 0:
        return False
    store, deadline = group[0], time.monotonic() + wait_s
    try:
        while not store.check([f"{FAILED}/0"]):
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)
        return store.get(f"{FAILED}/0").decode(errors="replace") == _describe(exc)
    except Exception:  # noqa: BLE001 - the store went away with the main process
        return False


def peer_failure(wait_s: float = 0.0) -> str | None:
    """The failure another process announced (``process R of N: ...``), waiting up to ``wait_s`` for one to
    appear; None when there is none (or it is this process's own)."""
    group = _group()
    if group is None:
        return _watch.failure if _watch is not None else None
    store, rank, _ = group
    deadline = time.monotonic() + wait_s
    while True:
        try:
            if store.check([FAILED]):
                line = store.get(FAILED).decode(errors="replace")
                return None if line.startswith(f"process {rank} of ") else line
        except Exception:  # noqa: BLE001 - the store is gone (its host process died)
            return _watch.failure if _watch is not None else None
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.1)


def this_process() -> str:
    """``process R of N`` in a run of several processes, else ''."""
    group = _group()
    return f"process {group[1]} of {group[2]}" if group is not None else ""


def lost_connection(exc: BaseException) -> bool:
    """``exc`` is a collective's report of a peer that went away (gloo's closed connection, a backend's error)."""
    text = str(exc)
    return (type(exc).__name__ in ("DistBackendError", "DistNetworkError")
            or any(s in text for s in ("Connection closed by peer", "Connection reset by peer", "Broken pipe",
                                       "ProcessGroupGloo", "NCCL communicator was aborted")))


def silent_peers(wait_s: float = 3.0) -> list[int]:
    """The other processes whose heartbeat stopped: it did not move over ``wait_s`` seconds (killed, out of memory,
    their machine gone). Best effort: empty when every one still beats or nothing can be told (the store is gone)."""
    group = _group()
    if group is None:
        return []
    store, rank, world = group
    others = [r for r in range(world) if r != rank]
    beats: dict[int, set[int]] = {r: set() for r in others}
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        for r in others:
            try:
                beats[r].add(store.add(f"{BEAT}{r}", 0))
            except Exception:  # noqa: BLE001 - the store is shutting down with the launcher: ask again
                pass
        time.sleep(0.25)
    # a process seen beating before, and never since: one that never beat had no watch yet, nothing can be told
    return [r for r in others if len(beats[r]) == 1 and next(iter(beats[r])) > 0]


class Watch:
    """The thread that keeps this process's heartbeat and watches for another process's failure (see the module)."""

    def __init__(self, store, rank: int, world: int):
        self.store, self.rank, self.world = store, rank, world
        self.failure: str | None = None
        self._stop = threading.Event()
        self._main = threading.main_thread().ident
        self._thread = threading.Thread(target=self._run, name="rlcli-peers", daemon=True)

    def start(self) -> "Watch":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        seen_at = None
        while not self._stop.wait(0.5 if seen_at is None else 0.25):
            try:
                self.store.add(f"{BEAT}{self.rank}", 1)
                if seen_at is None and self.store.check([FAILED]):
                    line = self.store.get(FAILED).decode(errors="replace")
                    if line.startswith(f"process {self.rank} of "):
                        return  # this process failed itself: its own error path is stopping it
                    self.failure, seen_at = line, time.monotonic()
            except Exception:  # noqa: BLE001 - the store went away: the run is ending; the collectives will say so
                if seen_at is None:
                    return
            if seen_at is None:
                continue
            waited = time.monotonic() - seen_at
            if waited >= HARD_EXIT_S:
                self._exit()
            elif waited >= GRACE_S and not getattr(self, "_raised", False):
                self._raised = True
                ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(self._main), ctypes.py_object(PeerFailed))

    def _exit(self) -> None:
        os.write(2, (f"error: {self.failure}; this process (process {self.rank} of {self.world}) could not stop "
                     f"by itself within {HARD_EXIT_S:g} s of that, so it ends now\n").encode())
        os._exit(1)


_watch: Watch | None = None


def watch() -> None:
    """Start this process's :class:`Watch` (once the process group exists; a no-op in a run of one process)."""
    global _watch
    group = _group()
    if group is None or _watch is not None:
        return
    _watch = Watch(*group).start()


def unwatch() -> None:
    """The run is over on this process: its watch stops (before the process group goes)."""
    global _watch
    if _watch is not None:
        _watch.stop()
        _watch = None
