"""Chat templates: a conversation rendered token for token as the model's own template writes it.

Real chat models (SmolLM2, Qwen, Llama, ...) learned one layout for a conversation, a tool call and a tool result:
their chat template's. ``ChatTemplate`` probes what a tokenizer's template does (its end-of-turn token, whether it
writes ``tools`` and ``tool_calls``) and renders conversations with it:

- ``prepare``: messages and tool schemas exactly as ``apply_chat_template`` gets them (for templates that ignore
  ``tools``, the tools are described in a system message; calls are written into the content where the template
  ignores ``tool_calls``);
- ``spans`` / ``tokens``: where each assistant turn is in a rendered conversation, and its token ids with the
  text between assistant turns tokenised piece by piece, so that a model's sampled tokens can stand in for the
  turns. The same functions serve the chat protocol's episodes (``rlcli.env.protocols.ChatProtocol``), SFT on
  ``messages`` rows (``rlcli.data.sft``, loss on the assistant pieces) and PPO prompts (``prompt_ids``), so all three
  see one token layout;
- ``check``: a probe episode through the template; a template that cannot reproduce an episode (it trims or
  rewrites assistant text, drops earlier reasoning, renders a turn differently once another message follows)
  raises ``ChatTemplateError`` saying where the two texts part.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from jinja2.exceptions import TemplateError

from rlcli.config.errors import UserError
from rlcli.toolcalls import ToolCall, ToolCallParser, call_writer, describe_tools, hermes_calls


class ChatTemplateError(UserError):
    """The chat template cannot render an episode exactly."""


# ---------------------------------------------------------------------------------------------------------------
# messages


def normalise_messages(messages: Sequence[Mapping]) -> list[dict]:
    """Messages as chat templates expect them.

    - tool-call ``arguments`` given as a JSON string (OpenAI style) become an object (what templates render);
    - keys whose value is null are dropped and a null ``content`` becomes ``""``: a JSON-lines reader (datasets,
      Arrow) gives every message every key any message of the file has, filled with null, and templates test for
      keys (``message.tool_calls is defined``);
    - null values inside tool-call arguments are dropped for the same reason.
    """
    out = []
    for message in messages:
        m = {k: v for k, v in dict(message).items() if v is not None or k == "content"}
        if m.get("content") is None:
            m["content"] = ""
        if m.get("tool_calls"):
            m["tool_calls"] = [_normalise_call(c) for c in m["tool_calls"]]
        elif "tool_calls" in m:
            del m["tool_calls"]
        out.append(m)
    return out


def _normalise_call(call: Mapping) -> dict:
    call = {k: v for k, v in dict(call).items() if v is not None}
    function = call.get("function")
    if isinstance(function, Mapping):
        function = {k: v for k, v in dict(function).items() if v is not None}
        arguments = function.get("arguments")
        if isinstance(arguments, str):
            try:
                parsed = json.loads(arguments) if arguments.strip() else {}
                arguments = parsed if isinstance(parsed, dict) else arguments
            except json.JSONDecodeError:
                pass
        if isinstance(arguments, Mapping):
            arguments = {k: v for k, v in arguments.items() if v is not None}
        function["arguments"] = arguments if arguments is not None else {}
        call["function"] = function
    return call


def clean_schemas(tools: Sequence[Mapping] | None) -> list[dict] | None:
    """Tool schemas without null values (see ``normalise_messages``: a JSON-lines reader adds them)."""
    if not tools:
        return None

    def clean(x):
        if isinstance(x, Mapping):
            return {k: clean(v) for k, v in x.items() if v is not None}
        if isinstance(x, list):
            return [clean(v) for v in x]
        return x

    return [clean(t) for t in tools]


def tool_call_entry(call: ToolCall, call_id: str) -> dict:
    """One entry of an assistant message's ``tool_calls`` (OpenAI layout; ``arguments`` an object, as Hugging Face
    templates render it)."""
    arguments = call.arguments if isinstance(call.arguments, dict) else {"input": call.arguments}
    return {"id": call_id, "type": "function", "function": {"name": call.name, "arguments": arguments}}


# ---------------------------------------------------------------------------------------------------------------
# the template


@dataclass(frozen=True)
class Spans:
    """A rendered conversation: its ``text`` and the ``[start, end)`` character spans of the assistant turns' own
    text (content, tool calls and the end-of-turn token: what the model writes)."""

    text: str
    assistant: list[tuple[int, int]]


class ChatTemplate:
    """What a tokenizer's chat template does, found by rendering probe conversations.

    Attributes:
        eot_id / eot_text: the token the template puts right after an assistant message's content (end of turn).
        turn_suffix: what it writes after that token (``"\\n"`` for ChatML, ``""`` for Llama 3).
        renders_tools: the template writes the ``tools`` it is given (else they go into a system message).
        renders_tool_calls: the template writes an assistant message's ``tool_calls``.
    """

    PROBE_TEXT = "rlcli probe text"

    @classmethod
    def of(cls, tokenizer) -> ChatTemplate:
        """The (probed once) ``ChatTemplate`` of a tokenizer and its current template."""
        key = (id(tokenizer), getattr(tokenizer, "chat_template", None))
        cached = _TEMPLATES.get(key)
        if cached is None or cached.tokenizer is not tokenizer:
            cached = _TEMPLATES[key] = cls(tokenizer)
        return cached

    def __init__(self, tokenizer):
        if not getattr(tokenizer, "chat_template", None):
            raise ChatTemplateError("the tokenizer has no chat template; env.protocol chat renders every episode with "
                                    "the model's own template")
        self.tokenizer = tokenizer
        user = [{"role": "user", "content": "rlcli probe question"}]
        prompt = self.render(user, add_generation_prompt=True)
        turn = self.render(user + [{"role": "assistant", "content": self.PROBE_TEXT}])
        if not turn.startswith(prompt + self.PROBE_TEXT):
            raise ChatTemplateError(
                "the chat template does not start an assistant message with its own generation prompt: "
                + difference(prompt + self.PROBE_TEXT, turn, "the generation prompt and the content",
                              "the assistant message"))
        tail = turn[len(prompt) + len(self.PROBE_TEXT):]
        tail_ids = self.encode(tail)
        special = set(getattr(tokenizer, "all_special_ids", [])) | {
            i for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items() if getattr(t, "special", False)}
        if not tail_ids or tail_ids[0] not in special:
            raise ChatTemplateError(
                f"cannot tell where the chat template ends an assistant turn: after the content it writes {tail!r}, "
                "which does not start with a special token (the model's end-of-turn token)")
        self.eot_id = tail_ids[0]
        self.eot_text = self.decode([self.eot_id])
        if not tail.startswith(self.eot_text):
            raise ChatTemplateError(f"the chat template's end of turn {tail!r} does not start with the text of its "
                                    f"first token {self.eot_text!r}")
        self.turn_suffix = tail[len(self.eot_text):]
        schema = {"type": "function", "function": {"name": "rlcli_probe_tool", "description": "probe",
                                                   "parameters": {"type": "object", "properties": {}}}}
        self.renders_tools = self._renders(lambda: self.render(user, tools=[schema], add_generation_prompt=True),
                                           "rlcli_probe_tool")
        call = {"role": "assistant", "content": "",
                "tool_calls": [{"id": "call_0", "type": "function",
                                "function": {"name": "rlcli_probe_tool", "arguments": {}}}]}
        self.renders_tool_calls = self._renders(lambda: self.render(user + [call]), "rlcli_probe_tool")

    def _renders(self, render: Callable[[], str], marker: str) -> bool:
        try:
            return marker in render()
        except TemplateError:
            return False

    # rendering -----------------------------------------------------------------------------------------------

    def render(self, messages: Sequence[Mapping], tools: Sequence[Mapping] | None = None,
               add_generation_prompt: bool = False) -> str:
        """``apply_chat_template`` as text (``tools`` passed only when given)."""
        kwargs = {"tools": list(tools)} if tools else {}
        try:
            return self.tokenizer.apply_chat_template(list(messages), tokenize=False,
                                                      add_generation_prompt=add_generation_prompt, **kwargs)
        except TemplateError as exc:
            raise ChatTemplateError(f"the chat template failed on a conversation with roles "
                                    f"{[m.get('role') for m in messages]}: {exc}") from None

    def encode(self, text: str) -> list[int]:
        """The template's own tokenization (as ``apply_chat_template(tokenize=True)``: no special tokens added)."""
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []

    def decode(self, ids: Sequence[int], before: Sequence[int] = ()) -> str:
        """Text of ``ids`` as it reads after ``before`` (some tokenizers drop a leading space at the start of a
        decode; decoding with the preceding tokens and cutting them off keeps it)."""
        kwargs = {"skip_special_tokens": False, "clean_up_tokenization_spaces": False}
        context = list(before)[-4:]
        if not context:
            return self.tokenizer.decode(list(ids), **kwargs)
        head = self.tokenizer.decode(context, **kwargs)
        full = self.tokenizer.decode(context + list(ids), **kwargs)
        return full[len(head):] if full.startswith(head) else self.tokenizer.decode(list(ids), **kwargs)

    def prepare(self, messages: Sequence[Mapping], tools: Sequence[Mapping] | None = None,
                parser: ToolCallParser | None = None) -> tuple[list[dict], list[dict] | None]:
        """``(messages, tools)`` exactly as ``apply_chat_template`` gets them: messages normalised
        (``normalise_messages``); ``tools`` kept for a template that renders them, otherwise described in a system
        message (``describe_tools``: the parser's format, Hermes by default) and returned as None. For a template
        that ignores ``tool_calls``, an assistant message's calls are written into its content in the parser's
        format unless the content already holds them (as in episodes). Preparing the result again changes
        nothing."""
        messages = normalise_messages(messages)
        if not self.renders_tool_calls:
            messages = [self._calls_in_content(m, parser) for m in messages]
        tools = clean_schemas(tools)
        if not tools or self.renders_tools:
            return messages, tools
        description = describe_tools(tools, parser)
        if messages and messages[0]["role"] == "system":
            first = dict(messages[0], content=f"{messages[0]['content']}\n\n{description}")
            return [first] + messages[1:], None
        return [{"role": "system", "content": description}] + messages, None

    def _calls_in_content(self, message: dict, parser: ToolCallParser | None) -> dict:
        """For a template that ignores ``tool_calls``: the message with its calls written at the end of its
        content, in the parser's format, unless they are written there already."""
        if message["role"] != "assistant" or not message.get("tool_calls"):
            return message
        write = call_writer(parser)
        written = write([(c["function"]["name"], c["function"].get("arguments", {})) for c in message["tool_calls"]])
        content = message["content"]
        if content.endswith(written):
            return message
        return dict(message, content=(content + "\n" if content else "") + written)

    def spans(self, messages: Sequence[Mapping], tools: Sequence[Mapping] | None = None) -> Spans:
        """The rendered conversation and where each assistant turn's own text is in it.

        Assistant turn i starts where ``render(messages[:i], add_generation_prompt=True)`` ends and runs through the
        end-of-turn token; raises ``ChatTemplateError`` when the full text does not begin with a turn as rendered on
        its own (the template changes a turn once more messages follow)."""
        full = self.render(messages, tools)
        spans = []
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            head = self.render(messages[:i], tools, add_generation_prompt=True)
            alone = self.render(messages[: i + 1], tools)
            if not alone.startswith(head):
                raise ChatTemplateError(f"assistant message {i + 1}: " + difference(
                    head, alone, "the generation prompt", "the conversation with the assistant message"))
            end = alone.rfind(self.eot_text, len(head))
            if end < 0:
                raise ChatTemplateError(f"assistant message {i + 1}: the template wrote no end-of-turn token "
                                        f"{self.eot_text!r} after it")
            turn = alone[: end + len(self.eot_text)]
            if not full.startswith(turn):
                raise ChatTemplateError(f"assistant message {i + 1}: " + difference(
                    turn, full, "the turn as rendered when it is the last message",
                    "the whole conversation (the template rewrites earlier turns)"))
            spans.append((len(head), len(turn)))
        return Spans(full, spans)

    def tokens(self, spans: Spans, assistant_ids: Sequence[Sequence[int]] | None = None
               ) -> tuple[list[int], list[int]]:
        """Token ids of a rendered conversation and a 0/1 mask of assistant tokens: the text between assistant
        turns tokenised piece by piece and each assistant turn on its own. With ``assistant_ids`` (the ids the
        model sampled, one list per turn) only the last ``len(assistant_ids)`` turns are the model's and are
        replaced by them; earlier assistant messages (examples in a prompt) stay inside the text around them, as
        the prompt was tokenised whole. A sampled turn that does not end with the end-of-turn token (cut at its
        token budget, or ended by another EOS) is closed by the template: its end-of-turn token follows as the
        template's text (mask 0), as it does in an episode that goes on after such a turn (a stateful
        environment's ``_respond``)."""
        turns = spans.assistant
        if assistant_ids is not None:
            turns = turns[len(turns) - len(assistant_ids):]
        ids, mask, at = [], [], 0
        for j, (start, end) in enumerate(turns):
            piece = self.encode(spans.text[at:start])
            if assistant_ids is None:
                turn, closing = self.encode(spans.text[start:end]), []
            else:
                turn = list(assistant_ids[j])
                closing = [] if turn and turn[-1] == self.eot_id else [self.eot_id]
            ids += piece + turn + closing
            mask += [0] * len(piece) + [1] * len(turn) + [0] * len(closing)
            at = end
        tail = self.encode(spans.text[at:])
        return ids + tail, mask + [0] * len(tail)

    # the round-trip check --------------------------------------------------------------------------------------

    def check(self, tool_schemas: Sequence[Mapping] | None, parser: ToolCallParser | None = None,
              system_message: str | None = None) -> None:
        """Run a probe episode through the template and raise ``ChatTemplateError`` naming the first thing that
        would make episodes differ from the template's rendering of their messages: assistant text trimmed or
        rewritten, earlier reasoning dropped, a tool call or tool result the template does not write, a turn
        rendered differently once more messages follow."""
        head = [{"role": "system", "content": system_message}] if system_message else []
        messages, tools = self.prepare(head + [{"role": "user", "content": "rlcli probe question"}], tool_schemas,
                                       parser)
        text = self.render(messages, tools, add_generation_prompt=True)
        for content, what in (("  rlcli probe answer with spaces \n\n", "leading and trailing whitespace"),
                              ("<think>\nrlcli probe reasoning\n</think>\n\nrlcli probe answer", "reasoning")):
            turn = text + content + self.eot_text
            later = self.render(messages + [{"role": "assistant", "content": content},
                                            {"role": "user", "content": "rlcli probe follow-up"}], tools)
            if not later.startswith(turn):
                raise ChatTemplateError(f"the chat template rewrites assistant text ({what}): " + difference(
                    turn, later, "what the model wrote", "the template's rendering once another message follows"))
        if not tool_schemas:
            return
        name = tool_schemas[0]["function"]["name"]
        call = ToolCall(name, {"rlcli_probe_argument": "rlcli probe value"})
        message = tool_call_entry(call, "call_0")
        canonical = self.render(messages + [{"role": "assistant", "content": "", "tool_calls": [message]}], tools)
        if not canonical.startswith(text):
            raise ChatTemplateError("an assistant message with tool_calls does not start with the generation prompt: "
                                    + difference(text, canonical, "the generation prompt", "the message"))
        written = canonical[len(text):canonical.rfind(self.eot_text)] if self.renders_tool_calls else (
            call_writer(parser)([(name, call.arguments)]))
        assistant = self.assistant_message(written, [call], "call", parser_ok=True, messages=messages, tools=tools,
                                           head=text, parser=parser)
        conversation, _ = self.prepare(messages + [assistant], None, parser)
        so_far = text + written + self.eot_text
        result = {"role": "tool", "tool_call_id": "call_0", "name": name, "content": "rlcli probe result"}
        if "tool_calls" not in assistant and self.renders_tool_calls:
            raise ChatTemplateError("the chat template renders an assistant message with tool_calls differently from "
                                    "itself (no layout of content and tool_calls renders back to the same text)")
        after = self.render(conversation + [result], tools, add_generation_prompt=True)
        if not after.startswith(so_far):
            raise ChatTemplateError("the chat template renders a tool-calling turn differently once the tool result "
                                    "follows: " + difference(so_far, after, "the turn", "the conversation"))
        if "rlcli probe result" not in after[len(so_far):]:
            raise ChatTemplateError("the chat template does not write tool messages (role 'tool'): the tool result "
                                    "is missing from its rendering")
        final = after + "rlcli probe answer" + self.eot_text
        rendered = self.render(conversation + [result, {"role": "assistant", "content": "rlcli probe answer"}], tools)
        if not rendered.startswith(final):
            raise ChatTemplateError("the chat template renders earlier turns differently once the answer follows: "
                                    + difference(final, rendered, "the episode", "the conversation"))

    # assistant turns -----------------------------------------------------------------------------------------

    def assistant_message(self, text: str, calls: Sequence[ToolCall], turn_id: str, *, parser_ok: bool,
                          messages: Sequence[Mapping], tools: Sequence[Mapping] | None, head: str,
                          parser: ToolCallParser | None = None) -> dict:
        """The assistant message for a turn whose text (end-of-turn token excluded) is ``text``, following
        ``messages`` (prepared) whose rendering with the generation prompt is ``head``.

        With tool calls, the OpenAI layout (``content`` before the calls + ``tool_calls``) when preparing and
        rendering it gives back exactly ``text``: the template writes the calls, or, for a template that ignores
        ``tool_calls``, ``prepare`` writes them into the content (Hermes format only: the one SFT writes for data
        that names no parser). Otherwise ``content`` is the whole text and there are no ``tool_calls``, so the
        conversation renders what the model wrote, whatever reads it later."""
        entries = [tool_call_entry(c, f"{turn_id}_{j}") for j, c in enumerate(calls)] if parser_ok else []
        raw = {"role": "assistant", "content": text}
        writes_hermes = call_writer(parser) is hermes_calls.write
        if not entries or (not self.renders_tool_calls and not writes_hermes):
            return raw
        start = calls[0].start if calls[0].start is not None else 0
        for content in dict.fromkeys((text[:start].rstrip(), text[:start], "")):
            message = {"role": "assistant", "content": content, "tool_calls": entries}
            prepared, _ = self.prepare(list(messages) + [message], None, parser)
            if self.render(prepared, tools).startswith(head + text + self.eot_text):
                return message
        return raw


