"""Tool-call parser plug-ins for tests (``env.tool_call_parser: tests/env/parsers.py:every_turn_calls``)."""

from rlcli.env import ToolCall


def every_turn_calls(text: str) -> list:
    """Reads every assistant turn as a call of the calculator: makes a real model that has never seen a tool call
    produce episodes with tool turns."""
    return [ToolCall("calculator", {"expression": "6*7"})]
