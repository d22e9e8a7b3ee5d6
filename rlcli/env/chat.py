"""The chat protocol: an episode is a list of chat messages, rendered token for token by the model's own template.

Real chat models (SmolLM2, Qwen, Llama, ...) learned one layout for a conversation, a tool call and a tool result:
their chat template's. This module makes an episode follow it exactly:

- the prompt is ``apply_chat_template(messages, tools=<schemas>, add_generation_prompt=True)``; for templates that
  ignore ``tools``, the tools are described in a system message instead (``ChatTemplate.prepare``);
- a model turn ends at the template's end-of-turn token (``ChatTemplate.eot_id``: what the template writes right
  after an assistant message's content, e.g. ``<|im_end|>``); its tool calls are read by a parser
  (``hermes``: ``<tool_call>{json}</tool_call>``, ``llama3_json``: the whole turn is ``{"name", "parameters"}``,
  or your own ``path.py:fn``);
- the tool results are appended as exactly the text the template renders for ``tool`` messages plus the next
  generation prompt: the template renders the conversation with the new messages, and the text past what the
  episode already holds is the forced text. Nothing is written per model family.

The model's tokens are kept as sampled; everything else is the tokenization of the template's text between them.
``ChatTemplate.spans`` finds those pieces in a rendered conversation, and the same function serves the rollouts
(``expected_ids``: what an episode's ids must be), SFT on ``messages`` rows (loss on the assistant pieces) and PPO
prompts (``prompt_ids``), so all three see one token layout.

A template that cannot reproduce an episode (it trims or rewrites assistant text, drops earlier reasoning, renders
a turn differently once another message follows) is refused when the environment is built (``ChatTemplate.check``
runs a probe conversation) and, should an episode still differ, when that episode ends: a ``ChatTemplateError``
says where the two texts part.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from jinja2.exceptions import TemplateError

from rlcli.config.errors import UserError
from rlcli.env.protocols import Malformed, ToolCall, tool_schema

ToolCallParser = Callable[[str], list]
"""``model text -> [ToolCall | Malformed, ...]`` (empty: the turn calls nothing, so the episode ends). For templates
without tool support a parser may carry ``instructions(schemas) -> str`` (the system text that teaches its format)
and ``write([(name, arguments), ...]) -> str`` (how it writes calls into an assistant message's content); the
Hermes ones are used otherwise."""


class ChatTemplateError(UserError):
    """The chat template cannot render an episode exactly."""


# ---------------------------------------------------------------------------------------------------------------
# tool-call parsers


_HERMES_CALL = re.compile(r"<tool_call>(.*?)(</tool_call>|$)", re.DOTALL)


def hermes_calls(text: str) -> list[ToolCall | Malformed]:
    """Hermes / Qwen style: every ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` in the turn."""
    calls = []
    for match in _HERMES_CALL.finditer(text):
        if not match.group(2):
            calls.append(Malformed("unclosed tool call: <tool_call> without </tool_call>"))
            break
        calls.append(_json_call(match.group(1), "arguments", match.start()))
    return calls


def _hermes_instructions(schemas: Sequence[Mapping]) -> str:
    listed = "\n".join(json.dumps(s, ensure_ascii=False) for s in schemas)
    return ("# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
            f"You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n{listed}\n</tools>"
            "\n\nFor each function call, return a json object with function name and arguments within "
            "<tool_call></tool_call> XML tags:\n<tool_call>\n"
            '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>\n'
            "Each result comes back to you in a tool message.")


def _hermes_write(calls: Sequence[tuple[str, dict]]) -> str:
    return "\n".join(f"<tool_call>\n{json.dumps({'name': n, 'arguments': a}, ensure_ascii=False)}\n</tool_call>"
                     for n, a in calls)


hermes_calls.instructions = _hermes_instructions
hermes_calls.write = _hermes_write


def llama3_json_calls(text: str) -> list[ToolCall | Malformed]:
    """Llama 3.1 style: a turn that is one JSON object ``{"name": ..., "parameters": {...}}`` is a call."""
    stripped = text.strip()
    if not stripped.startswith("{"):
        return []
    return [_json_call(stripped, "parameters", text.index("{"))]


def _llama3_instructions(schemas: Sequence[Mapping]) -> str:
    listed = "\n\n".join(json.dumps(s, ensure_ascii=False, indent=4) for s in schemas)
    return ("You have access to the following functions. To call a function, respond with only a JSON object of the "
            'form {"name": function name, "parameters": dictionary of argument name and its value}.\n\n' + listed)


llama3_json_calls.instructions = _llama3_instructions
llama3_json_calls.write = lambda calls: "\n".join(json.dumps({"name": n, "parameters": a}, ensure_ascii=False)
                                                 for n, a in calls)

PARSERS: dict[str, ToolCallParser] = {"hermes": hermes_calls, "llama3_json": llama3_json_calls}


def _json_call(body: str, arguments_key: str, start: int) -> ToolCall | Malformed:
    try:
        call = json.loads(body.strip())
    except json.JSONDecodeError as err:
        return Malformed(f"the tool call is not valid JSON ({err.msg} at char {err.pos})")
    if not isinstance(call, dict):
        return Malformed(f"a tool call must be a JSON object, got {type(call).__name__}")
    name = call.get("name")
    if not isinstance(name, str) or not name:
        return Malformed('the tool call has no "name" string')
    arguments = call.get(arguments_key, call.get("arguments", {}))
    if isinstance(arguments, str):  # OpenAI style: the arguments as a JSON string
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError:
            return Malformed(f'"{arguments_key}" is a string that is not a JSON object')
    if not isinstance(arguments, dict):
        return Malformed(f'"{arguments_key}" must be a JSON object, got {type(arguments).__name__}')
    return ToolCall(name, arguments, start=start)


def load_parser(spec: str) -> ToolCallParser:
    """A built-in parser name (``hermes``, ``llama3_json``) or ``path/to/file.py:fn`` / ``module:fn``."""
    if spec in PARSERS:
        return PARSERS[spec]
    if ":" not in spec:
        raise UserError(f"unknown tool-call parser {spec!r}: use one of {', '.join(PARSERS)} or "
                        "'path/to/file.py:function' / 'package.module:function'")
    from rlcli.config.plugins import resolve_object

    parser = resolve_object(spec)
    if not callable(parser):
        raise UserError(f"tool-call parser {spec!r} is not callable (got {type(parser).__name__})")
    return parser


def describe_tools(schemas: Sequence[Mapping], parser: ToolCallParser | None = None) -> str:
    """The system text that describes tools to a model whose template ignores ``tools``: the parser's own
    ``instructions`` when it has them, else the Hermes ones."""
    instructions = getattr(parser, "instructions", None) or _hermes_instructions
    return instructions(list(schemas))


def schemas_for(tools: Mapping[str, Callable]) -> list[dict]:
    """OpenAI-style function schemas of named tools (from their signatures and docstrings)."""
    return [tool_schema(fn, name) for name, fn in tools.items()]


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
                + _difference(prompt + self.PROBE_TEXT, turn, "the generation prompt and the content",
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
        write = getattr(parser, "write", None) or _hermes_write
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
                raise ChatTemplateError(f"assistant message {i + 1}: " + _difference(
                    head, alone, "the generation prompt", "the conversation with the assistant message"))
            end = alone.rfind(self.eot_text, len(head))
            if end < 0:
                raise ChatTemplateError(f"assistant message {i + 1}: the template wrote no end-of-turn token "
                                        f"{self.eot_text!r} after it")
            turn = alone[: end + len(self.eot_text)]
            if not full.startswith(turn):
                raise ChatTemplateError(f"assistant message {i + 1}: " + _difference(
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
        the prompt was tokenised whole."""
        turns = spans.assistant
        if assistant_ids is not None:
            turns = turns[len(turns) - len(assistant_ids):]
        ids, mask, at = [], [], 0
        for j, (start, end) in enumerate(turns):
            piece = self.encode(spans.text[at:start])
            turn = list(assistant_ids[j]) if assistant_ids is not None else self.encode(spans.text[start:end])
            ids += piece + turn
            mask += [0] * len(piece) + [1] * len(turn)
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
                raise ChatTemplateError(f"the chat template rewrites assistant text ({what}): " + _difference(
                    turn, later, "what the model wrote", "the template's rendering once another message follows"))
        if not tool_schemas:
            return
        name = tool_schemas[0]["function"]["name"]
        call = ToolCall(name, {"rlcli_probe_argument": "rlcli probe value"})
        message = tool_call_entry(call, "call_0")
        canonical = self.render(messages + [{"role": "assistant", "content": "", "tool_calls": [message]}], tools)
        if not canonical.startswith(text):
            raise ChatTemplateError("an assistant message with tool_calls does not start with the generation prompt: "
                                    + _difference(text, canonical, "the generation prompt", "the message"))
        written = canonical[len(text):canonical.rfind(self.eot_text)] if self.renders_tool_calls else (
            (getattr(parser, "write", None) or _hermes_write)([(name, call.arguments)]))
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
                                    "follows: " + _difference(so_far, after, "the turn", "the conversation"))
        if "rlcli probe result" not in after[len(so_far):]:
            raise ChatTemplateError("the chat template does not write tool messages (role 'tool'): the tool result "
                                    "is missing from its rendering")
        final = after + "rlcli probe answer" + self.eot_text
        rendered = self.render(conversation + [result, {"role": "assistant", "content": "rlcli probe answer"}], tools)
        if not rendered.startswith(final):
            raise ChatTemplateError("the chat template renders earlier turns differently once the answer follows: "
                                    + _difference(final, rendered, "the episode", "the conversation"))

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
        writes_hermes = (getattr(parser, "write", None) or _hermes_write) is _hermes_write
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


def _difference(expected: str, got: str, expected_name: str, got_name: str) -> str:
    """Where two texts part, with some context: one line for an error message."""
    at = next((i for i, (a, b) in enumerate(zip(expected, got)) if a != b), min(len(expected), len(got)))
    lo = max(0, at - 40)
    return (f"at character {at}, {expected_name} has {expected[lo:at + 40]!r} but {got_name} has "
            f"{got[lo:at + 40]!r}")


@dataclass
class ChatProtocol:
    """The environment's view of the chat protocol: the template, the call parser, the tools' schemas (None: the
    model is not told about the tools) and an optional system message."""

    template: ChatTemplate
    parser: ToolCallParser
    tool_schemas: list[dict] | None = None
    system_message: str | None = None
    stop_strings: tuple[str, ...] = ()

    def start(self, prompt: str | Sequence[Mapping]) -> tuple[list[dict], list[dict] | None, str]:
        """Prompt text (a user message) or messages -> (messages, tools, rendered text with the generation
        prompt), as ``apply_chat_template`` gets and writes them."""
        if isinstance(prompt, str):
            messages = [{"role": "user", "content": prompt}]
        else:
            messages = [dict(m) for m in prompt]
        if self.system_message and not (messages and messages[0].get("role") == "system"):
            messages = [{"role": "system", "content": self.system_message}] + messages
        messages, tools = self.template.prepare(messages, self.tool_schemas, self.parser)
        return messages, tools, self.template.render(messages, tools, add_generation_prompt=True)

    def parse(self, text: str) -> list[ToolCall | Malformed]:
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


def prompt_ids(tokenizer, prompt: str | Sequence[Mapping], *, system_message: str | None = None,
               tools: Sequence[Mapping] | None = None, parser: ToolCallParser | None = None) -> list[int]:
    """Token ids of a prompt rendered with the tokenizer's chat template and the generation prompt: the one way
    ``rlcli ppo`` (``data.chat_template``), the chat protocol and SFT render a conversation's start.

    Without tools the template is only rendered (no probe: any template works, as ``apply_chat_template``)."""
    if tools:
        protocol = ChatProtocol(ChatTemplate.of(tokenizer), parser or hermes_calls, clean_schemas(tools),
                                system_message)
        _, _, text = protocol.start(prompt)
        return protocol.template.encode(text)
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else normalise_messages(prompt)
    if system_message and not (messages and messages[0].get("role") == "system"):
        messages = [{"role": "system", "content": system_message}] + messages
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []
