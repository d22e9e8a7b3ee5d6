"""Text environments: a policy generates, calls tools (plain Python functions), reads their output, and goes on.

- ``history``: ``TextHistory`` (prompt / model / tool segments, token masks, rich rendering, JSON round trip);
- ``protocols``: how a tool call is written (``TagProtocol``: TRL tags, ``JsonProtocol``: ``<tool_call>`` JSON);
- ``chat``: the chat protocol (``ChatProtocol``, ``ChatTemplate``): episodes as chat messages rendered token for
  token by the model's own chat template; tool-call parsers (``hermes_calls``, ``llama3_json_calls``);
- ``tools``: ``ToolRunner`` (time limits, outcomes as text, counts) and ``load_tool`` (recipe specs);
- ``builtin_tools``: ``calculator``, ``python``, ``search``;
- ``environment``: ``TextEnvironment`` (the batched multi-turn loop) and ``histories_to_rollout``.
"""

from rlcli.env.builtin_tools import BUILTIN_TOOLS, calculator, make_python_tool, make_search_tool, python
from rlcli.env.chat import ChatProtocol, ChatTemplate, ChatTemplateError, hermes_calls, llama3_json_calls
from rlcli.env.environment import EnvStats, RowState, TextEnvironment, histories_to_rollout
from rlcli.padding import left_pad
from rlcli.env.history import Segment, Span, TextHistory, ToolCallRecord
from rlcli.env.protocols import JsonProtocol, Malformed, Submit, TagProtocol, ToolCall, ToolCallProtocol, tool_schema
from rlcli.env.tools import ToolOutcome, ToolResult, ToolRunner, load_tool

__all__ = [
    "BUILTIN_TOOLS",
    "ChatProtocol",
    "ChatTemplate",
    "ChatTemplateError",
    "EnvStats",
    "JsonProtocol",
    "Malformed",
    "RowState",
    "Segment",
    "Span",
    "Submit",
    "TagProtocol",
    "TextEnvironment",
    "TextHistory",
    "ToolCall",
    "ToolCallProtocol",
    "ToolCallRecord",
    "ToolOutcome",
    "ToolResult",
    "ToolRunner",
    "calculator",
    "hermes_calls",
    "histories_to_rollout",
    "left_pad",
    "llama3_json_calls",
    "load_tool",
    "make_python_tool",
    "make_search_tool",
    "python",
    "tool_schema",
]
