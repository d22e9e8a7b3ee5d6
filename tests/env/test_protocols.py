"""Tool-call protocols: parsing calls, submissions and malformed calls; formatting answers."""

from __future__ import annotations

import pytest

from rlcli.env.protocols import ChatProtocol, JsonProtocol, TagProtocol, ToolCallProtocol
from rlcli.toolcalls import Malformed, Submit, ToolCall


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
def test_tag_protocol_parses(text, expected):
    assert TagProtocol().parse(text) == expected


@pytest.mark.parametrize(
    "text, reason",
    [
        ("<request><Calculator>1 + 2", "unclosed"),
        ("<request>1 + 2<call>", "<ToolName>"),
        ("1 + 2<call>", "without a <request>"),
    ],
)
def test_tag_protocol_malformed(text, reason):
    [result] = TagProtocol().parse(text)
    assert isinstance(result, Malformed) and reason in result.reason


def test_tag_protocol_format_and_prompt():
    p = TagProtocol()
    assert isinstance(p, ToolCallProtocol)
    assert p.stop_strings == ("<call>", "<submit>")
    assert p.format_response("3") == "3<response>"
    prompt = p.system_prompt({"Calculator": lambda s: s})
    assert "<request><ToolName>" in prompt and "- Calculator:" in prompt


@pytest.mark.parametrize(
    "text, expected",
    [
        ('<tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}</tool_call>', [ToolCall("add", {"a": 1, "b": 2})]),
        ('thinking...\n<tool_call>\n{"name": "now"}\n</tool_call>', [ToolCall("now", {})]),
        ('<tool_call>{"name": "add", "arguments": "{\\"a\\": 1}"}</tool_call>', [ToolCall("add", {"a": 1})]),
        ("The answer is 3.", []),
    ],
)
def test_json_protocol_parses(text, expected):
    assert JsonProtocol().parse(text) == expected


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
def test_json_protocol_malformed(text, reason):
    [result] = JsonProtocol().parse(text)
    assert isinstance(result, Malformed) and reason in result.reason


def test_json_protocol_submit_marker():
    p = JsonProtocol(submit="<done>")
    assert p.stop_strings == ("</tool_call>", "<done>")
    assert p.parse("42<done>") == [Submit("42")]


def test_every_protocol_fits_the_one_slot():
    """TextEnvironment's turn loop asks the same of each protocol (it has no protocol-specific branch)."""
    for protocol in (TagProtocol(), JsonProtocol(), ChatProtocol(template=None, parser=None)):
        assert isinstance(protocol, ToolCallProtocol)
    assert TagProtocol().turn_end_ids() == [] and JsonProtocol().system_prompt({}).startswith("# Tools")
