"""Print constraints.txt: the installed version of every package rlcli[test,plot,reasoning,textarena,openenv] needs,
directly or not, and of the packages installed without their requirements (``NO_DEPS``).

    python scripts/freeze_constraints.py > constraints.txt     # in the .venv the tests passed in

Like ``pip freeze``, but only the packages reachable from rlcli's requirements (not whatever else the environment
holds), and torch without its build label (``2.13.0``, not ``2.13.0+cpu``), so that one file serves CPU and CUDA
machines alike.
"""

from __future__ import annotations

import importlib.metadata as md
import re
import tomllib
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parent.parent
HEADER = """\
# The exact versions rlcli is tested with, for scripts/setup.sh and the Dockerfile (pip install -c constraints.txt).
# pyproject.toml keeps loose lower bounds, for installing rlcli into an environment of your own.
# Every package rlcli[test,plot,reasoning,textarena,openenv] needs, directly or not (and openenv, installed with
# --no-deps), as installed where the tests passed (Python 3.11, Linux
# x86-64). torch carries no build label: which build pip picks (CPU or CUDA) depends on where it looks; see the
# README's "Install" section. Regenerate: python scripts/freeze_constraints.py > constraints.txt
"""


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


# installed with --no-deps (scripts/setup.sh): pinned, but their own requirements are not followed
NO_DEPS = ("openenv",)


def requirement_closure(extras: tuple[str, ...] = ("test", "plot", "reasoning", "textarena", "openenv")
                        ) -> dict[str, str]:
    """Normalised name -> installed version of every distribution that rlcli[extras] requires, recursively.

    rlcli's own requirements come from pyproject.toml (an installed rlcli's metadata can be older than the file)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    env = default_environment()
    todo = [(Requirement(r), {""}) for r in project["dependencies"]]
    found_no_deps = {_norm(n): md.version(n) for n in NO_DEPS if _installed(n)}
    todo += [(Requirement(r), {""}) for extra in extras for r in project["optional-dependencies"][extra]]
    found: dict[str, set[str]] = {}
    while todo:
        req, parent_extras = todo.pop()
        if req.marker is not None and not any(req.marker.evaluate({**env, "extra": e}) for e in parent_extras):
            continue
        key, wanted = _norm(req.name), set(req.extras)
        if key in found and wanted <= found[key]:
            continue
        try:
            dist = md.distribution(req.name)
        except md.PackageNotFoundError:
            continue  # a requirement whose marker held but which is not installed: nothing to pin
        found[key] = found.get(key, set()) | wanted
        todo += [(Requirement(text), wanted | {""}) for text in dist.requires or []]
    pins = {key: md.version(key).split("+", 1)[0] for key in found}
    return dict(sorted({**pins, **found_no_deps}.items()))


def _installed(name: str) -> bool:
    try:
        md.distribution(name)
        return True
    except md.PackageNotFoundError:
        return False


if __name__ == "__main__":
    print(HEADER + "\n".join(f"{name}=={version}" for name, version in requirement_closure().items()))