_TEMPLATES: dict[tuple[int, str | None], ChatTemplate] = {}


def difference(expected: str, got: str, expected_name: str, got_name: str) -> str:
    """Where two texts part, with some context: one line for an error message."""
    at = next((i for i, (a, b) in enumerate(zip(expected, got)) if a != b), min(len(expected), len(got)))
    lo = max(0, at - 40)
    return (f"at character {at}, {expected_name} has {expected[lo:at + 40]!r} but {got_name} has "
            f"{got[lo:at + 40]!r}")


def conversation(prompt: str | Sequence[Mapping], system_message: str | None = None) -> list[dict]:
    """The messages a conversation starts with: a text prompt is one user message; ``system_message`` goes first
    unless the prompt has a system message of its own."""
    if isinstance(prompt, str):
        messages = [{"role": "user", "content": prompt}]
    else:
        messages = [dict(m) for m in prompt]
    if system_message and not (messages and messages[0].get("role") == "system"):
        messages = [{"role": "system", "content": system_message}] + messages
    return messages


def prompt_ids(tokenizer, prompt: str | Sequence[Mapping], *, system_message: str | None = None,
               tools: Sequence[Mapping] | None = None, parser: ToolCallParser | None = None) -> list[int]:
    """Token ids of a prompt rendered with the tokenizer's chat template and the generation prompt: the one way
    ``rlcli ppo`` (``data.chat_template``), the chat protocol and SFT render a conversation's start.

    Without tools the template is only rendered (no probe: any template works, as ``apply_chat_template``)."""
    if tools:
        template = ChatTemplate.of(tokenizer)
        messages, schemas = template.prepare(conversation(prompt, system_message), tools, parser)
        return template.encode(template.render(messages, schemas, add_generation_prompt=True))
    messages = normalise_messages(conversation(prompt, system_message))
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []
