"""Run tools (plain Python callables, ``str -> str``) so that nothing a tool does can crash or hang a run.

``ToolRunner`` calls a tool with a time limit and turns every outcome into text for the model plus a counted
``ToolOutcome`` (ok, error, timeout, unknown_tool, bad_output, malformed_call, truncated). Output is cut in
characters before it is tokenised, so a tool that returns 50 MB costs what 4 kB costs. A call runs in a forked
child (``fork``, the default) or in the trainer's process (``inline``) (``rlcli.env.isolation``); neither keeps a
tool from the trainer's user, files or network. The outcomes and the two modes in full: docs/internals.md,
"rlcli/env/tools.py".
"""

from __future__ import annotations

import functools
import json
import multiprocessing
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from enum import Enum
from typing import Any, Literal, NamedTuple

from rlcli.config.errors import ERROR_MESSAGE_CHARS, UserError, error_text
from rlcli.env.isolation import ExitCalled, InlineTimeout, Ran, run_forked, run_inline
from rlcli.plugins import resolve_object
from rlcli.toolcalls import Malformed, ToolCall

Tool = Callable[..., str]

DEFAULT_MEMORY_MB = 1024



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
    printed_bytes: int = 0
    """Bytes the call wrote to stdout and stderr (fork isolation; they never reach the terminal)."""
    printed: str = ""
    """The last ``rlcli.env.isolation.PRINTED_TAIL_CHARS`` characters of them."""



class ToolRunner:
    """Calls tools by name with limits (see the module docstring); keeps ``counts`` of every ``ToolOutcome`` (as
    strings) and ``printed_bytes`` (all calls together) for logging.

    Args:
        tools: name -> callable. A string argument is passed positionally; a dict (JSON protocol) as keywords.
        timeout_s: wall-clock limit per call (inline: Python code on the main thread only).
        max_output_tokens: outputs longer than this many tokens are cut and marked ``truncated``. Counted with
            ``tokenizer`` when given, else as 4 characters per token.
        tokenizer: the policy's tokenizer, for the token count above.
        isolation: ``"fork"`` (default) or ``"inline"`` (in-process), see the module docstring.
        max_parallel: how many forked calls run at once in ``run_many``.
        memory_mb: address space a forked call may add to the trainer's (fork isolation only).
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
        memory_mb: int = DEFAULT_MEMORY_MB,
    ):
        if isolation not in ("fork", "inline"):
            raise ValueError(f"isolation must be 'fork' or 'inline', got {isolation!r}")
        if isolation == "fork" and "fork" not in multiprocessing.get_all_start_methods():
            raise ValueError("isolation='fork' needs a platform with fork (Linux); use isolation='inline'")
        if memory_mb <= 0:
            raise ValueError(f"memory_mb must be positive, got {memory_mb}")
        for name, fn in tools.items():
            if not callable(fn):
                raise ValueError(f"tool {name!r} is not callable: {fn!r}")
        self.tools = dict(tools)
        self.timeout_s = timeout_s
        self.max_output_tokens = max_output_tokens
        self.tokenizer = tokenizer
        self.isolation = isolation
        self.max_parallel = max(1, max_parallel)
        self.memory_mb = memory_mb
        # Output is cut to this many characters before anything else (the forked child sends no more, and no more is
        # tokenised): 32 characters per token is more than any tokenizer's tokens hold on ordinary text.
        self.max_output_chars = max(4096, 32 * max_output_tokens)
        self.counts: Counter[str] = Counter()
        self.printed_bytes = 0

    def run(self, name: str, arguments: str | dict[str, Any]) -> ToolResult:
        return self.run_many([ToolCall(name, arguments)])[0]

    def malformed(self, reason: str) -> ToolResult:
        return self._count(ToolResult(f"Error: malformed tool call: {reason}", ToolOutcome.MALFORMED_CALL))

    def run_many(self, calls: Sequence[ToolCall | Malformed],
                 own_tools: Sequence[Mapping[str, Tool] | None] | None = None) -> list[ToolResult]:
        """Run calls (forked ones concurrently, up to ``max_parallel`` at a time); results in the same order.

        ``own_tools``: per call, tools of that call's episode alone (a stateful environment's methods,
        ``rlcli.env.stateful``); they always run inline (their state must outlive the call) and come before the
        runner's own tools."""
        results: list[ToolResult | None] = [None] * len(calls)
        pending: list[tuple[int, Tool, ToolCall, bool]] = []
        for i, call in enumerate(calls):
            own = (own_tools[i] if own_tools is not None else None) or {}
            if isinstance(call, Malformed):
                results[i] = self.malformed(call.reason)
            elif call.name in own:
                pending.append((i, own[call.name], call, True))
            elif call.name not in self.tools:
                available = ", ".join(sorted({*self.tools, *own})) or "none"
                results[i] = self._count(ToolResult(
                    f"Error: unknown tool {call.name!r}; available tools: {available}", ToolOutcome.UNKNOWN_TOOL))
            else:
                pending.append((i, self.tools[call.name], call, self.isolation == "inline"))
        inline = [p for p in pending if p[3]]
        forked = [p for p in pending if not p[3]]
        chunks = [inline] if inline else []
        chunks += [forked[s:s + self.max_parallel] for s in range(0, len(forked), self.max_parallel)]
        for chunk in chunks:
            jobs = [functools.partial(_answer, fn, call.arguments, self.max_output_chars) for _, fn, call, _ in chunk]
            if chunk[0][3]:
                ran = [run_inline(job, self.timeout_s) for job in jobs]
            else:
                ran = run_forked(jobs, self.timeout_s, self.memory_mb * 2**20)
            for (i, _, _, _), r in zip(chunk, (_raw(r, self.timeout_s) for r in ran)):
                result = self._truncate(ToolResult(r.text, r.status, r.seconds), r.cut_chars)
                if r.note:  # after truncation, so the model always sees it
                    output = f"{result.output}\n{r.note}" if result.output else r.note
                    result = ToolResult(output, result.status, r.seconds)
                self.printed_bytes += r.printed_bytes
                results[i] = self._count(replace(result, printed_bytes=r.printed_bytes, printed=r.printed))
        return results  # type: ignore[return-value]

    def _truncate(self, result: ToolResult, cut_chars: int = 0) -> ToolResult:
        """Cut to ``max_output_tokens``; ``cut_chars``: characters the child already dropped before sending."""
        # Only what the tool itself returned is capped; rlcli's own error texts are short by construction.
        if result.status not in (ToolOutcome.OK, ToolOutcome.BAD_OUTPUT):
            return result
        text, cap = result.output, self.max_output_tokens
        if len(text) > self.max_output_chars:  # inline outputs arrive whole: never tokenise megabytes
            cut_chars += len(text) - self.max_output_chars
            text = text[: self.max_output_chars]
        if self.tokenizer is not None:
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            if len(ids) <= cap and not cut_chars:
                return result
            kept, dropped = self.tokenizer.decode(ids[:cap]), f"{max(0, len(ids) - cap)} tokens"
        else:
            if len(text) <= 4 * cap and not cut_chars:
                return result
            kept, dropped = text[: 4 * cap], f"{max(0, len(text) - 4 * cap)} characters"
        if cut_chars:
            dropped += f" and {cut_chars} more characters"
        status = ToolOutcome.TRUNCATED if result.status is ToolOutcome.OK else result.status
        return ToolResult(f"{kept}\n[truncated: {dropped} cut]", status, result.seconds)

    def _count(self, result: ToolResult) -> ToolResult:
        self.counts[result.status.value] += 1
        return result


