"""What rlcli owns in an output dir: a manifest (``.rlcli-run.json``) of the top-level names its runs wrote.

Replacing a run deletes exactly those names, never a file of the user's that sits beside them, and a directory
holding anything else is refused by a fresh run (see ``trainers/outputs.py``). Every writer claims its name
*before* it writes (``claim``), so a run killed mid-write never leaves an rlcli file that is not in the manifest.

The manifest also records the run's state (``running`` / ``finished``), the recipe type and the main process's
pid and host: a fresh run may reuse the directory of a run that stopped before its first checkpoint (nothing there
can be resumed), but not one that finished or is still running.

Ownership of the directory is an OS lock (``flock`` on ``.rlcli-lock``), held by the main process for the run's
life and released by the kernel when it dies: of two runs started together into one directory, the second is
refused (``lock``). A run replacing another moves the old run's files aside (``take_over``: a sibling
``.rlcli-trash-NAME-PID``) and deletes them only once the new run has a checkpoint or has finished (``commit``); a
run that fails before that puts them back (``release(ok=False)``).

Imports nothing of rlcli (``logging.py`` and ``checkpoint.py`` claim their files through it).
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

MANIFEST = ".rlcli-run.json"
RECIPE_FILE = "recipe.yaml"
LOCK = ".rlcli-lock"
OLD = ".rlcli-old"  # where a replaced run waits when no sibling trash can be made (output_dir is a mount point)
TRASH_PREFIX = ".rlcli-trash-"
# rlcli's bookkeeping names: always its own, never part of a run's results
BOOKKEEPING = frozenset({MANIFEST, MANIFEST + ".tmp", LOCK, OLD})
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


def claim(out: str | Path, *names: str) -> None:
    """Record top-level ``names`` of ``out`` as written by rlcli (call before writing them; main process only)."""
    out = Path(out)
    top = {Path(n).parts[0] for n in names if n and Path(n).parts}
    data = read_manifest(out) or {"files": []}
    if top <= set(data["files"]):
        return
    out.mkdir(parents=True, exist_ok=True)
    data["files"] = sorted(set(data["files"]) | top)
    _write_manifest(out, data)


def start(out: str | Path, recipe_type: str) -> None:
    """Mark ``out`` as holding a running run of ``recipe_type`` by this process (main process only)."""
    out = Path(out)
    data = read_manifest(out) or {"files": []}
    data.update(recipe=recipe_type, state="running", pid=os.getpid(), host=socket.gethostname())
    out.mkdir(parents=True, exist_ok=True)
    _write_manifest(out, data)


def mark_finished(out: str | Path) -> None:
    """Mark the run in ``out`` finished (main process only); a no-op without a manifest."""
    out = Path(out)
    data = read_manifest(out)
    if data is not None:
        data["state"] = "finished"
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
    """Top-level names in ``out`` that rlcli did not write, sorted."""
    out = Path(out)
    if not out.is_dir():
        return []
    mine = owned(out)
    found = [p.name for p in out.iterdir() if p.name not in mine]
    checkpoints = out / "checkpoints"
    if "checkpoints" in mine and checkpoints.is_dir() and not checkpoints.is_symlink():
        # rlcli writes only step-N directories there: anything else was put there by someone
        found += [f"checkpoints/{p.name}" for p in checkpoints.iterdir() if not CHECKPOINT_NAME.match(p.name)]
    return sorted(found)


def adopt_legacy(out: str | Path) -> None:
    """Give an older run's directory a manifest listing the rlcli files it holds (before resuming it)."""
    out = Path(out)
    if is_legacy_run(out):
        claim(out, *sorted(owned(out) - BOOKKEEPING))


def remove_owned(out: str | Path) -> None:
    """Delete what rlcli wrote into ``out`` (the manifest last); anything else in it stays."""
    out = Path(out)
    names = owned(out) - {LOCK}
    for name in sorted(names - {MANIFEST}):
        path = out / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
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


