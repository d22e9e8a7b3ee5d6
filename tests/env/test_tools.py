"""ToolRunner outcomes and isolation (time, memory, prints, process trees; inline limits); load_tool resolution."""

from __future__ import annotations

import mmap
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rlcli.env.builtin_tools import calculator
from rlcli.env.tools import ToolOutcome, ToolRunner, error_text, load_tool
from rlcli.toolcalls import Malformed, ToolCall


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
    _assert_all_die([int(pid_file.read_text())])  # the tool's own subprocess died with it


def _running(pid: int) -> bool:
    """Alive and not a zombie (in a container nobody may reap the orphan, but a zombie runs nothing)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def allocates(megabytes: str) -> str:
    # a fresh mapping, as any large allocation is once the trainer's heap has no free block big enough; a bytearray
    # may first reuse memory the trainer freed (already its address space, so not counted: the cap is on what a call
    # adds), which after a long test session can be a few hundred MB
    block = mmap.mmap(-1, int(megabytes) * 2**20)
    return str(len(block) // 2**20)


OUT_OF_MEMORY = "Error: OSError: [Errno 12] Cannot allocate memory"


def test_forked_calls_have_a_memory_cap():
    # without a cap a 4 GB bytearray "works": the kernel hands out its zero pages lazily
    runner = ToolRunner({"alloc": allocates})
    assert runner.memory_mb == 1024
    result = runner.run("alloc", "4096")
    assert (result.status, result.output) == (ToolOutcome.ERROR, OUT_OF_MEMORY)
    small = ToolRunner({"alloc": allocates}, memory_mb=64)
    assert small.run("alloc", "16").output == "16"
    assert small.run("alloc", "128").output == OUT_OF_MEMORY
    with pytest.raises(ValueError, match="memory_mb must be positive"):
        ToolRunner({"alloc": allocates}, memory_mb=0)


def prints(text: str) -> str:
    print("from print")
    print("from stderr", file=sys.stderr)
    os.write(1, b"from fd 1\n")
    subprocess.run(["echo", "from a subprocess"], check=True)
    return "done"


def prints_a_lot(text: str) -> str:
    for _ in range(2000):
        print("x" * 999)  # 2 MB: far more than a pipe holds
    return "done"


def prints_then_dies(text: str) -> str:
    print("about to die", flush=True)
    os._exit(5)


def test_forked_prints_are_captured_not_shown(capfd):
    runner = ToolRunner({"prints": prints, "lot": prints_a_lot, "dies": prints_then_dies}, timeout_s=10.0)
    start = time.monotonic()
    quiet, loud, dies = runner.run_many([ToolCall("prints", ""), ToolCall("lot", ""), ToolCall("dies", "")])
    assert time.monotonic() - start < 5.0
    assert capfd.readouterr() == ("", "")  # nothing reached the terminal
    assert (quiet.status, quiet.output) == (ToolOutcome.OK, "done")
    expected = "from print\nfrom stderr\nfrom fd 1\nfrom a subprocess\n"
    assert quiet.printed_bytes == len(expected) and sorted(quiet.printed.splitlines()) == sorted(expected.splitlines())
    assert (loud.status, loud.output, loud.printed_bytes) == (ToolOutcome.OK, "done", 2000 * 1000)
    assert len(loud.printed) == 500 and loud.printed.endswith("x\n")
    assert dies.status == ToolOutcome.ERROR
    assert dies.output == "Error: the tool process died (exit code 5); its last printed line: about to die"
    assert runner.printed_bytes == quiet.printed_bytes + loud.printed_bytes + len("about to die\n")


def _start_daemon(pid_file: str) -> None:
    """The classic double fork: the daemon calls setsid (own session and group) and its parent exits, so the
    daemon is an orphan outside the tool's process group. Waits until the daemon has written its pid."""
    if os.fork() == 0:
        os.setsid()
        if os.fork() == 0:
            with open(pid_file + ".tmp", "w") as f:
                f.write(str(os.getpid()))
            os.rename(pid_file + ".tmp", pid_file)
            time.sleep(60)
        os._exit(0)
    while not os.path.exists(pid_file):
        time.sleep(0.01)


def daemon_then_return(pid_file: str) -> str:
    _start_daemon(pid_file)
    return "started"


def daemon_then_hang(pid_file: str) -> str:
    _start_daemon(pid_file)
    time.sleep(60)
    return "never"


def daemon_then_exit(pid_file: str) -> str:
    _start_daemon(pid_file)
    os._exit(4)


