"""``TextHistory``: one episode of a text environment as an ordered list of prompt / model / tool segments.

Each segment keeps its token ids exactly as they entered the model (model tokens as sampled, never re-tokenised from
text), so ``history.token_ids`` is what the model saw and what PPO's forward pass will see, and ``token_mask`` marks
the tokens the policy chose.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

from rich.console import Console
from rich.text import Text

Source = Literal["prompt", "model", "tool"]
SOURCES: tuple[Source, ...] = ("prompt", "model", "tool")

# Distinct background colours, readable with black text on dark and light terminals. `show_tokens` alternates each
# colour with a second shade so token boundaries stay visible.
STYLES: dict[str, tuple[str, str]] = {
    "prompt": ("black on grey82", "black on grey70"),
    "model": ("black on pale_green3", "black on dark_sea_green2"),
    "tool": ("black on light_sky_blue1", "black on sky_blue2"),
}


@dataclass(frozen=True)
class Segment:
    """A contiguous run of tokens from one source: ``"prompt"``, ``"model"`` (sampled) or ``"tool"`` (forced)."""

    source: Source
    text: str
    token_ids: list[int]
    logprobs: list[float] | None = None
    """Model segments: the log-prob the sampler drew each token with (the behaviour distribution's)."""

    def __post_init__(self):
        if self.source not in SOURCES:
            raise ValueError(f"segment source must be one of {SOURCES}, got {self.source!r}")


@dataclass(frozen=True)
class ToolCallRecord:
    """One tool call: what the model asked for and what it got back.

    ``status`` is a ``ToolOutcome`` value: ok, error, timeout, unknown_tool, bad_output, malformed_call, truncated.
    ``arguments`` is the raw argument text (tag protocol) or the parsed JSON object (JSON protocol).
    """

    name: str
    arguments: Any
    output: str
    status: str


class Span(NamedTuple):
    """``[start, end)`` of one segment in ``token_ids`` or ``text``."""

    source: Source
    start: int
    end: int


@dataclass
class TextHistory:
    """One episode: segments in order, the tool calls made, and how it ended.

    ``finish_reason`` is one of ``submit`` (the model submitted), ``eos``, ``no_call`` (a turn ended with neither a tool
    call nor EOS), ``max_turns``, ``max_length``, ``max_new_tokens`` (chat: a turn used its whole token budget
    without ending), ``done`` (a stateful environment ended it), ``env_error`` (its environment failed); None while
    the episode runs. ``num_turns`` counts generation turns.
    ``meta`` holds the dataset row the prompt came from (for reward functions). ``answer`` is the episode's final
    answer: the text the model submitted, or its last turn's text (special tokens dropped) if it never submitted.

    Chat-protocol episodes also hold the conversation: ``messages`` (OpenAI style: assistant ``tool_calls``,
    ``tool`` messages) and ``tools`` (the schemas given to the template, None when they are described in a system
    message), exactly as ``apply_chat_template`` renders them into this episode's tokens.
    """

    segments: list[Segment] = field(default_factory=list)
    tool_calls: list[ToolCallRecord] = field(default_factory=list)
    reward: float | None = None
    finish_reason: str | None = None
    num_turns: int = 0
    meta: dict[str, Any] = field(default_factory=dict)
    answer: str | None = None
    messages: list[dict[str, Any]] | None = None
    tools: list[dict[str, Any]] | None = None
    env_reward: float | None = None
    """A stateful environment's ``get_reward()`` for this episode (``rlcli.env.stateful``); None without one."""
    env_error: str | None = None
    """Why the episode's stateful environment failed (constructor, reset, get_reward, _respond); None if it did
    not. Such an episode's ``finish_reason`` is ``env_error`` and it scores ``reward.failure_score``."""

    def append(self, source: Source, text: str, token_ids: list[int], logprobs: list[float] | None = None) -> Segment:
        segment = Segment(source, text, [int(t) for t in token_ids],
                          None if logprobs is None else [float(x) for x in logprobs])
        self.segments.append(segment)
        return segment

    # token views ----------------------------------------------------------------------------------------------

    @property
    def token_ids(self) -> list[int]:
        """All token ids in order: exactly the model's input for the next turn."""
        return [t for s in self.segments for t in s.token_ids]

    @property
    def token_mask(self) -> list[int]:
        """1 on tokens the model generated, 0 on prompt and tool tokens."""
        return [int(s.source == "model") for s in self.segments for _ in s.token_ids]

    @property
    def tool_mask(self) -> list[int]:
        """1 on tokens a tool wrote."""
        return [int(s.source == "tool") for s in self.segments for _ in s.token_ids]

    @property
    def sampler_logprobs(self) -> list[float] | None:
        """The sampler's log-prob of every token (0 on prompt and tool tokens); None if a model segment has none."""
        if any(s.source == "model" and s.logprobs is None for s in self.segments):
            return None
        return [lp for s in self.segments for lp in (s.logprobs if s.source == "model" else [0.0] * len(s.token_ids))]

    @property
    def token_spans(self) -> list[Span]:
        """One ``Span`` per segment, in token positions."""
        return _spans(self.segments, lambda s: len(s.token_ids))

    @property
    def text(self) -> str:
        return "".join(s.text for s in self.segments)

    @property
    def text_spans(self) -> list[Span]:
        """One ``Span`` per segment, in character positions of ``text``."""
        return _spans(self.segments, lambda s: len(s.text))

    @property
    def prompt_ids(self) -> list[int]:
        """The leading prompt segment(s): the query of a PPO rollout."""
        return [t for s in self._leading_prompt() for t in s.token_ids]

    @property
    def response_ids(self) -> list[int]:
        """Everything after the leading prompt: the response of a PPO rollout."""
        return self.token_ids[len(self.prompt_ids):]

    @property
    def model_text(self) -> str:
        """The text of the model segments only, joined."""
        return "".join(s.text for s in self.segments if s.source == "model")

    def _leading_prompt(self) -> list[Segment]:
        lead = []
        for s in self.segments:
            if s.source != "prompt":
                break
            lead.append(s)
        return lead

    # rendering ------------------------------------------------------------------------------------------------
    # Prompts, model text and tool output are printed through printable(): an escape sequence in them (model-written
    # or in the data) would otherwise reach the terminal and act there (clear it, retitle it, hide text).

    def show_text(self, console: Console | None = None, *, legend: bool = True) -> None:
        """Print the episode's text, each segment coloured by source, then a legend (unless ``legend=False``, e.g.
        when the caller prints one for several episodes) and a summary line."""
        console = console or Console()
        body = Text()
        for s in self.segments:
            body.append(printable(s.text), style=STYLES[s.source][0])
        console.print(body)
        if legend:
            console.print(source_legend())
        console.print(self._summary())

    def show_tokens(self, tokenizer, console: Console | None = None, *, legend: bool = True) -> None:
        """Print every token on its own, coloured by source (alternating two shades to show boundaries)."""
        console = console or Console()
        body = Text()
        for s in self.segments:
            for i, token_id in enumerate(s.token_ids):
                piece = tokenizer.decode([token_id], skip_special_tokens=False)
                body.append(printable(piece).replace("\n", "\u23ce\n"), style=STYLES[s.source][i % 2])
        console.print(body)
        if legend:
            console.print(source_legend())
        console.print(self._summary())

    def _summary(self) -> Text:
        n = len(self.token_ids)
        calls = printable(", ".join(f"{c.name}:{c.status}" for c in self.tool_calls)) or "none"
        return Text(
            f"finish={self.finish_reason} reward={self.reward} turns={self.num_turns} tokens={n} "
            f"(model {sum(self.token_mask)}, tool {sum(self.tool_mask)}) tool calls: {calls}",
            style="dim",
        )

    # serialisation --------------------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict; ``TextHistory.from_dict(h.to_dict()) == h``."""
        return {
            "segments": [{"source": s.source, "text": s.text, "token_ids": list(s.token_ids),
                          **({"logprobs": list(s.logprobs)} if s.logprobs is not None else {})}
                         for s in self.segments],
            "tool_calls": [
                {"name": c.name, "arguments": c.arguments, "output": c.output, "status": c.status}
                for c in self.tool_calls
            ],
            "reward": self.reward,
            "finish_reason": self.finish_reason,
            "num_turns": self.num_turns,
            "meta": self.meta,
            "answer": self.answer,
            **({"messages": self.messages, "tools": self.tools} if self.messages is not None else {}),
            **({"env_reward": self.env_reward} if self.env_reward is not None else {}),
            **({"env_error": self.env_error} if self.env_error is not None else {}),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TextHistory:
        return cls(
            segments=[Segment(s["source"], s["text"], list(s["token_ids"]), s.get("logprobs"))
                      for s in data["segments"]],
            tool_calls=[ToolCallRecord(**c) for c in data.get("tool_calls", [])],
            reward=data.get("reward"),
            finish_reason=data.get("finish_reason"),
            num_turns=data.get("num_turns", 0),
            meta=dict(data.get("meta") or {}),
            answer=data.get("answer"),
            messages=data.get("messages"),
            tools=data.get("tools"),
            env_reward=data.get("env_reward"),
            env_error=data.get("env_error"),
        )


_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def printable(text: str) -> str:
    """``text`` with every control character but newline and tab shown as ``\\xNN`` (ESC, carriage return, bell,
    C1 controls): what the terminal shows is what the text holds, and nothing in it acts on the terminal."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def _spans(segments: list[Segment], length) -> list[Span]:
    spans, start = [], 0
    for s in segments:
        end = start + length(s)
        spans.append(Span(s.source, start, end))
        start = end
    return spans


def source_legend() -> Text:
    """The colour of each segment source, as the renderings use them."""
    legend = Text()
    legend.append("legend: ", style="dim")
    for source in SOURCES:
        legend.append(f" {source} ", style=STYLES[source][0])
        legend.append(" ")
    return legend
