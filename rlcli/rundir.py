"""What rlcli owns in an output dir: a manifest (``.rlcli-run.json``) of the top-level names its runs wrote.

Replacing a run deletes exactly those names, never a file of the user's that sits beside them, and a directory
holding anything else is refused by a fresh run (see ``trainers/common.py``). Every writer claims its name
*before* it writes (``claim``), so a run killed mid-write never leaves an rlcli file that is not in the manifest.

The manifest also records the run's state (``running`` / ``finished``), the recipe type and the main process's
pid and host: a fresh run may reuse the directory of a run that stopped before its first checkpoint (nothing there
can be resumed), but not one that finished or is still running.

Imports nothing of rlcli (``logging.py`` and ``checkpoint.py`` claim their files through it).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
from pathlib import Path
from typing import Any

MANIFEST = ".rlcli-run.json"
RECIPE_FILE = "recipe.yaml"

# What rlcli wrote into an output dir before the manifest existed: only used for a directory that holds a
# recipe.yaml and no manifest, so that an older run can still be replaced or resumed.
LEGACY_NAMES = frozenset({
    RECIPE_FILE, "metrics.jsonl", "checkpoints", "samples.jsonl", "episodes.jsonl", "episodes.jsonl.tmp",
    "summary.json", "reward_stats.json", "value_head.safetensors", "value_head.json", ".final.tmp", "base", "merged",
    "config.json", "generation_config.json", "model.safetensors", "adapter_config.json", "adapter_model.safetensors",
    "README.md", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
    "vocab.json", "merges.txt", "added_tokens.json", "tokenizer.model", "spiece.model",
})


def read_manifest(out: str | Path) -> dict[str, Any] | None:
    """The manifest of ``out``, or None when it has none (or one that cannot be read)."""
    try:
        data = json.loads((Path(out) / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and isinstance(data.get("files"), list) else None


def _write_manifest(out: Path, data: dict[str, Any]) -> None:
    tmp = out / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
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
    """``out`` holds a run written before rlcli kept manifests."""
    out = Path(out)
    return read_manifest(out) is None and (out / RECIPE_FILE).is_file()


def owned(out: str | Path) -> set[str]:
    """Top-level names in ``out`` that rlcli wrote (those that exist)."""
    out = Path(out)
    if not out.is_dir():
        return set()
    present = {p.name for p in out.iterdir()}
    data = read_manifest(out)
    if data is not None:
        mine = set(data["files"])
    elif (out / RECIPE_FILE).is_file():
        mine = set(LEGACY_NAMES)
    else:
        mine = set()
    mine |= {MANIFEST, MANIFEST + ".tmp"}
    return present & mine


def foreign(out: str | Path) -> list[str]:
    """Top-level names in ``out`` that rlcli did not write, sorted."""
    out = Path(out)
    if not out.is_dir():
        return []
    mine = owned(out)
    return sorted(p.name for p in out.iterdir() if p.name not in mine)


def adopt_legacy(out: str | Path) -> None:
    """Give an older run's directory a manifest listing the rlcli files it holds (before resuming it)."""
    out = Path(out)
    if is_legacy_run(out):
        claim(out, *sorted(owned(out) - {MANIFEST, MANIFEST + ".tmp"}))


def remove_owned(out: str | Path) -> None:
    """Delete what rlcli wrote into ``out`` (the manifest last); anything else in it stays."""
    out = Path(out)
    names = owned(out)
    for name in sorted(names - {MANIFEST}):
        path = out / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)


def running_elsewhere(out: str | Path) -> int | None:
    """The pid of another live rlcli process on this host that marked ``out`` running, else None."""
    data = read_manifest(out)
    if not data or data.get("state") != "running" or data.get("host") != socket.gethostname():
        return None
    pid = data.get("pid")
    if not isinstance(pid, int) or pid == os.getpid():
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass  # alive, owned by another user
    try:  # a recycled pid that is not rlcli's does not count
        if b"rlcli" not in Path(f"/proc/{pid}/cmdline").read_bytes():
            return None
    except OSError:
        pass
    return pid


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
