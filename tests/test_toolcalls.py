"""Reading tool calls from a model's text (every parser: tag, JSON, Hermes, Llama-3, plug-ins), and tool schemas from
functions."""

from __future__ import annotations

import json

import pytest

from rlcli.config.errors import UserError
from rlcli.env.protocols import JsonProtocol
from rlcli.toolcalls import (
    Malformed,
    Submit,
    ToolCall,
    hermes_calls,
    json_calls,
    llama3_json_calls,
    load_parser,
    tag_calls,
    tool_schema,
)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("let me compute <request><Calculator>1 + 2<call>", [ToolCall("Calculator", "1 + 2")]),
        ("<request><Search>multi\nline<call>", [ToolCall("Search", "multi\nline")]),
        ("<request><Search><call>", [ToolCall("Search", "")]),
        ("The answer is 3<submit>", [Submit("The answer is 3")]),
        ("plain text, no call", []),
    ],
)
def test_tag_parser_reads_calls_and_submissions(text, expected):
    assert tag_calls(text) == expected


@pytest.mark.parametrize(
    "text, reason",
    [
        ("<request><Calculator>1 + 2", "unclosed"),
        ("<request>1 + 2<call>", "<ToolName>"),
        ("1 + 2<call>", "without a <request>"),
    ],
)
def test_tag_parser_names_what_is_malformed(text, reason):
    [result] = tag_calls(text)
    assert isinstance(result, Malformed) and reason in result.reason


@pytest.mark.parametrize(
    "text, expected",
    [
        ('<tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}</tool_call>', [ToolCall("add", {"a": 1, "b": 2})]),
        ('thinking...\n<tool_call>\n{"name": "now"}\n</tool_call>', [ToolCall("now", {})]),
        ('<tool_call>{"name": "add", "arguments": "{\\"a\\": 1}"}</tool_call>', [ToolCall("add", {"a": 1})]),
        ("The answer is 3.", []),
    ],
)
def test_json_parser_reads_calls(text, expected):
    assert json_calls(text) == expected


@pytest.mark.parametrize(
    "text, reason",
    [
        ('<tool_call>{"name": "add", "arguments": {"a": 1</tool_call>', "not valid JSON"),
        ('<tool_call>{"arguments": {}}</tool_call>', 'no "name"'),
        ("<tool_call>[1, 2]</tool_call>", "JSON object"),
        ('<tool_call>{"name": "add", "arguments": [1]}</tool_call>', '"arguments" must be'),
        ('<tool_call>{"name": "add"', "unclosed"),
    ],
)
def test_json_parser_names_what_is_malformed(text, reason):
    [result] = json_calls(text)
    assert isinstance(result, Malformed) and reason in result.reason


def test_json_parser_submit_marker():
    assert json_calls("42<done>", submit="<done>") == [Submit("42")]
    assert JsonProtocol(submit="<done>").stop_strings == ("</tool_call>", "<done>")


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
