"""Mutation testing of rlcli's RL maths: do the tests notice a flipped sign, a dropped ``.detach()``, ``<`` for ``<=``?

    python scripts/mutate.py                       # every mutant of the default targets, summary + survivors
    python scripts/mutate.py --list                # just list the mutants (id, file:line, original -> mutated)
    python scripts/mutate.py --only 17             # run mutant 17 alone (its number in --list)
    python scripts/mutate.py --targets rlcli/rl/kl.py --report /tmp/kl.json

A small mutator on the standard library's ``ast``: mutmut and cosmic-ray are heavy dependencies, rewrite
whole files through their own parsers and runners, and handle torch code poorly (their operators know nothing about
``.detach()``, ``torch.maximum`` or ``@torch.no_grad``, and their per-mutant runners re-import torch every time).

Each mutant changes one AST node. Its source text is replaced in place (wrapped in parentheses, padded with newlines
so that line numbers stay put), the mutated module is written over the real file in the working tree, the tests run,
and the original is written back in a ``finally``. The script refuses to start when a target has uncommitted changes,
so that ``git checkout -- <file>`` is always a safe recovery should the script itself be killed.

Operators: ``+``/``-``, ``*``/``/``, unary minus dropped, unary minus added (on returned values), ``<``/``<=``,
``>``/``>=``, ``==``/``!=``, ``is``/``is not``, ``and``/``or``, ``.detach()`` dropped, ``.detach()`` added (to
arguments that look like differentiable tensors: log-probs, logits, values, losses), constants (int 0 <-> 1,
n -> n + 1; float 0.0 <-> 1.0, c -> -c; True <-> False), ``min``/``max`` (builtins, ``.min``/``.max`` methods and
``min=``/``max=`` keywords), ``torch.maximum``/``torch.minimum``.

Not mutated: docstrings and every string, f-strings, ``raise`` statements, type annotations, logging / warning /
print calls, and ``.detach()`` inside functions decorated with ``torch.no_grad`` (no graph there: equivalent by
construction). Functions of a target can be selected: ``path.py:func1,func2`` (methods by name or ``Class.name``).

Test selection: a clean run first records, per test, which functions of the targets it calls (``sys.settrace`` on
call events). A mutant inside a function runs only the tests that call that function, with ``-x``; a default argument
counts as its function's; a mutant at module level (class attributes, constants) runs every test that calls into
its file. A mutant no test reaches
survives without a run. Each run is a ``fork`` of this process, which has imported torch, transformers and pytest
once (``--no-fork``: a fresh ``python -m pytest`` per mutant, several seconds slower each).

Outcomes: killed (a test failed, or a test module failed to import), survived (the selected tests passed), timeout
(ran past ``--timeout-factor`` × the clean run's time), error (pytest usage or internal error), build (the mutant does not
compile: killed at build, not in the score). Score = killed / (killed + survived), after removing the mutants listed
in ``scripts/mutate_equivalent.txt`` (``id  reason``, one per line; the reason is printed with them).
"""

from __future__ import annotations

import argparse
import ast
import copy
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parent.parent
DEFAULT_TARGETS = [
    *sorted(str(p.relative_to(REPO)) for p in (REPO / "rlcli" / "rl").glob("*.py") if p.name != "__init__.py"),
    "rlcli/ppo/learner.py:_accumulate_minibatch,_minibatch_loss,_advantage_inputs,step,_kl_in_reward,_optimise,"
    "_approx_kl_after,_ratio,TrainingRecord.write",
    "rlcli/ppo/build.py:optimizer_groups",
    "rlcli/parallel.py:clip_and_step",
]
DEFAULT_TESTS = ["tests/rl", "tests/ppo/test_learner.py", "tests/test_parallel.py",
                 # the learner under an engine whose sampler is not the learner (importance sampling)
                 "tests/models/test_engines.py::test_a_sampler_that_is_not_the_learner_is_corrected_and_its_mismatch_logged"]
EQUIVALENT_FILE = REPO / "scripts" / "mutate_equivalent.txt"
# imported once by the forking parent, so that each mutant's run skips them (never anything under rlcli/)
PRELOAD = ["numpy", "torch", "yaml", "pytest", "transformers", "accelerate",
           "transformers.models.gpt2.modeling_gpt2", "transformers.models.llama.modeling_llama"]
