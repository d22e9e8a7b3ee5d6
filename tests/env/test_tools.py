"""ToolRunner outcomes and isolation; load_tool resolution."""

from __future__ import annotations

import os
import time

import pytest

from rlcli.env.builtin_tools import calculator
from rlcli.env.protocols import Malformed, ToolCall
from rlcli.env.tools import ToolOutcome, ToolRunner, error_text, load_tool


def raises(text: str) -> str:
    raise KeyError("missing key " + "x" * 500)


def hangs(text: str) -> str:
    time.sleep(60)
    return "never"


def spawns_and_hangs(text: str) -> str:
    import subprocess

    proc = subprocess.Popen(["sleep", "60"])
    with open(text, "w") as f:
        f.write(str(proc.pid))
    time.sleep(60)
    return "never"


def returns_dict(text: str) -> dict:
    return {"a": [1, 2]}


def returns_none(text: str) -> None:
    return None


def exits(text: str) -> str:
    os._exit(3)


def add(a: int, b: int) -> str:
    return str(a + b)


def test_outcomes(tok):
    runner = ToolRunner(
        {"calc": calculator, "raises": raises, "dict": returns_dict, "none": returns_none, "add": add,
         "big": lambda s: "z" * 500, "exits": exits},
        timeout_s=5.0, tokenizer=tok, max_output_tokens=20,
    )
    results = runner.run_many([
        ToolCall("calc", "2 * (3 + 4)"), ToolCall("raises", ""), ToolCall("dict", ""), ToolCall("none", ""),
        ToolCall("add", {"a": 2, "b": 3}), ToolCall("add", {"c": 1}), ToolCall("nope", ""), Malformed("bad JSON"),
        ToolCall("big", ""), ToolCall("exits", ""),
    ])
    out = [(r.status, r.output) for r in results]
    assert out[0] == (ToolOutcome.OK, "14")
    assert out[1][0] == ToolOutcome.ERROR and out[1][1].startswith("Error: KeyError: 'missing key xxx")
    assert len(out[1][1]) < 250  # error texts stay short
    assert out[2] == (ToolOutcome.BAD_OUTPUT, '{"a": [1, 2]}\n[note: the tool returned dict, expected str; converted]')
    assert out[3] == (ToolOutcome.BAD_OUTPUT, "[note: the tool returned None, expected str]")
    assert out[4] == (ToolOutcome.OK, "5")
    assert out[5][0] == ToolOutcome.ERROR and out[5][1].startswith("Error: TypeError:")
    assert out[6] == (ToolOutcome.UNKNOWN_TOOL,
                      "Error: unknown tool 'nope'; available tools: add, big, calc, dict, exits, none, raises")
    assert out[7] == (ToolOutcome.MALFORMED_CALL, "Error: malformed tool call: bad JSON")
    assert out[8] == (ToolOutcome.TRUNCATED, "z" * 20 + "\n[truncated: 480 tokens cut]")
    assert out[9][0] == ToolOutcome.ERROR and "exit code 3" in out[9][1]
    assert runner.counts == {"ok": 2, "error": 3, "bad_output": 2, "unknown_tool": 1, "malformed_call": 1,
                             "truncated": 1}


def test_hanging_tool_and_its_children_are_killed(tmp_path):
    runner = ToolRunner({"hangs": hangs, "spawns": spawns_and_hangs, "calc": calculator}, timeout_s=0.5)
    pid_file = tmp_path / "pid"
    start = time.monotonic()
    results = runner.run_many([ToolCall("hangs", ""), ToolCall("spawns", str(pid_file)), ToolCall("calc", "1+1")])
    assert time.monotonic() - start < 3.0  # the calls ran concurrently and were cut at the limit
    assert [r.status for r in results] == [ToolOutcome.TIMEOUT, ToolOutcome.TIMEOUT, ToolOutcome.OK]
    assert results[0].output == "Error: TimeoutError: the tool did not finish within 0.5 s"
    grandchild = int(pid_file.read_text())
    for _ in range(100):  # the tool's own subprocess died with it (process group kill)
        if not _running(grandchild):
            break
        time.sleep(0.02)
    else:
        pytest.fail("the tool's subprocess outlived the timeout")


def _running(pid: int) -> bool:
    """Alive and not a zombie (in a container nobody may reap the orphan, but a zombie runs nothing)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_inline_isolation_runs_in_process():
    calls = []

    def stateful(text: str) -> str:
        calls.append(text)
        return str(len(calls))

    runner = ToolRunner({"s": stateful}, isolation="inline")
    assert [runner.run("s", "a").output, runner.run("s", "b").output] == ["1", "2"]
    forked = ToolRunner({"s": stateful})
    assert forked.run("s", "c").output == "3" and calls == ["a", "b"]  # the fork's change did not come back


def test_error_text_is_short():
    assert error_text(ValueError("bad\nsecond line")) == "Error: ValueError: bad"
    assert error_text(RuntimeError()) == "Error: RuntimeError"


def test_load_tool(tmp_path, monkeypatch):
    assert load_tool("calculator")("1+1") == "2"
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("Paris is the capital of France.\n\nBerlin is the capital of Germany.\n")
    assert load_tool("search", corpus_path=str(corpus))("capital of germany") == "Berlin is the capital of Germany."

    plugin = tmp_path / "my_tools.py"
    plugin.write_text("def shout(text):\n    return text.upper()\n\n"
                      "def make(suffix):\n    return lambda text: text + suffix\n")
    assert load_tool(f"{plugin}:shout")("hi") == "HI"
    assert load_tool(f"{plugin}:make", suffix="!")("hi") == "hi!"
    monkeypatch.syspath_prepend(str(tmp_path))
    assert load_tool("my_tools:shout")("a") == "A"
    assert load_tool("rlcli.env.builtin_tools:calculator")("2**3") == "8"

    for spec, message in [
        ("nonsense", "not a built-in tool"),
        (f"{tmp_path}/missing.py:f", "does not exist"),
        (f"{plugin}:nope", "has no attribute 'nope'"),
        ("no_such_module_xyz:f", "cannot import module"),
        ("search", "bad options"),
    ]:
        with pytest.raises(ValueError, match=message) as err:
            load_tool(spec)
        assert spec in str(err.value)
    broken = tmp_path / "broken.py"
    broken.write_text("raise RuntimeError('boom at import')\n")
    with pytest.raises(ValueError, match="importing .* failed: Error: RuntimeError: boom at import"):
        load_tool(f"{broken}:f")