class _Raw(NamedTuple):
    """A call's result before truncation. ``note`` explains a converted non-string result; ``cut_chars`` counts the
    characters dropped before the text left the call's process (no megabytes through a pipe); ``printed*``: what
    the call wrote to stdout and stderr."""

    status: ToolOutcome
    text: str
    note: str
    seconds: float
    cut_chars: int = 0
    printed_bytes: int = 0
    printed: str = ""



def _invoke(fn: Tool, arguments: str | dict[str, Any]) -> tuple[ToolOutcome, str, str]:
    """-> (status, text, note); the note explains a conversion of a non-string result."""
    try:
        value = fn(**arguments) if isinstance(arguments, dict) else fn(arguments)
        return _coerce(value)
    except InlineTimeout:
        raise
    except ExitCalled as exc:
        text = (f"Error: the tool called os._exit({exc.code}); it runs inside the trainer (isolation inline), so it "
                "was stopped instead")
        return ToolOutcome.ERROR, text, ""
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


def _timeout_text(timeout_s: float) -> str:
    return f"Error: TimeoutError: the tool did not finish within {timeout_s:g} s"

def _answer(fn: Tool, arguments: str | dict[str, Any], max_chars: int) -> tuple[str, str, str, int]:
    """What a call's process sends back: ``(status, text cut to max_chars, note, characters cut)``."""
    status, text, note = _invoke(fn, arguments)
    return status.value, text[:max_chars], note, max(0, len(text) - max_chars)


def _raw(ran: Ran, timeout_s: float) -> _Raw:
    printed = {"printed_bytes": ran.printed_bytes, "printed": ran.printed}
    if ran.answer is not None:
        status, text, note, cut = ran.answer
        return _Raw(ToolOutcome(status), text, note, ran.seconds, cut, **printed)
    if ran.timed_out:
        return _Raw(ToolOutcome.TIMEOUT, _timeout_text(timeout_s), "", ran.seconds, **printed)
    text = f"Error: the tool process died ({ran.death})"
    last_line = next((line.strip() for line in reversed(ran.printed.splitlines()) if line.strip()), "")
    if last_line:
        text += f"; its last printed line: {last_line[:ERROR_MESSAGE_CHARS]}"
    return _Raw(ToolOutcome.ERROR, text, "", ran.seconds, **printed)


# ---------------------------------------------------------------------------------------------------------------
# loading


def load_tool(spec: str, **options: Any) -> Tool:
    """Resolve a tool from a recipe string.

    ``spec`` is a built-in name (``calculator``, ``python``, ``search``: ``options`` go to its factory, e.g.
    ``load_tool("search", corpus_path="wiki.txt")``), ``path/to/file.py:fn`` or ``package.module:fn``
    (``rlcli.plugins.resolve_object``). With options, a non-built-in target is treated as a factory and called with
    them. Raises ``ValueError`` naming the spec.
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
    try:
        obj = resolve_object(spec, what="tool")
    except UserError as exc:
        raise ValueError(str(exc)) from None
    if options:
        try:
            obj = obj(**options)
        except Exception as err:  # noqa: BLE001 - any factory failure is a configuration error
            raise ValueError(f"tool {spec!r}: calling it with options {sorted(options)} failed: {error_text(err)}") \
                from None
    if not callable(obj):
        raise ValueError(f"tool {spec!r} is not callable (got {type(obj).__name__})")
    return obj
