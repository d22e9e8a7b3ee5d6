"""TextHistory: views over segments, exact JSON round trip, rich rendering."""

from __future__ import annotations

import json

from rich.console import Console
from rich.style import Style

from rlcli.env.history import STYLES, Span, TextHistory, ToolCallRecord


def make_history(tok) -> TextHistory:
    h = TextHistory(meta={"answer": "4", "id": 7})
    for source, text in [("prompt", "Q: 2+2?\n"), ("model", "<request><Calc>2+2<call>"), ("tool", "4<response>"),
                         ("model", " it is 4 ü<submit>")]:
        h.append(source, text, tok(text, add_special_tokens=False)["input_ids"])
    h.tool_calls.append(ToolCallRecord("Calc", "2+2", "4", "ok"))
    h.tool_calls.append(ToolCallRecord("search", {"query": "x", "k": [1, 2.5]}, "Error: ...", "error"))
    h.reward, h.finish_reason, h.num_turns = 0.1 + 0.2, "submit", 2
    return h


def test_views(tok):
    h = make_history(tok)
    lengths = [len(s.token_ids) for s in h.segments]
    assert h.token_ids == [t for s in h.segments for t in s.token_ids]
    assert h.text == "".join(s.text for s in h.segments)
    assert h.token_mask == [0] * lengths[0] + [1] * lengths[1] + [0] * lengths[2] + [1] * lengths[3]
    assert h.tool_mask == [0] * (lengths[0] + lengths[1]) + [1] * lengths[2] + [0] * lengths[3]
    assert h.token_spans[2] == Span("tool", lengths[0] + lengths[1], sum(lengths[:3]))
    start, end = h.text_spans[1][1:]
    assert h.text[start:end] == "<request><Calc>2+2<call>"
    assert h.prompt_ids == h.segments[0].token_ids and h.prompt_ids + h.response_ids == h.token_ids
    assert h.model_text == "<request><Calc>2+2<call> it is 4 ü<submit>"


def test_json_round_trip_is_exact(tok):
    h = make_history(tok)
    restored = TextHistory.from_dict(json.loads(json.dumps(h.to_dict())))
    assert restored == h
    assert restored.reward == 0.1 + 0.2 and restored.tool_calls[1].arguments == {"query": "x", "k": [1, 2.5]}
    assert TextHistory.from_dict(TextHistory().to_dict()) == TextHistory()


def _background_hex(style: str) -> str:
    return Style.parse(style).bgcolor.get_truecolor().hex


def test_rendering_colours_each_source_and_shows_a_legend(tok):
    h = make_history(tok)
    for show in (lambda c: h.show_text(c), lambda c: h.show_tokens(tok, c)):
        console = Console(record=True, width=100, color_system="truecolor", force_terminal=True)
        show(console)
        html = console.export_html(inline_styles=True, clear=False)
        plain = console.export_text()
        assert "legend:" in plain and all(name in plain for name in ("prompt", "model", "tool"))
        colours = {source: _background_hex(STYLES[source][0]) for source in ("prompt", "model", "tool")}
        assert len(set(colours.values())) == 3
        for colour in colours.values():
            assert colour in html
        assert "finish=submit" in plain and "Calc:ok" in plain
    # show_text prints the text itself
    console = Console(record=True, width=200)
    h.show_text(console)
    assert "<request><Calc>2+2<call>4<response>" in console.export_text()


def test_escape_sequences_in_prompt_and_model_text_never_reach_the_terminal(tok):
    """A prompt or a model that writes ESC [2J (clear screen), an OSC title, a carriage return or a bell: shown as
    text, not sent to the terminal."""
    import io

    h = TextHistory()
    for source, text in [("prompt", "Q\x1b]0;owned\x07?\n"), ("model", "ok\x1b[2J\rgone\x9b31m"), ("tool", "\x1b[8m")]:
        h.append(source, text, tok(text, add_special_tokens=False)["input_ids"])
    h.tool_calls.append(ToolCallRecord("Ca\x1b[1mlc", "", "", "ok"))
    for show in (lambda c: h.show_text(c), lambda c: h.show_tokens(tok, c)):
        raw = io.StringIO()
        show(Console(file=raw, width=200, force_terminal=True, color_system="truecolor"))
        written = raw.getvalue()
        # rich's own styling is ESC [ ... m; nothing else of the texts' controls may come through
        leftover = __import__("re").sub(r"\x1b\[[0-9;]*m", "", written)
        assert not any(c in leftover for c in "\x1b\x07\r\x9b"), repr(leftover)
        assert "\\x1b[2J" in leftover and "\\x0d" in leftover
