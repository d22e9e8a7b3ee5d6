"""Batched sampling from a decoder-only causal LM, with the same arithmetic as the PPO forward pass.

``sample()`` is the one generator that plain PPO rollouts and the text environment share. Three things make its
log-probs equal to the ones a training forward pass over ``Rollout.full_sequences()`` computes:

- position ids come from the attention mask's cumulative sum, so a left-padded row sees the same positions as
  the same row without padding (ppo-details.md item 3);
- the returned ``logprobs`` are ``log_softmax(logits / temperature)`` at the sampled token: the tempered, *unfiltered*
  distribution the trainer computes. top-k, top-p and ``min_new_tokens`` only change which token is drawn;
- the KV cache is prefilled once and then fed one token per step, with the attention mask growing by one column.

Rows that finish (EOS, a stop string, or their token budget) leave the batch at once: their rows are dropped from
the input, the attention mask and the KV cache (``Cache.batch_select_indices``), so every decoded position is a
real token. ``drop_finished=False`` keeps them in the batch, fed pad tokens, which is what a naive padded loop
does; it exists as the baseline that the position counters of ``SampleOutput`` are compared with.

Randomness is per row: ``generator`` gives row i a seed (its i-th draw), and row i's own stream gives one uniform
per step, which inverts that row's CDF. A row's tokens therefore depend on its logits, the generator's state and
its index, never on the batch size, the padding or which other rows are still in the batch.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass

import torch

STOP_REASONS = ("eos", "stop_string", "length")


@dataclass(frozen=True)
class SampleOutput:
    """What ``sample()`` generated, on the CPU. B = batch, R = longest response.

    - ``response_ids``  [B, R] long: new tokens, **right**-padded with the pad id. An EOS that ended a row is kept
      (it is a real model token); so is the token that completed a stop string.
    - ``response_mask`` [B, R] long: 1 on generated tokens, 0 on padding.
    - ``logprobs``      [B, R] float32: ``log_softmax(logits / temperature)`` of each generated token (plain
      ``log_softmax(logits)`` when ``temperature == 0``); 0 on padding.
    - ``stop_reason``   B strings, each one of ``"eos"``, ``"stop_string"``, ``"length"``.
    - ``num_generated`` B ints: tokens generated per row (= ``response_mask.sum(1)``).

    Position counters (one "position" = one token of one row pushed through the model):

    - ``generated_positions``: real tokens generated, summed over rows.
    - ``computed_positions``: positions pushed through the model in decode steps. With finished rows leaving the
      batch it equals ``generated_positions`` minus the last token of each row (which is sampled but never fed);
      a naive padded loop pays ``B * (R - 1)``.
    - ``padded_positions``: decode positions spent on rows that had already finished (0 when they leave).
    - ``prefill_positions`` / ``prefill_pad_positions``: the prefill's ``B * Q`` and how many of those are left
      padding.
    """

    response_ids: torch.Tensor
    response_mask: torch.Tensor
    logprobs: torch.Tensor
    stop_reason: list[str]
    num_generated: list[int]
    generated_positions: int
    computed_positions: int
    padded_positions: int
    prefill_positions: int
    prefill_pad_positions: int


def sample(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    max_new_tokens: int | Sequence[int],
    *,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    eos_token_id: int | Sequence[int] | None,
    pad_token_id: int,
    stop_strings: Sequence[str] = (),
    tokenizer=None,
    min_new_tokens: int = 0,
    generator: torch.Generator | None = None,
    drop_finished: bool = True,
) -> SampleOutput:
    """Sample continuations of a batch of prompts, one token per step on a KV cache.

    Args:
        model: a Hugging Face decoder-only LM (anything whose forward takes ``input_ids``, ``attention_mask``,
            ``position_ids`` and a ``cache`` / ``past_key_values`` and returns ``logits`` [B, T, V]).
        input_ids: [B, Q] long, **left**-padded prompts.
        attention_mask: [B, Q] long, 1 on real prompt tokens.
        max_new_tokens: token budget, one int for all rows or one per row (a row with budget <= 0 generates
            nothing and stops with ``"length"``).
        temperature: logits are divided by it before top-k/top-p; 0 means greedy (argmax).
        top_k: keep the k most likely tokens; 0 keeps all.
        top_p: keep the smallest set of tokens whose probability reaches ``top_p``; 1.0 keeps all.
        eos_token_id: token id(s) that end a row (kept in the response).
        pad_token_id: fills ``response_ids`` after a row ends.
        stop_strings: a row ends as soon as the decoded text of its new tokens contains one of these.
        tokenizer: decodes new tokens for ``stop_strings``; required when they are given.
        min_new_tokens: EOS is masked out until a row has this many tokens (stop strings are not affected,
            as in Hugging Face ``generate``).
        generator: source of randomness; the same generator state gives the same samples.
        drop_finished: drop finished rows from the batch (default). False keeps them, fed pad tokens: the
            naive baseline, for benchmarks and tests.

    Runs under ``torch.no_grad()`` with the model in eval mode (its previous mode is restored).
    """
    if input_ids.dim() != 2 or input_ids.shape != attention_mask.shape:
        raise ValueError(f"input_ids and attention_mask must both be [B, Q]; got {tuple(input_ids.shape)} "
                         f"and {tuple(attention_mask.shape)}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 = no limit), got {top_k}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    stop_strings = tuple(s for s in stop_strings if s)
    if stop_strings and tokenizer is None:
        raise ValueError("stop_strings need a tokenizer to decode the generated tokens")
    empty_rows = (attention_mask.sum(dim=1) == 0).nonzero().flatten().tolist()
    if empty_rows:
        raise ValueError(f"rows {empty_rows} have no real prompt token (attention_mask all 0)")

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return _sample(
                model, input_ids, attention_mask, max_new_tokens, temperature=temperature, top_k=top_k,
                top_p=top_p, eos_ids=_as_id_list(eos_token_id), pad_token_id=pad_token_id, stop_strings=stop_strings,
                tokenizer=tokenizer, min_new_tokens=min_new_tokens, generator=generator, drop_finished=drop_finished,
            )
    finally:
        model.train(was_training)


def _sample(model, input_ids, attention_mask, max_new_tokens, *, temperature, top_k, top_p, eos_ids, pad_token_id,
            stop_strings, tokenizer, min_new_tokens, generator, drop_finished) -> SampleOutput:
    device = _model_device(model, input_ids.device)
    batch_size = input_ids.shape[0]
    if isinstance(max_new_tokens, int):
        budgets = [max_new_tokens] * batch_size
    else:
        budgets = [int(b) for b in max_new_tokens]
        if len(budgets) != batch_size:
            raise ValueError(f"max_new_tokens has {len(budgets)} entries for a batch of {batch_size}")

    tokens: list[list[int]] = [[] for _ in range(batch_size)]
    logprobs: list[list[float]] = [[] for _ in range(batch_size)]
    stop_reason: list[str | None] = ["length" if b <= 0 else None for b in budgets]
    counters = dict(computed=0, padded=0, prefill=0, prefill_pad=0)

    # one seed per row, drawn in row order, so row i's stream does not depend on the batch size
    seed_device = generator.device if generator is not None else "cpu"
    row_generators = [
        torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,), generator=generator, device=seed_device)))
        for _ in range(batch_size)
    ]
    # `rows[i]` is the original index of batch row i; `alive[i]` is False only for finished rows that stay in the
    # batch (drop_finished=False).
    rows = torch.tensor([i for i in range(batch_size) if budgets[i] > 0], dtype=torch.long)
    if len(rows) == 0:
        return _pack(tokens, logprobs, stop_reason, pad_token_id, counters)
    seq_ids = input_ids[rows].to(device)
    seq_mask = attention_mask[rows].to(device=device, dtype=torch.long)
    # Columns that are padding in every remaining row carry nothing: drop them (positions come from the cumsum, so
    # nothing else changes).
    first_real = int((seq_mask.sum(0) > 0).nonzero()[0])
    seq_ids, seq_mask = seq_ids[:, first_real:], seq_mask[:, first_real:]
    alive = torch.ones(len(rows), dtype=torch.bool, device=device)
    eos_tensor = torch.tensor(eos_ids, dtype=torch.long, device=device) if eos_ids else None
    stop_window = 4 * max((len(s) for s in stop_strings), default=0) + 8
    caller = _ModelCaller(model)

    counters["prefill"] = seq_ids.numel()
    counters["prefill_pad"] = int((seq_mask == 0).sum())
    logits = caller.prefill(seq_ids, seq_mask)
    step = 0
    while True:
        row_uniforms = torch.cat([torch.rand(1, generator=row_generators[r]) for r in rows.tolist()]).to(device)
        if min_new_tokens > step and eos_tensor is not None:
            sample_logits = logits.clone()
            sample_logits[:, eos_tensor] = float("-inf")
        else:
            sample_logits = logits
        next_tokens = _draw(sample_logits, temperature, top_k, top_p, row_uniforms)
        scaled = logits.float() / temperature if temperature > 0 else logits.float()
        next_logprobs = torch.log_softmax(scaled, dim=-1).gather(1, next_tokens[:, None]).squeeze(1)
        step += 1

        finished = torch.zeros(len(rows), dtype=torch.bool)
        alive_list = alive.tolist()
        next_list, lp_list = next_tokens.tolist(), next_logprobs.tolist()
        for i, row in enumerate(rows.tolist()):
            if not alive_list[i]:
                continue
            tokens[row].append(next_list[i])
            logprobs[row].append(lp_list[i])
            if next_list[i] in eos_ids:
                stop_reason[row] = "eos"
            elif stop_strings and _hits_stop_string(tokenizer, tokens[row][-stop_window:], stop_strings):
                stop_reason[row] = "stop_string"
            elif len(tokens[row]) >= budgets[row]:
                stop_reason[row] = "length"
            finished[i] = stop_reason[row] is not None
        finished = finished.to(device)

        if drop_finished:
            keep = (~finished).nonzero().squeeze(1)
            if len(keep) == 0:
                break
            if len(keep) < len(rows):
                rows = rows[keep.cpu()]
                seq_ids, seq_mask, next_tokens, alive = seq_ids[keep], seq_mask[keep], next_tokens[keep], alive[keep]
                caller.select_rows(keep)
            new_mask_col = torch.ones(len(rows), 1, dtype=torch.long, device=device)
        else:
            alive = alive & ~finished
            if not alive.any():
                break
            next_tokens = torch.where(alive, next_tokens, torch.full_like(next_tokens, pad_token_id))
            new_mask_col = alive.long()[:, None]
            counters["padded"] += int((~alive).sum())

        seq_ids = torch.cat([seq_ids, next_tokens[:, None]], dim=1)
        seq_mask = torch.cat([seq_mask, new_mask_col], dim=1)
        counters["computed"] += len(rows)
        logits = caller.step(seq_ids, seq_mask)

    return _pack(tokens, logprobs, stop_reason, pad_token_id, counters)


def _draw(logits: torch.Tensor, temperature: float, top_k: int, top_p: float, uniforms: torch.Tensor) -> torch.Tensor:
    """[b, V] logits, [b] uniforms in [0, 1) -> [b] token ids, by inverting each row's filtered CDF."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    vocab = logits.shape[-1]
    if 0 < top_k < vocab:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        sorted_probs = torch.softmax(sorted_logits, dim=-1)
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
        drop = mass_before >= top_p
        drop[:, 0] = False
        logits = logits.scatter(1, order, sorted_logits.masked_fill(drop, float("-inf")))
    cdf = torch.softmax(logits, dim=-1).cumsum(dim=-1)
    targets = uniforms[:, None].to(cdf.dtype) * cdf[:, -1:]
    # right=True: the first token whose cumulative mass exceeds the target, so zero-probability tokens never win
    return torch.searchsorted(cdf, targets, right=True).squeeze(1).clamp(max=vocab - 1)


def _hits_stop_string(tokenizer, tail_ids: list[int], stop_strings: tuple[str, ...]) -> bool:
    # Only the tail is decoded: rows are checked every step, so a stop string can only be completed by the newest
    # token, and it spans at most 4 tokens per character (byte-level pieces of a multi-byte character). Special tokens
    # are kept so markers that are added tokens (e.g. "<tool_call>") still match.
    text = tokenizer.decode(tail_ids, skip_special_tokens=False)
    return any(s in text for s in stop_strings)


def _pack(tokens, logprobs, stop_reason, pad_token_id, counters) -> SampleOutput:
    batch_size = len(tokens)
    width = max((len(t) for t in tokens), default=0)
    response_ids = torch.full((batch_size, width), pad_token_id, dtype=torch.long)
    response_mask = torch.zeros((batch_size, width), dtype=torch.long)
    response_logprobs = torch.zeros((batch_size, width), dtype=torch.float32)
    for row, (ids, lps) in enumerate(zip(tokens, logprobs)):
        response_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        response_mask[row, : len(ids)] = 1
        response_logprobs[row, : len(lps)] = torch.tensor(lps, dtype=torch.float32)
    num_generated = [len(t) for t in tokens]
    return SampleOutput(
        response_ids=response_ids,
        response_mask=response_mask,
        logprobs=response_logprobs,
        stop_reason=[r or "length" for r in stop_reason],
        num_generated=num_generated,
        generated_positions=sum(num_generated),
        computed_positions=counters["computed"],
        padded_positions=counters["padded"],
        prefill_positions=counters["prefill"],
        prefill_pad_positions=counters["prefill_pad"],
    )


def _as_id_list(token_ids: int | Sequence[int] | None) -> list[int]:
    if token_ids is None:
        return []
    if isinstance(token_ids, int):
        return [token_ids]
    return [int(t) for t in token_ids]


def _model_device(model: torch.nn.Module, default: torch.device) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return default


def _positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Same rule as ``Rollout.full_sequences``: position = number of real tokens before this one."""
    return (attention_mask.cumsum(dim=1) - 1).clamp(min=0)


class _ModelCaller:
    """Calls the model with a KV cache, whichever keyword the model takes it by.

    transformers 5.x names it ``cache`` (``past_key_values`` is a deprecated alias in many models, the only name in
    some). We create a ``DynamicCache`` ourselves, pass it in, and check after the prefill that the model filled it;
    if the model ignored it (a wrapper swallowing unknown kwargs), or the cache cannot drop rows, we fall back to
    recomputing the full sequence each step: slower, same numbers.
    """

    def __init__(self, model: torch.nn.Module):
        self.model = model
        params = inspect.signature(model.forward).parameters
        takes_var_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        self.cache_kwargs = [k for k in ("cache", "past_key_values") if k in params]
        if not self.cache_kwargs and takes_var_kwargs:
            self.cache_kwargs = ["cache", "past_key_values"]
        self.logits_to_keep = "logits_to_keep" in params
        self.takes_use_cache = "use_cache" in params or takes_var_kwargs
        self.cache = None
        self.use_cache = bool(self.cache_kwargs)

    def _call(self, ids, mask, cache_kwarg: str | None):
        kwargs = dict(input_ids=ids, attention_mask=mask, position_ids=_positions(mask)[:, -ids.shape[1]:])
        if cache_kwarg is not None:
            kwargs[cache_kwarg] = self.cache
            kwargs["use_cache"] = True
        elif self.takes_use_cache:
            kwargs["use_cache"] = False
        if self.logits_to_keep:
            kwargs["logits_to_keep"] = 1
        out = self.model(**kwargs)
        logits = out.logits if hasattr(out, "logits") else out[0]
        return logits[:, -1, :]

    def prefill(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        from transformers import DynamicCache

        while self.use_cache and self.cache_kwargs:
            self.cache = DynamicCache(config=getattr(self.model, "config", None))
            kwarg = self.cache_kwargs[0]
            logits = self._call(ids, mask, kwarg)
            if self.cache.get_seq_length() > 0:
                self.cache_kwargs = [kwarg]
                return logits
            self.cache_kwargs.pop(0)
        self.use_cache, self.cache = False, None
        return self._call(ids, mask, None)

    def step(self, seq_ids: torch.Tensor, seq_mask: torch.Tensor) -> torch.Tensor:
        """Logits for the next token after ``seq_ids`` (the full sequences; only the last column is new)."""
        if self.use_cache:
            return self._call(seq_ids[:, -1:], seq_mask, self.cache_kwargs[0])
        return self._call(seq_ids, seq_mask, None)

    def select_rows(self, keep: torch.Tensor) -> None:
        if not self.use_cache:
            return
        try:
            self.cache.batch_select_indices(keep)
        except (AttributeError, NotImplementedError, TypeError):
            # a cache type that cannot drop rows (some linear-attention layers): recompute from here on
            self.use_cache, self.cache = False, None
