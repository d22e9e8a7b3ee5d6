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
        return f"{where}: {self.key}: {self.message}" if self.key else f"{where}: {self.message}"


class UserError(Exception):
    """Bad input the user can fix (a data file, a plug-in, an output dir). Printed as one paragraph, exit 1."""


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
