"""Errors a user can fix: bad recipes and bad input data. The CLI prints them without a traceback."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a recipe: where (file, line, dotted key) and what was expected."""

    key: str
    message: str
    source: str = ""
    line: int | None = None

    def render(self) -> str:
        where = self.source or "recipe"
        if self.line is not None:
            where += f":{self.line}"
        # "ppo.batch_size=64 must be ..." names its key already
        named = not self.key or self.message.startswith((self.key + "=", self.key + " "))
        return f"{where}: {self.message}" if named else f"{where}: {self.key}: {self.message}"


class RecipeProblems(ValueError):
    """Several problems a schema's cross-field check found at once. Raised out of a pydantic validator (which lets
    only a ``ValueError`` through, kept on the error as ``ctx["error"]``); the loader lists each one under its own
    key, a full dotted path from the recipe's top (a problem without one stays on the validator's section)."""

    def __init__(self, problems: list[Problem]):
        self.problems = problems
        super().__init__("; ".join(f"{p.key}: {p.message}" if p.key else p.message for p in problems))


ERROR_MESSAGE_CHARS = 200


def error_text(exc: BaseException) -> str:
    """``Error: <ExceptionType>: <first line of the message, cut short>``: an exception in one line, as a tool's
    answer to the model or in a plug-in's import failure."""
    message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    if len(message) > ERROR_MESSAGE_CHARS:
        message = message[:ERROR_MESSAGE_CHARS] + "..."
    return f"Error: {type(exc).__name__}: {message}" if message else f"Error: {type(exc).__name__}"


class UserError(Exception):
    """Bad input the user can fix (a data file, a plug-in, an output dir). Printed as one paragraph, exit 1.

    ``key``: the recipe key the problem is about, when there is one; the message then reads ``key: detail``, and
    :meth:`problem` turns it into a recipe :class:`Problem` (a preflight's checks collect them)."""

    def __init__(self, message: str = "", *, key: str | None = None):
        self.key, self.detail = key, message
        super().__init__(f"{key}: {message}" if key else message)

    def problem(self, key: str = "") -> Problem:
        """This error as a recipe problem about its own key, or ``key`` when it has none."""
        return Problem(self.key or key, self.detail)


class RecipeError(UserError):
    """A recipe with one or more problems; all of them are reported together."""

    def __init__(self, problems: list[Problem], *, title: str | None = None, hint: str | None = None):
        self.problems = problems
        self.title = title
        self.hint = hint
        super().__init__(self.render())

    def render(self) -> str:
        head = "1 problem" if len(self.problems) == 1 else f"{len(self.problems)} problems"
        lines = [self.title or f"Invalid recipe ({head}):"] + [f"  - {p.render()}" for p in self.problems]
        return "\n".join(lines + ([self.hint] if self.hint else []))


class NothingToDo(Exception):
    """The command has nothing to do (a finished run resumed to the length it has): said, exit 0."""
