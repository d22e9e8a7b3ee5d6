"""Built-in tools: ``calculator``, ``python`` and ``search``.

Every entry of ``BUILTIN_TOOLS`` is a *factory* that takes the tool's options as keyword arguments and returns the
tool (a ``str -> str`` callable): ``BUILTIN_TOOLS["search"](corpus_path="wiki.txt")``. ``load_tool`` (in
``rlcli.env.tools``) resolves recipe names through it. ``calculator`` and ``python`` also exist as ready-made
module-level tools with default options.

``python`` runs model-written code in the sandbox of ``rlcli.env.sandbox`` (bubblewrap: no network, no host files but
the system, no other processes); where bubblewrap cannot run, building it fails unless the recipe opts in with
``{spec: python, options: {allow_unsandboxed: true}}`` (see ``make_python_tool``).

Tools signal failure by raising; ``ToolRunner`` turns the exception into ``Error: <Type>: <message>`` for the model.
"""

from __future__ import annotations

import ast
import functools
import math
import operator
import os
import re
from collections import Counter
from collections.abc import Callable
from pathlib import Path

# ---------------------------------------------------------------------------------------------------------------
# calculator

MAX_EXPRESSION_CHARS = 500
MAX_INT_BITS = 4096  # about 1233 decimal digits: every operation on such numbers takes microseconds

_BINARY_OPS = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: pow,
}
_UNARY_OPS = {ast.USub: operator.neg, ast.UAdd: operator.pos}


def calculator(expression: str) -> str:
    """Evaluate an arithmetic expression: numbers, + - * / // % **, unary minus and parentheses.

    Args:
        expression: the expression to evaluate, e.g. "(3 + 4) * 2 ** 3".
    """
    expression = expression.strip()
    if len(expression) > MAX_EXPRESSION_CHARS:
        raise ValueError(f"expression longer than {MAX_EXPRESSION_CHARS} characters")
    try:
        tree = ast.parse(expression, mode="eval")
    except SyntaxError as err:
        raise ValueError(f"not an arithmetic expression: {err.msg}") from None
    return _format_number(_evaluate(tree.body))


def make_calculator_tool() -> Callable[[str], str]:
    """The calculator has no options; this factory exists so every built-in is made the same way."""
    return calculator


def _evaluate(node: ast.AST) -> int | float:
    # Walks the AST itself (never eval): only number literals and the listed operators are accepted.
    if isinstance(node, ast.Constant):
        if isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
            return _check_size(node.value)
        raise ValueError(f"unsupported literal {node.value!r}: only numbers are allowed")
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY_OPS:
        return _UNARY_OPS[type(node.op)](_evaluate(node.operand))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY_OPS:
        left, right = _evaluate(node.left), _evaluate(node.right)
        if isinstance(node.op, ast.Pow):
            _check_power(left, right)
        return _check_size(_BINARY_OPS[type(node.op)](left, right))
    raise ValueError(f"unsupported syntax: {type(node).__name__}; only numbers, + - * / // % ** and parentheses")


def _check_power(base: int | float, exponent: int | float) -> None:
    # Refuse before computing: 9**9**9 would take minutes and gigabytes.
    if isinstance(base, int) and isinstance(exponent, int) and exponent > 0 and abs(base) > 1:
        if abs(base).bit_length() * exponent > MAX_INT_BITS:
            raise ValueError(f"result too large: more than {MAX_INT_BITS} bits")
    elif abs(exponent) > 10_000 and abs(base) not in (0, 1):
        raise ValueError("exponent too large")


def _check_size(value: int | float) -> int | float:
    if isinstance(value, int) and value.bit_length() > MAX_INT_BITS:
        raise ValueError(f"result too large: more than {MAX_INT_BITS} bits")
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError("result is not a finite number")
    if isinstance(value, complex):
        raise ValueError("result is a complex number")
    return value


def _format_number(value: int | float) -> str:
    if isinstance(value, float):
        if value.is_integer() and abs(value) < 1e15:
            return str(int(value))
        return f"{value:.12g}"
    return str(value)


# ---------------------------------------------------------------------------------------------------------------
# python

# Runs the user's code as __main__ from main.py, after the sandbox's limits, with tracebacks that start at the
# user's code (the launcher's own frame is skipped).
_LAUNCHER = """
import sys, traceback
sys.argv = ["main.py"]
with open("main.py", encoding="utf-8") as f:
    source = f.read()
try:
    exec(compile(source, "main.py", "exec"), {"__name__": "__main__", "__builtins__": __builtins__})
except SystemExit:
    raise
except BaseException as exc:
    traceback.print_exception(type(exc), exc, exc.__traceback__.tb_next)
    open(".raised", "w").close()  # the traceback says what happened: no exit code after it
    sys.exit(1)
"""


