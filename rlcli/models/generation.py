"""Batched sampling from a causal or encoder-decoder LM, with the same arithmetic as the PPO forward pass.

``sample()`` is the one generator that plain PPO rollouts and the text environment share. Its log-probs equal the
training forward's: positions come from the attention mask, tokens and ``logprobs`` come from
``rules.apply(logits)`` (the behaviour distribution), and the KV cache is prefilled once then fed one token per step.
Finished rows leave the batch at once; multi-turn rows keep their cache (``keep_cache`` / ``past``); randomness is
per row, so a row's tokens never depend on the batch around it. Each property in detail: docs/internals.md,
"rlcli/models/generation.py".
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from rlcli.padding import left_to_right, pad, position_ids
from rlcli.rl.sampling import SamplingRules

STOP_REASONS = ("eos", "stop_string", "length")


@dataclass(frozen=True)
class SampleOutput:
    """What ``sample()`` generated, on the CPU. B = batch, R = longest response.

    - ``response_ids``  [B, R] long: new tokens, **right**-padded with the pad id. An EOS that ended a row is kept
      (it is a real model token); so is the token that completed a stop string.
    - ``response_mask`` [B, R] long: 1 on generated tokens, 0 on padding.
    - ``logprobs``      [B, R] float32: log-prob of each generated token under the behaviour distribution
      (``log_softmax(rules.apply(logits))``; temperature 1 when ``rules.temperature == 0``); 0 on padding.
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
    reused_positions: int = 0
    """Context positions covered by ``past`` caches, so not computed again."""
    kept: list[KeptCache | None] | None = None
    """With ``keep_cache=True``: each row's cache when it finished (None where the model's cache cannot be kept)."""


@dataclass(frozen=True)
class KeptCache:
    """One row's KV cache, to continue from later without computing its context again.

    - ``token_ids``: the tokens it covers, in order (all real; padding columns are dropped when it is taken);
    - ``layers``: per layer ``(keys, values)``, each ``[1, heads, len(token_ids), head_dim]``.

    Keys and values do not depend on the column a token sits in (positions are baked in by the model: rotary or
    absolute), so dropping padding columns and re-padding in another batch changes nothing but float summation
    order. Only plain ``DynamicLayer`` caches are kept (a sliding-window layer holds fewer columns than the mask).
    """

    token_ids: tuple[int, ...]
    layers: tuple[tuple[torch.Tensor, torch.Tensor], ...]

    def __len__(self) -> int:
        return len(self.token_ids)


