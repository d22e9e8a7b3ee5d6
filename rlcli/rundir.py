"""The run directory: what rlcli owns in an ``output_dir``, and :class:`RunDir`, the one object every command
(and the demo scripts of ``recipes/``) goes through to use one: check → lock → take over → claim → commit or
restore → release.

A manifest (``.rlcli-run.json``) lists what rlcli's runs wrote there (claimed *before* it is written), so replacing a
run deletes exactly those names; the main process holds an OS lock for the run's life and the other processes a
shared one while they write; a replaced run's files are moved aside and deleted only once the new run stands, put
back if it fails first. The checks of a resume are here too (:meth:`RunDir.check`). In detail: docs/internals.md,
"rlcli/rundir.py".
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import shutil
import socket
import stat
from pathlib import Path
from typing import Any

from rlcli.config.errors import NothingToDo, Problem, RecipeError, UserError
from rlcli.launch import is_main_process
from rlcli.signals import Stopped, shielded

MANIFEST = ".rlcli-run.json"
RECIPE_FILE = "recipe.yaml"
LOCK = ".rlcli-lock"
WRITERS = ".rlcli-writers"  # shared-locked by every process of a run but the main one, while it writes here
OLD = ".rlcli-old"  # where a replaced run waits when no sibling trash can be made (output_dir is a mount point)
TRASH_PREFIX = ".rlcli-trash-"
# rlcli's bookkeeping names: always its own, never part of a run's results
BOOKKEEPING = frozenset({MANIFEST, MANIFEST + ".tmp", LOCK, WRITERS, OLD})
CHECKPOINT_NAME = re.compile(r"^step-\d{8}(\.tmp)?$")

# What rlcli wrote into an output dir before the manifest existed: only used for a directory that holds a
# recipe.yaml and no manifest, so that an older run can still be replaced or resumed.
LEGACY_NAMES = frozenset({
    RECIPE_FILE, "metrics.jsonl", "checkpoints", "samples.jsonl", "episodes.jsonl", "episodes.jsonl.tmp",
    "summary.json", "reward_stats.json", "value_head.safetensors", "value_head.json", ".final.tmp", "base", "merged",
    "config.json", "generation_config.json", "model.safetensors", "adapter_config.json", "adapter_model.safetensors",
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
    "vocab.json", "merges.txt", "added_tokens.json", "tokenizer.model", "spiece.model",
})


def read_manifest(out: str | Path) -> dict[str, Any] | None:
    """The manifest of ``out``, or None when it has none (or one that cannot be read)."""
    try:
        data = json.loads((Path(out) / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and isinstance(data.get("files"), list) else None


class NoSpace(OSError):
    """A write that failed for want of space (ENOSPC / EDQUOT); ``filename`` says where."""


def no_space(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)


def as_no_space(exc: BaseException, where: str | Path) -> BaseException:
    """``exc`` as ``NoSpace`` when it is a write that failed for want of space: an OSError ENOSPC / EDQUOT, or
    torch's zip writer's RuntimeError on a full disk ('unexpected pos', 'failed writing'); else ``exc`` itself."""
    if no_space(exc):
        return NoSpace(exc.errno, os.strerror(exc.errno), getattr(exc, "filename", None) or str(where))
    text = str(exc)
    if isinstance(exc, RuntimeError) and ("unexpected pos" in text or "failed writing" in text):
        return NoSpace(errno.ENOSPC, os.strerror(errno.ENOSPC), str(where))
    return exc


def _write_manifest(out: Path, data: dict[str, Any]) -> None:
    tmp = out / (MANIFEST + ".tmp")
    try:
        tmp.write_text(json.dumps(data, indent=1) + "\n")
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        if no_space(exc):
            raise NoSpace(exc.errno, os.strerror(exc.errno), str(tmp)) from None
        raise
    os.replace(tmp, out / MANIFEST)  # a kill mid-write leaves the old manifest, never half of one


def claim(out: str | Path, *names: str, runs: bool = False) -> None:
    """Record top-level ``names`` of ``out`` as written by rlcli (call before writing them; main process only).
    ``runs``: they are run directories of their own (a demo's stages), whose foreign files stay the user's."""
    out = Path(out)
    top = {Path(n).parts[0] for n in names if n and Path(n).parts}
    data = read_manifest(out) or {"files": []}
    nested = set(data.get("runs", []))
    if top <= set(data["files"]) and (not runs or top <= nested):
        return
    out.mkdir(parents=True, exist_ok=True)
    data["files"] = sorted(set(data["files"]) | top)
    if runs:
        data["runs"] = sorted(nested | top)
    _write_manifest(out, data)


def is_legacy_run(out: str | Path) -> bool:
    """``out`` holds a run written before rlcli kept manifests: its recipe.yaml beside the metrics or episodes that
    every older run wrote (a recipe.yaml alone is as likely the user's own)."""
    out = Path(out)
    return (read_manifest(out) is None and (out / RECIPE_FILE).is_file()
            and any((out / n).is_file() for n in ("metrics.jsonl", "episodes.jsonl")))


def owned(out: str | Path) -> set[str]:
    """Top-level names in ``out`` that rlcli wrote (those that exist)."""
    out = Path(out)
    if not out.is_dir():
        return set()
    present = {p.name for p in out.iterdir()}
    data = read_manifest(out)
    if data is not None:
        mine = set(data["files"])
    elif is_legacy_run(out):
        mine = set(LEGACY_NAMES)
        if (out / "adapter_config.json").is_file():
            mine.add("README.md")  # the model card peft writes beside an adapter
    else:
        mine = set()
    mine |= BOOKKEEPING
    return present & mine


def has_run(out: str | Path) -> bool:
    """``out`` holds files of a run (not only rlcli's bookkeeping)."""
    return bool(owned(out) - BOOKKEEPING)


def foreign(out: str | Path) -> list[str]:
    """Names in ``out`` that rlcli did not write, sorted: top-level ones, anything but step-N directories inside
    ``checkpoints/``, and what is foreign inside the run directories ``out`` lists as ``runs``."""
    out = Path(out)
    if not out.is_dir():
        return []
    mine = owned(out)
    found = [p.name for p in out.iterdir() if p.name not in mine]
    checkpoints = out / "checkpoints"
    if "checkpoints" in mine and checkpoints.is_dir() and not checkpoints.is_symlink():
        # rlcli writes only step-N directories there: anything else was put there by someone
        found += [f"checkpoints/{p.name}" for p in checkpoints.iterdir() if not CHECKPOINT_NAME.match(p.name)]
    for name in sorted(set((read_manifest(out) or {}).get("runs", [])) & mine):
        found += [f"{name}/{inner}" if inner else name for inner in foreign_in_run(out / name)]
    return sorted(found)


def foreign_in_run(path: Path) -> list[str]:
    """What in ``path``, a directory listed as a run of its own, rlcli did not write: a directory without a manifest
    (nor an older run's files) is all the user's."""
    if path.is_symlink() or not path.is_dir():
        return [""] if path.exists() or path.is_symlink() else []
    if read_manifest(path) is None and not is_legacy_run(path):
        return sorted(p.name for p in path.iterdir() if p.name not in BOOKKEEPING)
    return foreign(path)


def adopt_legacy(out: str | Path) -> None:
    """Give an older run's directory a manifest listing the rlcli files it holds (before resuming it)."""
    out = Path(out)
    if is_legacy_run(out):
        claim(out, *sorted(owned(out) - BOOKKEEPING))


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def remove_owned(out: str | Path) -> None:
    """Delete what rlcli wrote into ``out`` (the manifest last); anything else in it stays."""
    out = Path(out)
    for name in sorted(owned(out) - {LOCK, WRITERS, MANIFEST}):
        _remove(out / name)
    (out / MANIFEST).unlink(missing_ok=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def apply_umask(path: str | Path) -> None:
    """Give ``path`` (and everything under it) the modes the umask gives new files and directories.

    safetensors writes its files with mode 0600 whatever the umask; every other file of a run gets the usual
    0644 (umask 022), and a saved model is meant to be read by whoever reads the run.
    """
    mask = _umask()
    path = Path(path)
    paths = [path, *path.rglob("*")] if path.is_dir() else [path]
    for p in paths:
        if p.is_symlink():
            continue
        mode = (0o777 if p.is_dir() else 0o666) & ~mask
        if stat.S_IMODE(p.stat().st_mode) != mode:
            os.chmod(p, mode)


def holder(out: str | Path) -> int | None:
    """The pid written into ``out``'s lock file by the process that holds it (or held it last)."""
    try:
        return int((Path(out) / LOCK).read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


class InUse(Exception):
    """Another process holds the lock."""


def _flock(path: Path, *, exclusive: bool) -> int:
    """An open descriptor of ``path`` (created if missing) holding a non-blocking ``flock``; ``InUse`` when another
    process holds a conflicting one."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise InUse(str(path)) from None
            raise
        try:  # the previous holder may have removed the file after this one opened it: lock the one on disk
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)


def _unlink_if_free(path: Path) -> None:
    """Remove a lock file nobody holds (a process of this run that still holds it keeps it, and the next run is
    refused until that process ends)."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        path.unlink(missing_ok=True)
    except OSError:
        pass
    finally:
        os.close(fd)


class RunDir:
    """The one owner of a run directory, for one run in one process.

    The order is the contract: :meth:`check` (no side effects: ``--dry-run`` reports what it finds), :meth:`open`
    (checks, then :meth:`lock`, then what the directory holds decides: a fresh start, a resume, a refusal),
    :meth:`take_over` once every input has loaded (the replaced run moved aside; the manifest says this run is
    running), :meth:`claim` before each write, :meth:`commit` when the run stands (its first checkpoint), and
    :meth:`finish` (finished, released) or :meth:`release` (``ok=False``: a replaced run comes back). As a context
    manager it releases on the way out, ``ok`` when no exception left the block.

    ``kind`` is what the manifest records (a recipe's type name, or a demo script's name); ``main``: this is the
    process that decides and writes the bookkeeping (the others only join the lock)."""

    def __init__(self, out: str | Path, kind: str, *, main: bool | None = None):
        self.out = Path(out)
        self.kind = kind
        self.main = is_main_process() if main is None else main
        self.trash: Path | None = None  # the replaced run's files, until commit()
        self.restored = False  # release() put a replaced run back
        self._fd: int | None = None
        self._made_dir = False

    @classmethod
    def of(cls, recipe, *, main: bool | None = None) -> "RunDir":
        """The run directory of ``recipe`` (its ``output_dir``; the kind is the recipe's type)."""
        return cls(recipe.output_dir, type(recipe).__name__, main=main)

    def __enter__(self) -> "RunDir":
        return self

    def __exit__(self, kind, exc, tb) -> None:
        self.release(ok=exc is None)
        if self.restored and isinstance(exc, (UserError, Stopped)):
            exc.add_note(f"{self.out} holds the run this one was replacing again, as it was.")

    # --- check: nothing is written ------------------------------------------------------------------------------

    def problems(self, *, resume: bool = False, inputs: list[tuple[str, str]] = ()) -> list[Problem]:
        """Problems with this directory findable before anything is loaded or written (key ``output_dir``): the
        working directory or one above it, a file, not writable, holding files rlcli did not write (a fresh run),
        or holding one of the run's own ``inputs`` ((key, value) pairs that may name files)."""
        out, shown = self.out, str(self.out)
        resolved, cwd = out.resolve(), Path.cwd().resolve()
        if resolved == cwd or resolved in cwd.parents:
            where = "the working directory" if resolved == cwd else f"a parent of the working directory ({cwd})"
            return [Problem("output_dir", f"{shown!r} is {where}; a run needs a directory of its own (such as "
                                          "runs/NAME), since it fills it with its files and overwrite_output_dir "
                                          "replaces them")]
        if out.exists() and not out.is_dir():
            return [Problem("output_dir", f"{out} is a file, not a directory")]
        inside = self._inputs_inside(inputs)
        existing = out
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        if not existing.is_dir():
            return inside + [Problem("output_dir", f"{out} cannot be created: {existing} is a file")]
        if not os.access(existing, os.W_OK | os.X_OK):
            read_only = bool(os.statvfs(existing).f_flag & os.ST_RDONLY)
            why = "is on a read-only file system" if read_only else "is not writable by this user"
            target = "" if existing == out else f" cannot be created: {existing}"
            return inside + [Problem("output_dir", f"{out}{target} {why}")]
        others = foreign(out)
        if others and not resume:
            listed = ", ".join(others[:5]) + (f" and {len(others) - 5} more" if len(others) > 5 else "")
            return inside + [Problem("output_dir", (
                f"{out} holds files rlcli did not write ({listed}); a run writes only into an empty directory or one "
                "holding rlcli's own files, so that replacing a run never deletes yours: choose another output_dir, "
                "or move those files away"))]
        return inside

    def _inputs_inside(self, inputs) -> list[Problem]:
        """Input values naming an existing file or directory inside this directory (a model, data, a plug-in's
        ``file.py:name``): a run replaces what is there, so it would destroy its own input."""
        out = self.out.expanduser()
        if not out.is_dir():
            return []
        out = out.resolve()
        problems = []
        for key, value in inputs:
            if not value or "\n" in value or len(value) > 4096:
                continue
            for candidate in [value] + ([value.rsplit(":", 1)[0]] if ":" in value else []):
                try:
                    path = Path(candidate).expanduser()
                    if not path.exists():
                        continue
                    path = path.resolve()
                except (OSError, ValueError):
                    continue
                if path == out or out in path.parents:
                    shown = str(self.out)
                    problems.append(Problem(key, (
                        f"{value} is inside output_dir {shown}, which this run writes into (and replaces on "
                        "overwrite or resume): the run would destroy its own input. Copy it out first (e.g. cp -r "
                        f"{shown} {shown.rstrip('/')}-input, then {key}=that copy), or choose another output_dir")))
                    break
        return problems

    def check(self, recipe, *, resume: bool, origin=None) -> list[Problem]:
        """What ``--dry-run`` and the run both check before anything loads: this directory's problems (placed where
        their keys were set, ``origin``) and, on ``--resume`` when there are none, what the resume itself needs
        (raised: another command's run, settings that differ from the checkpoint's, a length that goes back)."""
        from rlcli.config.loader import locate

        origin = origin if origin is not None else "recipe"
        problems = locate(self.problems(resume=resume, inputs=recipe_inputs(recipe)), origin)
        if resume and not problems:
            self._check_resume_kind()
            newest = _latest_checkpoint(self.out)  # (the run verifies its files, and falls back)
            if newest is not None:
                check_resume_recipe(recipe, newest, origin)
                length = resume_length(recipe)
                if length is not None:
                    self.check_forward(int(newest.name.split("-")[1]), *length, origin=origin)
        return problems

    def _check_resume_kind(self) -> None:
        """``--resume`` of a run another command wrote (an sft run under ``rlcli ppo``): said before anything."""
        from rlcli.commands import command_of

        manifest = read_manifest(self.out)
        if manifest is not None and manifest.get("recipe") not in (None, self.kind):
            raise UserError(f"--resume: {self.out} holds an `rlcli {command_of(manifest.get('recipe'))}` run; "
                            f"`rlcli {command_of(self.kind)}` cannot continue it (to train on from its model, start "
                            f"a new run in another output_dir with model.name_or_path={self.out})")

    def check_forward(self, start_step: int, total_steps: int, key: str, origin=None) -> None:
        """A resumed run only goes forward: refused when its new length (``key``) ends at or before the checkpoint's
        step, or before the step a finished run reached; "nothing to do" when it ends where the finished run did.
        The finished model is never replaced by an older one."""
        from rlcli.config.loader import locate

        out, origin = self.out, origin if origin is not None else "recipe"
        manifest = read_manifest(out) or {}
        finished_at = _last_logged_step(out) if manifest.get("state") == "finished" else None
        if finished_at is not None and total_steps == finished_at:
            raise NothingToDo(f"the run in {out} already finished at step {finished_at}, the length asked for; its "
                              f"model is in place (raise {key} to train longer)")
        if finished_at is not None and total_steps < finished_at:
            raise RecipeError(locate([Problem(key, (
                f"--resume would end at step {total_steps}, but the run in {out} finished at step {finished_at}: "
                f"resuming from its checkpoint at step {start_step} would replace the finished model with a less "
                f"trained one. A resume only goes forward: set {key} above {finished_at}, or keep the finished "
                "model"))], origin))
        if total_steps <= start_step:
            raise RecipeError(locate([Problem(key, (
                f"--resume would end at step {total_steps}, but the newest checkpoint in {out} is at step "
                f"{start_step}: a resume only goes forward; set {key} above {start_step}"))], origin))

    # --- lock and open ------------------------------------------------------------------------------------------

    def lock(self) -> None:
        """Take the directory (main process; the others :meth:`join` it when they begin writing): an exclusive
        ``flock`` on ``.rlcli-lock`` held until :meth:`release`, or until the process dies (the kernel drops it).
        Refused while another process holds it, or while a process of an earlier run still writes here. Creates
        the directory when missing (``release`` removes it again if the run leaves nothing in it)."""
        if self._fd is not None or not self.main:
            return
        made_dir = not self.out.exists()
        self.out.mkdir(parents=True, exist_ok=True)
        try:
            fd = _flock(self.out / LOCK, exclusive=True)
        except InUse:
            pid = holder(self.out)
            who = f"rlcli process {pid}" if pid is not None else "another rlcli process"
            raise UserError(f"output_dir {self.out} is in use: {who} is running there; wait for it to end (or stop "
                            "it), or choose another output_dir") from None
        if (self.out / WRITERS).exists():
            try:
                os.close(_flock(self.out / WRITERS, exclusive=True))
            except InUse:
                os.close(fd)
                raise UserError(f"output_dir {self.out} is in use: a process of an earlier run there is still "
                                "running (its main process has ended); wait for it to end (or stop it), or choose "
                                "another output_dir") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())  # who holds it, for the in-use message
        self._fd, self._made_dir = fd, made_dir
        from rlcli.logging import console

        for old in self.leftover_trash():
            console.print(f"[yellow]note:[/] {old} holds the files of a run that a later run into {self.out} "
                          "replaced and that run was killed before it had a checkpoint; move them back into place, "
                          "or delete it")

    def join(self) -> None:
        """A process of the run other than the main one, before it writes here: a shared lock on ``.rlcli-writers``
        for as long as it may write."""
        if self.main or self._fd is not None:
            return
        try:
            self._fd = _flock(self.out / WRITERS, exclusive=False)
        except InUse:  # the main process checks the directory at a moment no other run can hold it
            raise UserError(f"output_dir {self.out} is in use by another run") from None

    def open(self, recipe, *, resume: bool) -> Path | None:
        """Check the directory, take it (:meth:`lock`), and decide what the run does there; returns the checkpoint
        to resume from (None: a fresh run). Nothing is removed here: an earlier run is moved aside by
        :meth:`take_over`, once every input has loaded.

        A fresh run refuses a directory that already holds a run unless ``overwrite_output_dir`` is set, so a typo
        never silently destroys results; it reuses, without asking, one whose run stopped before its first
        checkpoint (nothing there can be resumed). ``--resume`` needs a checkpoint that loads and the recipe it was
        trained with, apart from the settings listed in ``RESUME_MAY_CHANGE``. A command that does not train never
        replaces a training run."""
        from rlcli.logging import check_trackers

        problems = self.check(recipe, resume=resume) + check_trackers(recipe)
        if problems:
            raise RecipeError(problems)
        self.lock()
        try:
            return self._decide(recipe, resume)
        except BaseException:
            self.release(ok=False)
            raise

    def _decide(self, recipe, resume: bool) -> Path | None:
        from rlcli.commands import command_of, COMMANDS
        from rlcli.logging import console

        out, manifest = self.out, read_manifest(self.out)
        holds_run = has_run(out)
        finished = manifest is not None and manifest.get("state") == "finished"
        previous = (manifest or {}).get("recipe")
        trains = COMMANDS.get(command_of(self.kind))
        if trains is not None and not trains.trains and holds_run and (
                (previous and previous != self.kind) or (is_legacy_run(out) and (out / "metrics.jsonl").exists())):
            # overwrite_output_dir defaults to true for such a command (its output is cheap to redo); a trained
            # model is not
            raise UserError(f"output_dir {out} holds a training run; {trains.name} would replace it: choose another "
                            "output_dir")
        if resume:
            ckpt, notes = usable_checkpoint(out)
            if self.main:
                for note in notes:
                    console.print(f"[yellow]note:[/] {note}")
            if ckpt is None:
                if not holds_run:
                    raise UserError(f"--resume: {out} holds no run, so no checkpoint to resume from; run the same "
                                    "command without --resume to start one")
                if notes:
                    raise UserError(f"--resume: no checkpoint in {out} can be read ({'; '.join(notes)}); the run "
                                    "cannot be continued: start it over (overwrite_output_dir=true) or in another "
                                    "output_dir")
                if finished:
                    raise UserError(f"--resume: the run in {out} finished and kept no checkpoint (train.save_every "
                                    "was null or above its length), so it cannot be continued; its model is in place. "
                                    f"To train longer, start a new run from it (model.name_or_path={out} and another "
                                    "output_dir), or start over with overwrite_output_dir=true")
                raise UserError(f"--resume: the run in {out} stopped before its first checkpoint, so there is "
                                "nothing to resume from (checkpoints are written every train.save_every steps); run "
                                "the same command without --resume to start it over: a fresh run reuses the "
                                "directory of a run that never reached a checkpoint")
            if ckpt != _latest_checkpoint(out):
                check_resume_recipe(recipe, ckpt)  # the newest was checked already; this one fell back to
            return ckpt
        if holds_run:
            stopped_early = (manifest is not None and manifest.get("state") == "running"
                             and _latest_checkpoint(out) is None)
            if stopped_early:
                if self.main:
                    console.print(f"[yellow]note:[/] {out} holds a run that stopped before its first checkpoint "
                                  "(nothing to resume); starting over in it")
            elif not recipe.overwrite_output_dir:
                if _latest_checkpoint(out) is not None:
                    how = "pass --resume to continue it from its newest checkpoint, "
                else:
                    how = ("it kept no checkpoint, so it cannot be continued (to train on from its model: "
                           f"model.name_or_path={out} in another output_dir); ")
                raise UserError(
                    f"output_dir {out} already holds a run; {how}choose another output_dir, or set "
                    "overwrite_output_dir=true to replace it (only the files rlcli wrote are replaced, and only once "
                    "the new run has loaded its inputs)"
                )
        return None

    # --- take over, claim, commit, release ----------------------------------------------------------------------

    def take_over(self, *, replace: bool = True) -> None:
        """Begin writing (every process, once every input has loaded). The main process moves the run in the
        directory aside first when ``replace`` (not on a resume): into a sibling ``.rlcli-trash-NAME-PID`` (or
        ``.rlcli-old`` inside when no sibling can be made), deleted by :meth:`commit`, put back by
        :meth:`release` with ``ok=False``; then the manifest says this run of ``kind`` is running here. The other
        processes :meth:`join`."""
        if not self.main:
            self.join()
            return
        if replace:
            self._move_aside()
        adopt_legacy(self.out)
        data = read_manifest(self.out) or {"files": []}
        data.update(recipe=self.kind, state="running", pid=os.getpid(), host=socket.gethostname())
        self.out.mkdir(parents=True, exist_ok=True)
        _write_manifest(self.out, data)

    def _move_aside(self) -> None:
        out = self.out
        names = sorted(owned(out) - {LOCK, WRITERS, OLD})
        if not names:
            return
        trash = out.parent / f"{TRASH_PREFIX}{out.name}-{os.getpid()}"
        try:
            trash.mkdir()
        except OSError:
            trash = out / OLD
            trash.mkdir(exist_ok=True)
        moved = []
        try:
            for name in names:
                os.rename(out / name, trash / name)
                moved.append(name)
        except OSError:
            if trash.parent == out:
                raise
            for name in moved:  # another file system (out is a mount point): keep the old run inside out
                os.rename(trash / name, out / name)
            shutil.rmtree(trash, ignore_errors=True)
            trash = out / OLD
            trash.mkdir(exist_ok=True)
            for name in names:
                os.rename(out / name, trash / name)
        self.trash = trash

    def start(self, recipe) -> None:
        """:meth:`take_over` for a run of ``recipe`` starting fresh, and its resolved recipe written (main)."""
        self.take_over()
        self.write_recipe(recipe)

    def write_recipe(self, recipe) -> None:
        """The resolved recipe into ``recipe.yaml`` (main process), claimed with the names its trackers write."""
        from rlcli.config.loader import recipe_to_yaml

        if not self.main:
            return
        self.claim(RECIPE_FILE)
        logging = getattr(recipe, "logging", None)  # env-rollout logs nothing
        if logging is not None and "tensorboard" in logging.report_to:
            self.claim(logging.project)  # Accelerate's TensorBoard tracker writes into OUT/PROJECT
        (self.out / RECIPE_FILE).write_text(recipe_to_yaml(recipe))

    def claim(self, *names: str, runs: bool = False) -> None:
        """:func:`claim` on this directory (main process; the others write only inside claimed names)."""
        if self.main:
            claim(self.out, *names, runs=runs)

    def commit(self) -> None:
        """The new run stands (its first checkpoint, or its end): delete the run it replaced."""
        if self.trash is not None:
            shutil.rmtree(self.trash, ignore_errors=True)
            self.trash = None

    def finish(self) -> None:
        """The run finished: every file it wrote gets the umask's mode (safetensors ignores it), the manifest says
        finished, and the directory is released (the run it replaced goes)."""
        if self.main and self._fd is not None:
            for name in owned(self.out):
                if (self.out / name).is_file():
                    apply_umask(self.out / name)
            data = read_manifest(self.out)
            if data is not None:
                data["state"] = "finished"
                _write_manifest(self.out, data)
        self.release(ok=True)

    def release(self, ok: bool) -> None:
        """Let go of the directory (a no-op when not held). ``ok``: the run stands, so the run it replaced goes;
        otherwise a replaced run comes back in place of what this run wrote. A directory this run created and left
        empty is removed."""
        with shielded():
            self._release(ok)

    def _release(self, ok: bool) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            return
        if not self.main:
            os.close(fd)
            return
        try:
            if ok:
                self.commit()
            elif self.trash is not None and self.trash.exists():
                for name in sorted(owned(self.out) - {LOCK, WRITERS, OLD}):
                    _remove(self.out / name)
                for item in self.trash.iterdir():
                    os.rename(item, self.out / item.name)
                self.trash.rmdir()
                self.restored = True
            self.trash = None
            _unlink_if_free(self.out / WRITERS)
            (self.out / LOCK).unlink(missing_ok=True)  # before the unlock: a waiting process retries on a new file
        finally:
            os.close(fd)
        if self._made_dir:
            try:
                self.out.rmdir()  # only when empty
            except OSError:
                pass

    def leftover_trash(self) -> list[Path]:
        """Runs that a run here replaced and that stayed aside because that run was killed before it stood."""
        found = [p for p in self.out.parent.glob(f"{TRASH_PREFIX}{self.out.name}-*") if p.is_dir()]
        if (self.out / OLD).is_dir():
            found.append(self.out / OLD)
        return [p for p in found if p != self.trash]


# --- what a recipe gives the checks -------------------------------------------------------------------------------

# keys whose values are never read as input paths
_NOT_INPUTS = ("output_dir", "overwrite_output_dir", "logging.", "seed")


def _leaves(value: Any, prefix: str = ""):
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _leaves(v, f"{prefix}{k}.")
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            yield from _leaves(v, f"{prefix}{i}.")
    elif isinstance(value, str):
        yield prefix[:-1], value


def recipe_inputs(recipe) -> list[tuple[str, str]]:
    """(key, value) of every string in ``recipe`` that may name an input file (a model, data, a plug-in)."""
    return [(k, v) for k, v in _leaves(recipe.model_dump(mode="json")) if not k.startswith(_NOT_INPUTS)]


def _latest_checkpoint(out: Path) -> Path | None:
    from rlcli.checkpoint import latest_checkpoint

    return latest_checkpoint(out)


def usable_checkpoint(out: Path) -> tuple[Path | None, list[str]]:
    """The newest checkpoint whose files all load, and a note for each newer one that did not (skipped)."""
    from rlcli.checkpoint import checkpoint_dirs, verify_checkpoint

    notes = []
    for ckpt in reversed(checkpoint_dirs(out)):
        problem = verify_checkpoint(ckpt)
        if problem is None:
            if notes:
                notes.append(f"resuming from {ckpt.name} instead")
            return ckpt, notes
        notes.append(f"checkpoint {ckpt} cannot be read ({problem}); it is skipped")
    return None, notes


def _last_logged_step(out: Path) -> int | None:
    from rlcli.logging import read_metrics

    try:
        steps = [r.get("step") for r in read_metrics(out)]
    except (OSError, ValueError):
        return None
    steps = [s for s in steps if isinstance(s, int)]
    return max(steps) if steps else None


def resume_length(recipe) -> tuple[int, str] | None:
    """A recipe's run length in steps and its key, when the recipe alone says it (not counted from the data)."""
    ppo = getattr(recipe, "ppo", None)
    if ppo is not None and hasattr(ppo, "steps"):
        return ppo.steps, "ppo.steps"
    train = getattr(recipe, "train", None)
    if train is not None and getattr(train, "max_steps", None):
        return train.max_steps, "train.max_steps"
    return None


# Settings --resume may change: they do not alter the sequence of updates (how long it runs, what is logged,
# saved or evaluated, micro-batches that only regroup the same batch).
RESUME_MAY_CHANGE = (
    "output_dir", "overwrite_output_dir", "logging", "train.max_steps", "train.epochs", "ppo.steps",
    "train.save_every", "train.keep_checkpoints", "eval.every", "eval.batch_size", "train.sample_every",
    "train.samples_per_log", "train.micro_batch_size", "ppo.micro_batch_size", "model.gradient_checkpointing",
    "train.host_memory",
    "lora.merge_on_save", "data.long_prompts",
    # where the reward service is and how it is reached (the scores are the service's, wherever it runs)
    "reward.url", "reward.token_env", "reward.timeout_s", "reward.max_concurrency", "reward.retries",
    "reward.retry_backoff_s", "reward.verify_tls", "reward.ca_file",
)


_MISSING = object()


def _changes(old: Any, new: Any, prefix: str = "") -> list[tuple[str, Any, Any]]:
    if isinstance(old, dict) and isinstance(new, dict):
        found = []
        for key in list(old) + [k for k in new if k not in old]:
            a, b = old.get(key, _MISSING), new.get(key, _MISSING)
            if a is _MISSING or b is _MISSING:
                continue  # a key of another rlcli version: nothing to compare
            found += _changes(a, b, f"{prefix}{key}.")
        return found
    if isinstance(old, (list, tuple)) and isinstance(new, (list, tuple)):
        old, new = list(old), list(new)
    return [] if old == new else [(prefix.rstrip("."), old, new)]


def _show(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else value
    return text if len(text) <= 60 else text[:57] + "..."


def check_resume_recipe(recipe, ckpt: Path, origin=None) -> None:
    """Refuse a resumed recipe that differs from the checkpoint's in a setting that changes the updates."""
    import yaml

    from rlcli.config.loader import locate

    saved_path = ckpt / RECIPE_FILE
    if not saved_path.is_file():
        saved_path = ckpt.parent.parent / RECIPE_FILE
    if not saved_path.is_file():
        return
    try:
        saved = yaml.safe_load(saved_path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return
    from rlcli.config.renamed import migrate

    migrate(type(recipe).__name__, saved, saved=True)  # a checkpoint of an earlier release: its keys, renamed
    current = recipe.model_dump(mode="json")
    changed = [(k, a, b) for k, a, b in _changes(saved, current)
               if not any(k == p or k.startswith(p + ".") for p in RESUME_MAY_CHANGE)]
    if not changed:
        return
    problems = locate([Problem(k, f"{_show(a)} -> {_show(b)}") for k, a, b in changed],
                      origin if origin is not None else "recipe")
    raise RecipeError(
        problems,
        title=f"--resume: {len(changed)} setting(s) differ from those the checkpoint was trained with ({saved_path}):",
        hint="A resumed run continues exactly as it was trained, so these must stay as they were (drop the "
             "overrides, or restore the recipe). --resume accepts changes to: more or fewer steps (train.max_steps, "
             "train.epochs, ppo.steps), logging.*, train.save_every, train.keep_checkpoints, eval.every, "
             "micro_batch_size and similar, the reward service's address and connection settings (reward.url, "
             "reward.timeout_s, ...). To train on with other settings, start a new run in another output_dir "
             "from this one's model (model.name_or_path=<this output_dir>).",
    )