LOG_CALLS = {"print", "warn", "warning", "info", "debug", "error", "exception", "log", "echo", "secho"}
DIFFERENTIABLE = re.compile(r"(^|_)(logprobs|logits|values|loss|ratio|terms|per_token)$")

BINOPS = {ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.Div, ast.Div: ast.Mult}
CMPOPS = {ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt, ast.Eq: ast.NotEq, ast.NotEq: ast.Eq,
          ast.Is: ast.IsNot, ast.IsNot: ast.Is}
SWAP_NAMES = {"min": "max", "max": "min", "maximum": "minimum", "minimum": "maximum"}


# --- mutants ------------------------------------------------------------------------------------------------------

@dataclass
class Mutant:
    number: int
    id: str  # file:function:operator:index, stable while the function itself does not change
    file: str
    function: str  # qualified name, "<module>" outside any function body
    operator: str
    line: int
    original: str
    mutated: str
    span: tuple[int, int, int, int] = field(repr=False)  # lineno, col, end_lineno, end_col (cols in UTF-8 bytes)
    replacement: str = field(repr=False, default="")
    lines: tuple[int, int] | None = field(repr=False, default=None)  # enclosing function's lines, None at module level
    status: str = "pending"
    seconds: float = 0.0
    tests_run: int = 0
    reason: str = ""

    def where(self) -> str:
        return f"{self.file}:{self.line}: {self.original} -> {self.mutated}"


def _is_no_grad(decorator: ast.expr) -> bool:
    text = ast.unparse(decorator)
    return "no_grad" in text or "inference_mode" in text


def _is_log_call(node: ast.Call) -> bool:
    f = node.func
    name = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else ""
    return name in LOG_CALLS


class _Collector(ast.NodeVisitor):
    """Walks a module, yielding (qualname, function lines, operator, original node, mutated node)."""

    def __init__(self, functions: set[str] | None):
        self.functions = functions  # None: every function
        self.stack: list[tuple[str, tuple[int, int], bool]] = []  # (qualname, lines, no_grad)
        self.class_stack: list[str] = []
        self.found: list[tuple[str, tuple[int, int] | None, str, ast.AST, ast.AST | str]] = []
        self.in_body = False
        self.no_grad_with = 0

    # scope ----------------------------------------------------------------------------------------------------
    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        self.class_stack.append(node.name)
        for stmt in node.body:
            self.visit(stmt)
        self.class_stack.pop()

    def visit_FunctionDef(self, node: ast.FunctionDef) -> None:
        parent = self.stack[-1][0] + "." if self.stack else ("".join(c + "." for c in self.class_stack))
        qualname = parent + node.name
        first = min([node.lineno, *[d.lineno for d in node.decorator_list]])
        no_grad = any(_is_no_grad(d) for d in node.decorator_list) or (bool(self.stack) and self.stack[-1][2])
        self.stack.append((qualname, (first, node.end_lineno), no_grad))
        # a default value matters when its function is called: it counts as the function's (decorators are not
        # mutated: @torch.no_grad(), @dataclass(frozen=True))
        for default in [*node.args.defaults, *[d for d in node.args.kw_defaults if d is not None]]:
            self.visit(default)
        body = node.body
        if ast.get_docstring(node) is not None:
            body = body[1:]
        for stmt in body:
            self.visit(stmt)
        self.stack.pop()

    visit_AsyncFunctionDef = visit_FunctionDef

    def _selected(self) -> bool:
        if self.functions is None:
            return True
        if not self.stack:
            return False
        qualname = self.stack[0][0]  # the outermost function decides
        return qualname in self.functions or qualname.rsplit(".", 1)[-1] in self.functions

    def _add(self, operator: str, node: ast.AST, new: ast.AST | str) -> None:
        if not self._selected():
            return
        if self.stack:
            qualname, lines, _ = self.stack[-1]
        else:
            qualname, lines = "<module>", None
        self.found.append((qualname, lines, operator, node, new))

    def _no_grad(self) -> bool:
        return bool(self.stack and self.stack[-1][2]) or self.no_grad_with > 0

    # skipped wholesale ----------------------------------------------------------------------------------------
    def visit_Raise(self, node: ast.Raise) -> None:
        pass

    def visit_JoinedStr(self, node: ast.JoinedStr) -> None:
        pass

    def visit_Import(self, node) -> None:
        pass

    visit_ImportFrom = visit_Import

    def visit_Expr(self, node: ast.Expr) -> None:
        if isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
            return  # a docstring or bare string
        self.generic_visit(node)

    def visit_AnnAssign(self, node: ast.AnnAssign) -> None:
        if node.value is not None:
            self.visit(node.value)

    def visit_arguments(self, node: ast.arguments) -> None:
        pass  # annotations; defaults are visited by visit_FunctionDef

    def visit_With(self, node: ast.With) -> None:
        no_grad = any(_is_no_grad(item.context_expr) for item in node.items)
        self.no_grad_with += no_grad
        self.generic_visit(node)
        self.no_grad_with -= no_grad

    # operators ------------------------------------------------------------------------------------------------
    def visit_BinOp(self, node: ast.BinOp) -> None:
        new_op = BINOPS.get(type(node.op))
        if new_op is not None:
            new = copy.copy(node)
            new.op = new_op()
            self._add("binop", node, new)
        self.generic_visit(node)

    def visit_UnaryOp(self, node: ast.UnaryOp) -> None:
        if isinstance(node.op, ast.USub):
            self._add("neg_drop", node, node.operand)
            if not isinstance(node.operand, ast.Constant):  # -1 -> 1 only, not also -1 -> -0
                self.generic_visit(node)
            return
        if isinstance(node.op, ast.Not):
            self._add("not_drop", node, node.operand)
        self.generic_visit(node)

    def visit_Return(self, node: ast.Return) -> None:
        v = node.value
        # numbers and tensors only: a call is negated when it is a method or torch function (not a constructor,
        # bool(), str.join)
        numeric = isinstance(v, (ast.BinOp, ast.Name, ast.Subscript)) or (
            isinstance(v, ast.Call) and isinstance(v.func, ast.Attribute)
            and v.func.attr not in ("join", "format", "state_dict") and not v.func.attr[:1].isupper())
        if numeric:
            self._add("neg_add", v, ast.UnaryOp(ast.USub(), v))
        self.generic_visit(node)

    def visit_Compare(self, node: ast.Compare) -> None:
        for i, op in enumerate(node.ops):
            new_op = CMPOPS.get(type(op))
            if new_op is not None:
                new = copy.copy(node)
                new.ops = list(node.ops)
                new.ops[i] = new_op()
                self._add("compare", node, new)
        self.generic_visit(node)

    def visit_BoolOp(self, node: ast.BoolOp) -> None:
        new = copy.copy(node)
        new.op = ast.Or() if isinstance(node.op, ast.And) else ast.And()
        self._add("boolop", node, new)
        self.generic_visit(node)

    def visit_Constant(self, node: ast.Constant) -> None:
        v = node.value
        if isinstance(v, bool):
            new = not v
        elif isinstance(v, int):
            new = {0: 1, 1: 0}.get(v, v + 1)
        elif isinstance(v, float):
            new = {0.0: 1.0, 1.0: 0.0}.get(v, -v)
        else:
            return
        self._add("constant", node, ast.Constant(new))

    def visit_Call(self, node: ast.Call) -> None:
        if _is_log_call(node):
            return
        f = node.func
        if isinstance(f, ast.Attribute) and f.attr == "detach" and not node.args and not self._no_grad():
            self._add("detach_drop", node, f.value)
        if isinstance(f, ast.Name) and f.id in ("min", "max"):
            new = copy.copy(node)
            new.func = ast.Name(SWAP_NAMES[f.id], ast.Load())
            self._add("minmax", node, new)
        if isinstance(f, ast.Attribute) and f.attr in SWAP_NAMES:
            new = copy.copy(node)
            new.func = ast.Attribute(f.value, SWAP_NAMES[f.attr], ast.Load())
            self._add("minmax", node, new)
        for k in node.keywords:
            if k.arg == "dim":
                continue  # dim=-1 vs dim=1 on a 2-D tensor: equivalent mutants by the dozen; shapes catch the rest
            self.visit(k.value)
            if k.arg in ("min", "max"):
                new = copy.copy(node)
                new.keywords = [ast.keyword(SWAP_NAMES[k.arg] if kw is k else kw.arg, kw.value)
                                for kw in node.keywords]
                self._add("minmax_kw", node, new)
        if not self._no_grad():
            for arg in node.args:
                if isinstance(arg, ast.Name) and DIFFERENTIABLE.search(arg.id):
                    detached = ast.Call(ast.Attribute(arg, "detach", ast.Load()), [], [])
                    self._add("detach_add", arg, detached)
        self.visit(node.func)
        for arg in node.args:
            self.visit(arg)


