"""``TextEnvironment``: batched multi-turn rollouts in which the model calls tools while it generates.

Every episode is a row with an explicit state (``RowState``):

    GENERATING --(turn ends in a tool call or a malformed call)--> WAITING_FOR_TOOL --(output appended)--> GENERATING
        |                                                                 |
        +--(submit / EOS / no call / max_length)--> DONE <--(max_turns / max_length reached)--+

Each turn samples for all GENERATING rows at once with ``rlcli.models.generation.sample`` (stop strings = the
protocol's call/submit markers; EOS stops too), then runs the tools of all WAITING_FOR_TOOL rows at once.

Rows keep their KV cache across turns (``kv_reuse``): a turn feeds each continuing row only what its cache does not
hold (the last token it sampled and the forced tool tokens), not the whole episode again.

With the chat protocol (``rlcli.env.chat.ChatProtocol``) the episode is a list of chat messages and every token
outside the model's own comes from its chat template: the prompt is the rendered conversation with the generation
prompt, a turn ends at the template's end-of-turn token, and a tool result is the text the template writes for the
``tool`` message(s) and the next generation prompt. ``history.messages`` holds the conversation; when the episode
ends, its ids are checked against the template's rendering of those messages.

Token bookkeeping, the contract PPO relies on:

- the prompt is tokenised once (``add_special_tokens=True``) into a "prompt" segment;
- the model's tokens are kept exactly as sampled (never re-tokenised from text) as a "model" segment;
- tool output is formatted by the protocol, tokenised on its own (``add_special_tokens=False``) and appended as a
  "tool" segment;
- each turn the model's input is exactly the concatenation of every segment's ids so far.

So ``history.token_ids`` is what the model saw, and ``histories_to_rollout`` hands PPO exactly those ids, with
``tool_mask`` on the tool tokens (forced text: no policy loss, value loss or KL on them).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any

import torch

from rlcli.config.errors import UserError
from rlcli.env.chat import ChatProtocol, ChatTemplateError, _difference
from rlcli.env.history import TextHistory, ToolCallRecord
from rlcli.env.protocols import Malformed, Submit, ToolCall, ToolCallProtocol
from rlcli.env.tools import ToolRunner
from rlcli.models.generation import KeptCache, sample
from rlcli.padding import left_pad, pad, right_pad
from rlcli.rl.sampling import SamplingRules
from rlcli.rl.types import Rollout


class RowState(Enum):
    GENERATING = "generating"
    WAITING_FOR_TOOL = "waiting_for_tool"
    DONE = "done"


@dataclass
class _Row:
    history: TextHistory
    state: RowState = RowState.GENERATING
    pending: ToolCall | Malformed | list[ToolCall | Malformed] | None = None
    cache: KeptCache | None = None  # the row's KV cache after its last turn (kv_reuse)
    rendered: str = ""  # chat protocol: the template's text of everything so far

    def finish(self, reason: str) -> None:
        self.history.finish_reason = reason
        self.state = RowState.DONE
        self.pending = None
        self.cache = None


@dataclass(frozen=True)
class EnvStats:
    """What one ``TextEnvironment.run`` did; ``as_metrics()`` flattens it for a metrics sink."""

    episodes: int
    turns_per_episode: float
    tool_calls_per_episode: float
    tool_outcomes: dict[str, int]
    finish_reasons: dict[str, int]
    generated_tokens: int
    tool_tokens: int
    seconds: float
    tokens_per_s: float
    pad_fraction: float  # share of positions pushed through the model that were padding (prefill and decode)
    tool_seconds: float = 0.0
    reused_positions: int = 0  # context positions a kept KV cache covered (not computed again)
    computed_positions: int = 0  # positions pushed through the model (prefill and decode, padding included)

    def as_metrics(self, prefix: str = "env/") -> dict[str, float]:
        metrics = {
            f"{prefix}episodes": self.episodes,
            f"{prefix}turns_per_episode": self.turns_per_episode,
            f"{prefix}tool_calls_per_episode": self.tool_calls_per_episode,
            f"{prefix}generated_tokens": self.generated_tokens,
            f"{prefix}tool_tokens": self.tool_tokens,
            f"{prefix}seconds": self.seconds,
            f"{prefix}tool_seconds": self.tool_seconds,
            f"{prefix}tokens_per_s": self.tokens_per_s,
            f"{prefix}pad_fraction": self.pad_fraction,
            f"{prefix}reused_positions": self.reused_positions,
            f"{prefix}computed_positions": self.computed_positions,
        }
        metrics.update({f"{prefix}tool_{k}": v for k, v in self.tool_outcomes.items()})
        metrics.update({f"{prefix}finish_{k}": v for k, v in self.finish_reasons.items()})
        return metrics


class TextEnvironment:
    """Roll out a policy that calls tools, in batches.

    Args:
        model: a Hugging Face causal LM (see ``rlcli.models.generation.sample``).
        tokenizer: its tokenizer; needs a pad token (masks come from the segments, never from `ids != pad`).
        tools: name -> callable (``str -> str``; the JSON protocol passes keyword arguments).
        protocol: how calls are written and answered (``TagProtocol()``, ``JsonProtocol()``, or a
            ``ChatProtocol``: the model's chat template writes everything but the model's tokens).
        max_turns: generation turns per episode; a call made on the last turn is still answered, then it ends.
        max_new_tokens: token budget of one turn.
        max_tool_output_tokens: longer tool outputs are cut (and marked) before the protocol wraps them.
        max_length: cap on an episode's total tokens, prompt included; prompts must be shorter.
        few_shot_prefix: text put before every prompt (TRL's few-shot examples).
        system_prompt: text put before the few-shot prefix, e.g. ``protocol.system_prompt(tools)``.
        rules: the sampling rules (temperature, top-k/top-p, EOS before ``min_new_tokens`` of a turn, banned ids;
            ``rlcli.rl.sampling``); a turn's positions count from 0. PPO replays them on every model token.
        eos_token_id: id(s) that end an episode; defaults to the tokenizer's EOS (chat: the template's end-of-turn
            token ends a turn, and the tokenizer's EOS too).
        tool_timeout_s, tool_isolation: passed to ``ToolRunner``.
        kv_reuse: keep each row's KV cache across turns and feed only the new tokens (False: prefill the whole
            episode every turn; same tokens up to float rounding, for benchmarks and tests).
        engine: a rollout engine (``rlcli.models.engines``, e.g. vLLM) that samples the model turns instead of
            rlcli's own sampler: each turn re-submits the episode's exact token ids, forced tool tokens included
            (the engine's prefix cache stands in for ``kv_reuse``); the token layout is the same either way.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer,
        tools: Mapping[str, Callable[..., str]],
        protocol: ToolCallProtocol,
        *,
        max_turns: int = 4,
        max_new_tokens: int = 64,
        max_tool_output_tokens: int = 64,
        max_length: int = 512,
        few_shot_prefix: str = "",
        system_prompt: str = "",
        rules: SamplingRules = SamplingRules(),
        eos_token_id: int | Sequence[int] | None = None,
        tool_timeout_s: float = 10.0,
        tool_isolation: str = "fork",
        kv_reuse: bool = True,
        engine=None,
    ):
        if tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer has no pad token; set one (distinct from EOS) before rollouts")
        if max_turns < 1 or max_new_tokens < 1 or max_length < 2:
            raise ValueError(f"need max_turns >= 1, max_new_tokens >= 1, max_length >= 2; got {max_turns}, "
                             f"{max_new_tokens}, {max_length}")
        max_positions = getattr(getattr(model, "config", None), "max_position_embeddings", None)
        if isinstance(max_positions, int) and max_length > max_positions:
            raise ValueError(f"max_length={max_length} is more than the model's {max_positions} positions")
        self.model = model
        self.tokenizer = tokenizer
        self.protocol = protocol
        self.runner = ToolRunner(tools, timeout_s=tool_timeout_s, max_output_tokens=max_tool_output_tokens,
                                 tokenizer=tokenizer, isolation=tool_isolation)
        self.max_turns = max_turns
        self.max_new_tokens = max_new_tokens
        self.max_length = max_length
        self.prefix = system_prompt + few_shot_prefix
        self.rules = rules
        self.chat = protocol if isinstance(protocol, ChatProtocol) else None
        if eos_token_id is None:
            eos_token_id = tokenizer.eos_token_id
            if self.chat is not None:
                eos_token_id = list(dict.fromkeys(t for t in (self.chat.template.eot_id, eos_token_id)
                                                  if t is not None))
        self.eos_token_id = eos_token_id
        self.pad_token_id = tokenizer.pad_token_id
        self.kv_reuse = kv_reuse and engine is None
        self.engine = engine
        self.last_stats: EnvStats | None = None

    @property
    def tools(self) -> dict[str, Callable[..., str]]:
        return self.runner.tools

    def run(
        self,
        prompts: Sequence[str | Sequence[Mapping[str, Any]]],
        rows: Sequence[dict[str, Any]] | None = None,
        generator: torch.Generator | None = None,
    ) -> list[TextHistory]:
        """Run one episode per prompt until every episode is DONE; ``rows`` (dataset rows) land in ``history.meta``.
        With the chat protocol a prompt may also be a list of chat messages.

        Stats of the run are left in ``self.last_stats``.
        """
        if rows is not None and len(rows) != len(prompts):
            raise ValueError(f"got {len(prompts)} prompts but {len(rows)} rows")
        start = time.perf_counter()
        positions = Counter()
        episodes = [self._start_episode(i, p, rows[i] if rows is not None else {}) for i, p in enumerate(prompts)]
        tool_seconds = 0.0

        while True:
            generating = [e for e in episodes if e.state is RowState.GENERATING]
            if not generating:
                break
            self._generate_turn(generating, generator, positions)
            waiting = [e for e in episodes if e.state is RowState.WAITING_FOR_TOOL]
            if waiting:
                tool_start = time.perf_counter()
                self._answer_tools(waiting)
                tool_seconds += time.perf_counter() - tool_start

        histories = [e.history for e in episodes]
        self.last_stats = _stats(histories, positions, time.perf_counter() - start, tool_seconds)
        return histories

    # the two phases of a turn -----------------------------------------------------------------------------------

    def _start_episode(self, index: int, prompt, row: dict[str, Any]) -> _Row:
        history = TextHistory(meta=dict(row))
        if self.chat is not None:
            history.messages, history.tools, text = self.chat.start(prompt)
            ids = self.chat.template.encode(text)
        else:
            if not isinstance(prompt, str):
                raise UserError(f"prompt {index} is a list of messages, which needs the chat protocol",
                                key="env.protocol")
            text = self.prefix + prompt
            ids = self.tokenizer(text, add_special_tokens=True)["input_ids"]
        if len(ids) >= self.max_length:
            raise UserError(f"prompt {index} has {len(ids)} tokens (few-shot prefix and system prompt included): "
                            f"env.max_length={self.max_length} leaves no room to generate; raise env.max_length "
                            "or shorten the prompt", key="env.max_length")
        history.append("prompt", text, ids)
        return _Row(history, rendered=text)

    def _generate_turn(self, episodes: list[_Row], generator, positions: Counter) -> None:
        """GENERATING -> WAITING_FOR_TOOL or DONE for every row given."""
        contexts = [e.history.token_ids for e in episodes]
        budgets = [min(self.max_new_tokens, self.max_length - len(ids)) for ids in contexts]
        if self.engine is not None:
            out = self.engine.generate(contexts, budgets, rules=self.rules, eos_token_id=self.eos_token_id,
                                       pad_token_id=self.pad_token_id, stop_strings=self.protocol.stop_strings,
                                       tokenizer=self.tokenizer, generator=generator)
        else:
            input_ids, attention_mask = left_pad(contexts, self.pad_token_id)
            out = sample(
                self.model, input_ids, attention_mask, budgets, rules=self.rules,
                eos_token_id=self.eos_token_id, pad_token_id=self.pad_token_id,
                stop_strings=self.protocol.stop_strings, tokenizer=self.tokenizer, generator=generator,
                past=[e.cache for e in episodes] if self.kv_reuse else None, keep_cache=self.kv_reuse,
            )
        positions["prefill"] += out.prefill_positions
        positions["prefill_pad"] += out.prefill_pad_positions
        positions["decode"] += out.computed_positions
        positions["decode_pad"] += out.padded_positions
        positions["reused"] += out.reused_positions
        for i, episode in enumerate(episodes):
            episode.cache = out.kept[i] if out.kept is not None else None
            if self.chat is not None:
                self._chat_turn(episode, out.response_ids[i, : out.num_generated[i]].tolist(),
                                out.logprobs[i, : out.num_generated[i]].tolist(), out.stop_reason[i])
                continue
            history = episode.history
            new_ids = out.response_ids[i, : out.num_generated[i]].tolist()
            text = self.tokenizer.decode(new_ids, skip_special_tokens=False)
            history.append("model", text, new_ids, out.logprobs[i, : out.num_generated[i]].tolist())
            history.num_turns += 1
            full = len(history.token_ids) >= self.max_length
            history.answer = self.tokenizer.decode(new_ids, skip_special_tokens=True).strip()
            if out.stop_reason[i] == "eos":
                episode.finish("eos")
                continue
            parsed = self.protocol.parse(text)
            if isinstance(parsed, Submit):
                history.answer = parsed.answer.strip()
                episode.finish("submit")
            elif isinstance(parsed, (ToolCall, Malformed)) and not full:
                episode.pending, episode.state = parsed, RowState.WAITING_FOR_TOOL
            else:
                episode.finish("max_length" if full else "no_call")

    def _answer_tools(self, episodes: list[_Row]) -> None:
        """WAITING_FOR_TOOL -> GENERATING or DONE: run every pending call, append the answers as tool segments."""
        if self.chat is not None:
            self._answer_chat_tools(episodes)
            return
        results = self.runner.run_many([e.pending for e in episodes])
        for episode, result in zip(episodes, results):
            history, call = episode.history, episode.pending
            text = self.protocol.format_response(result.output)
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            room = self.max_length - len(history.token_ids)
            if len(ids) > room:  # the episode ends here anyway; keep the total under max_length
                ids = ids[:room]
                text = self.tokenizer.decode(ids, skip_special_tokens=False)
            if ids:
                history.append("tool", text, ids)
            name, arguments = (call.name, call.arguments) if isinstance(call, ToolCall) else ("", None)
            history.tool_calls.append(ToolCallRecord(name, arguments, result.output, result.status.value))
            if len(history.token_ids) >= self.max_length:
                episode.finish("max_length")
            elif history.num_turns >= self.max_turns:
                episode.finish("max_turns")
            else:
                episode.pending, episode.state = None, RowState.GENERATING

    # the chat protocol -------------------------------------------------------------------------------------------

    def _chat_turn(self, episode: _Row, new_ids: list[int], logprobs: list[float], stop_reason: str) -> None:
        """One sampled turn of a chat episode: the model segment, the assistant message, and the next state."""
        history, template = episode.history, self.chat.template
        text = template.decode(new_ids, before=history.token_ids)
        history.append("model", text, new_ids, logprobs)
        history.num_turns += 1
        ended_turn = stop_reason == "eos" and new_ids and new_ids[-1] == template.eot_id
        content = template.decode(new_ids[:-1], before=history.token_ids[: -len(new_ids)]) if ended_turn else text
        calls = self.chat.parse(content) if ended_turn else []
        parsed = [c for c in calls if isinstance(c, ToolCall)]
        message = template.assistant_message(content, parsed, f"call_{history.num_turns}",
                                             parser_ok=len(parsed) == len(calls), messages=history.messages,
                                             tools=history.tools, head=episode.rendered, parser=self.chat.parser)
        history.messages.append(self.chat.template.prepare([message], None, self.chat.parser)[0][0])
        episode.rendered += text
        history.answer = self.tokenizer.decode(new_ids, skip_special_tokens=True).strip()
        if calls and len(history.token_ids) < self.max_length:
            episode.pending, episode.state = calls, RowState.WAITING_FOR_TOOL
        elif ended_turn or stop_reason == "eos":
            self._finish_chat(episode, "eos")
        elif len(history.token_ids) >= self.max_length:
            self._finish_chat(episode, "max_length")
        else:
            self._finish_chat(episode, "max_new_tokens")

    def _answer_chat_tools(self, episodes: list[_Row]) -> None:
        """Run every pending call of every row; append the tool messages and the template's text for them."""
        flat = [call for e in episodes for call in e.pending]
        results = iter(self.runner.run_many(flat))
        template = self.chat.template
        for episode in episodes:
            history, calls = episode.history, episode.pending
            assistant = history.messages[-1]
            ids_of_calls = iter(c["id"] for c in assistant.get("tool_calls", []))
            new_messages = []
            for call in calls:
                result = next(results)
                message = {"role": "tool", "content": result.output}
                if isinstance(call, ToolCall):
                    call_id = next(ids_of_calls, None)
                    message = {"role": "tool", **({"tool_call_id": call_id} if call_id else {}),
                               "name": call.name, "content": result.output}
                new_messages.append(message)
                name, arguments = (call.name, call.arguments) if isinstance(call, ToolCall) else ("", None)
                history.tool_calls.append(ToolCallRecord(name, arguments, result.output, result.status.value))
            last_turn = history.num_turns >= self.max_turns
            after = template.render(history.messages + new_messages, history.tools, add_generation_prompt=not last_turn)
            if not after.startswith(episode.rendered):
                raise ChatTemplateError(
                    "env.protocol chat: the chat template renders an episode's earlier turns differently once its "
                    "tool results follow, so the tokens the model saw would not be the template's rendering of the "
                    "conversation: " + _difference(episode.rendered, after, "the episode", "the template"))
            text = after[len(episode.rendered):]
            ids = template.encode(text)
            if len(history.token_ids) + len(ids) > self.max_length:
                # the tool turn does not fit: the episode ends before it (its messages stay whole; the calls were made
                # and stay in tool_calls)
                self._finish_chat(episode, "max_length")
                continue
            history.messages += new_messages
            history.append("tool", text, ids)
            episode.rendered = after
            if last_turn:
                self._finish_chat(episode, "max_turns")
            else:
                episode.pending, episode.state = None, RowState.GENERATING

    def _finish_chat(self, episode: _Row, reason: str) -> None:
        episode.finish(reason)
        history = episode.history
        expected = chat_token_ids(self.chat.template, history)
        if history.token_ids != expected[: len(history.token_ids)]:
            at = next((i for i, (a, b) in enumerate(zip(history.token_ids, expected)) if a != b), len(expected))
            got, want = (self.tokenizer.decode(ids[max(0, at - 8):at + 8]) for ids in (history.token_ids, expected))
            raise ChatTemplateError(f"env.protocol chat: an episode's tokens differ from the chat template's rendering "
                                    f"of its messages at token {at}: the episode has {got!r}, the template {want!r}")


