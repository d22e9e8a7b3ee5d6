"""Fixtures for the text-environment tests: the byte tokenizer, tiny random GPT-2s, and a scripted policy."""

from __future__ import annotations

import re
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config

from rlcli.models.tokenizer import build_byte_tokenizer


def tiny_gpt2(tok, seed: int = 0):
    torch.manual_seed(seed)
    config = GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=len(tok), n_positions=512,
                        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return AutoModelForCausalLM.from_config(config).eval()


class ScriptedLM(torch.nn.Module):
    """A real tiny GPT-2 (real forward, real KV cache) whose logits are overridden to follow a script.

    Episodes are told apart by their prompt, which starts with ``#<k>:``. ``plans[k][t]`` is the list of token ids
    the policy emits on turn ``t`` of episode ``k`` (``None``: the random GPT-2 samples freely). It must end with a
    token that completes a stop string or with EOS, so the sampler stops exactly at its end.

    Everything the model is fed is recorded: ``prefills[k]`` = the context of each turn's prefill, ``fed[k]`` = the
    full sequence pushed through the model for episode k so far (prefill + every decoded token). Rows are tracked
    through the KV cache: the tracked sequences live on the cache object and follow its ``batch_select_indices``.
    """

    def __init__(self, inner, tokenizer, plans: dict[int, list[list[int] | None]]):
        super().__init__()
        self.inner = inner
        self.config = inner.config
        self.tokenizer = tokenizer
        self.plans = plans
        self.prefills: dict[int, list[list[int]]] = defaultdict(list)
        self.fed: dict[int, list[int]] = {}
        self.forward_calls = 0

    def _episode(self, ids: list[int]) -> int:
        return int(re.search(r"#(\d+):", self.tokenizer.decode(ids)).group(1))

    def forward(self, input_ids, attention_mask=None, position_ids=None, cache=None, use_cache=None,
                logits_to_keep=0):
        assert cache is not None, "the sampler should run on a KV cache"
        self.forward_calls += 1
        if cache.get_seq_length() == 0:  # prefill: start tracking this batch's rows on the cache itself
            rows = [input_ids[i][attention_mask[i] == 1].tolist() for i in range(len(input_ids))]
            starts = [len(r) for r in rows]
            select = cache.batch_select_indices

            def select_and_track(indices, _select=select):
                _select(indices)
                for name in ("_tracked", "_starts", "_episodes"):
                    setattr(cache, name, [getattr(cache, name)[i] for i in indices.tolist()])

            cache.batch_select_indices = select_and_track
            cache._tracked, cache._starts = rows, starts
            cache._episodes = [self._episode(r) for r in rows]
            for k, r in zip(cache._episodes, rows):
                self.prefills[k].append(list(r))
        else:
            assert input_ids.shape == (len(cache._tracked), 1)
            for r, token in zip(cache._tracked, input_ids[:, 0].tolist()):
                r.append(token)
        out = self.inner(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache,
                         use_cache=use_cache, logits_to_keep=logits_to_keep)
        logits = out.logits.clone()
        for i, (r, start, k) in enumerate(zip(cache._tracked, cache._starts, cache._episodes)):
            self.fed[k] = list(r)
            turn = len(self.prefills[k]) - 1
            script = self.plans.get(k, [])[turn] if turn < len(self.plans.get(k, [])) else None
            done = len(r) - start
            if script is not None and done < len(script):
                logits[i, -1] = -1e4
                logits[i, -1, script[done]] = 0.0
        return SimpleNamespace(logits=logits)


@pytest.fixture(scope="session")
def tok():
    return build_byte_tokenizer()


@pytest.fixture(scope="session")
def model(tok):
    return tiny_gpt2(tok)


@pytest.fixture
def scripted(tok):
    """``scripted(plans)`` -> a ScriptedLM over a fresh tiny GPT-2."""
    return lambda plans: ScriptedLM(tiny_gpt2(tok), tok, plans).eval()