def _parse_target(spec: str) -> tuple[str, set[str] | None]:
    path, _, funcs = spec.partition(":")
    return path, ({f.strip() for f in funcs.split(",") if f.strip()} or None)


def collect(targets: list[str]) -> list[Mutant]:
    mutants: list[Mutant] = []
    for spec in targets:
        path, functions = _parse_target(spec)
        source = (REPO / path).read_text()
        tree = ast.parse(source)
        collector = _Collector(functions)
        collector.visit(tree)
        counters: dict[tuple[str, str], int] = {}
        for qualname, lines, operator, node, new in collector.found:
            key = (qualname, operator)
            index = counters.get(key, 0)
            counters[key] = index + 1
            new_text = new if isinstance(new, str) else ast.unparse(new)
            span = (node.lineno, node.col_offset, node.end_lineno, node.end_col_offset)
            newlines = "\n" * (node.end_lineno - node.lineno)
            mutants.append(Mutant(
                number=len(mutants) + 1, id=f"{path}:{qualname}:{operator}:{index}", file=path, function=qualname,
                operator=operator, line=node.lineno, original=ast.unparse(node), mutated=new_text, span=span,
                replacement=f"({new_text}{newlines})", lines=lines))
    return mutants


def mutated_source(source: str, m: Mutant) -> str:
    lines = source.encode().splitlines(keepends=True)
    l0, c0, l1, c1 = m.span
    head = b"".join(lines[: l0 - 1]) + lines[l0 - 1][:c0]
    tail = lines[l1 - 1][c1:] + b"".join(lines[l1:])
    return (head + m.replacement.encode() + tail).decode()


# --- running tests ------------------------------------------------------------------------------------------------

class _CallRecorder:
    """pytest plugin: per test, the (file, first line) of every code object in the targets that it runs."""

    def __init__(self, files: set[str], out: Path):
        self.files = files
        self.out = out
        self.calls: dict[str, set] = {}
        self.durations: dict[str, float] = {}
        self.failed: list[str] = []

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_protocol(self, item, nextitem):
        seen: set = self.calls.setdefault(item.nodeid, set())
        files = self.files

        def trace(frame, event, arg):  # call events only: returning None turns line tracing off
            code = frame.f_code
            if code.co_filename in files:
                seen.add((code.co_filename, code.co_firstlineno))

        t = time.perf_counter()
        sys.settrace(trace)
        try:
            yield
        finally:
            sys.settrace(None)
        self.durations[item.nodeid] = time.perf_counter() - t

    def pytest_runtest_logreport(self, report):
        if report.failed:
            self.failed.append(report.nodeid)

    def dump(self) -> None:
        self.out.write_text(json.dumps({
            "calls": {k: sorted(v) for k, v in self.calls.items()},
            "durations": self.durations, "failed": self.failed}))


def _pytest_args(tests: list[str]) -> list[str]:
    return ["-q", "-x", "-p", "no:cacheprovider", "-o", "addopts=", "-m", "not sharded and not slow and not gpu",
            "--rootdir", str(REPO), *tests]


def _fork_run(args: list[str], timeout: float, log: Path, plugin=None) -> tuple[str, int | None]:
    """pytest.main(args) in a forked child with its own process group; ("exit", code) or ("timeout", None)."""
    pid = os.fork()
    if pid == 0:  # child
        code = 3
        try:
            os.setsid()
            sys.dont_write_bytecode = True  # a stale .pyc of another mutant of the same size must never be read
            fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            os.chdir(REPO)
            sys.path.insert(0, str(REPO))
            import pytest

            code = int(pytest.main(args, plugins=[plugin] if plugin else []))
            if plugin is not None:
                plugin.dump()
        except BaseException:  # noqa: BLE001
            import traceback

            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return "exit", os.waitstatus_to_exitcode(status)
        if time.monotonic() > deadline:
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            os.waitpid(pid, 0)
            return "timeout", None
        time.sleep(0.02)


def _subprocess_run(args: list[str], timeout: float, log: Path) -> tuple[str, int | None]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONDONTWRITEBYTECODE": "1"}
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "pytest", *args], cwd=REPO, env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            return "exit", proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return "timeout", None


