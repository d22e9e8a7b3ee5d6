"""Tool-call protocols: how an episode's prompt, a model turn and a tool answer become text and tokens.

Every protocol fits one ``ToolCallProtocol`` slot, all that ``TextEnvironment``'s turn loop asks of it: what ends a
turn (``stop_strings``, ``turn_end_ids()``), the prompt (``start``), what a sampled turn says (``read_turn``), the
forced text of tool results (``answer_calls``), a last check (``check_episode``), a stateful environment's
observation (``observe``, optional) and the tools' description (``system_prompt``). Three are built in:
``TagProtocol`` and ``JsonProtocol`` write plain text (``PlainText`` holds what they share); ``ChatProtocol`` lets the
model's chat template write everything but the model's own tokens. Each method in detail: docs/internals.md,
"rlcli/env/protocols.py".
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from rlcli.chat_template import ChatTemplate, ChatTemplateError, conversation, difference
from rlcli.config.errors import UserError
from rlcli.env.history import TextHistory
from rlcli.toolcalls import (
    Malformed,
    Parsed,
    Submit,
    ToolCall,
    ToolCallParser,
    hermes_tools_text,
    json_calls,
    tag_calls,
    tool_schema,
    tool_summary,
)

Call = ToolCall | Malformed


@dataclass(frozen=True)
class Opening:
    """An episode's prompt: its ``text`` and token ``ids``; chat: the conversation (``messages``, ``tools``) as the
    template renders it."""

    text: str
    ids: list[int]
    messages: list[dict] | None = None
    tools: list[dict] | None = None


@dataclass(frozen=True)
class Turn:
    """What one sampled turn says.

    ``text``: the model segment's text. ``calls``: the calls to answer (none: the episode ends). ``finish``: why the
    episode ends if no call is answered: ``eos`` or ``submit`` (the model's choice), ``no_call`` or
    ``max_new_tokens`` (the turn stopped without one; ``max_length`` instead when the episode is full).
    ``answer``: the submitted answer, if any. ``message``: chat: the assistant message the turn adds."""

    text: str
    calls: list[Call]
    finish: str
    answer: str | None = None
    message: dict | None = None

    @property
    def ended_by_model(self) -> bool:
        return self.finish in ("eos", "submit")


@dataclass(frozen=True)
class Answer:
    """The forced text after a turn's calls, its token ids, and (chat) the ``tool`` messages it renders.

    ``whole``: the answer is never cut (chat: the template's text for the tool turn). An episode ends before a whole
    answer that does not fit; one that fills the episode exactly still hands the turn to the model, which has no
    tokens left (so the episode ends in a model turn, where its messages render as its tokens). An answer that is
    not whole is cut to the room left, and a full episode ends right after it."""

    text: str
    ids: list[int]
    messages: list[dict] = field(default_factory=list)
    whole: bool = False


@runtime_checkable
class ToolCallProtocol(Protocol):
    stop_strings: tuple[str, ...]

    def turn_end_ids(self) -> list[int]: ...

    def start(self, prompt: str | Sequence[Mapping[str, Any]], tokenizer, prefix: str) -> Opening: ...

    def read_turn(self, history: TextHistory, ids: list[int], stop_reason: str, tokenizer) -> Turn: ...

    def answer_calls(self, history: TextHistory, calls: Sequence[Call], outputs: Sequence[str], tokenizer, *,
                     room: int, last_turn: bool) -> Answer: ...

    def check_episode(self, history: TextHistory, tokenizer) -> None: ...

    def system_prompt(self, tools: Mapping[str, Callable]) -> str: ...


# ---------------------------------------------------------------------------------------------------------------
# plain text: the tag and JSON protocols


class PlainText:
    """The episode side of a protocol that writes plain text: ``prefix + prompt`` tokenised with special tokens, a
    turn's tokens decoded as they are, ``parse(text) -> [ToolCall | Malformed | Submit]`` on a turn that did not end
    at EOS, and ``format_response(output)`` per call as the answer (cut to the room the episode has left). A
    protocol adds ``stop_strings``, ``parse``, ``format_response`` and ``system_prompt``: ``TagProtocol``,
    ``JsonProtocol``, and plain-text protocols of your own (tests/ppo/test_behaviour_policy.py has one)."""

    parse: Callable[[str], list[Parsed]]
    format_response: Callable[[str], str]

    def turn_end_ids(self) -> list[int]:
        return []

    def start(self, prompt, tokenizer, prefix: str) -> Opening:
        if not isinstance(prompt, str):
            raise UserError("a prompt is a list of messages, which needs the chat protocol", key="env.protocol")
        text = prefix + prompt
        return Opening(text, tokenizer(text, add_special_tokens=True)["input_ids"])

    def read_turn(self, history: TextHistory, ids: list[int], stop_reason: str, tokenizer) -> Turn:
        text = tokenizer.decode(ids, skip_special_tokens=False)
        if stop_reason == "eos":
            return Turn(text, [], "eos")
        parsed = self.parse(text)
        if parsed and isinstance(parsed[0], Submit):
            return Turn(text, [], "submit", answer=parsed[0].answer.strip())
        return Turn(text, list(parsed), "no_call")

    def answer_calls(self, history: TextHistory, calls: Sequence[Call], outputs: Sequence[str], tokenizer, *,
                     room: int, last_turn: bool) -> Answer:
        text = "".join(self.format_response(output) for output in outputs)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) > room:  # the episode ends here anyway; keep the total under max_length
            ids = ids[:room]
            text = tokenizer.decode(ids, skip_special_tokens=False)
        return Answer(text, ids)

    def observe(self, history: TextHistory, text: str, tokenizer, *, room: int, last_turn: bool) -> Answer:
        """An environment's observation (not a tool result): its text as it is, cut to ``room``."""
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) > room:
            ids = ids[:room]
            text = tokenizer.decode(ids, skip_special_tokens=False)
        return Answer(text, ids)

    def check_episode(self, history: TextHistory, tokenizer) -> None:
        pass


@dataclass(frozen=True)
class TagProtocol(PlainText):
    """TRL ``TextEnvironment`` tags: the model writes ``<request><ToolName>arguments<call>``; the environment appends
    ``output<response>``; ``<submit>`` ends the episode. The tool gets ``arguments`` as one string."""

    request: str = "<request>"
    call: str = "<call>"
    response: str = "<response>"
    submit: str = "<submit>"

    @property
    def stop_strings(self) -> tuple[str, ...]:
        return (self.call, self.submit)

    def parse(self, model_text: str) -> list[Parsed]:
        return tag_calls(model_text, self.request, self.call, self.submit)

    def format_response(self, output: str) -> str:
        return output + self.response

    def system_prompt(self, tools: Mapping[str, Callable]) -> str:
        lines = [
            f"You can use tools. To call one, write {self.request}<ToolName>input{self.call}; its output follows, "
            f"ended by {self.response}. When you are done, write your answer followed by {self.submit}.",
            "Tools:",
        ]
        lines += [f"- {name}: {tool_summary(fn)}" for name, fn in tools.items()]
        return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class JsonProtocol(PlainText):
    """``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` answered by ``<tool_response>...</tool_response>``.

    The tool is called with the arguments as keyword arguments. There is no submit marker by default: an episode
    ends when a turn ends without a call (usually at EOS). Set ``submit`` to add one.
    """

    open_tag: str = "<tool_call>"
    close_tag: str = "</tool_call>"
    response_open: str = "<tool_response>"
    response_close: str = "</tool_response>"
    submit: str | None = None

    @property
    def stop_strings(self) -> tuple[str, ...]:
        return (self.close_tag,) + ((self.submit,) if self.submit else ())

    def parse(self, model_text: str) -> list[Parsed]:
        return json_calls(model_text, self.open_tag, self.close_tag, self.submit)

    def format_response(self, output: str) -> str:
        return f"{self.response_open}\n{output}\n{self.response_close}\n"

    def system_prompt(self, tools: Mapping[str, Callable]) -> str:
        schemas = "\n".join(json.dumps(tool_schema(fn, name)) for name, fn in tools.items())
        end = f" When you are done, write your answer followed by {self.submit}." if self.submit else ""
        return (hermes_tools_text(schemas, self.open_tag, self.close_tag)
                + f"The result comes back within {self.response_open}{self.response_close} tags.{end}\n")


# ---------------------------------------------------------------------------------------------------------------
# chat


@dataclass
class ChatProtocol:
    """An episode is a list of chat messages, rendered token for token by the model's own chat template.

    - the prompt is ``apply_chat_template(messages, tools=<schemas>, add_generation_prompt=True)`` (tools described
      in a system message for templates that ignore ``tools``: ``ChatTemplate.prepare``); the environment's text
      prefix is not used;
    - a turn ends at the template's end-of-turn token (``ChatTemplate.eot_id``); ``parser`` reads its tool calls
      (``rlcli.toolcalls``: ``hermes_calls``, ``llama3_json_calls`` or your own);
    - the answer to a turn's calls is exactly the text the template renders for the ``tool`` messages plus the next
      generation prompt: the conversation is rendered with them, and the text past what the episode holds is forced;
    - a finished episode's ids must be the template's tokens of its messages (``chat_token_ids``).

    ``tool_schemas``: None when the model is not told about the tools; ``system_message``: put first unless the
    prompt has its own.
    """

    template: ChatTemplate
    parser: ToolCallParser
    tool_schemas: list[dict] | None = None
    system_message: str | None = None
    stop_strings: tuple[str, ...] = ()

    def turn_end_ids(self) -> list[int]:
        return [self.template.eot_id]

    def start(self, prompt, tokenizer=None, prefix: str = "") -> Opening:
        """Prompt text (a user message) or messages -> the conversation as ``apply_chat_template`` gets it and its
        rendering with the generation prompt."""
        messages, tools = self.template.prepare(conversation(prompt, self.system_message), self.tool_schemas,
                                                self.parser)
        text = self.template.render(messages, tools, add_generation_prompt=True)
        return Opening(text, self.template.encode(text), messages, tools)

    def parse(self, text: str) -> list[Call]:
        """The parser's calls; a parser that fails or returns something else becomes an error text for the model."""
        try:
            calls = self.parser(text)
        except Exception as exc:  # noqa: BLE001 - a plug-in parser's bug becomes an error text for the model
            return [Malformed(f"the tool-call parser failed: {type(exc).__name__}: {exc}")]
        out = []
        for call in calls or []:
            if isinstance(call, (ToolCall, Malformed)):
                out.append(call)
            else:
                out.append(Malformed(f"the tool-call parser returned {type(call).__name__}, not a ToolCall"))
        return out

    def read_turn(self, history: TextHistory, ids: list[int], stop_reason: str, tokenizer) -> Turn:
        """Calls are read only from a turn the model ended with the end-of-turn token; the turn becomes an assistant
        message (``ChatTemplate.assistant_message``)."""
        template = self.template
        text = template.decode(ids, before=history.token_ids)
        ended_turn = stop_reason == "eos" and ids and ids[-1] == template.eot_id
        content = template.decode(ids[:-1], before=history.token_ids) if ended_turn else text
        calls = self.parse(content) if ended_turn else []
        parsed = [c for c in calls if isinstance(c, ToolCall)]
        message = template.assistant_message(content, parsed, f"call_{history.num_turns + 1}",
                                             parser_ok=len(parsed) == len(calls), messages=history.messages,
                                             tools=history.tools, head=history.text, parser=self.parser)
        message = template.prepare([message], None, self.parser)[0][0]
        finish = "eos" if ended_turn or stop_reason == "eos" else "max_new_tokens"
        return Turn(text, calls, finish, message=message)

    def answer_calls(self, history: TextHistory, calls: Sequence[Call], outputs: Sequence[str], tokenizer, *,
                     room: int, last_turn: bool) -> Answer:
        """The tool messages and the template's text for them (the whole turn: an episode ends before a turn that
        does not fit in ``room``)."""
        ids_of_calls = iter(c["id"] for c in history.messages[-1].get("tool_calls", []))
        messages = []
        for call, output in zip(calls, outputs):
            message = {"role": "tool", "content": output}
            if isinstance(call, ToolCall):
                call_id = next(ids_of_calls, None)
                message = {"role": "tool", **({"tool_call_id": call_id} if call_id else {}),
                           "name": call.name, "content": output}
            messages.append(message)
        return self._continue(history, messages, last_turn, "its tool results")

    def observe(self, history: TextHistory, text: str, tokenizer, *, room: int, last_turn: bool) -> Answer:
        """An environment's observation as a user turn (the whole turn, like ``answer_calls``)."""
        return self._continue(history, [{"role": "user", "content": text}], last_turn, "a user turn")

    def _continue(self, history: TextHistory, messages: list[dict], last_turn: bool, what: str) -> Answer:
        """The template's text for ``messages`` after the episode (and the next generation prompt)."""
        rendered = history.text
        after = self.template.render(history.messages + messages, history.tools, add_generation_prompt=not last_turn)
        if not after.startswith(rendered):
            raise ChatTemplateError(
                f"env.protocol chat: the chat template renders an episode's earlier turns differently once {what} "
                "follows, so the tokens the model saw would not be the template's rendering of the "
                "conversation: " + difference(rendered, after, "the episode", "the template"))
        text = after[len(rendered):]
        return Answer(text, self.template.encode(text), messages, whole=True)

    def check_episode(self, history: TextHistory, tokenizer) -> None:
        expected = chat_token_ids(self.template, history)
        if history.token_ids != expected[: len(history.token_ids)]:
            at = next((i for i, (a, b) in enumerate(zip(history.token_ids, expected)) if a != b), len(expected))
            got, want = (tokenizer.decode(ids[max(0, at - 8):at + 8]) for ids in (history.token_ids, expected))
            raise ChatTemplateError(f"env.protocol chat: an episode's tokens differ from the chat template's rendering "
                                    f"of its messages at token {at}: the episode has {got!r}, the template {want!r}")

    def system_prompt(self, tools: Mapping[str, Callable]) -> str:
        return ""  # the template describes the tools (``tool_schemas``)


def chat_token_ids(template: ChatTemplate, history: TextHistory) -> list[int]:
    """The token ids of ``history.messages`` as the chat template renders them (``ChatTemplate.spans``), with each
    assistant turn's tokens as the model sampled them. An episode's ``token_ids`` are a prefix of these: all of
    them, but what the template writes after the last token the episode holds (the newline after an end-of-turn
    token, or a turn the episode's length cut)."""
    spans = template.spans(history.messages, history.tools)
    model_turns = [s.token_ids for s in history.segments if s.source == "model"]
    ids, _ = template.tokens(spans, model_turns)
    return ids