def chat_token_ids(template, history: TextHistory) -> list[int]:
    """The token ids of ``history.messages`` as the chat template renders them (``ChatTemplate.spans``), with each
    assistant turn's tokens as the model sampled them. An episode's ``token_ids`` are a prefix of these: all of
    them, but what the template writes after the last token the episode holds (the newline after an end-of-turn
    token, or a turn the episode's length cut)."""
    spans = template.spans(history.messages, history.tools)
    model_turns = [s.token_ids for s in history.segments if s.source == "model"]
    ids, _ = template.tokens(spans, model_turns)
    return ids


def histories_to_rollout(histories: Sequence[TextHistory], pad_token_id: int) -> Rollout:
    """Finished episodes -> a ``Rollout``: query = the leading prompt segment(s), left-padded; response = everything
    after it (model and tool tokens), right-padded; ``tool_mask`` = 1 on tool tokens; ``sampler_logprobs`` when every
    model segment recorded them."""
    query_ids, query_mask = left_pad([h.prompt_ids for h in histories], pad_token_id)
    cuts = [len(h.prompt_ids) for h in histories]
    response_ids, response_mask = right_pad([h.token_ids[n:] for h, n in zip(histories, cuts)], pad_token_id)
    tool_mask, _ = pad([h.tool_mask[n:] for h, n in zip(histories, cuts)], 0, "right", min_width=response_ids.shape[1])
    logprobs = [h.sampler_logprobs for h in histories]
    sampler_logprobs = None
    if all(lp is not None for lp in logprobs):
        sampler_logprobs, _ = pad([lp[n:] for lp, n in zip(logprobs, cuts)], 0.0, "right",
                                  min_width=response_ids.shape[1], dtype=torch.float32)
    return Rollout(query_ids=query_ids, query_mask=query_mask, response_ids=response_ids,
                   response_mask=response_mask, tool_mask=tool_mask, sampler_logprobs=sampler_logprobs)


def _stats(histories: list[TextHistory], positions: Counter, seconds: float, tool_seconds: float) -> EnvStats:
    n = max(len(histories), 1)
    generated = sum(sum(h.token_mask) for h in histories)
    computed = positions["prefill"] + positions["decode"]
    padding = positions["prefill_pad"] + positions["decode_pad"]
    return EnvStats(
        episodes=len(histories),
        turns_per_episode=sum(h.num_turns for h in histories) / n,
        tool_calls_per_episode=sum(len(h.tool_calls) for h in histories) / n,
        tool_outcomes=dict(Counter(c.status for h in histories for c in h.tool_calls)),
        finish_reasons=dict(Counter(h.finish_reason for h in histories)),
        generated_tokens=generated,
        tool_tokens=sum(sum(h.tool_mask) for h in histories),
        seconds=seconds,
        tokens_per_s=generated / seconds if seconds > 0 else 0.0,
        pad_fraction=padding / computed if computed else 0.0,
        tool_seconds=tool_seconds,
        reused_positions=positions["reused"],
        computed_positions=computed,
    )
