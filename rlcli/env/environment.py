"""``TextEnvironment``: batched multi-turn rollouts in which the model calls tools while it generates.

Every episode is a row with an explicit state (``RowState``): GENERATING, WAITING_FOR_TOOL or DONE. Each turn samples
for all GENERATING rows at once (``rlcli.models.generation.sample``, rows keeping their KV cache across turns), then
runs the tools of all WAITING_FOR_TOOL rows at once. The protocol (``rlcli.env.protocols``) renders the prompt, reads
each turn and renders the answer to its calls; the loop owns the states, the token budget and the tool runs.

The contract PPO relies on: the model's tokens are kept exactly as sampled, tool output is tokenised on its own and
appended as a "tool" segment, so ``history.token_ids`` is what the model saw and ``histories_to_rollout`` hands PPO
exactly those ids, with ``tool_mask`` on the tool tokens. The state machine and the bookkeeping in full:
docs/internals.md, "rlcli/env/environment.py".
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
from rlcli.env.history import TextHistory, ToolCallRecord
from rlcli.env.protocols import Call, ToolCallProtocol
from rlcli.env.stateful import EnvironmentFailed, Environments, EpisodeEnvironment, append_to_prompt
from rlcli.env.tools import ToolRunner
from rlcli.models.generation import KeptCache, sample
from rlcli.padding import left_pad, pad, right_pad
from rlcli.rl.sampling import SamplingRules
from rlcli.rl.types import Rollout
from rlcli.toolcalls import ToolCall


class RowState(Enum):
    GENERATING = "generating"
    WAITING_FOR_TOOL = "waiting_for_tool"
    DONE = "done"


@dataclass
class _Row:
    history: TextHistory
    protocol: ToolCallProtocol
    state: RowState = RowState.GENERATING
    pending: list[Call] | None = None  # the calls of its last turn, to answer
    cache: KeptCache | None = None  # the row's KV cache after its last turn (kv_reuse)
    env: EpisodeEnvironment | None = None  # its stateful environment (rlcli.env.stateful), while the episode runs
    env_error: str | None = None  # how that environment failed
    reply: tuple[str, str] | None = None  # (text, finish reason) of a turn without calls, for the environment

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
        protocol: how calls are written and answered (``TagProtocol()``, ``JsonProtocol()`` or a ``ChatProtocol``).
        max_turns: generation turns per episode; a call made on the last turn is still answered, then it ends.
        max_new_tokens / max_tool_output_tokens / max_length: a turn's budget / a tool output's (cut and marked) /
            an episode's total tokens, prompt included (prompts must be shorter).
        few_shot_prefix, system_prompt: text put before every prompt (the system prompt first).
        rules: the sampling rules (``rlcli.rl.sampling``); a turn's positions count from 0.
        eos_token_id: id(s) that end an episode; defaults to the tokenizer's EOS.
        tool_timeout_s, tool_isolation: passed to ``ToolRunner``.
        kv_reuse: keep each row's KV cache across turns (False: prefill the whole episode every turn).
        engine: a rollout engine (``rlcli.models.engines``) that samples the model turns instead of rlcli's sampler.
        environments: stateful environments (``rlcli.env.stateful``), one instance per episode.

    The arguments in full (engines, stateful environments): docs/internals.md, "TextEnvironment's arguments".
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
        environments: Environments | None = None,
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
        self.few_shot_prefix = few_shot_prefix
        self.environments = environments
        self.rules = rules
        if eos_token_id is None:
            eos_token_id = tokenizer.eos_token_id
            turn_end = protocol.turn_end_ids()
            if turn_end:
                eos_token_id = list(dict.fromkeys(t for t in (*turn_end, eos_token_id) if t is not None))
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
        protocol, prefix, env, env_error = self.protocol, self.prefix, None, None
        if self.environments is not None:
            kind = self.environments.kind_of(row)
            protocol = kind.protocol or protocol
            prefix = (kind.system_prompt + self.few_shot_prefix) if kind.system_prompt is not None else prefix
            try:
                env = EpisodeEnvironment(kind, self.environments.timeout_s)
                observation = env.reset(self.environments.reset_arguments(row))
                if observation:
                    prompt = append_to_prompt(prompt, observation)
            except EnvironmentFailed as exc:
                # the episode still gets one model turn (a rollout row needs response tokens), then ends failed
                env_error = str(exc)
        opening = protocol.start(prompt, self.tokenizer, prefix)
        history.messages, history.tools = opening.messages, opening.tools
        if len(opening.ids) >= self.max_length:
            raise UserError(f"prompt {index} has {len(opening.ids)} tokens (few-shot prefix and system prompt "
                            f"included): env.max_length={self.max_length} leaves no room to generate; raise "
                            "env.max_length or shorten the prompt", key="env.max_length")
        history.append("prompt", opening.text, opening.ids)
        return _Row(history, protocol, env=env, env_error=env_error)

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
            history = episode.history
            new_ids = out.response_ids[i, : out.num_generated[i]].tolist()
            turn = episode.protocol.read_turn(history, new_ids, out.stop_reason[i], self.tokenizer)
            history.append("model", turn.text, new_ids, out.logprobs[i, : out.num_generated[i]].tolist())
            history.num_turns += 1
            if turn.message is not None:
                history.messages.append(turn.message)
            history.answer = self.tokenizer.decode(new_ids, skip_special_tokens=True).strip()
            if turn.answer is not None:
                history.answer = turn.answer
            full = len(history.token_ids) >= self.max_length
            finish = "max_length" if full and not turn.ended_by_model else turn.finish
            if episode.env_error is not None:
                self._finish(episode, "env_error")
            elif turn.calls and not full:
                episode.pending, episode.state = turn.calls, RowState.WAITING_FOR_TOOL
            elif (episode.env is not None and episode.env.responds and not full and turn.finish != "submit"
                  and history.num_turns < self.max_turns):
                # a turn without calls: the environment may answer it with an observation (``_respond``)
                episode.pending, episode.state = [], RowState.WAITING_FOR_TOOL
                episode.reply = (self.tokenizer.decode(new_ids, skip_special_tokens=True), finish)
            else:  # a turn the model ended itself ends the episode for that reason, full or not
                self._finish(episode, finish)

    def _answer_tools(self, episodes: list[_Row]) -> None:
        """WAITING_FOR_TOOL -> GENERATING or DONE: run every pending call of every row, append the answers as tool
        segments."""
        calls = [call for e in episodes for call in e.pending]
        own_tools = [e.env.tools if e.env is not None else None for e in episodes for _ in e.pending]
        results = iter(self.runner.run_many(calls, own_tools if self.environments is not None else None))
        for episode in episodes:
            history, calls = episode.history, episode.pending
            outputs = []
            for call in calls:
                result = next(results)
                outputs.append(result.output)
                name, arguments = (call.name, call.arguments) if isinstance(call, ToolCall) else ("", None)
                history.tool_calls.append(ToolCallRecord(name, arguments, result.output, result.status.value))
            observation = None
            if episode.reply is not None:  # a turn without calls, for the environment to answer
                text, finish = episode.reply
                episode.reply = None
                try:
                    observation = episode.env.respond(text)
                except EnvironmentFailed as exc:
                    episode.env_error = str(exc)
                    self._finish(episode, "env_error")
                    continue
                if observation is None:
                    self._finish(episode, finish)
                    continue
            done = episode.env is not None and episode.env.done
            last_turn = history.num_turns >= self.max_turns or done
            room = self.max_length - len(history.token_ids)
            if observation is not None:
                observe = getattr(episode.protocol, "observe", None)
                if observe is None:
                    raise UserError(f"the environment answered a turn with an observation, which protocol "
                                    f"{type(episode.protocol).__name__} cannot show (it has no observe method)",
                                    key="env.protocol")
                answer = observe(history, observation, self.tokenizer, room=room, last_turn=last_turn)
            else:
                answer = episode.protocol.answer_calls(history, calls, outputs, self.tokenizer, room=room,
                                                       last_turn=last_turn)
            if len(answer.ids) > room:
                # a whole answer that does not fit: the episode ends before it (its messages stay whole; the calls
                # were made and stay in tool_calls)
                self._finish(episode, "max_length")
                continue
            if answer.messages:
                history.messages += answer.messages
            if answer.ids:
                history.append("tool", answer.text, answer.ids)
            if not answer.whole and len(history.token_ids) >= self.max_length:
                self._finish(episode, "max_length")
            elif last_turn:
                self._finish(episode, "done" if done else "max_turns")
            else:
                episode.pending, episode.state = None, RowState.GENERATING

    def _finish(self, episode: _Row, reason: str) -> None:
        env, history = episode.env, episode.history
        if env is not None:  # the episode is over: score it from the environment's state, then let it go
            if episode.env_error is None:
                try:
                    history.env_reward = env.reward()
                except EnvironmentFailed as exc:
                    episode.env_error = str(exc)
            env.close()
            episode.env = None
        if episode.env_error is not None:
            history.env_error, reason = episode.env_error, "env_error"
        episode.finish(reason)
        episode.protocol.check_episode(history, self.tokenizer)


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