def clean_run(tests: list[str], files: set[str], fork: bool, workdir: Path) -> dict:
    """The unmutated tests, recording which target functions each test calls."""
    out = workdir / "clean.json"
    log = workdir / "clean.log"
    if fork:
        plugin = _CallRecorder(files, out)
        t = time.perf_counter()
        kind, code = _fork_run(_pytest_args(tests)[1:], 3600, log, plugin)  # no -x: record every test
        seconds = time.perf_counter() - t
    else:
        raise SystemExit("--no-fork needs the call map of a forked clean run; run without --no-fork once")
    if kind != "exit" or code != 0 or not out.exists():
        sys.exit(f"the clean run failed (pytest exit {code}); fix the tests first. Log: {log}\n"
                 + log.read_text()[-3000:])
    data = json.loads(out.read_text())
    data["seconds"] = seconds
    return data


def select_tests(m: Mutant, clean: dict) -> list[str]:
    path = str(REPO / m.file)
    lo, hi = m.lines if m.lines is not None else (0, 10**9)  # module level: every test that calls into the file
    return [nodeid for nodeid, calls in clean["calls"].items()
            if any(f == path and lo <= line <= hi for f, line in calls)]


# --- main ---------------------------------------------------------------------------------------------------------

def load_equivalent(path: Path) -> dict[str, str]:
    known = {}
    if path.exists():
        for raw in path.read_text().splitlines():
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            key, _, reason = line.partition(" ")
            known[key] = reason.strip().lstrip("#").strip()
    return known


def dirty(files: list[str]) -> list[str]:
    out = subprocess.run(["git", "status", "--porcelain", "--", *files], cwd=REPO, capture_output=True, text=True,
                         check=True).stdout
    return [line for line in out.splitlines() if line.strip()]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--targets", nargs="+", default=DEFAULT_TARGETS,
                   help="files to mutate, optionally path.py:func1,func2 (default: rlcli/rl/*.py and the loss "
                        "assembly of rlcli/ppo/learner.py)")
    p.add_argument("--tests", nargs="+", default=DEFAULT_TESTS, help=f"pytest paths (default: {DEFAULT_TESTS})")
    p.add_argument("--list", action="store_true", help="list the mutants and exit")
    p.add_argument("--only", type=int, nargs="+", help="run only these mutant numbers (see --list)")
    p.add_argument("--operators", nargs="+", help="run only mutants of these operators")
    p.add_argument("--survivors-of", type=Path, metavar="REPORT",
                   help="rerun only the mutants an earlier report did not kill (after adding tests); the others keep "
                        "that report's outcome, and the report written covers them all")
    p.add_argument("--jobs", type=int, default=1, help="parallel runs (only 1 is supported: mutants share the files)")
    p.add_argument("--timeout-factor", type=float, default=3.0, help="per-mutant limit = this × the clean run + 10 s")
    p.add_argument("--report", type=Path, default=REPO / "mutation-report.json", help="where the JSON report goes")
    p.add_argument("--equivalent", type=Path, default=EQUIVALENT_FILE, help="known equivalent mutants, id + reason")
    p.add_argument("--no-fork", action="store_true", help="a fresh python per mutant instead of a fork")
    args = p.parse_args(argv)
    if args.jobs != 1:
        p.error("--jobs: only 1 is supported (every mutant is written over the real file)")

    mutants = collect(args.targets)
    equivalent = load_equivalent(args.equivalent)
    if args.list:
        for m in mutants:
            mark = "  [equivalent]" if m.id in equivalent else ""
            print(f"{m.number:4d}  {m.id}  {m.where()}{mark}")
        print(f"{len(mutants)} mutants")
        return 0
    if args.only:
        mutants = [m for m in mutants if m.number in set(args.only)]
    if args.operators:
        mutants = [m for m in mutants if m.operator in set(args.operators)]
    earlier: dict[str, dict] = {}
    if args.survivors_of:
        earlier = {r["id"]: r for r in json.loads(args.survivors_of.read_text())["mutants"]}

    files = sorted({_parse_target(t)[0] for t in args.targets})
    changed = dirty(files)
    if changed:
        sys.exit("refusing to mutate files with uncommitted changes (a crash must always be recoverable with "
                 "`git checkout -- <file>`):\n" + "\n".join(changed))

    fork = not args.no_fork
    if fork:
        for name in PRELOAD:
            try:
                __import__(name)
            except ImportError:
                pass

    # SIGTERM / SIGHUP run the finally blocks that put the originals back
    def _stop(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGHUP, _stop)

    originals = {f: (REPO / f).read_text() for f in files}
    workdir = Path(tempfile.mkdtemp(prefix="rlcli-mutate-"))
    t_start = time.perf_counter()
    abs_files = {str(REPO / f) for f in files}
    print(f"clean run of {' '.join(args.tests)} ...", flush=True)
    clean = clean_run(args.tests, abs_files, True, workdir)
    all_tests = list(clean["calls"])
    timeout = args.timeout_factor * clean["seconds"] + 10
    print(f"clean run: {len(all_tests)} tests, {clean['seconds']:.1f} s; per-mutant limit {timeout:.0f} s; "
          f"{len(mutants)} mutants", flush=True)
    log = workdir / "mutant.log"
    try:
        for k, m in enumerate(mutants, 1):
            t = time.perf_counter()
            if m.id in equivalent:
                m.status, m.reason = "equivalent", equivalent[m.id]
            elif earlier.get(m.id, {}).get("status") in ("killed", "build"):
                m.status, m.reason, m.tests_run = earlier[m.id]["status"], "earlier report", earlier[m.id]["tests_run"]
                continue
            else:
                source = mutated_source(originals[m.file], m)
                try:
                    compile(source, m.file, "exec")
                except SyntaxError as e:
                    m.status, m.reason = "build", str(e)
                else:
                    tests = select_tests(m, clean)
                    m.tests_run = len(tests)
                    if not tests:
                        m.status, m.reason = "survived", "no test calls this function"
                    else:
                        try:
                            (REPO / m.file).write_text(source)
                            run = _fork_run if fork else _subprocess_run
                            kind, code = run(_pytest_args(tests), timeout, log)
                        finally:
                            (REPO / m.file).write_text(originals[m.file])
                        if kind == "timeout":
                            m.status = "timeout"
                        elif code == 0:
                            m.status = "survived"
                        elif code in (1, 2):  # a test failed, or collecting them did (the module broke on import)
                            m.status = "killed"
                        elif code == 4 and "found no collectors" in log.read_text():
                            # a test module failed to import, so pytest could not find the test ids it was given
                            m.status, m.reason = "killed", "a test module failed to import"
                        else:
                            m.status, m.reason = "error", f"pytest exit {code}: " + log.read_text()[-2000:]
            m.seconds = time.perf_counter() - t
            print(f"[{k}/{len(mutants)}] {m.status:10s} {m.seconds:5.1f}s {m.tests_run:3d} tests  {m.id}  "
                  f"{m.where()}", flush=True)
    finally:
        for f, text in originals.items():
            if (REPO / f).read_text() != text:
                (REPO / f).write_text(text)
    return _summary(mutants, time.perf_counter() - t_start, args.report, clean)


