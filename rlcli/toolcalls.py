"""Tool calls in a model's text: what a call is, every way rlcli reads one, and how a tool is described.

Every parser is a function ``text -> [ToolCall | Malformed | Submit, ...]`` (empty: the text calls nothing):

- ``tag_calls``: TRL tags, ``<request><ToolName>arguments<call>`` (arguments: one string), ``<submit>`` ends;
- ``json_calls``: ``<tool_call>{"name": .., "arguments": {..}}</tool_call>`` ending a turn, optionally a submit
  marker (the JSON protocol);
- ``hermes_calls``: every ``<tool_call>{json}</tool_call>`` of a chat turn (Hermes, Qwen);
- ``llama3_json_calls``: a chat turn that is one JSON object ``{"name": .., "parameters": {..}}`` (Llama 3.1);
- ``load_parser(spec)``: one of the two chat parsers by name, or your own ``path/to/file.py:fn`` / ``module:fn``.

The tag and JSON parsers read the first call of a turn (generation stops at its closing marker); the chat parsers
read a whole assistant turn. The JSON-body rules (``json_call``) are the same for all three JSON formats.
"""

from __future__ import annotations

import inspect
import json
import re
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from rlcli.config.errors import UserError
from rlcli.plugins import resolve_object


@dataclass(frozen=True)
class ToolCall:
    """The model asked for tool ``name``; ``arguments`` is a string (tag protocol) or a dict of keyword arguments.
    ``start``: where the call begins in the turn's text, when the parser knows (the chat protocol splits a turn
    into content and calls there)."""

    name: str
    arguments: str | dict[str, Any]
    start: int | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class Submit:
    """The model ended the episode; ``answer`` is its text before the submit marker."""

    answer: str


@dataclass(frozen=True)
class Malformed:
    """The model tried to call a tool but the call cannot be read; ``reason`` goes back to it as an error text."""

    reason: str


Parsed = ToolCall | Malformed | Submit

ToolCallParser = Callable[[str], list]
"""``model text -> [ToolCall | Malformed, ...]`` (empty: the turn calls nothing, so the episode ends). For templates
without tool support a chat parser may carry ``instructions(schemas) -> str`` (the system text that teaches its
format) and ``write([(name, arguments), ...]) -> str`` (how it writes calls into an assistant message's content);
the Hermes ones are used otherwise."""


# ---------------------------------------------------------------------------------------------------------------
# one call closed by a marker: the tag and JSON protocols


def tag_calls(text: str, request: str = "<request>", call: str = "<call>", submit: str | None = "<submit>"
              ) -> list[Parsed]:
    """TRL ``TextEnvironment`` tags: ``<request><ToolName>arguments<call>``; text before ``<submit>`` is the
    answer."""

    def read(body: str, start: int) -> ToolCall | Malformed:
        match = re.fullmatch(r"\s*<([^<>\s]+)>(.*)", body, flags=re.DOTALL)
        if match is None:
            return Malformed(f"expected {request}<ToolName>arguments{call}")
        return ToolCall(match.group(1), match.group(2), start=start)

    return _closed_call(text, request, call, submit, read)


def json_calls(text: str, open_tag: str = "<tool_call>", close_tag: str = "</tool_call>",
               submit: str | None = None) -> list[Parsed]:
    """``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``; with ``submit``, text before it is the
    answer."""

    def read(body: str, start: int) -> ToolCall | Malformed:
        return json_call(body, start=start,
                         expected='the tool call must be a JSON object {"name": ..., "arguments": {...}}')

    return _closed_call(text, open_tag, close_tag, submit, read)


