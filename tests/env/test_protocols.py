"""Tool-call protocols: formatting answers and prompts, one slot for all, parsing with rlcli.toolcalls' parsers (whose
own tests are in tests/test_toolcalls.py)."""

from __future__ import annotations


from rlcli.env.protocols import ChatProtocol, JsonProtocol, TagProtocol, ToolCallProtocol
from rlcli.toolcalls import json_calls, tag_calls


def test_tag_protocol_format_and_prompt():
    p = TagProtocol()
    assert isinstance(p, ToolCallProtocol)
    assert p.stop_strings == ("<call>", "<submit>")
    assert p.format_response("3") == "3<response>"
    prompt = p.system_prompt({"Calculator": lambda s: s})
    assert "<request><ToolName>" in prompt and "- Calculator:" in prompt


def test_every_protocol_fits_the_one_slot():
    """TextEnvironment's turn loop asks the same of each protocol (it has no protocol-specific branch)."""
    for protocol in (TagProtocol(), JsonProtocol(), ChatProtocol(template=None, parser=None)):
        assert isinstance(protocol, ToolCallProtocol)
    assert TagProtocol().turn_end_ids() == [] and JsonProtocol().system_prompt({}).startswith("# Tools")


def test_the_protocols_parse_with_the_toolcalls_parsers():
    text = 'a <request><Calculator>1 + 2<call> <tool_call>{"name": "add", "arguments": {"a": 1}}</tool_call> 3<submit>'
    assert TagProtocol().parse(text) == tag_calls(text) != []
    assert JsonProtocol().parse(text) == json_calls(text) != []
