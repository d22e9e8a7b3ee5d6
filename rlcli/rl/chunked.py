"""Per-token statistics of the behaviour distribution without the full-vocabulary logits.

A model's final hidden states ``[B, T, H]`` are small; its logits ``[B, T, V]`` are not (8 rows × 300 positions ×
49,152 float32 logits is 0.47 GB per copy, and log-softmax, gather, entropy and their gradients make several). Here
the hidden states go through the LM head a chunk of positions at a time: each chunk yields the log-probs of its
labels, its logsumexp and, when asked, its entropy, the exact KL to a reference and the mass the rules forbid, and
its logits are freed before the next chunk. Under autograd each chunk runs inside ``torch.utils.checkpoint``, so the
backward recomputes one chunk's logits at a time instead of keeping every chunk's alive.

Only the positions ``mask`` selects are computed (padding, forced tool tokens and prompt tokens without a label never
reach the head); every other position gets exactly 0, with no gradient.

The rules (temperature, bans, EOS before ``min_new_tokens``, top-k / top-p) are applied inside the chunk by
``SamplingRules.apply``, so the numbers are those of ``SamplingRules.logprobs`` / ``entropy`` / ``full_kl`` /
``forbidden_mass`` on the full logits, up to float summation order.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch.utils.checkpoint import checkpoint

from rlcli.rl.sampling import SamplingRules, _entropy

# float32 logits per chunk (64 MB): 341 positions of a 49,152-token vocabulary, 110 of Qwen's 151,936; a small
# vocabulary gets one chunk for the whole batch
CHUNK_ELEMENTS = 1 << 24

Head = Callable[[torch.Tensor], torch.Tensor]
"""``[n, H]`` hidden states -> ``[n, V]`` raw logits (the model's LM head, LoRA and tied weights included)."""


class TokenStats(NamedTuple):
    """Per-position statistics, each ``[B, T]`` float32 (0 where ``mask`` is 0); None where not asked for.

    - ``logprobs``: log-prob of each label under the behaviour distribution (``-inf`` on a label the rules forbid);
    - ``logsumexp``: logsumexp of the behaviour logits (the log normaliser);
    - ``entropy``: entropy (nats) of the behaviour distribution;
    - ``full_kl``: exact ``KL(pi || ref)`` over the vocabulary, both under the rules (>= 0);
    - ``forbidden_mass``: probability the unrestricted tempered distribution puts on tokens the rules forbid.
    """

    logprobs: torch.Tensor
    logsumexp: torch.Tensor
    entropy: torch.Tensor | None = None
    full_kl: torch.Tensor | None = None
    forbidden_mass: torch.Tensor | None = None


def chunk_positions(vocab_size: int, chunk_elements: int = CHUNK_ELEMENTS) -> int:
    """Positions per chunk so that one chunk's float32 logits hold about ``chunk_elements`` numbers (at least 1)."""
    return max(1, chunk_elements // max(int(vocab_size), 1))


def token_stats(hidden: torch.Tensor, head: Head, labels: torch.Tensor, rules: SamplingRules, *,
                turn_positions: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                entropy: bool = False, ref: tuple[torch.Tensor, Head] | None = None, forbidden: bool = False,
                chunk_size: int | None = None) -> TokenStats:
    """Statistics of ``rules.apply(head(hidden))`` at every selected position, a chunk of positions at a time.

    Args:
        hidden: ``[B, T, H]`` the head's input; position t scores ``labels[:, t]``.
        head: hidden ``[n, H]`` -> raw logits ``[n, V]``.
        labels: ``[B, T]`` long token ids (any value where ``mask`` is 0, e.g. -100).
        rules: the sampling rules (``rlcli.rl.sampling``).
        turn_positions: ``[B, T]`` long, each position's index inside its model turn (None = 0, 1, 2, ... along T).
        mask: ``[B, T]`` 0/1 or bool, the positions to compute (None = all).
        entropy: also the entropy.
        ref: ``(ref_hidden [B, T, H'], ref_head)``: also the exact KL to the reference's distribution.
        forbidden: also the forbidden mass.
        chunk_size: positions per chunk (None: ``chunk_positions`` of the vocabulary, found on the first chunk).

    Returns:
        ``TokenStats`` of ``[B, T]`` float32 tensors (float64 if ``hidden`` is), differentiable w.r.t. ``hidden``
        and the head's parameters (through ``logprobs``, ``logsumexp``, ``entropy`` and ``full_kl``).
    """
    b, t = labels.shape
    if hidden.shape[:2] != (b, t):
        raise ValueError(f"hidden {tuple(hidden.shape)} does not match labels {tuple(labels.shape)}")
    if turn_positions is None:
        turn_positions = torch.arange(t, device=labels.device).expand(b, t)
    keep = torch.ones(b, t, dtype=torch.bool, device=hidden.device) if mask is None else \
        mask.to(device=hidden.device, dtype=torch.bool)
    where = keep.nonzero(as_tuple=True)
    h = hidden[where]                                           # [N, H]: only the selected positions
    lab = labels.to(hidden.device)[where]
    pos = turn_positions.to(hidden.device)[where]
    ref_h = None if ref is None else ref[0][where]
    out_dtype = torch.promote_types(hidden.dtype, torch.float32)
    names = ["logprobs", "logsumexp"] + [n for n, on in (("entropy", entropy), ("full_kl", ref is not None),
                                                          ("forbidden_mass", forbidden)) if on]

    def one_chunk(h_c, lab_c, pos_c, ref_c):
        raw = head(h_c)
        z = rules.apply(raw, pos_c)                             # [n, V] behaviour logits, float32
        lse = torch.logsumexp(z, dim=-1)
        values = [z.gather(-1, lab_c[:, None]).squeeze(-1) - lse, lse]
        if entropy:
            values.append(_entropy(z))
        if ref is not None:
            logp = torch.log_softmax(z, dim=-1)  # as the reference's: identical models give a KL of exactly 0
            ref_logp = torch.log_softmax(rules.apply(ref[1](ref_c), pos_c), dim=-1)
            p = logp.exp()
            # p = 0 (a forbidden token) contributes 0; the where keeps its -inf - -inf from making a NaN
            values.append(torch.where(p > 0, p * (logp - ref_logp), torch.zeros_like(p)).sum(-1).clamp(min=0))
        if forbidden:
            plain = SamplingRules(temperature=rules.temperature if rules.temperature > 0 else 1.0)
            all_lse = torch.logsumexp(plain.apply(raw), dim=-1)
            values.append((1.0 - torch.exp(lse - all_lse)).clamp(min=0))
        return tuple(values)

    n = h.shape[0]
    parts: list[tuple[torch.Tensor, ...]] = []
    step = chunk_size
    start = 0
    while start < n:
        if step is None:  # the vocabulary size is known once the head has run
            with torch.no_grad():
                step = chunk_positions(head(h[:1]).shape[-1])
        sl = slice(start, start + step)
        args = (h[sl], lab[sl], pos[sl], None if ref_h is None else ref_h[sl])
        if torch.is_grad_enabled():
            # the backward recomputes this chunk's logits instead of keeping them alive
            parts.append(checkpoint(one_chunk, *args, use_reentrant=False))
        else:
            parts.append(one_chunk(*args))
        start += step
    results = []
    for i, _ in enumerate(names):
        flat = torch.cat([p[i] for p in parts]) if parts else hidden.new_zeros(0, dtype=out_dtype)
        full = torch.zeros(b, t, dtype=out_dtype, device=hidden.device)
        results.append(full.index_put(where, flat.to(out_dtype)))
    stats = dict(zip(names, results))
    return TokenStats(**stats)

