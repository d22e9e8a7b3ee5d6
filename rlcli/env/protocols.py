"""Tool-call protocols: how a model's text asks for a tool, and how the answer is written back.

Every protocol fits one small ``ToolCallProtocol`` slot:

- ``stop_strings``: the markers that end a generation turn (a complete call, a submission);
- ``parse(model_text)``: read one turn of model text -> ``ToolCall`` | ``Submit`` | ``Malformed`` | ``None``
  (``None``: the turn holds neither a call nor a submission);
- ``format_response(output)``: the forced text appended after a call (tool output or an error text);
- ``system_prompt(tools)``: text that tells the model which tools exist and how to call them.

Two are built in: ``TagProtocol`` (TRL's ``TextEnvironment`` tags) and ``JsonProtocol`` (Hermes/Qwen-style
``<tool_call>`` JSON). The chat protocol (``rlcli.env.chat``), where the model's chat template writes the
conversation, has a different shape and lives there.
"""

from __future__ import annotations

import inspect
import json
import re
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable


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


ParseResult = ToolCall | Submit | Malformed | None


@runtime_checkable
class ToolCallProtocol(Protocol):
    stop_strings: tuple[str, ...]

    def parse(self, model_text: str) -> ParseResult: ...

    def format_response(self, output: str) -> str: ...

    def system_prompt(self, tools: Mapping[str, Callable]) -> str: ...


# ---------------------------------------------------------------------------------------------------------------
# TRL tags


@dataclass(frozen=True)
class TagProtocol:
    """TRL ``TextEnvironment`` tags: the model writes ``<request><ToolName>arguments<call>``; the environment appends
    ``output<response>``; ``<submit>`` ends the episode. The tool gets ``arguments`` as one string."""

    request: str = "<request>"
    call: str = "<call>"
    response: str = "<response>"
    submit: str = "<submit>"

    @property
    def stop_strings(self) -> tuple[str, ...]:
        return (self.call, self.submit)

    def parse(self, model_text: str) -> ParseResult:
        call_at, submit_at = _find(model_text, self.call), _find(model_text, self.submit)
        if submit_at is not None and (call_at is None or submit_at < call_at):
            return Submit(model_text[:submit_at])
        if call_at is None:
            if self.request in model_text:
                return Malformed(f"unclosed tool call: {self.request} without {self.call}")
            return None
        head = model_text[:call_at]
        request_at = head.rfind(self.request)
        if request_at < 0:
            return Malformed(f"{self.call} without a {self.request} before it")
        match = re.fullmatch(r"\s*<([^<>\s]+)>(.*)", head[request_at + len(self.request):], flags=re.DOTALL)
        if match is None:
            return Malformed(f"expected {self.request}<ToolName>arguments{self.call}")
        return ToolCall(match.group(1), match.group(2))

    def format_response(self, output: str) -> str:
        return output + self.response

    def system_prompt(self, tools: Mapping[str, Callable]) -> str:
        lines = [
            f"You can use tools. To call one, write {self.request}<ToolName>input{self.call}; its output follows, "
            f"ended by {self.response}. When you are done, write your answer followed by {self.submit}.",
            "Tools:",
        ]
        lines += [f"- {name}: {_summary(fn)}" for name, fn in tools.items()]
        return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------------------
# JSON in <tool_call> tags


@dataclass(frozen=True)
class JsonProtocol:
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

    def parse(self, model_text: str) -> ParseResult:
        close_at = _find(model_text, self.close_tag)
        submit_at = _find(model_text, self.submit) if self.submit else None
        if submit_at is not None and (close_at is None or submit_at < close_at):
            return Submit(model_text[:submit_at])
        if close_at is None:
            if self.open_tag in model_text:
                return Malformed(f"unclosed tool call: {self.open_tag} without {self.close_tag}")
            return None
        head = model_text[:close_at]
        open_at = head.rfind(self.open_tag)
        if open_at < 0:
            return Malformed(f"{self.close_tag} without a {self.open_tag} before it")
        body = head[open_at + len(self.open_tag):].strip()
        try:
            call = json.loads(body)
        except json.JSONDecodeError as err:
            return Malformed(f"the tool call is not valid JSON ({err.msg} at char {err.pos})")
        if not isinstance(call, dict):
            return Malformed(f'the tool call must be a JSON object {{"name": ..., "arguments": {{...}}}}, '
                             f"got {type(call).__name__}")
        name = call.get("name")
        if not isinstance(name, str) or not name:
            return Malformed('the tool call has no "name" string')
        arguments = call.get("arguments", {})
        if isinstance(arguments, str):  # OpenAI style: arguments as a JSON string
            try:
                arguments = json.loads(arguments) if arguments.strip() else {}
            except json.JSONDecodeError:
                return Malformed('"arguments" is a string that is not a JSON object')
        if not isinstance(arguments, dict):
            return Malformed(f'"arguments" must be a JSON object, got {type(arguments).__name__}')
        return ToolCall(name, arguments)

    def format_response(self, output: str) -> str:
        return f"{self.response_open}\n{output}\n{self.response_close}\n"

    def system_prompt(self, tools: Mapping[str, Callable]) -> str:
        schemas = "\n".join(json.dumps(tool_schema(fn, name)) for name, fn in tools.items())
        end = f" When you are done, write your answer followed by {self.submit}." if self.submit else ""
        return (
            "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
            f"You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n{schemas}\n</tools>"
            "\n\nFor each function call, return a json object with function name and arguments within "
            f"{self.open_tag}{self.close_tag} XML tags:\n{self.open_tag}\n"
            '{"name": <function-name>, "arguments": <args-json-object>}\n'
            f"{self.close_tag}\nThe result comes back within {self.response_open}{self.response_close} tags.{end}\n"
        )


_JSON_TYPES = {str: "string", int: "integer", float: "number", bool: "boolean", list: "array", dict: "object"}


def tool_schema(fn: Callable, name: str | None = None) -> dict[str, Any]:
    """An OpenAI-style function schema from ``fn``'s signature, type hints and docstring.

    The description is the docstring's first paragraph; parameter descriptions come from a Google-style ``Args:``
    section when there is one. Unannotated parameters are typed ``string`` (tools are ``str -> str``).
    """
    target = fn if inspect.isfunction(fn) or inspect.ismethod(fn) else type(fn).__call__
    try:
        hints = typing.get_type_hints(target)
    except Exception:  # unresolvable annotations only cost us the types
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
            "description": _summary(fn),
            "parameters": {"type": "object", "properties": properties, "required": required},
        },
    }


def _json_type(hint) -> str:
    origin = typing.get_origin(hint) or hint
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return _json_type(args[0]) if args else "string"
    return _JSON_TYPES.get(origin, "string")


def _summary(fn: Callable) -> str:
    doc = inspect.getdoc(fn) or ""
    return " ".join(doc.split("\n\n")[0].split()) or "(no description)"


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


def _find(text: str, marker: str | None) -> int | None:
    if not marker:
        return None
    at = text.find(marker)
    return None if at < 0 else at
