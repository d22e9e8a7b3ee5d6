"""What the demo and pipeline scripts of recipes/ share: running ``rlcli`` stages, and taking their ``--out`` folder
over without ever deleting a file they did not write (the guard rlcli's own output dirs have, ``rlcli.rundir``, for
folders of runs). The scripts import it inside their functions: rlcli loads their environments and reward functions
from the files themselves, where this folder is not on ``sys.path``."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def take_out_dir(out: Path, *, owned: frozenset[str] = frozenset(), record: str | None = None,
                 resume: bool = False) -> dict:
    """Make ``out`` this script's, and return the progress an earlier run left in ``out/record`` on ``resume``
    (else ``{}``).

    A folder that is empty, holds ``record`` (an earlier run of this script wrote it) or only names in ``owned`` is
    replaced; any other folder is left untouched and the script exits with a message naming it."""
    progress = json.loads((out / record).read_text()) if resume and record and (out / record).exists() else {}
    if not resume and out.exists() and any(out.iterdir()):
        names = {p.name for p in out.iterdir()}
        if not ((record is not None and record in names) or names <= owned):
            mark = f" (no {record} there)" if record else ""
            also = ", or --resume an earlier run's" if record else ""
            sys.exit(f"--out {out} holds files this script did not write{mark}: choose an empty or new directory{also}")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    return progress


def rlcli(*args: str) -> float:
    """Run ``rlcli ARGS`` from the repository's root, showing the command; exit with its code when it fails; return
    its wall time in seconds."""
    print("\n$ rlcli " + " ".join(args), flush=True)
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "rlcli", *args], check=False, cwd=ROOT)
    if result.returncode != 0:
        sys.exit(result.returncode)
    return time.perf_counter() - start