def test_forked_call_kills_descendants_that_left_its_session(tmp_path):
    runner = ToolRunner({"returns": daemon_then_return, "hangs": daemon_then_hang, "exits": daemon_then_exit},
                        timeout_s=2.0)
    files = [str(tmp_path / name) for name in ("a", "b", "c")]
    results = runner.run_many([ToolCall("returns", files[0]), ToolCall("hangs", files[1]), ToolCall("exits", files[2])])
    assert [r.status for r in results] == [ToolOutcome.OK, ToolOutcome.TIMEOUT, ToolOutcome.ERROR]
    assert "exit code 4" in results[2].output
    _assert_all_die([int(Path(f).read_text()) for f in files])


def _assert_all_die(pids: list[int]) -> None:
    for _ in range(100):
        if not any(_running(pid) for pid in pids):
            return
        time.sleep(0.02)
    pytest.fail(f"processes outlived the tool call: {[pid for pid in pids if _running(pid)]}")


def test_inline_isolation_runs_in_process():
    calls = []

    def stateful(text: str) -> str:
        calls.append(text)
        return str(len(calls))

    runner = ToolRunner({"s": stateful}, isolation="inline")
    assert [runner.run("s", "a").output, runner.run("s", "b").output] == ["1", "2"]
    forked = ToolRunner({"s": stateful})
    assert forked.run("s", "c").output == "3" and calls == ["a", "b"]  # the fork's change did not come back


class RecordingTokenizer:
    """Wraps a tokenizer; remembers the longest text it was asked to encode."""

    def __init__(self, inner):
        self.inner, self.longest = inner, 0

    def __call__(self, text, **kwargs):
        self.longest = max(self.longest, len(text))
        return self.inner(text, **kwargs)

    def decode(self, ids, **kwargs):
        return self.inner.decode(ids, **kwargs)


def test_inline_output_is_cut_before_it_is_tokenised(tok):
    recording = RecordingTokenizer(tok)
    runner = ToolRunner({"huge": lambda s: "y" * 20_000_000}, tokenizer=recording, max_output_tokens=16,
                        isolation="inline")
    start = time.monotonic()
    result = runner.run("huge", "")
    assert time.monotonic() - start < 2.0
    assert recording.longest <= runner.max_output_chars == 4096
    marker = f"[truncated: {4096 - 16} tokens and {20_000_000 - 4096} more characters cut]"
    assert (result.status, result.output) == (ToolOutcome.TRUNCATED, "y" * 16 + "\n" + marker)


def loops(text: str) -> str:
    while True:
        pass


def sleeps(text: str) -> str:
    time.sleep(60)
    return "never"


def swallows(text: str) -> str:
    while True:
        try:
            time.sleep(60)
        except Exception:  # noqa: BLE001 - what a careless tool does
            pass


def test_inline_hangs_time_out():
    runner = ToolRunner({"loops": loops, "sleeps": sleeps, "swallows": swallows, "calc": calculator},
                        timeout_s=0.3, isolation="inline")
    for name in ("loops", "sleeps", "swallows"):
        start = time.monotonic()
        result = runner.run(name, "")
        assert time.monotonic() - start < 1.5, name
        assert (result.status, result.output) == (
            ToolOutcome.TIMEOUT, "Error: TimeoutError: the tool did not finish within 0.3 s"), name
    assert runner.run("calc", "1+1").output == "2"
    assert signal.getsignal(signal.SIGALRM) == signal.SIG_DFL  # the timer is gone again
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)


def test_inline_os_exit_is_answered_not_obeyed():
    # in a forked copy of this test process: if the guard failed, os._exit would end pytest itself
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            runner = ToolRunner({"exits": lambda s: os._exit(7), "calc": calculator}, isolation="inline")
            first, second = runner.run("exits", ""), runner.run("calc", "2*3")
            os.write(write_end, f"{first.status.value}|{first.output}|{second.output}".encode())
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end) as f:
        report = f.read()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert report == ("error|Error: the tool called os._exit(7); it runs inside the trainer (isolation inline), so it "
                      "was stopped instead|6")


def test_env_section_sets_the_memory_cap(tok, model):
    from rlcli.config.env import EnvConfig
    from rlcli.env.build import build_environment
    from rlcli.rl.sampling import SamplingRules

    env = build_environment(EnvConfig(tools={"alloc": f"{__file__}:allocates"}, tool_memory_mb=64), model, tok,
                            rules=SamplingRules(), max_new_tokens=8)
    assert env.runner.memory_mb == 64
    assert env.runner.run("alloc", "128").output == OUT_OF_MEMORY
    assert EnvConfig(tools={"c": "calculator"}).tool_memory_mb == 1024


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
