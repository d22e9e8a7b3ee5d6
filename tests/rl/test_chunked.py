"""Chunked per-token statistics (rlcli.rl.chunked) against the same statistics of the full logits."""

from __future__ import annotations

import math

import pytest
import torch

from rlcli.rl.chunked import chunk_positions, token_stats
from rlcli.rl.sampling import SamplingRules

RULES = [
    SamplingRules(),
    SamplingRules(temperature=0.7),
    SamplingRules(temperature=1.3, eos_ids=(3,), min_new_tokens=2, banned_ids=(5,)),
]


def _problem(dtype, seed=0, b=3, t=7, h=6, v=11):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(b, t, h, generator=g, dtype=dtype, requires_grad=True)
    head = torch.nn.Linear(h, v, bias=True).to(dtype)
    with torch.no_grad():
        head.weight.copy_(torch.randn(v, h, generator=g, dtype=dtype))
    labels = torch.randint(0, v, (b, t), generator=g)
    labels[labels == 5] = 4  # never a banned label where it counts
    labels[:, :2][labels[:, :2] == 3] = 2
    mask = torch.ones(b, t, dtype=torch.bool)
    mask[0, 5:] = False  # padding
    mask[1, 2:4] = False  # forced tool tokens
    labels[~mask] = 5  # a banned id: -inf if it were computed
    turn = torch.arange(t).expand(b, t).clone()
    turn[1, 4:] -= 4  # a new turn after the tool tokens
    return hidden, head, labels, mask, turn


def _reference(hidden, head, labels, rules, mask, turn):
    logits = head(hidden)
    lp = rules.logprobs(logits, labels, turn, mask=mask)
    ent = torch.where(mask, rules.entropy(logits, turn), 0.0)
    lse = torch.where(mask, torch.logsumexp(rules.apply(logits, turn), dim=-1), 0.0)
    return lp, ent, lse


@pytest.mark.parametrize("rules", RULES, ids=["plain", "temperature", "bans"])
@pytest.mark.parametrize("chunk", [1, 4, 1000])
def test_values_and_gradients_equal_the_full_logits(rules, chunk):
    hidden, head, labels, mask, turn = _problem(torch.float64)
    weights = torch.randn(3, 7, dtype=torch.float64)

    lp, ent, lse = _reference(hidden, head, labels, rules, mask, turn)
    ((lp * weights).sum() + (ent * weights.flip(0)).sum() + lse.sum()).backward()
    want = hidden.grad.clone(), head.weight.grad.clone(), head.bias.grad.clone()
    hidden.grad = None
    head.zero_grad()

    got = token_stats(hidden, head, labels, rules, turn_positions=turn, mask=mask, entropy=True, chunk_size=chunk)
    torch.testing.assert_close(got.logprobs, lp, rtol=0, atol=1e-12)
    torch.testing.assert_close(got.entropy, ent, rtol=0, atol=1e-12)
    torch.testing.assert_close(got.logsumexp, lse, rtol=0, atol=1e-12)
    assert (got.logprobs[~mask] == 0).all() and torch.isfinite(got.logprobs).all()
    ((got.logprobs * weights).sum() + (got.entropy * weights.flip(0)).sum() + got.logsumexp.sum()).backward()
    for g, w in zip((hidden.grad, head.weight.grad, head.bias.grad), want):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-10)
    assert hidden.grad[~mask].abs().max() == 0  # positions not computed get no gradient


def test_float32_gradients_within_1e_6():
    hidden, head, labels, mask, turn = _problem(torch.float32, seed=1)
    rules = RULES[2]
    lp, ent, _ = _reference(hidden, head, labels, rules, mask, turn)
    (lp.sum() - 0.1 * ent.sum()).backward()
    want = hidden.grad.clone(), head.weight.grad.clone()
    hidden.grad = None
    head.zero_grad()
    got = token_stats(hidden, head, labels, rules, turn_positions=turn, mask=mask, entropy=True, chunk_size=3)
    (got.logprobs.sum() - 0.1 * got.entropy.sum()).backward()
    for g, w in zip((hidden.grad, head.weight.grad), want):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-6)


