"""Reading tool calls from a model's text (every parser), and tool schemas from functions."""

from __future__ import annotations

import json

import pytest

from rlcli.config.errors import UserError
from rlcli.env.protocols import JsonProtocol
from rlcli.toolcalls import Malformed, ToolCall, hermes_calls, llama3_json_calls, load_parser, tool_schema


def test_hermes_parser_reads_every_call_and_names_what_is_wrong():
    text = ('Let me see.\n<tool_call>\n{"name": "calculator", "arguments": {"expression": "2+2"}}\n</tool_call>\n'
            '<tool_call>{"name": "add", "arguments": "{\\"a\\": 1, \\"b\\": 2}"}</tool_call>')
    calls = hermes_calls(text)
    assert calls == [ToolCall("calculator", {"expression": "2+2"}), ToolCall("add", {"a": 1, "b": 2})]
    assert calls[0].start == text.index("<tool_call>")
    assert hermes_calls("no call here") == []
    assert "not valid JSON" in hermes_calls("<tool_call>{nope}</tool_call>")[0].reason
    assert "unclosed" in hermes_calls('<tool_call>{"name": "x"}')[0].reason
    assert "name" in hermes_calls('<tool_call>{"arguments": {}}</tool_call>')[0].reason


def test_llama3_parser_and_plugins(tmp_path):
    assert llama3_json_calls(' {"name": "add", "parameters": {"a": 1, "b": 2}}') == [ToolCall("add", {"a": 1, "b": 2})]
    assert llama3_json_calls("The answer is 3.") == []
    assert isinstance(llama3_json_calls("{oops"), list) and isinstance(llama3_json_calls("{oops")[0], Malformed)
    plugin = tmp_path / "parse.py"
    plugin.write_text("from rlcli.env import ToolCall\ndef calls(text):\n    return [ToolCall('add', {'a': 1, 'b': 1})]\n")
    assert load_parser(f"{plugin}:calls")("x") == [ToolCall("add", {"a": 1, "b": 1})]
    with pytest.raises(UserError, match="unknown tool-call parser"):
        load_parser("mistral")


def weather(city: str, days: int = 1, metric: bool | None = None) -> str:
    """Look up the weather forecast.

    Longer notes that are not part of the summary.

    Args:
        city: the city name,
            possibly with a country.
        days: how many days ahead.
    """
    return ""


def test_tool_schema_from_signature_and_docstring():
    schema = tool_schema(weather)
    fn = schema["function"]
    assert fn["name"] == "weather" and fn["description"] == "Look up the weather forecast."
    assert fn["parameters"]["required"] == ["city"]
    props = fn["parameters"]["properties"]
    assert props["city"] == {"type": "string", "description": "the city name, possibly with a country."}
    assert props["days"] == {"type": "integer", "description": "how many days ahead."}
    assert props["metric"] == {"type": "boolean"}
    prompt = JsonProtocol().system_prompt({"weather": weather})
    rendered = prompt.split("<tools>\n")[1].split("\n</tools>")[0]
    assert json.loads(rendered) == schema
    assert JsonProtocol().format_response("sunny") == "<tool_response>\nsunny\n</tool_response>\n"
