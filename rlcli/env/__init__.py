"""Text environments: a policy generates, calls tools (plain Python functions), reads their output, and goes on.

- ``history``: ``TextHistory`` (prompt / model / tool segments, token masks, rich rendering, JSON round trip);
- ``protocols``: how an episode's prompt, turns and tool answers become text and tokens (``TagProtocol``: TRL tags,
  ``JsonProtocol``: ``<tool_call>`` JSON, ``ChatProtocol``: chat messages rendered token for token by the model's
  own chat template, ``rlcli.chat_template``); the calls themselves are read by ``rlcli.toolcalls``
  (``ToolCall``, ``hermes_calls``, ``llama3_json_calls``, ...);
- ``tools``: ``ToolRunner`` (time limits, outcomes as text, counts) and ``load_tool`` (recipe specs); ``isolation``:
  the processes a call runs in (fork or inline, deadlines, killing what a call started);
- ``builtin_tools``: ``calculator``, ``python``, ``search``; ``sandbox``: the bubblewrap sandbox and limits that the
  ``python`` tool and the ``python_session`` environment run model-written code in;
- ``environment``: ``TextEnvironment`` (the batched multi-turn loop) and ``histories_to_rollout``.
"""

from rlcli.chat_template import ChatTemplate, ChatTemplateError
from rlcli.env.builtin_tools import BUILTIN_TOOLS, calculator, make_python_tool, make_search_tool, python
from rlcli.env.environment import EnvStats, RowState, TextEnvironment, histories_to_rollout
from rlcli.env.history import Segment, Span, TextHistory, ToolCallRecord
from rlcli.env.protocols import ChatProtocol, JsonProtocol, TagProtocol, ToolCallProtocol
from rlcli.env.tools import ToolOutcome, ToolResult, ToolRunner, load_tool
from rlcli.padding import left_pad
from rlcli.toolcalls import Malformed, Submit, ToolCall, hermes_calls, llama3_json_calls, tool_schema

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