def make_python_tool(
    timeout_s: float = 5.0, memory_mb: int = 512, max_output_chars: int = 2000, max_file_mb: int = 1,
    allow_unsandboxed: bool = False,
) -> Callable[[str], str]:
    """A tool that runs Python code in a fresh, sandboxed interpreter and returns what it printed.

    Each call: a new ``rlcli.env.sandbox.Interpreter`` (its working directory deleted afterwards) with
    ``RLIMIT_AS`` = ``memory_mb``, ``RLIMIT_CPU`` and a wall-clock limit of ``timeout_s``, files (stdout included)
    capped at ``max_file_mb``, the sandbox's process limit. stdout and stderr come back together, cut to
    ``max_output_chars`` (its start and its end are kept). Running past the time limit raises ``TimeoutError``.

    Without a working bubblewrap (``sandbox_problem()``) this raises ``ValueError`` unless ``allow_unsandboxed``:
    then the code runs in a plain subprocess with the trainer's user, files and network (only the limits above, a
    clean environment and its own process group).
    """
    # imported here: the calculator and search tools need only the standard library, and this file is loaded on its
    # own where rlcli is not installed (bench/_trl_driver.py)
    from rlcli.env import sandbox

    bwrap = sandbox.resolve_bwrap("python tool", "this tool", allow_unsandboxed)
    # the CPU limit is only a backstop behind the wall-clock one (threads can burn CPU faster than wall time)
    limits = sandbox.Limits(memory_mb=memory_mb, cpu_s=timeout_s + 1, max_file_mb=max_file_mb,
                            max_output_chars=max_output_chars)

    def python(code: str) -> str:
        """Run Python code in a sandboxed interpreter and return its printed output (stdout and stderr).

        Args:
            code: the Python program to run; use print() to show results.
        """
        with sandbox.Interpreter(_LAUNCHER, limits, bwrap, files={"main.py": code}) as interpreter:
            finished = interpreter.exited_within(timeout_s)
            ending = interpreter.stop()
            if not finished or ending.signal == "SIGXCPU":
                raise TimeoutError(sandbox.timed_out(timeout_s))
            output = interpreter.output()
            raised = (interpreter.workdir / ".raised").exists()
        if ending.signal or (ending.returncode != 0 and not raised):  # how it ended, when not normally
            output = f"{output}\n[{ending}]" if output.strip() else f"[{ending}]"
        return output if output.strip() else "(no output)"

    python.sandboxed = bwrap is not None
    return python


def python(code: str) -> str:
    """Run Python code in a sandboxed interpreter and return its printed output (stdout and stderr).

    Args:
        code: the Python program to run; use print() to show results.
    """
    # built on first use, so that importing this module never fails on a machine without bubblewrap
    return _default_python_tool()(code)


@functools.cache
def _default_python_tool() -> Callable[[str], str]:
    return make_python_tool()


# ---------------------------------------------------------------------------------------------------------------
# search


def make_search_tool(corpus_path: str | os.PathLike, k1: float = 1.5, b: float = 0.75) -> Callable[[str], str]:
    """A tool that returns the passage of a local text corpus that best matches a query (BM25).

    The corpus is a UTF-8 text file with one passage per paragraph (passages separated by blank lines). It is read
    and indexed once, here.
    """
    path = Path(corpus_path)
    if not path.is_file():
        raise ValueError(f"search corpus {str(path)!r} is not a file")
    passages = [p.strip() for p in re.split(r"\n\s*\n", path.read_text(encoding="utf-8")) if p.strip()]
    if not passages:
        raise ValueError(f"search corpus {str(path)!r} has no passages")
    index = _BM25([_terms(p) for p in passages], k1=k1, b=b)

    def search(query: str) -> str:
        """Search the corpus and return the passage that best matches the query.

        Args:
            query: words to look for.
        """
        scores = index.scores(_terms(query))
        best = max(range(len(passages)), key=lambda i: (scores[i], -i))
        return passages[best] if scores[best] > 0 else "No results found."

    return search


def _terms(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


class _BM25:
    def __init__(self, docs: list[list[str]], k1: float, b: float):
        self.k1, self.b = k1, b
        self.tfs = [Counter(d) for d in docs]
        self.lengths = [len(d) for d in docs]
        self.avg_length = sum(self.lengths) / len(docs) or 1.0
        df = Counter(term for d in docs for term in set(d))
        n = len(docs)
        self.idf = {term: math.log(1 + (n - f + 0.5) / (f + 0.5)) for term, f in df.items()}

    def scores(self, query: list[str]) -> list[float]:
        out = []
        for tf, length in zip(self.tfs, self.lengths):
            norm = self.k1 * (1 - self.b + self.b * length / self.avg_length)
            terms = (t for t in set(query) if t in tf)
            out.append(sum(self.idf.get(t, 0.0) * tf[t] * (self.k1 + 1) / (tf[t] + norm) for t in terms))
        return out


BUILTIN_TOOLS: dict[str, Callable[..., Callable[..., str]]] = {
    "calculator": make_calculator_tool,
    "python": make_python_tool,
    "search": make_search_tool,
}