# --- ownership: the lock, and replacing a run without losing it before the new one stands -------------------------


class InUse(Exception):
    """Another process holds ``out``'s lock."""


class _Held:
    def __init__(self, out: Path, fd: int, made_dir: bool):
        self.out, self.fd, self.made_dir = out, fd, made_dir
        self.trash: Path | None = None  # the replaced run's files, until commit()


_held: _Held | None = None


def lock(out: str | Path) -> None:
    """Take ``out`` for this process: an exclusive ``flock`` on ``out/.rlcli-lock``, held until :func:`release`
    (or until the process dies: the kernel drops it). Raises ``InUse`` when another process holds it. Creates
    ``out`` when missing (``release`` removes it again if the run leaves nothing in it)."""
    global _held
    out = Path(out)
    if _held is not None:
        if _held.out.resolve() == out.resolve():
            return
        release(ok=False)  # a previous run of this process that never released (called as a library)
    made_dir = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    path = out / LOCK
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise InUse(str(out)) from None
            raise
        try:  # the holder before us may have removed the file after we opened it: lock the one on disk
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())  # who holds it, for the in-use message
    _held = _Held(out, fd, made_dir)


def holder(out: str | Path) -> int | None:
    """The pid written into ``out``'s lock file by the process that holds it (or held it last)."""
    try:
        return int((Path(out) / LOCK).read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def take_over(out: str | Path) -> None:
    """Move the run in ``out`` (the files rlcli wrote, not the lock) aside before a new run writes there: into a
    sibling ``.rlcli-trash-NAME-PID`` (or ``out/.rlcli-old`` when no sibling can be made). Nothing is deleted here:
    :func:`commit` deletes it once the new run stands, :func:`release` with ``ok=False`` puts it back."""
    out = Path(out)
    names = sorted(owned(out) - {LOCK, OLD})
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
        if trash.parent != out:  # another file system (out is a mount point): keep the old run inside out
            for name in moved:
                os.rename(trash / name, out / name)
            shutil.rmtree(trash, ignore_errors=True)
            trash = out / OLD
            trash.mkdir(exist_ok=True)
            for name in names:
                os.rename(out / name, trash / name)
        else:
            raise
    if _held is not None and _held.out == out:
        _held.trash = trash


def commit() -> None:
    """The new run stands (its first checkpoint, or its end): delete the run it replaced."""
    if _held is not None and _held.trash is not None:
        shutil.rmtree(_held.trash, ignore_errors=True)
        _held.trash = None


def release(ok: bool) -> None:
    """Let go of the output dir (main process, at the end of a run; a no-op when none is held). ``ok``: the run
    finished, so the run it replaced goes; otherwise a replaced run comes back in place of what this run wrote.
    A directory this run created and left empty is removed."""
    global _held
    h, _held = _held, None
    if h is None:
        return
    try:
        if ok:
            if h.trash is not None:
                shutil.rmtree(h.trash, ignore_errors=True)
        elif h.trash is not None and h.trash.exists():
            for name in sorted(owned(h.out) - {LOCK, OLD}):
                path = h.out / name
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path)
                else:
                    path.unlink(missing_ok=True)
            for item in h.trash.iterdir():
                os.rename(item, h.out / item.name)
            h.trash.rmdir()
        (h.out / LOCK).unlink(missing_ok=True)  # before the unlock: a waiting process then retries on a new file
    finally:
        os.close(h.fd)
    if h.made_dir:
        try:
            h.out.rmdir()  # only when empty
        except OSError:
            pass


def leftover_trash(out: str | Path) -> list[Path]:
    """Runs that a run in ``out`` replaced and that stayed aside because that run was killed before it stood."""
    out = Path(out)
    found = [p for p in out.parent.glob(f"{TRASH_PREFIX}{out.name}-*") if p.is_dir()]
    if (out / OLD).is_dir():
        found.append(out / OLD)
    mine = _held.trash if _held is not None else None
    return [p for p in found if p != mine]
