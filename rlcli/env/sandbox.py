"""The sandbox that model-written Python runs in, for the ``python`` tool and the ``python_session`` environment alike.

An ``Interpreter`` is this Python (``-I``) running a program inside bubblewrap: no network, no host files but the
system and the interpreter (read-only) and a fresh working directory, its own pid namespace, no capabilities, a clean
environment. Both users get the same limits (``Limits``: address space, CPU, file size, printed output) and the same
process limit: ``MAX_PROCESSES`` more than this user has (``RLIMIT_NPROC``), and a pids cgroup where one can be made
(root is exempt from ``RLIMIT_NPROC``). Without a working bubblewrap a user is refused (``resolve_bwrap``) unless
the recipe opts in: the program then runs in a plain subprocess with the same limits.
"""

from __future__ import annotations

import functools
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

BWRAP = "bwrap"
"""The bubblewrap executable (looked up on PATH)."""

CLEAN_PATH = "/usr/local/bin:/usr/bin:/bin"
MAX_PROCESSES = 32
"""Processes (threads included) model-written code may add to this user's count when its interpreter starts."""

SANDBOX_OPT_IN = "options: {allow_unsandboxed: true}"
OUTPUT_FILE = ".output"
"""Where, in the working directory, the code's stdout and stderr go: a file, not a pipe, so that ``RLIMIT_FSIZE``
bounds what a print loop can produce."""


def sandbox_problem() -> str | None:
    """Why code cannot be sandboxed on this machine, or None when it can.

    Checked once per process by running an empty program in the real sandbox: bubblewrap must be installed and
    allowed to create namespaces (unprivileged user namespaces, which some containers and hardened kernels refuse).
    """
    return _sandbox_problem(BWRAP)


def resolve_bwrap(user: str, opt_in_by: str, allow_unsandboxed: bool) -> str | None:
    """The bubblewrap to run ``user``'s code with, or None where there is none and the recipe allowed that.

    Raises ``ValueError`` (``the <user> cannot sandbox model-written code: ...``) when there is none and
    ``allow_unsandboxed`` is false; ``opt_in_by`` names where the recipe would opt in (``this tool``).
    """
    problem = sandbox_problem()
    if problem is None:
        return shutil.which(BWRAP)
    if not allow_unsandboxed:
        raise ValueError(
            f"the {user} cannot sandbox model-written code: {problem}. Install bubblewrap (Debian/Ubuntu: apt-get "
            f"install bubblewrap), or accept running the code with the trainer's permissions (its files, network "
            f"and environment variables are then reachable) by giving {opt_in_by} {SANDBOX_OPT_IN}")
    return None


def timed_out(timeout_s: float) -> str:
    return f"the code did not finish within {timeout_s:g} s"


@dataclass(frozen=True)
class Limits:
    """What an interpreter may use: address space, CPU seconds (``RLIMIT_CPU``, rounded up), the size of any file
    it writes (its printed output included), and the printed characters given back (``Interpreter.output``)."""

    memory_mb: int
    cpu_s: float
    max_file_mb: int
    max_output_chars: int

    def preamble(self) -> str:
        """Python source that sets the limits; run first in the interpreter. argv[1] is the process limit, this
        user's count at the start plus ``MAX_PROCESSES`` (RLIMIT_NPROC counts all of the user's processes)."""
        memory, cpu, fsize = self.memory_mb * 2**20, math.ceil(self.cpu_s), self.max_file_mb * 2**20
        return (
            "import resource, sys\n"
            f"resource.setrlimit(resource.RLIMIT_AS, ({memory}, {memory}))\n"
            f"resource.setrlimit(resource.RLIMIT_CPU, ({cpu}, {cpu + 1}))\n"
            f"resource.setrlimit(resource.RLIMIT_FSIZE, ({fsize}, {fsize}))\n"
            "resource.setrlimit(resource.RLIMIT_NPROC, (int(sys.argv[1]), int(sys.argv[1])))\n"
        )


class Ending(NamedTuple):
    """How an interpreter ended: its exit status as ``Popen`` gave it, and the signal that killed it (bubblewrap
    reports a child killed by signal N as exit code 128 + N: read as the signal, so both modes say the same)."""

    returncode: int
    signal: str | None

    def __str__(self) -> str:
        return f"killed by signal {self.signal}" if self.signal else f"exit code {self.returncode}"


