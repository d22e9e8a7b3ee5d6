"""Models built from scratch for each family and head, LoRA wrapping, and the byte tokenizer round trip."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer

from rlcli.config.common import LoraConfig, ModelConfig
from rlcli.config.errors import Problem
from rlcli.models.loading import apply_lora, check_model_config, load_model, load_tokenizer

CONFIGS = {
    "gpt2": {"n_layer": 1, "n_embd": 32, "n_head": 2},
    "llama": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
              "num_key_value_heads": 2},
    "t5": {"d_model": 32, "d_ff": 64, "num_layers": 1, "num_heads": 2, "d_kv": 16},
}


@pytest.mark.parametrize("arch, task", [("gpt2", "causal"), ("llama", "causal"), ("t5", "seq2seq"), ("gpt2", "classifier"),
                                        ("llama", "classifier")])
def test_build_from_scratch_and_lora(arch, task):
    cfg = ModelConfig(architecture=arch, config=CONFIGS[arch])
    assert check_model_config(cfg, task) == []
    tok = load_tokenizer(cfg)
    model = load_model(cfg, task, tok)
    assert model.config.vocab_size == len(tok) and model.config.pad_token_id == tok.pad_token_id
    ids = torch.tensor([tok("hello")["input_ids"]])
    kwargs = {"decoder_input_ids": ids} if task == "seq2seq" else {}
    out = model(input_ids=ids, **kwargs)
    assert torch.isfinite(out.logits).all()
    lora = apply_lora(model, LoraConfig(r=4), task)
    trainable = {n for n, p in lora.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or "score" in n for n in trainable)
    if task == "classifier":
        assert any("score" in n for n in trainable), "the reward head must stay trainable under LoRA"


def test_config_checks_name_bad_keys():
    problems = check_model_config(ModelConfig(architecture="gpt2", config={"n_layr": 2}), "causal")
    assert problems == [Problem("model.config.n_layr", "not a gpt2 config field; did you mean 'n_layer'?")]
    [problem] = check_model_config(ModelConfig(architecture="gtp2"), "causal")
    assert problem.key == "model.architecture" and "unknown architecture 'gtp2'" in problem.message
    assert "has no causal model class" in check_model_config(ModelConfig(architecture="t5"), "causal")[0].message


def test_byte_tokenizer_round_trip(tmp_path):
    tok = load_tokenizer(ModelConfig(architecture="gpt2"))
    assert tok.pad_token_id != tok.eos_token_id
    tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    text = "héllo 12*34 <call> 🙂"
    assert again(text)["input_ids"] == tok(text)["input_ids"] and again.decode(tok(text)["input_ids"]) == text