def test_hand_computed_example():
    # vocabulary of 3, head = identity: logits (0, log 2, log 3) -> p = (1/6, 2/6, 3/6)
    logits = torch.log(torch.tensor([[[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]]]))
    got = token_stats(logits, lambda z: z, torch.tensor([[2, 0]]), SamplingRules(banned_ids=(1,)), entropy=True,
                      forbidden=True, chunk_size=1)
    # token 1 banned: p = (1/4, 0, 3/4)
    torch.testing.assert_close(got.logprobs, torch.tensor([[math.log(0.75), math.log(0.25)]]))
    torch.testing.assert_close(got.logsumexp, torch.full((1, 2), math.log(4.0)))
    h = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    torch.testing.assert_close(got.entropy, torch.full((1, 2), h))
    torch.testing.assert_close(got.forbidden_mass, torch.full((1, 2), 2 / 6))


def test_full_kl_and_forbidden_mass_equal_the_full_logits():
    hidden, head, labels, mask, turn = _problem(torch.float64, seed=2)
    ref_head = torch.nn.Linear(6, 11).to(torch.float64)
    ref_hidden = hidden.detach() + 0.3
    rules = RULES[2]
    with torch.no_grad():
        got = token_stats(hidden, head, labels, rules, turn_positions=turn, mask=mask, ref=(ref_hidden, ref_head),
                          forbidden=True, chunk_size=2)
        kl = rules.full_kl(head(hidden), ref_head(ref_hidden), turn)
        forbidden = rules.forbidden_mass(head(hidden), turn)
    torch.testing.assert_close(got.full_kl, torch.where(mask, kl, 0.0), rtol=0, atol=1e-12)
    torch.testing.assert_close(got.forbidden_mass, torch.where(mask, forbidden, 0.0), rtol=0, atol=1e-12)
    assert got.full_kl[mask].min() > 0 and got.forbidden_mass[mask].min() > 0


def test_backward_keeps_one_chunk_of_logits_not_all():
    """What autograd saves for the backward: with chunks it is the hidden states and per-position numbers, never the
    [positions, vocab] logits (the backward recomputes a chunk at a time)."""
    torch.manual_seed(0)
    n, h, v = 256, 16, 4096
    hidden = torch.randn(1, n, h, requires_grad=True)
    head = torch.nn.Linear(h, v, bias=False)
    labels = torch.randint(0, v, (1, n))
    logits_bytes = n * v * 4

    def saved_bytes(fn) -> int:
        total = 0

        def pack(t):
            nonlocal total
            total += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = fn()
        out.sum().backward()
        return total

    full = saved_bytes(lambda: SamplingRules().logprobs(head(hidden), labels))
    chunked = saved_bytes(lambda: token_stats(hidden, head, labels, SamplingRules(), entropy=True,
                                              chunk_size=32).logprobs)
    assert full >= 2 * logits_bytes  # the logits and their log-softmax, at least
    assert chunked < logits_bytes / 8


def test_chunk_positions_follow_the_vocabulary():
    assert chunk_positions(49152) == (1 << 24) // 49152
    assert chunk_positions(10**9) == 1
    assert chunk_positions(256) == 65536


def test_default_chunks_no_positions_and_only_what_was_asked():
    hidden, head, labels, mask, turn = _problem(torch.float64, seed=3)
    rules = SamplingRules(temperature=0.7, banned_ids=(5,))
    with torch.no_grad():
        got = token_stats(hidden, head, labels, rules, turn_positions=turn, mask=mask, forbidden=True)
        logits = head(hidden)
        want = rules.logprobs(logits, labels, turn, mask=mask)
        forbidden = torch.where(mask, rules.forbidden_mass(logits, turn), 0.0)
        none = token_stats(hidden, head, labels, rules, mask=torch.zeros_like(mask))
    torch.testing.assert_close(got.logprobs, want, rtol=0, atol=1e-12)  # the chunk size found from the vocabulary
    torch.testing.assert_close(got.forbidden_mass, forbidden, rtol=0, atol=1e-12)  # tempered, not plain
    assert got.entropy is None and got.full_kl is None
    assert none.logprobs.shape == labels.shape and (none.logprobs == 0).all() and none.forbidden_mass is None
