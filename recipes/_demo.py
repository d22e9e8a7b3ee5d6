"""What the demo and pipeline scripts of recipes/ share: their ``--out`` folder, owned through rlcli's own run
directory owner (``rlcli.rundir.RunDir``: checked, locked, taken over, committed or restored, released), and running
``rlcli`` stages into it. The scripts import it inside their functions: rlcli loads their environments and reward
functions from the files themselves, where this folder is not on ``sys.path``.

The folder holds one rlcli run directory per stage (``sft/``, ``eval-sft/``, ...) and a few files of the script's
own; its manifest lists both. A file of the user's anywhere in it (beside the stages, or inside one of them) makes
the script refuse the folder before anything moves, so no interruption can lose it. An earlier run of the same
script is moved aside (never deleted) until the new run's first stage has finished, and put back when the new run
is interrupted or fails before that; ``--resume`` continues an earlier pipeline in place."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def rlcli(*args: str) -> float:
    """Run ``rlcli ARGS`` from the repository's root, showing the command; exit with its code when it fails; return
    its wall time in seconds."""
    print("\n$ rlcli " + " ".join(args), flush=True)
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "rlcli", *args], check=False, cwd=ROOT)
    if result.returncode != 0:
        sys.exit(result.returncode)
    return time.perf_counter() - start


class OutDir:
    """A script's ``--out`` folder for one run of the script; a context manager (``take_out_dir``).

    ``runs``: the names of the stages' rlcli run directories; ``files``: the script's own files; ``record``: the
    script's progress file (``--resume`` reads it back)."""

    def __init__(self, out: Path, *, script: str, runs: frozenset[str], files: frozenset[str] = frozenset(),
                 record: str | None = None, resume: bool = False):
        from rlcli.rundir import RunDir

        self.out, self.runs, self.record, self.resume = Path(out), frozenset(runs), record, resume
        self.files = frozenset(files) | ({record} if record else set())
        self.dir = RunDir(self.out, f"script {script}", main=True)
        self.progress: dict = {}

    def __enter__(self) -> "OutDir":
        from rlcli import signals
        from rlcli.config.errors import UserError

        refused = self._refusal()
        if refused:
            sys.exit(f"--out {self.out} {refused}")
        try:
            self.dir.lock()
        except UserError as exc:
            sys.exit(str(exc))
        # SIGTERM (kill, scancel) stops the script through __exit__, as Ctrl-C does, so an earlier run comes back
        self._signals = signals.handled()
        self._signals.__enter__()
        try:
            if self.resume and self.record and (self.out / self.record).exists():
                self.progress = json.loads((self.out / self.record).read_text())
            if self._earlier_without_manifest():
                self._claim()  # an earlier version's run of this script: its stages are moved aside like any other
            self.dir.take_over(replace=not self.resume)
            self._claim()
        except BaseException:
            self.dir.release(ok=False)
            self._signals.__exit__(None, None, None)
            raise
        return self

    def _claim(self) -> None:
        self.dir.claim(*self.runs, runs=True)
        self.dir.claim(*self.files)

    def _earlier_without_manifest(self) -> bool:
        from rlcli import rundir

        return rundir.read_manifest(self.out) is None and any(
            p.name not in rundir.BOOKKEEPING for p in self.out.iterdir())

    def __exit__(self, kind, exc, tb) -> None:
        from rlcli.signals import Stopped

        try:
            if exc is None:
                self.dir.finish()
                return
            self.dir.release(ok=False)  # interrupted or failed: an earlier run comes back unless a stage finished
        finally:
            self._signals.__exit__(None, None, None)
        if isinstance(exc, (KeyboardInterrupt, Stopped)):
            back = f"; {self.out} holds the earlier run again" if self.dir.restored else ""
            print(f"\n{str(exc) or 'interrupted'}{back}", file=sys.stderr)
            sys.exit(128 + exc.signum if isinstance(exc, Stopped) else 130)

    def _refusal(self) -> str | None:
        """Why this folder is not the script's to use (None: it is). Nothing is written to find out."""
        from rlcli import rundir

        out = self.out
        if out.exists() and not out.is_dir():
            return "is a file, not a directory"
        if not out.is_dir() or not any(out.iterdir()):
            return None
        manifest = rundir.read_manifest(out)
        if manifest is not None:
            kind = manifest.get("recipe")
            if kind not in (None, self.dir.kind):
                from rlcli.commands import command_of

                what = kind if kind.startswith("script ") else f"`rlcli {command_of(kind)}` run"
                return f"holds the output of another {what}: choose an empty or new directory"
            found = rundir.foreign(out)
        else:  # an earlier version of the script kept no manifest: its names, and stages holding only rlcli's files
            names = {p.name for p in out.iterdir()} - rundir.BOOKKEEPING
            found = sorted(names - self.runs - self.files)
            for name in sorted(self.runs & names):
                found += [f"{name}/{inner}" if inner else name for inner in rundir.foreign_in_run(out / name)]
        if not found:
            return None
        listed = ", ".join(found[:5]) + (f" and {len(found) - 5} more" if len(found) > 5 else "")
        also = ", or --resume an earlier run's" if self.record else ""
        return (f"holds files this script did not write ({listed}): choose an empty or new directory{also}, or move "
                "those files away")

    def rlcli(self, *args: str) -> float:
        """A stage: ``rlcli ARGS`` (see :func:`rlcli`); once it has finished, the run of the script stands (an
        earlier one it replaced goes)."""
        seconds = rlcli(*args)
        self.dir.commit()
        return seconds


class Pipeline(OutDir):
    """A script whose stages are recorded in ``record`` after each one: ``--resume`` skips the stages an earlier run
    of the same folder finished and keeps their times and summaries."""

    def __init__(self, out: Path, *, script: str, runs: frozenset[str], record: str, resume: bool = False,
                 settings: dict | None = None):
        super().__init__(out, script=script, runs=runs, record=record, resume=resume)
        self.settings = settings or {}

    def __enter__(self) -> "Pipeline":
        super().__enter__()
        self.times = self.progress.get("seconds", {})
        self.summaries = self.progress.get("summaries", {})
        return self

    def stage(self, name: str, done: Path, *args: str, summary: Callable[[Path], dict] | None = None) -> None:
        """Run stage ``name`` (``rlcli ARGS``) unless ``--resume`` finds ``done``, the file it ends with; record its
        time and, with ``summary``, ``summary(done)``."""
        if self.resume and done.exists():
            print(f"{name}: done by an earlier run ({done})", flush=True)
        else:
            self.times[name] = self.rlcli(*args)
        if summary is not None:
            self.summaries[name] = summary(done)
        (self.out / self.record).write_text(json.dumps({"summaries": self.summaries, "seconds": self.times,
                                                        **self.settings}, indent=2))


def take_out_dir(out: Path, *, script: str, runs: frozenset[str], files: frozenset[str] = frozenset()) -> OutDir:
    """The ``--out`` folder of a script that replaces an earlier run of itself (``with take_out_dir(...) as d``)."""
    return OutDir(out, script=script, runs=runs, files=files)