class Interpreter:
    """This Python running ``program`` (source; ``Limits.preamble`` goes first) in the sandbox, or, with ``bwrap``
    None, in a plain subprocess with the same limits, its own process group and a clean environment.

    A fresh working directory holds ``files`` (name -> text) and is the program's home. ``talk``: stdin and stdout
    are pipes to the program (which must then send its prints to ``OUTPUT_FILE`` itself); otherwise stdin is
    ``/dev/null`` and stdout and stderr go to ``OUTPUT_FILE``. ``stop`` kills it and all it started; ``close`` (or
    leaving a ``with`` block) also deletes the working directory.
    """

    def __init__(self, program: str, limits: Limits, bwrap: str | None, *, files: dict[str, str] | None = None,
                 talk: bool = False):
        self.limits, self.sandboxed = limits, bwrap is not None
        self.workdir = Path(tempfile.mkdtemp(prefix="rlcli_python_"))
        self._marker = f"RLCLI_TOOL_CALL={uuid.uuid4().hex}"  # finds what unsandboxed code left running
        self._group = None
        self._ending: Ending | None = None
        try:
            for name, text in (files or {}).items():
                (self.workdir / name).write_text(text, encoding="utf-8")
            command = [sys.executable, "-I", "-c", limits.preamble() + program,
                       str(_user_processes() + MAX_PROCESSES)]
            if bwrap is not None:
                command = _sandbox_command(bwrap, str(self.workdir)) + command
            self._group = _pids_cgroup(MAX_PROCESSES + 8)  # + bwrap's own processes
            if self._group is not None:  # joined before the exec: bwrap forks its child at once
                command = ["/bin/sh", "-c", '{ echo $$ > "$0"; } 2>/dev/null; exec "$@"',
                           str(self._group / "cgroup.procs"), *command]
            env = _clean_environment(str(self.workdir))
            if bwrap is None:
                env.update([self._marker.split("=", 1)])
            if talk:
                streams = {"stdin": subprocess.PIPE, "stdout": subprocess.PIPE, "stderr": subprocess.DEVNULL}
            else:
                streams = {"stdin": subprocess.DEVNULL, "stdout": open(self.workdir / OUTPUT_FILE, "wb"),
                           "stderr": subprocess.STDOUT}
            try:
                # bwrap too gets the clean environment: its init process is visible as /proc/1 inside
                self.process = subprocess.Popen(command, cwd=self.workdir, env=env, start_new_session=True,
                                                **streams)
            finally:
                if not talk:
                    streams["stdout"].close()
        except BaseException:
            _drop_cgroup(self._group)
            shutil.rmtree(self.workdir, ignore_errors=True)
            raise

    def exited_within(self, seconds: float) -> bool:
        """Wait up to ``seconds`` for the program to end; True when it did. It is not reaped (``stop`` does)."""
        deadline = time.monotonic() + seconds
        # WNOWAIT: notice the exit without reaping, so the pid (= the group id) stays reserved until the kill in
        # stop() and that kill cannot reach a process that reused it
        while os.waitid(os.P_PID, self.process.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.005)
        return True

    def stop(self) -> Ending:
        """Kill the program and everything it started (if still running), and say how it ended."""
        if self._ending is None:
            try:  # in the sandbox: bwrap, whose death takes the whole pid namespace with it
                os.killpg(self.process.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            if not self.sandboxed:
                _kill_marked(self._marker)  # a setsid() descendant left the process group
            code = self.process.wait()
            _drop_cgroup(self._group)
            self._ending = Ending(code, _signal_name(code, self.sandboxed))
        return self._ending

    def close(self) -> None:
        """``stop``, close the pipes and delete the working directory."""
        try:
            self.stop()
        finally:
            for stream in (self.process.stdin, self.process.stdout):
                if stream is not None:
                    try:
                        stream.close()
                    except OSError:
                        pass
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> Interpreter:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def output(self) -> str:
        """What the code printed (``OUTPUT_FILE``), cut to ``max_output_chars``: its start and its end (the end of a
        traceback) are kept. A long file is read only at its two ends."""
        cap = self.limits.max_output_chars
        chunk = 4 * cap + 4  # a UTF-8 character is at most 4 bytes: a chunk holds more than ``cap`` characters
        try:
            with open(self.workdir / OUTPUT_FILE, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if size <= 2 * chunk:
                    output = _decode(f.read())
                    if len(output) <= cap:
                        return output
                    head, tail = output, output
                else:  # more than 2 * cap characters: cut for sure
                    head = _decode(f.read(chunk))
                    f.seek(size - chunk)
                    tail = _decode(f.read(chunk))
        except OSError:
            return ""
        return f"{head[: cap // 2]}\n[... output truncated ...]\n{tail[-(cap - cap // 2):]}"


def _decode(data: bytes) -> str:
    return data.decode("utf-8", errors="replace")


def _signal_name(returncode: int, sandboxed: bool) -> str | None:
    number = -returncode if returncode < 0 else (returncode - 128 if sandboxed and returncode > 128 else 0)
    if number:
        try:
            return signal.Signals(number).name
        except ValueError:
            pass
    return None


def _clean_environment(workdir: str) -> dict[str, str]:
    return {"PATH": CLEAN_PATH, "HOME": workdir, "TMPDIR": workdir, "LC_ALL": "C.UTF-8"}


# ---------------------------------------------------------------------------------------------------------------
# bubblewrap


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
    for key, value in _clean_environment(workdir).items():
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


# ---------------------------------------------------------------------------------------------------------------
# process limits and clean-up


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
    v1), for one interpreter's process tree; None where this process may not make one (the usual case without root
    or delegation: RLIMIT_NPROC is then the only process limit)."""
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
