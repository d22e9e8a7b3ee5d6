"""sample(): padding-invariance, training-pass log-probs, stop conditions, rows leaving the batch, greedy."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config

from rlcli.models.generation import sample
from rlcli.models.tokenizer import build_byte_tokenizer
from rlcli.rl.sampling import SamplingRules
from rlcli.rl.types import Rollout



@pytest.fixture(scope="module")
def tok():
    return build_byte_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=len(tok), n_positions=512,
                        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return AutoModelForCausalLM.from_config(config).eval()


def encode(tok, prompts, pad_to: int | None = None):
    rows = [tok(p)["input_ids"] for p in prompts]
    width = max(max(len(r) for r in rows), pad_to or 0)
    input_ids = torch.full((len(rows), width), tok.pad_token_id)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        input_ids[i, width - len(r):] = torch.tensor(r)
        mask[i, width - len(r):] = 1
    return input_ids, mask


RULE_KEYS = ("temperature", "top_k", "top_p", "min_new_tokens", "banned_ids")


def run(model, tok, input_ids, mask, max_new_tokens=20, seed=0, **kwargs):
    kwargs.setdefault("eos_token_id", tok.eos_token_id)
    rule_kwargs = {k: kwargs.pop(k) for k in RULE_KEYS if k in kwargs}
    eos = kwargs["eos_token_id"]
    rules = SamplingRules(eos_ids=tuple([eos] if isinstance(eos, int) else eos or ()), **rule_kwargs)
    return sample(model, input_ids, mask, max_new_tokens, rules=rules, pad_token_id=tok.pad_token_id,
                  generator=torch.Generator().manual_seed(seed), **kwargs)


def test_left_padding_changes_nothing(model, tok):
    alone = run(model, tok, *encode(tok, ["the same prompt"]))
    padded = run(model, tok, *encode(tok, ["the same prompt"], pad_to=25))
    # in a batch next to a longer prompt (so it is left-padded), at the same row index
    batched = run(model, tok, *encode(tok, ["the same prompt", "a much longer prompt that forces padding"]))
    for other in (padded, batched):
        n = alone.num_generated[0]
        assert other.response_ids[0, :n].tolist() == alone.response_ids[0, :n].tolist()
        assert other.num_generated[0] == n and other.stop_reason[0] == alone.stop_reason[0]
        torch.testing.assert_close(other.logprobs[0, :n], alone.logprobs[0, :n], atol=1e-5, rtol=0)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprobs_match_the_training_forward_pass(model, tok, temperature):
    input_ids, mask = encode(tok, ["hi", "a longer prompt", "mid size"])
    out = run(model, tok, input_ids, mask, max_new_tokens=[5, 30, 17], temperature=temperature)
    rollout = Rollout(input_ids, mask, out.response_ids, out.response_mask, torch.zeros_like(out.response_ids))
    full_ids, full_mask, positions = rollout.full_sequences()
    with torch.no_grad():
        logits = model(input_ids=full_ids, attention_mask=full_mask, position_ids=positions).logits
    q = input_ids.shape[1]
    trained = torch.log_softmax(logits[:, q - 1: -1] / temperature, dim=-1)
    trained = trained.gather(2, out.response_ids[..., None]).squeeze(2) * out.response_mask
    torch.testing.assert_close(trained, out.logprobs, atol=1e-5, rtol=0)


def test_stop_strings_end_a_row_and_are_kept(model, tok):
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    input_ids, mask = encode(tok, ["one", "two", "three", "four"])
    out = run(model, tok, input_ids, mask, max_new_tokens=200, stop_strings=letters, tokenizer=tok)
    assert "stop_string" in out.stop_reason
    for row, reason in enumerate(out.stop_reason):
        text = tok.decode(out.response_ids[row, : out.num_generated[row]].tolist(), skip_special_tokens=True)
        letters_at = [i for i, ch in enumerate(text) if ch in letters]
        if reason == "stop_string":  # exactly one letter, the last character
            assert letters_at == [len(text) - 1]
        else:
            assert not letters_at


def test_eos_ends_a_row_and_is_kept(model, tok):
    eos_ids = list(range(1, 60))  # many "EOS" ids so rows end fast
    input_ids, mask = encode(tok, ["one", "two", "three"])
    out = run(model, tok, input_ids, mask, max_new_tokens=100, eos_token_id=eos_ids)
    for row in range(3):
        ids = out.response_ids[row, : out.num_generated[row]].tolist()
        assert out.stop_reason[row] == "eos" and ids[-1] in eos_ids and not set(ids[:-1]) & set(eos_ids)
        assert out.response_mask[row].sum() == len(ids)
        assert (out.response_ids[row, len(ids):] == tok.pad_token_id).all()
    late = run(model, tok, input_ids, mask, max_new_tokens=100, eos_token_id=eos_ids, min_new_tokens=6)
    assert min(late.num_generated) >= 6


class BatchRecorder(torch.nn.Module):
    """Wraps a model and records the batch size of every forward call."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.config, self.batch_sizes = inner, inner.config, []

    def forward(self, input_ids, attention_mask=None, position_ids=None, **kwargs):
        # **kwargs: the KV cache under whichever name the installed transformers uses (`cache` or `past_key_values`)
        self.batch_sizes.append(input_ids.shape[0])
        return self.inner(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, **kwargs)