def _closed_call(text: str, open_tag: str, close_tag: str, submit: str | None,
                 read: Callable[[str, int], ToolCall | Malformed]) -> list[Parsed]:
    """The submission or the call closed first in ``text``: ``read(body, start)`` reads the call between the
    last ``open_tag`` before the first ``close_tag`` and that ``close_tag``."""
    close_at, submit_at = _find(text, close_tag), _find(text, submit)
    if submit_at is not None and (close_at is None or submit_at < close_at):
        return [Submit(text[:submit_at])]
    if close_at is None:
        if open_tag in text:
            return [Malformed(f"unclosed tool call: {open_tag} without {close_tag}")]
        return []
    head = text[:close_at]
    open_at = head.rfind(open_tag)
    if open_at < 0:
        return [Malformed(f"{close_tag} without a {open_tag} before it")]
    return [read(head[open_at + len(open_tag):], open_at)]


def _find(text: str, marker: str | None) -> int | None:
    if not marker:
        return None
    at = text.find(marker)
    return None if at < 0 else at


def json_call(body: str, *, arguments_key: str = "arguments", start: int | None = None,
              expected: str = "a tool call must be a JSON object") -> ToolCall | Malformed:
    """One call written as JSON: ``{"name": .., "<arguments_key>": {..}}`` (``"arguments"`` is accepted too;
    arguments given as a JSON string, OpenAI style, are read). ``expected`` starts the error when it is no object."""
    try:
        call = json.loads(body.strip())
    except json.JSONDecodeError as err:
        return Malformed(f"the tool call is not valid JSON ({err.msg} at char {err.pos})")
    if not isinstance(call, dict):
        return Malformed(f"{expected}, got {type(call).__name__}")
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


# ---------------------------------------------------------------------------------------------------------------
# every call of a chat turn


_HERMES_CALL = re.compile(r"<tool_call>(.*?)(</tool_call>|$)", re.DOTALL)


def hermes_calls(text: str) -> list[ToolCall | Malformed]:
    """Hermes / Qwen style: every ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` in the turn."""
    calls = []
    for match in _HERMES_CALL.finditer(text):
        if not match.group(2):
            calls.append(Malformed("unclosed tool call: <tool_call> without </tool_call>"))
            break
        calls.append(json_call(match.group(1), start=match.start()))
    return calls


def hermes_tools_text(listed: str, open_tag: str = "<tool_call>", close_tag: str = "</tool_call>") -> str:
    """The Hermes system text up to how results come back: the tool schemas (``listed``, one JSON per line) and
    how to write a call. The JSON protocol's system prompt is this text with its own tags."""
    return ("# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
            f"You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n{listed}\n</tools>"
            "\n\nFor each function call, return a json object with function name and arguments within "
            f"{open_tag}{close_tag} XML tags:\n{open_tag}\n"
            '{"name": <function-name>, "arguments": <args-json-object>}\n'
            f"{close_tag}\n")


def _hermes_instructions(schemas: Sequence[Mapping]) -> str:
    listed = "\n".join(json.dumps(s, ensure_ascii=False) for s in schemas)
    return hermes_tools_text(listed) + "Each result comes back to you in a tool message."


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
    return [json_call(stripped, arguments_key="parameters", start=text.index("{"))]


def _llama3_instructions(schemas: Sequence[Mapping]) -> str:
    listed = "\n\n".join(json.dumps(s, ensure_ascii=False, indent=4) for s in schemas)
    return ("You have access to the following functions. To call a function, respond with only a JSON object of the "
            'form {"name": function name, "parameters": dictionary of argument name and its value}.\n\n' + listed)


llama3_json_calls.instructions = _llama3_instructions
llama3_json_calls.write = lambda calls: "\n".join(json.dumps({"name": n, "parameters": a}, ensure_ascii=False)
                                                 for n, a in calls)

PARSERS: dict[str, ToolCallParser] = {"hermes": hermes_calls, "llama3_json": llama3_json_calls}