def sample(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    max_new_tokens: int | Sequence[int],
    *,
    rules: SamplingRules = SamplingRules(),
    eos_token_id: int | Sequence[int] | None,
    pad_token_id: int,
    stop_strings: Sequence[str] = (),
    tokenizer=None,
    generator: torch.Generator | None = None,
    drop_finished: bool = True,
    past: Sequence[KeptCache | None] | None = None,
    keep_cache: bool = False,
) -> SampleOutput:
    """Sample continuations of a batch of prompts, one token per step on a KV cache.

    Args:
        model: a Hugging Face decoder-only LM, or an encoder-decoder LM (``config.is_encoder_decoder``: the prompt is
            encoded once and the decoder starts from ``decoder_start_token_id``).
        input_ids, attention_mask: [B, Q] long, **left**-padded prompts and 1 on their real tokens.
        max_new_tokens: token budget, one int for all rows or one per row (<= 0: nothing, stop reason ``"length"``).
        rules: the behaviour policy (``rlcli.rl.sampling``): tokens are drawn from, and ``logprobs`` taken from,
            ``softmax(rules.apply(logits))``.
        eos_token_id: token id(s) that end a row (kept in the response); pad_token_id: fills it after that.
        stop_strings, tokenizer: a row ends once its decoded new text contains one (the tokenizer decodes it).
        generator: source of randomness; the same generator state gives the same samples.
        drop_finished: drop finished rows from the batch (default); False keeps them, fed pad tokens (a baseline).
        past: per row, a ``KeptCache`` from an earlier call (or None): only the prompt tokens it does not cover are fed.
        keep_cache: return each row's ``KeptCache`` in ``SampleOutput.kept``.

    Runs under ``torch.no_grad()`` with the model in eval mode (its previous mode is restored). The arguments in
    full: docs/internals.md, "sample's arguments".
    """
    if input_ids.dim() != 2 or input_ids.shape != attention_mask.shape:
        raise ValueError(f"input_ids and attention_mask must both be [B, Q]; got {tuple(input_ids.shape)} "
                         f"and {tuple(attention_mask.shape)}")
    stop_strings = tuple(s for s in stop_strings if s)
    if stop_strings and tokenizer is None:
        raise ValueError("stop_strings need a tokenizer to decode the generated tokens")
    empty_rows = (attention_mask.sum(dim=1) == 0).nonzero().flatten().tolist()
    if empty_rows:
        raise ValueError(f"rows {empty_rows} have no real prompt token (attention_mask all 0)")
    if past is not None and len(past) != input_ids.shape[0]:
        raise ValueError(f"past has {len(past)} entries for a batch of {input_ids.shape[0]}")
    if (past is not None or keep_cache) and getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        raise ValueError("past / keep_cache are for decoder-only models")

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return _sample(
                model, input_ids, attention_mask, max_new_tokens, rules=rules, eos_ids=_as_id_list(eos_token_id),
                pad_token_id=pad_token_id, stop_strings=stop_strings, tokenizer=tokenizer, generator=generator,
                drop_finished=drop_finished, past=past, keep_cache=keep_cache,
            )
    finally:
        model.train(was_training)


def _sample(model, input_ids, attention_mask, max_new_tokens, *, rules, eos_ids, pad_token_id, stop_strings,
            tokenizer, generator, drop_finished, past, keep_cache) -> SampleOutput:
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
    counters = dict(computed=0, padded=0, prefill=0, prefill_pad=0, reused=0)
    kept: list[KeptCache | None] | None = [None] * batch_size if keep_cache else None

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
        return _pack(tokens, logprobs, stop_reason, pad_token_id, counters, kept)
    seq_ids = input_ids[rows].to(device)
    seq_mask = attention_mask[rows].to(device=device, dtype=torch.long)
    # Columns that are padding in every remaining row carry nothing: drop them (positions come from the cumsum, so
    # nothing else changes).
    first_real = int((seq_mask.sum(0) > 0).nonzero()[0])
    seq_ids, seq_mask = seq_ids[:, first_real:], seq_mask[:, first_real:]
    alive = torch.ones(len(rows), dtype=torch.bool, device=device)
    stop_window = 4 * max((len(s) for s in stop_strings), default=0) + 8
    is_seq2seq = bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))
    if is_seq2seq:
        decoder = _Seq2SeqDecoder(model, seq_ids, seq_mask, pad_token_id)
    else:
        decoder = _CausalDecoder(model, seq_ids, seq_mask, pad_token_id,
                                 past=None if past is None else [past[r] for r in rows.tolist()])

    logits = decoder.first_logits()
    counters["prefill"], counters["prefill_pad"] = decoder.prefill_positions, decoder.prefill_pad_positions
    counters["reused"] = decoder.reused_positions
    step = 0
    while True:
        row_uniforms = torch.cat([torch.rand(1, generator=row_generators[r]) for r in rows.tolist()]).to(device)
        positions = torch.full((len(rows), 1), step, dtype=torch.long, device=device)
        z = rules.apply(logits[:, None, :], positions)[:, 0]
        next_tokens = z.argmax(dim=-1) if rules.temperature == 0 else _draw(z, row_uniforms)
        next_logprobs = torch.log_softmax(z, dim=-1).gather(1, next_tokens[:, None]).squeeze(1)
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
            if finished[i] and keep_cache:
                kept[row] = decoder.keep(i)
        finished = finished.to(device)

        if drop_finished:
            keep = (~finished).nonzero().squeeze(1)
            if len(keep) == 0:
                break
            if len(keep) < len(rows):
                rows = rows[keep.cpu()]
                next_tokens, alive = next_tokens[keep], alive[keep]
                decoder.select_rows(keep)
            fed = torch.ones(len(rows), dtype=torch.long, device=device)
        else:
            alive = alive & ~finished
            if not alive.any():
                break
            next_tokens = torch.where(alive, next_tokens, torch.full_like(next_tokens, pad_token_id))
            fed = alive.long()
            counters["padded"] += int((~alive).sum())

        counters["computed"] += len(rows)
        logits = decoder.step(next_tokens, fed)

    return _pack(tokens, logprobs, stop_reason, pad_token_id, counters, kept)