def test_finished_rows_leave_the_batch(model, tok):
    input_ids, mask = encode(tok, ["a", "bb", "ccc", "dddd"])
    budgets = [2, 30, 8, 0]
    recorder = BatchRecorder(model).eval()
    lean = run(recorder, tok, input_ids, mask, max_new_tokens=budgets, eos_token_id=None)
    naive = run(model, tok, input_ids, mask, max_new_tokens=budgets, eos_token_id=None, drop_finished=False)

    assert lean.num_generated == budgets[:3] + [0] and lean.stop_reason == ["length"] * 4
    # same tokens and log-probs either way
    assert torch.equal(lean.response_ids, naive.response_ids)
    torch.testing.assert_close(lean.logprobs, naive.logprobs, atol=1e-5, rtol=0)
    # the batch shrank as rows finished (the row with budget 0 never entered it), and the KV cache with it
    assert recorder.batch_sizes == [3] + [3] * 1 + [2] * 6 + [1] * 22
    batch, width = 4, max(budgets)
    assert lean.generated_positions == 40
    assert lean.computed_positions == sum(b - 1 for b in budgets if b > 0) == 37
    assert lean.padded_positions == 0
    assert naive.computed_positions == 3 * (width - 1) and naive.padded_positions > 0
    assert lean.computed_positions < batch * width


def test_greedy_limits_agree_with_a_plain_argmax_loop(model, tok):
    input_ids, mask = encode(tok, ["greedy", "decoding test"])
    greedy = run(model, tok, input_ids, mask, max_new_tokens=12, temperature=0.0, eos_token_id=None)
    for kwargs in (dict(temperature=1e-4), dict(top_k=1), dict(top_p=1e-6)):
        other = run(model, tok, input_ids, mask, max_new_tokens=12, eos_token_id=None, **kwargs)
        assert torch.equal(other.response_ids, greedy.response_ids), kwargs
    # reference: argmax over full forward passes, no cache
    for row in range(2):
        ids = input_ids[row][mask[row] == 1].tolist()
        for _ in range(12):
            with torch.no_grad():
                ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
        assert greedy.response_ids[row].tolist() == ids[-12:]


def test_deterministic_given_a_generator_and_restores_train_mode(model, tok):
    input_ids, mask = encode(tok, ["seeded", "runs"])
    a, b = run(model, tok, input_ids, mask, seed=5), run(model, tok, input_ids, mask, seed=5)
    c = run(model, tok, input_ids, mask, seed=6)
    assert torch.equal(a.response_ids, b.response_ids) and not torch.equal(a.response_ids, c.response_ids)
    model.train()
    try:
        run(model, tok, input_ids, mask, max_new_tokens=2)
        assert model.training
    finally:
        model.eval()


def test_rejects_bad_arguments(model, tok):
    input_ids, mask = encode(tok, ["x"])
    with pytest.raises(ValueError, match="tokenizer"):
        run(model, tok, input_ids, mask, stop_strings=["a"])
    with pytest.raises(ValueError, match="top_p"):
        run(model, tok, input_ids, mask, top_p=0.0)
    with pytest.raises(ValueError, match="no real prompt token"):
        run(model, tok, input_ids, torch.zeros_like(mask))