def load_parser(spec: str) -> ToolCallParser:
    """A built-in chat parser name (``hermes``, ``llama3_json``) or ``path/to/file.py:fn`` / ``module:fn``."""
    if spec in PARSERS:
        return PARSERS[spec]
    if ":" not in spec:
        raise UserError(f"unknown tool-call parser {spec!r}: use one of {', '.join(PARSERS)} or "
                        "'path/to/file.py:function' / 'package.module:function'")
    parser = resolve_object(spec)
    if not callable(parser):
        raise UserError(f"tool-call parser {spec!r} is not callable (got {type(parser).__name__})")
    return parser


def call_writer(parser: ToolCallParser | None) -> Callable[[Sequence[tuple[str, dict]]], str]:
    """How ``parser``'s format writes calls into a message's content (Hermes unless it says otherwise)."""
    return getattr(parser, "write", None) or _hermes_write


def describe_tools(schemas: Sequence[Mapping], parser: ToolCallParser | None = None) -> str:
    """The system text that describes tools to a model whose template ignores ``tools``: the parser's own
    ``instructions`` when it has them, else the Hermes ones."""
    instructions = getattr(parser, "instructions", None) or _hermes_instructions
    return instructions(list(schemas))


# ---------------------------------------------------------------------------------------------------------------
# tool schemas


_JSON_TYPES = {str: "string", int: "integer", float: "number", bool: "boolean", list: "array", dict: "object"}


def tool_schema(fn: Callable, name: str | None = None) -> dict[str, Any]:
    """An OpenAI-style function schema from ``fn``'s signature, type hints and docstring.

    The description is the docstring's first paragraph; parameter descriptions come from a Google-style ``Args:``
    section when there is one. Unannotated parameters are typed ``string`` (tools are ``str -> str``).
    """
    target = fn if inspect.isfunction(fn) or inspect.ismethod(fn) else type(fn).__call__
    try:
        hints = typing.get_type_hints(target)
    except Exception:  # unresolvable annotations only cost the types
        hints = {}
    doc = inspect.getdoc(fn) or ""
    arg_docs = _parse_args_section(doc)
    properties, required = {}, []
    for pname, param in inspect.signature(fn).parameters.items():
        if param.kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD):
            continue
        prop = {"type": _json_type(hints.get(pname, str))}
        if pname in arg_docs:
            prop["description"] = arg_docs[pname]
        properties[pname] = prop
        if param.default is inspect.Parameter.empty:
            required.append(pname)
    return {
        "type": "function",
        "function": {
            "name": name or getattr(fn, "__name__", type(fn).__name__),
            "description": tool_summary(fn),
            "parameters": {"type": "object", "properties": properties, "required": required},
        },
    }


def schemas_for(tools: Mapping[str, Callable]) -> list[dict]:
    """OpenAI-style function schemas of named tools (from their signatures and docstrings)."""
    return [tool_schema(fn, name) for name, fn in tools.items()]


def tool_summary(fn: Callable) -> str:
    """The first paragraph of ``fn``'s docstring on one line."""
    doc = inspect.getdoc(fn) or ""
    return " ".join(doc.split("\n\n")[0].split()) or "(no description)"


def _json_type(hint) -> str:
    origin = typing.get_origin(hint) or hint
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return _json_type(args[0]) if args else "string"
    return _JSON_TYPES.get(origin, "string")


def _parse_args_section(doc: str) -> dict[str, str]:
    out, in_args, current = {}, False, None
    for line in doc.splitlines():
        stripped = line.strip()
        if stripped in ("Args:", "Arguments:", "Parameters:"):
            in_args = True
            continue
        if not in_args:
            continue
        if not stripped or (not line.startswith((" ", "\t")) and stripped.endswith(":")):
            if out:
                break
            continue
        match = re.match(r"(\w+)\s*(\([^)]*\))?\s*:\s*(.*)", stripped)
        if match and line.startswith((" ", "\t")) and len(line) - len(line.lstrip()) <= 4:
            current = match.group(1)
            out[current] = match.group(3)
        elif current:
            out[current] = (out[current] + " " + stripped).strip()
    return out