def _draw(z: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """[b, V] behaviour logits (``SamplingRules.apply``), [b] uniforms in [0, 1) -> [b] token ids, by inverting each
    row's CDF."""
    vocab = z.shape[-1]
    cdf = torch.softmax(z, dim=-1).cumsum(dim=-1)
    targets = uniforms[:, None].to(cdf.dtype) * cdf[:, -1:]
    # right=True: the first token whose cumulative mass exceeds the target, so zero-probability tokens never win
    return torch.searchsorted(cdf, targets, right=True).squeeze(1).clamp(max=vocab - 1)


def _hits_stop_string(tokenizer, tail_ids: list[int], stop_strings: tuple[str, ...]) -> bool:
    # Only the tail is decoded: rows are checked every step, so a stop string can only be completed by the newest
    # token, and it spans at most 4 tokens per character (byte-level pieces of a multi-byte character). Special tokens
    # are kept so markers that are added tokens (e.g. "<tool_call>") still match.
    text = tokenizer.decode(tail_ids, skip_special_tokens=False)
    return any(s in text for s in stop_strings)


def _pack(tokens, logprobs, stop_reason, pad_token_id, counters, kept) -> SampleOutput:
    response_ids, response_mask = pad(tokens, pad_token_id, "right")
    response_logprobs, _ = pad(logprobs, 0.0, "right", dtype=torch.float32)
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
        reused_positions=counters["reused"],
        kept=kept,
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


def _cache_kwargs(model: torch.nn.Module) -> tuple[list[str], bool, bool]:
    """Which keyword(s) may carry a KV cache into ``model.forward``, and whether it takes ``logits_to_keep`` and
    ``use_cache``. transformers 5.x names the cache ``cache`` (``past_key_values`` is a deprecated alias in many
    models, the only name in some)."""
    params = inspect.signature(model.forward).parameters
    takes_var_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    names = [k for k in ("cache", "past_key_values") if k in params]
    if not names and takes_var_kwargs:
        names = ["cache", "past_key_values"]
    return names, "logits_to_keep" in params, "use_cache" in params or takes_var_kwargs


class _CausalDecoder:
    """Feeds a decoder-only LM one token per step on a KV cache it creates itself (or builds from kept caches).

    It passes a ``DynamicCache`` by whichever keyword the model takes and checks after the prefill that the model
    filled it; if the model ignored it (a wrapper swallowing unknown kwargs), or the cache cannot drop rows, it falls
    back to recomputing the full sequence each step: slower, same numbers. Position ids always come from the
    attention mask (``rlcli.padding.position_ids``), as in the training forward pass.

    With ``past``, each row's covered prefix comes from its ``KeptCache``: the kept caches are left-padded to a
    common length ``C`` and the rest of every row (its "chunk") is left-padded to ``F``, so ``self.ids`` /
    ``self.mask`` are ``[b, C + F]`` with a hole between a short cache and a short chunk; the mask hides it.
    """

    def __init__(self, model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, pad_token_id: int,
                 past: list[KeptCache | None] | None = None):
        self.model = model
        self.cache_kwargs, self.logits_to_keep, self.takes_use_cache = _cache_kwargs(model)
        self.cache = None
        self.use_cache = bool(self.cache_kwargs)
        self.past_layers = None
        self.ids, self.mask, self.feed_width, self.reused_positions = ids, mask, ids.shape[1], 0
        if past is not None and self.use_cache and any(p is not None for p in past):
            self._continue_from(ids, mask, pad_token_id, past)
        self.prefill_positions = ids.shape[0] * self.feed_width
        self.prefill_pad_positions = int((self.mask[:, -self.feed_width:] == 0).sum())

    def _continue_from(self, ids, mask, pad_token_id, past) -> None:
        contexts = [row[m == 1].tolist() for row, m in zip(ids, mask)]
        covered = []
        for context, kept in zip(contexts, past):
            n = 0
            if kept is not None and tuple(context[: len(kept)]) == kept.token_ids[: len(context)]:
                n = min(len(kept), len(context) - 1)  # at least one token is fed: its logits come next
            covered.append(n)
        if not any(covered):
            return
        width_c = max(covered)
        chunks = [c[n:] for c, n in zip(contexts, covered)]
        self.feed_width = max(len(c) for c in chunks)
        device = ids.device
        rows_ids, rows_mask = [], []
        for context, n, chunk in zip(contexts, covered, chunks):
            row = [pad_token_id] * (width_c - n) + context[:n] + [pad_token_id] * (self.feed_width - len(chunk)) + chunk
            row_mask = [0] * (width_c - n) + [1] * n + [0] * (self.feed_width - len(chunk)) + [1] * len(chunk)
            rows_ids.append(row)
            rows_mask.append(row_mask)
        self.ids = torch.tensor(rows_ids, dtype=torch.long, device=device)
        self.mask = torch.tensor(rows_mask, dtype=torch.long, device=device)
        layers = []
        template = next(p for p, n in zip(past, covered) if n)
        for layer, (k0, v0) in enumerate(template.layers):
            keys, values = [], []
            for kept, n in zip(past, covered):
                k = kept.layers[layer][0][:, :, :n] if n else k0[:, :, :0]
                v = kept.layers[layer][1][:, :, :n] if n else v0[:, :, :0]
                keys.append(torch.nn.functional.pad(k, (0, 0, width_c - n, 0)))
                values.append(torch.nn.functional.pad(v, (0, 0, width_c - n, 0)))
            layers.append((torch.cat(keys).to(device), torch.cat(values).to(device)))
        self.past_layers = layers
        self.reused_positions = sum(covered)

    def _call(self, ids, mask, cache_kwarg: str | None):
        kwargs = dict(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask)[:, -ids.shape[1]:])
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

    def first_logits(self) -> torch.Tensor:
        from transformers import DynamicCache

        while self.use_cache and self.cache_kwargs:
            if self.past_layers is None:
                self.cache = DynamicCache(config=getattr(self.model, "config", None))
            else:
                self.cache = DynamicCache(ddp_cache_data=self.past_layers)
            before = self.cache.get_seq_length()
            kwarg = self.cache_kwargs[0]
            logits = self._call(self.ids[:, -self.feed_width:], self.mask, kwarg)
            if self.cache.get_seq_length() == before + self.feed_width:
                self.cache_kwargs = [kwarg]
                self.past_layers = None
                return logits
            self.cache_kwargs.pop(0)
        # the model ignored the cache: recompute whole sequences (a kept cache's tokens included) from here on
        self.use_cache, self.cache, self.past_layers = False, None, None
        self.prefill_positions = self.ids.numel()
        self.prefill_pad_positions = int((self.mask == 0).sum())
        self.reused_positions = 0
        return self._call(self.ids, self.mask, None)

    def keep(self, i: int) -> KeptCache | None:
        """Row ``i``'s cache as it is now (every token fed so far), or None when it cannot be kept."""
        from transformers.cache_utils import DynamicLayer

        if not self.use_cache or self.cache is None:
            return None
        layers = getattr(self.cache, "layers", None)
        if not layers or any(type(layer) is not DynamicLayer for layer in layers):
            return None
        real = self.mask[i] == 1
        if any(layer.keys is None or layer.keys.shape[-2] != real.shape[0] for layer in layers):
            return None
        return KeptCache(
            token_ids=tuple(self.ids[i][real].tolist()),
            layers=tuple((layer.keys[i : i + 1, :, real], layer.values[i : i + 1, :, real]) for layer in layers),
        )

    def step(self, next_tokens: torch.Tensor, fed: torch.Tensor) -> torch.Tensor:
        """Append ``next_tokens`` [b] (attention mask ``fed`` [b]: 0 for pad fed to finished rows) and return the
        logits for the token after them."""
        self.ids = torch.cat([self.ids, next_tokens[:, None]], dim=1)
        self.mask = torch.cat([self.mask, fed[:, None]], dim=1)
        if self.use_cache:
            return self._call(self.ids[:, -1:], self.mask, self.cache_kwargs[0])
        return self._call(self.ids, self.mask, None)

    def select_rows(self, keep: torch.Tensor) -> None:
        self.ids, self.mask = self.ids[keep], self.mask[keep]
        if not self.use_cache:
            return
        try:
            self.cache.batch_select_indices(keep)
        except (AttributeError, NotImplementedError, TypeError):
            # a cache type that cannot drop rows (some linear-attention layers): recompute from here on
            self.use_cache, self.cache = False, None


class _Seq2SeqDecoder:
    """Encodes the prompts once, then feeds the decoder one token per step on an ``EncoderDecoderCache``.

    The prompts are moved to right padding first (``rlcli.padding.left_to_right``), as the PPO forward pass does,
    so encoders with absolute positions see every prompt at positions 0..n-1. The decoder starts from
    ``config.decoder_start_token_id`` and reads ``[start] + response[:-1]``, like the training forward pass.
    """

    def __init__(self, model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, pad_token_id: int):
        from transformers import DynamicCache, EncoderDecoderCache

        self.model = model
        self.prefill_positions, self.prefill_pad_positions = ids.numel(), int((mask == 0).sum())
        self.reused_positions = 0
        ids, self.mask = left_to_right(ids, mask, pad_token_id)
        self.encoded = model.get_encoder()(input_ids=ids, attention_mask=self.mask)
        start = model.config.decoder_start_token_id
        if start is None:
            raise ValueError("the seq2seq model's config has no decoder_start_token_id")
        self.next_input = torch.full((ids.shape[0], 1), int(start), dtype=torch.long, device=ids.device)
        names, _, _ = _cache_kwargs(model)
        self.cache_kwarg = names[0] if names else "past_key_values"
        self.cache = EncoderDecoderCache(DynamicCache(), DynamicCache())

    def _call(self) -> torch.Tensor:
        out = self.model(encoder_outputs=self.encoded, attention_mask=self.mask, decoder_input_ids=self.next_input,
                         use_cache=True, **{self.cache_kwarg: self.cache})
        return out.logits[:, -1, :]

    def first_logits(self) -> torch.Tensor:
        return self._call()

    def step(self, next_tokens: torch.Tensor, fed: torch.Tensor) -> torch.Tensor:
        # finished rows kept in the batch (drop_finished=False) are fed pad; the decoder is causal, so what a
        # finished row sees never reaches a live one
        self.next_input = next_tokens[:, None]
        return self._call()

    def select_rows(self, keep: torch.Tensor) -> None:
        self.mask = self.mask[keep]
        self.encoded.last_hidden_state = self.encoded.last_hidden_state[keep]
        self.cache.batch_select_indices(keep)