def _summary(mutants: list[Mutant], seconds: float, report: Path, clean: dict) -> int:
    count = {s: sum(m.status == s for m in mutants)
             for s in ("killed", "survived", "equivalent", "timeout", "error", "build")}
    scored = count["killed"] + count["survived"]
    score = count["killed"] / scored if scored else float("nan")
    print()
    if count["equivalent"]:
        print("equivalent (excluded from the score):")
        for m in mutants:
            if m.status == "equivalent":
                print(f"  {m.where()}  -- {m.reason}")
    for status in ("timeout", "error", "build"):
        for m in mutants:
            if m.status == status:
                print(f"{status}: {m.where()}  {m.reason[:200]}")
    if count["survived"]:
        print("survivors:")
        for m in mutants:
            if m.status == "survived":
                extra = f"  ({m.reason})" if m.reason else ""
                print(f"  {m.where()}  [{m.id}]{extra}")
    print(f"\nscore {count['killed']}/{scored} = {score:.1%} killed  "
          + ", ".join(f"{k} {v}" for k, v in count.items()) + f", total {len(mutants)}; {seconds / 60:.1f} min")
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text(json.dumps({
        "score": score, "counts": count, "total": len(mutants), "seconds": seconds,
        "clean_run_seconds": clean["seconds"],
        "mutants": [{k: v for k, v in asdict(m).items() if k not in ("replacement",)} for m in mutants],
    }, indent=1))
    print(f"report: {report}")
    return 0 if count["survived"] == 0 and count["timeout"] == 0 and count["error"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
