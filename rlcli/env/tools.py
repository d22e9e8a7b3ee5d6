"""Run tools (plain Python callables, ``str -> str``) so that nothing a tool does can crash or hang a run.

``ToolRunner`` calls a tool with a time limit and turns every outcome into text for the model plus a counted
``ToolOutcome``:

==================  =====================================================================================
ok                  the tool returned a string
error               it raised; the text is ``Error: <ExceptionType>: <message>`` (message cut short)
timeout             it ran past ``timeout_s`` and was killed
unknown_tool        the model named a tool that does not exist
bad_output          it returned something other than ``str``: the value is converted (JSON for plain data,
                    ``str()`` otherwise, ``""`` for None) and a ``[note: ...]`` line tells the model so
malformed_call      the protocol could not read the call (bad JSON, no name, unclosed tag)
truncated           it returned a string longer than ``max_output_tokens`` tokens: cut, with a marker line
==================  =====================================================================================

Isolation: by default each call runs in a **forked child process** that is killed (with its whole process group)
when the time limit passes. Why fork and not the alternatives:

- a thread cannot be stopped: a ``while True`` tool would keep burning a core (and the GIL) for the rest of the run;
- a persistent ``spawn`` worker pool needs every tool, and every closure it captured, to be picklable and
  re-importable in a fresh interpreter (no torch import cost, but tools loaded from ``file.py:fn`` and factory
  closures often are not), and a hung worker must be replaced anyway;
- ``fork`` copies the parent copy-on-write in a few milliseconds, inherits the tools as they are (closures, a
  search index built at start-up), and only the result, already a string, crosses back through a pipe. The child
  never touches torch or CUDA, so forking a process that has them loaded is safe on Linux. The child calls
  ``os.setsid()`` so a tool's own subprocesses die with it.

The price: a tool's changes to its own global state do not survive the call (each call starts from the parent's
state). Use ``isolation="inline"`` for tools that must keep state: they run in-process, with no time limit.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import multiprocessing
import os
import signal
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any, Literal, NamedTuple

from rlcli.config.plugins import load_module_file
from rlcli.env.protocols import Malformed, ToolCall

Tool = Callable[..., str]

ERROR_MESSAGE_CHARS = 200


class ToolOutcome(str, Enum):
    OK = "ok"
    ERROR = "error"
    TIMEOUT = "timeout"
    UNKNOWN_TOOL = "unknown_tool"
    BAD_OUTPUT = "bad_output"
    MALFORMED_CALL = "malformed_call"
    TRUNCATED = "truncated"


@dataclass(frozen=True)
class ToolResult:
    """The text the model gets back (before the protocol wraps it) and how the call went."""

    output: str
    status: ToolOutcome
    seconds: float = 0.0


def error_text(exc: BaseException) -> str:
    """``Error: <ExceptionType>: <first line of the message, cut short>``."""
    message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    if len(message) > ERROR_MESSAGE_CHARS:
        message = message[:ERROR_MESSAGE_CHARS] + "..."
    return f"Error: {type(exc).__name__}: {message}" if message else f"Error: {type(exc).__name__}"


class ToolRunner:
    """Calls tools by name with a time limit; keeps ``counts`` of every ``ToolOutcome`` (as strings) for logging.

    Args:
        tools: name -> callable. A string argument is passed positionally; a dict (JSON protocol) as keywords.
        timeout_s: wall-clock limit per call (fork isolation only).
        max_output_tokens: outputs longer than this many tokens are cut and marked ``truncated``. Counted with
            ``tokenizer`` when given, else as 4 characters per token.
        tokenizer: the policy's tokenizer, for the token count above.
        isolation: ``"fork"`` (default, see the module docstring) or ``"inline"`` (in-process, no time limit).
        max_parallel: how many forked calls run at once in ``run_many``.
    """

    def __init__(
        self,
        tools: Mapping[str, Tool],
        *,
        timeout_s: float = 10.0,
        max_output_tokens: int = 64,
        tokenizer=None,
        isolation: Literal["fork", "inline"] = "fork",
        max_parallel: int = 16,
    ):
        if isolation not in ("fork", "inline"):
            raise ValueError(f"isolation must be 'fork' or 'inline', got {isolation!r}")
        if isolation == "fork" and "fork" not in multiprocessing.get_all_start_methods():
            raise ValueError("isolation='fork' needs a platform with fork (Linux); use isolation='inline'")
        for name, fn in tools.items():
            if not callable(fn):
                raise ValueError(f"tool {name!r} is not callable: {fn!r}")
        self.tools = dict(tools)
        self.timeout_s = timeout_s
        self.max_output_tokens = max_output_tokens
        self.tokenizer = tokenizer
        self.isolation = isolation
        self.max_parallel = max(1, max_parallel)
        # what the child sends back at most: enough to fill max_output_tokens, small enough to never clog the pipe
        self.max_transfer_chars = max(4096, 32 * max_output_tokens)
        self.counts: Counter[str] = Counter()

    def run(self, name: str, arguments: str | dict[str, Any]) -> ToolResult:
        return self.run_many([ToolCall(name, arguments)])[0]

    def malformed(self, reason: str) -> ToolResult:
        return self._count(ToolResult(f"Error: malformed tool call: {reason}", ToolOutcome.MALFORMED_CALL))

    def run_many(self, calls: Sequence[ToolCall | Malformed]) -> list[ToolResult]:
        """Run calls (forked ones concurrently, up to ``max_parallel`` at a time); results in the same order."""
        results: list[ToolResult | None] = [None] * len(calls)
        pending: list[tuple[int, Tool, ToolCall]] = []
        for i, call in enumerate(calls):
            if isinstance(call, Malformed):
                results[i] = self.malformed(call.reason)
            elif call.name not in self.tools:
                available = ", ".join(sorted(self.tools)) or "none"
                results[i] = self._count(ToolResult(
                    f"Error: unknown tool {call.name!r}; available tools: {available}", ToolOutcome.UNKNOWN_TOOL))
            else:
                pending.append((i, self.tools[call.name], call))
        for start in range(0, len(pending), self.max_parallel):
            chunk = pending[start:start + self.max_parallel]
            if self.isolation == "inline":
                raw = [_call_inline(fn, call.arguments) for _, fn, call in chunk]
            else:
                jobs = [_ForkedCall(fn, call.arguments, self.max_transfer_chars) for _, fn, call in chunk]
                raw = [job.wait(self.timeout_s) for job in jobs]
            for (i, _, _), r in zip(chunk, raw):
                result = self._truncate(ToolResult(r.text, r.status, r.seconds), r.cut_chars)
                if r.note:  # after truncation, so the model always sees it
                    output = f"{result.output}\n{r.note}" if result.output else r.note
                    result = ToolResult(output, result.status, r.seconds)
                results[i] = self._count(result)
        return results  # type: ignore[return-value]

    def _truncate(self, result: ToolResult, cut_chars: int = 0) -> ToolResult:
        """Cut to ``max_output_tokens``; ``cut_chars``: characters the child already dropped before sending."""
        # Only what the tool itself returned is capped; our own error texts are short by construction.
        if result.status not in (ToolOutcome.OK, ToolOutcome.BAD_OUTPUT):
            return result
        text, cap = result.output, self.max_output_tokens
        if self.tokenizer is not None:
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            if len(ids) <= cap and not cut_chars:
                return result
            kept, dropped = self.tokenizer.decode(ids[:cap]), f"{len(ids) - cap} tokens"
        else:
            if len(text) <= 4 * cap and not cut_chars:
                return result
            kept, dropped = text[: 4 * cap], f"{len(text) - 4 * cap} characters"
        if cut_chars:
            dropped += f" and {cut_chars} more characters"
        status = ToolOutcome.TRUNCATED if result.status is ToolOutcome.OK else result.status
        return ToolResult(f"{kept}\n[truncated: {dropped} cut]", status, result.seconds)

    def _count(self, result: ToolResult) -> ToolResult:
        self.counts[result.status.value] += 1
        return result


class _Raw(NamedTuple):
    """A call's result before truncation. ``note`` explains a converted non-string result; ``cut_chars`` counts the
    characters a forked child dropped so as not to push megabytes through the pipe."""

    status: ToolOutcome
    text: str
    note: str
    seconds: float
    cut_chars: int = 0


def _invoke(fn: Tool, arguments: str | dict[str, Any]) -> tuple[ToolOutcome, str, str]:
    """-> (status, text, note); the note explains a conversion of a non-string result."""
    try:
        value = fn(**arguments) if isinstance(arguments, dict) else fn(arguments)
        return _coerce(value)
    except BaseException as exc:  # noqa: BLE001 - SystemExit and KeyboardInterrupt from a tool are errors too
        return ToolOutcome.ERROR, error_text(exc), ""


def _coerce(value: Any) -> tuple[ToolOutcome, str, str]:
    if isinstance(value, str):
        return ToolOutcome.OK, value, ""
    type_name = type(value).__name__
    if value is None:
        return ToolOutcome.BAD_OUTPUT, "", "[note: the tool returned None, expected str]"
    if isinstance(value, bytes):
        text = value.decode("utf-8", errors="replace")
    elif isinstance(value, (dict, list, tuple, int, float, bool)):
        try:
            text = json.dumps(value, ensure_ascii=False)
        except (TypeError, ValueError):
            text = str(value)
    else:
        text = str(value)
    return ToolOutcome.BAD_OUTPUT, text, f"[note: the tool returned {type_name}, expected str; converted]"


def _call_inline(fn: Tool, arguments) -> _Raw:
    start = time.monotonic()
    status, text, note = _invoke(fn, arguments)
    return _Raw(status, text, note, time.monotonic() - start)


def _child_main(fn: Tool, arguments, conn, max_chars: int) -> None:
    os.setsid()  # own process group: killing it also kills whatever the tool started
    raw = _call_inline(fn, arguments)
    cut = max(0, len(raw.text) - max_chars)
    conn.send((raw.status.value, raw.text[:max_chars], raw.note, raw.seconds, cut))
    conn.close()


class _ForkedCall:
    """One tool call in a forked child process; ``wait`` collects it or kills it at the deadline."""

    _context = multiprocessing.get_context("fork") if "fork" in multiprocessing.get_all_start_methods() else None

    def __init__(self, fn: Tool, arguments, max_chars: int):
        self.started = time.monotonic()
        self.receiver, sender = self._context.Pipe(duplex=False)
        self.process = self._context.Process(target=_child_main, args=(fn, arguments, sender, max_chars))
        self.process.start()
        sender.close()  # so the parent sees EOF if the child dies without answering

    def wait(self, timeout_s: float) -> _Raw:
        deadline = self.started + timeout_s
        try:
            if self.receiver.poll(max(0.0, deadline - time.monotonic())):
                try:
                    status, text, note, seconds, cut = self.receiver.recv()
                    return _Raw(ToolOutcome(status), text, note, seconds, cut)
                except EOFError:
                    self.process.join(timeout=1.0)
                    code = self.process.exitcode
                    return _Raw(ToolOutcome.ERROR, f"Error: the tool process died (exit code {code})", "",
                                self._elapsed())
            message = f"Error: TimeoutError: the tool did not finish within {timeout_s:g} s"
            return _Raw(ToolOutcome.TIMEOUT, message, "", self._elapsed())
        finally:
            self._reap()

    def _elapsed(self) -> float:
        return time.monotonic() - self.started

    def _reap(self) -> None:
        # Kill the whole process group (the child is its leader after setsid): this ends whatever the tool started
        # too. The child is normally not reaped yet, so its pid is still reserved; Linux hands out pids in sequence,
        # so even when multiprocessing reaped it early the id is not reused within these milliseconds.
        self.receiver.close()
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            self.process.kill()  # the child had not reached setsid yet
        self.process.join(timeout=5.0)
        if self.process.exitcode is not None:
            self.process.close()


def load_tool(spec: str, **options: Any) -> Tool:
    """Resolve a tool from a recipe string.

    ``spec`` is a built-in name (``calculator``, ``python``, ``search``: ``options`` go to its factory, e.g.
    ``load_tool("search", corpus_path="wiki.txt")``), ``path/to/file.py:fn`` or ``package.module:fn``. With options, a
    non-built-in target is treated as a factory and called with them. Raises ``ValueError`` naming the spec.
    """
    from rlcli.env.builtin_tools import BUILTIN_TOOLS

    if spec in BUILTIN_TOOLS:
        try:
            return BUILTIN_TOOLS[spec](**options)
        except TypeError as err:
            raise ValueError(f"tool {spec!r}: bad options {sorted(options)}: {err}") from None
    if ":" not in spec:
        raise ValueError(
            f"tool {spec!r}: not a built-in tool ({', '.join(sorted(BUILTIN_TOOLS))}) and not of the form "
            "'path/to/file.py:function' or 'package.module:function'"
        )
    target, attr = spec.rsplit(":", 1)
    if not target or not attr:
        raise ValueError(f"tool {spec!r}: expected 'path/to/file.py:function' or 'package.module:function'")
    obj = _import_target(spec, target)
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ValueError(f"tool {spec!r}: {target!r} has no attribute {attr!r}") from None
    if options:
        try:
            obj = obj(**options)
        except Exception as err:  # noqa: BLE001 - any factory failure is a configuration error
            raise ValueError(f"tool {spec!r}: calling it with options {sorted(options)} failed: {error_text(err)}") \
                from None
    if not callable(obj):
        raise ValueError(f"tool {spec!r} is not callable (got {type(obj).__name__})")
    return obj


def _import_target(spec: str, target: str):
    if target.endswith(".py") or "/" in target or os.sep in target:
        path = Path(target)
        if not path.is_file():
            raise ValueError(f"tool {spec!r}: file {target!r} does not exist")
        try:
            module = load_module_file(path)
        except Exception as err:  # noqa: BLE001
            raise ValueError(f"tool {spec!r}: importing {target!r} failed: {error_text(err)}") from None
        if module is None:
            raise ValueError(f"tool {spec!r}: cannot import {target!r} as a Python file")
        return module
    try:
        return importlib.import_module(target)
    except Exception as err:  # noqa: BLE001
        raise ValueError(f"tool {spec!r}: cannot import module {target!r}: {error_text(err)}") from None
