"""Head inputs taken from inside a model's forward (rlcli.models.lm_head): the head of them is the model's own
logits, for tied and untied heads, LoRA on the head, seq2seq; SFT's chunked loss and its gradients equal the model's
own loss."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, T5Config, T5ForConditionalGeneration

from rlcli.data.sft import collate
from rlcli.models.lm_head import capture_head_input, chunkable, output_head
from rlcli.models.value_head import ValueHead, ValueHeadModel
from rlcli.rl.chunked import token_stats
from rlcli.rl.sampling import SamplingRules
from rlcli.trainers.sft import summed_loss

V = 97


def _gpt2():
    return GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=V, resid_pdrop=0, embd_pdrop=0,
                                      attn_pdrop=0, bos_token_id=1, eos_token_id=2, pad_token_id=0))


def _llama():
    return LlamaForCausalLM(LlamaConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=64,
                                        num_attention_heads=2, num_key_value_heads=1, vocab_size=V,
                                        tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0))


def _t5():
    return T5ForConditionalGeneration(T5Config(num_layers=2, num_decoder_layers=2, d_model=32, d_ff=64, d_kv=16,
                                               num_heads=2, vocab_size=V, dropout_rate=0.0, decoder_start_token_id=0,
                                               pad_token_id=0, eos_token_id=1))


def _lora(model, targets):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft's notes on LoRA over a tied head
        return get_peft_model(model, LoraConfig(r=4, target_modules=targets, init_lora_weights=False))


MODELS = {
    "gpt2-tied": lambda: _gpt2(),
    "llama-untied": lambda: _llama(),
    "gpt2-lora-on-head": lambda: _lora(_gpt2(), ["c_attn", "lm_head"]),
    "llama-lora-on-head": lambda: _lora(_llama(), ["q_proj", "lm_head"]),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_sft_loss_and_gradients_equal_the_models_own(name):
    torch.manual_seed(0)
    model = MODELS[name]()
    assert chunkable(model) and output_head(model) is not None
    examples = [{"input_ids": [5, 6, 7, 8, 9, 10], "labels": [-100, -100, 7, 8, 9, 10]},
                {"input_ids": [11, 12, 13], "labels": [-100, 12, 13]}]
    batch = collate(examples, 0)
    want = model(**batch, num_items_in_batch=5).loss
    want.backward()
    want_grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    got = summed_loss(model, batch) / 5
    got.backward()
    got_grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert got_grads.keys() == want_grads.keys() and any("lm_head" in k or "wte" in k for k in got_grads)
    for k in want_grads:
        torch.testing.assert_close(got_grads[k], want_grads[k], rtol=0, atol=1e-6, msg=k)


@pytest.mark.parametrize("name", ["gpt2-tied", "llama-lora-on-head", "t5", "t5-lora"])
def test_value_head_model_hidden_gives_its_logits(name):
    torch.manual_seed(0)
    lm = {"t5": _t5, "t5-lora": lambda: _lora(_t5(), ["q", "lm_head"])}.get(name, MODELS.get(name))()
    policy = ValueHeadModel(lm, ValueHead(32, init_std=0.1))
    q_ids = torch.tensor([[0, 5, 6], [7, 8, 9]])
    q_mask = torch.tensor([[0, 1, 1], [1, 1, 1]])
    r_ids = torch.tensor([[10, 11, 12, 0], [13, 14, 0, 0]])
    r_mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    logits, values = policy(q_ids, q_mask, r_ids, r_mask)
    hidden, values_h = policy(q_ids, q_mask, r_ids, r_mask, hidden=True)
    assert hidden.shape[:2] == r_ids.shape and hidden.shape[-1] == 32
    torch.testing.assert_close(policy.head(hidden), logits, rtol=0, atol=1e-6)
    torch.testing.assert_close(values_h, values)
    # the statistics of the chunks are those of the logits, gradients included
    rules = SamplingRules(temperature=0.9, eos_ids=(2,), min_new_tokens=1)
    r_ids = torch.where(torch.arange(4) == 0, torch.where(r_ids == 2, 3, r_ids), r_ids)
    lp_full = rules.logprobs(logits, r_ids, mask=r_mask.bool())
    lp = token_stats(hidden, policy.head, r_ids, rules, mask=r_mask.bool(), chunk_size=2).logprobs
    torch.testing.assert_close(lp, lp_full, rtol=0, atol=1e-6)
    if policy.is_peft:
        with policy.reference():
            ref_logits, _ = policy(q_ids, q_mask, r_ids, r_mask, with_values=False)
            ref_hidden, _ = policy(q_ids, q_mask, r_ids, r_mask, with_values=False, hidden=True)
        torch.testing.assert_close(policy.reference_head(ref_hidden), ref_logits, rtol=0, atol=1e-6)
        assert (ref_logits - logits).abs().max() > 1e-3  # the adapter really was off


def test_capture_leaves_the_model_alone_afterwards():
    model = _gpt2()
    ids = torch.tensor([[3, 4, 5]])
    with capture_head_input(model) as captured:
        out = model(input_ids=ids)
    assert out.logits.shape[1] == 0 and captured.hidden.shape == (1, 3, 32)
    assert model(input_ids=ids).logits.shape == (1, 3, V)


def test_a_model_with_logits_after_its_head_is_not_chunkable():
    model = copy.deepcopy(_gpt2())
    model.config.final_logit_softcapping = 30.0
    assert not chunkable(model)
    assert not ValueHeadModel(model, None).chunkable
