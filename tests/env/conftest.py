"""Fixtures for the text-environment tests: the byte tokenizer, tiny random GPT-2s, a scripted policy, and
SmolLM2-135M-Instruct converted from its GGUF file (``smollm2_dir``)."""

from __future__ import annotations

import re
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config

from rlcli.models.tokenizer import build_byte_tokenizer
from tests.smollm2 import smollm2_dir  # noqa: F401  (a session fixture)


def tiny_gpt2(tok, seed: int = 0, n_positions: int = 512):
    torch.manual_seed(seed)
    config = GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=len(tok), n_positions=n_positions,
                        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return AutoModelForCausalLM.from_config(config).eval()


class ScriptedLM(torch.nn.Module):
    """A real tiny GPT-2 (real forward, real KV cache) whose logits are overridden to follow a script.

    Episodes are told apart by their prompt, which starts with ``#<k>:``. ``plans[k][t]`` is the list of token ids
    the policy emits on turn ``t`` of episode ``k`` (``None``: the random GPT-2 samples freely). It must end with a
    token that completes a stop string or with EOS, so the sampler stops exactly at its end.

    Everything the model is fed is recorded: ``prefills[k]`` = the context of each turn (what the model holds when
    the turn's first token is drawn), ``fed[k]`` = the full sequence pushed through the model for episode k so far.
    Rows are tracked through the KV cache: the tracked sequences live on the cache object and follow its
    ``batch_select_indices``. A turn that continues from kept caches (``kv_reuse``) arrives as a new cache that
    already holds tokens; each of its rows is recognised by the keys of its last cached token in the last layer,
    which depend on the row's whole history and are copied bit for bit from the cache the row left.
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
        self.continued_rows = 0
        self._seen: dict[bytes, tuple[int, list[int]]] = {}

    def _episode(self, ids: list[int]) -> int:
        return int(re.search(r"#(\d+):", self.tokenizer.decode(ids)).group(1))

    @staticmethod
    def _fingerprint(cache, row: int, column: int) -> bytes:
        return cache.layers[-1].keys[row, :, column, :].numpy().tobytes()

    def _start_turn(self, cache, input_ids, attention_mask) -> None:
        """A forward on a cache this model has not tracked yet: the first call of a turn."""
        held = cache.get_seq_length()
        rows, episodes = [], []
        for i in range(len(input_ids)):
            chunk = input_ids[i][attention_mask[i, held:] == 1].tolist()
            real = (attention_mask[i, :held] == 1).nonzero().flatten().tolist()
            if real:
                k, before = self._seen[self._fingerprint(cache, i, real[-1])]
                self.continued_rows += 1
            else:
                before = []
                k = self._episode(chunk)
            rows.append(before + chunk)
            episodes.append(k)
        select = cache.batch_select_indices

        def select_and_track(indices, _select=select):
            _select(indices)
            for name in ("_tracked", "_starts", "_episodes"):
                setattr(cache, name, [getattr(cache, name)[i] for i in indices.tolist()])

        cache.batch_select_indices = select_and_track
        cache._tracked, cache._starts, cache._episodes = rows, [len(r) for r in rows], episodes
        for k, r in zip(episodes, rows):
            self.prefills[k].append(list(r))

    def forward(self, input_ids, attention_mask=None, position_ids=None, cache=None, use_cache=None,
                logits_to_keep=0):
        assert cache is not None, "the sampler should run on a KV cache"
        self.forward_calls += 1
        if not hasattr(cache, "_tracked"):
            self._start_turn(cache, input_ids, attention_mask)
        else:
            assert input_ids.shape == (len(cache._tracked), 1)
            for r, token in zip(cache._tracked, input_ids[:, 0].tolist()):
                r.append(token)
        out = self.inner(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache,
                         use_cache=use_cache, logits_to_keep=logits_to_keep)
        logits = out.logits.clone()
        for i, (r, start, k) in enumerate(zip(cache._tracked, cache._starts, cache._episodes)):
            self.fed[k] = list(r)
            self._seen[self._fingerprint(cache, i, -1)] = (k, list(r))
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
