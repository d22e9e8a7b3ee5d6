"""Built-in tools: calculator (safe AST arithmetic), python (subprocess; its sandbox: test_sandbox.py), search (BM25).

The python tests here run in the sandbox where bubblewrap works, unsandboxed (opted in) elsewhere."""

from __future__ import annotations

import os
import tempfile
import time

import pytest

from rlcli.env.builtin_tools import BUILTIN_TOOLS, calculator, make_python_tool, make_search_tool
from rlcli.env.tools import ToolOutcome, ToolRunner


@pytest.mark.parametrize(
    "expression, expected",
    [
        ("1 + 2 * 3", "7"),
        ("(1 + 2) * 3", "9"),
        ("-2 ** 2", "-4"),
        ("7 / 2", "3.5"),
        ("6 / 3", "2"),
        ("7 // 2", "3"),
        ("-7 % 3", "2"),
        ("2 ** 10", "1024"),
        ("2 ** -1", "0.5"),
        ("0.1 + 0.2", "0.3"),
        ("1.5e3 - +1", "1499"),
        ("10 ** 100", "1" + "0" * 100),
    ],
)
def test_calculator_computes(expression, expected):
    assert calculator(expression) == expected


@pytest.mark.parametrize(
    "expression, message",
    [
        ("x + 1", "unsupported syntax: Name"),
        ("__import__('os')", "unsupported syntax: Call"),
        ("(1).real", "unsupported syntax: Attribute"),
        ("'a' * 3", "only numbers"),
        ("True + 1", "only numbers"),
        ("[1, 2]", "unsupported syntax: List"),
        ("1 if 1 else 2", "unsupported syntax: IfExp"),
        ("lambda: 1", "unsupported syntax: Lambda"),
        ("1 << 2", "unsupported syntax: BinOp"),
        ("9 ** 9 ** 9", "too large"),
        ("(10 ** 1000) * (10 ** 1000)", "too large"),
        ("2.0 ** 100000", "exponent too large"),
        ("1e308 * 10", "not a finite number"),
        ("1 +", "not an arithmetic expression"),
        ("1" * 600, "longer than"),
    ],
)
def test_calculator_refuses(expression, message):
    start = time.monotonic()
    with pytest.raises(ValueError, match=message):
        calculator(expression)
    assert time.monotonic() - start < 0.5


def test_calculator_division_by_zero_raises():
    with pytest.raises(ZeroDivisionError):
        calculator("1 / 0")


def test_python_tool_runs_code_in_a_fresh_temp_dir():
    python = make_python_tool(timeout_s=5.0, allow_unsandboxed=True)
    assert python("print(6 * 7)") == "42\n"
    out = python("import os, sys\nprint(os.getcwd())\nprint(sorted(os.listdir('.')))\nprint(sys.flags.isolated)")
    cwd, listing, isolated = out.splitlines()
    assert cwd.startswith(tempfile.gettempdir()) and "rlcli_python_" in cwd
    assert listing == "['.output', 'main.py']" and isolated == "1"
    assert not os.path.exists(cwd)  # removed afterwards
    err = python("x = 1\nraise ValueError('from user code')")
    assert err == ('Traceback (most recent call last):\n  File "main.py", line 2, in <module>\n'
                   "    raise ValueError('from user code')\nValueError: from user code\n")
    assert python("x = 1") == "(no output)"


def test_python_tool_limits():
    python = make_python_tool(timeout_s=1.0, memory_mb=256, max_output_chars=100, allow_unsandboxed=True)
    start = time.monotonic()
    with pytest.raises(TimeoutError, match="did not finish within 1 s"):
        python("while True: pass")
    assert time.monotonic() - start < 3.0
    assert python("x = bytearray(1024 * 1024 * 1024)").endswith("MemoryError\n")
    out = python("print('a' * 10000 + 'end')")
    assert out.startswith("a" * 50) and "[... output truncated ...]" in out and out.endswith("aend\n")
    assert len(out) < 150


def test_python_tool_interrupted_inline_leaves_nothing_running():
    # the inline time limit (SIGALRM) lands in the tool's own wait loop: the code's process must still be killed
    runner = ToolRunner({"py": make_python_tool(timeout_s=30.0, allow_unsandboxed=True)}, timeout_s=1.0,
                        isolation="inline")
    start = time.monotonic()
    assert runner.run("py", "while True: pass").status == ToolOutcome.TIMEOUT
    assert time.monotonic() - start < 3.0
    for _ in range(100):  # the launcher's source is on the interpreter's command line
        if not _running_with(b"RLIMIT_AS"):
            return
        time.sleep(0.02)
    pytest.fail(f"the code's interpreter outlived the call: {_running_with(b'RLIMIT_AS')}")


def _running_with(marker: bytes) -> list[str]:
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                found = marker in f.read()
            with open(f"/proc/{pid}/stat") as f:
                if found and f.read().rsplit(")", 1)[1].split()[0] != "Z":
                    pids.append(pid)
        except OSError:
            continue
    return pids


def test_search_finds_the_best_passage(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(
        "The Eiffel Tower is in Paris.\nIt was finished in 1889.\n\n"
        "Mount Everest is the highest mountain on Earth.\n\n"
        "The Great Wall of China is very long.\n\n\n"
        "Paris is the capital of France and its largest city.\n"
    )
    search = make_search_tool(corpus)
    assert search("when was the eiffel tower finished") == "The Eiffel Tower is in Paris.\nIt was finished in 1889."
    assert search("highest mountain") == "Mount Everest is the highest mountain on Earth."
    assert search("capital of France") == "Paris is the capital of France and its largest city."
    assert search("zebra quantum") == "No results found."
    with pytest.raises(ValueError, match="is not a file"):
        make_search_tool(tmp_path / "missing.txt")
    assert set(BUILTIN_TOOLS) == {"calculator", "python", "search"}
