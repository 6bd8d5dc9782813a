"""User-facing errors.

Everything a user can fix (a bad recipe, a malformed data row, a missing file) raises a
`UserError`. The CLI prints it without a traceback and exits with code 2. Each problem names
where it is (a YAML path like ``stages.sft.train.lr`` or ``data.jsonl:17``), what was found, why
it is wrong and how to fix it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

EXIT_USER_ERROR = 2


@dataclass(frozen=True)
class Problem:
    """One thing wrong with the user's input."""

    where: str  # YAML path ("stages.sft.train.lr"), "file:line", or a file path
    message: str  # what is wrong and why
    fix: str = ""  # what to do about it
    value: object = field(default=None)
    has_value: bool = False

    def render(self) -> str:
        text = f"{self.where}: {self.message}"
        if self.has_value:
            shown = repr(self.value)
            if len(shown) > 80:
                shown = shown[:77] + "..."
            text += f" (got {shown})"
        if self.fix:
            text += f"\n    fix: {self.fix}"
        return text


def problem(where: str, message: str, fix: str = "", *, value: object = ..., ) -> Problem:
    """Build a Problem; pass ``value=`` to show the offending value."""
    if value is ...:
        return Problem(where, message, fix)
    return Problem(where, message, fix, value, True)


class UserError(Exception):
    """One or more problems the user can fix. Exit code 2, no traceback."""

    def __init__(self, problems: list[Problem] | Problem | str, *, title: str = ""):
        if isinstance(problems, str):
            problems = [Problem("error", problems)]
        elif isinstance(problems, Problem):
            problems = [problems]
        self.problems = list(problems)
        self.title = title
        super().__init__(self.render())

    def render(self) -> str:
        head = self.title or (
            "1 problem" if len(self.problems) == 1 else f"{len(self.problems)} problems"
        )
        body = "\n".join(f"  - {p.render()}" for p in self.problems)
        return f"{head}:\n{body}"


class ProblemCollector:
    """Collects problems so that validation can report all of them at once."""

    def __init__(self) -> None:
        self.problems: list[Problem] = []

    def add(self, where: str, message: str, fix: str = "", *, value: object = ...) -> None:
        self.problems.append(problem(where, message, fix, value=value))

    def extend(self, problems: list[Problem]) -> None:
        self.problems.extend(problems)

    def __bool__(self) -> bool:
        return bool(self.problems)

    def raise_if_any(self, title: str = "") -> None:
        if self.problems:
            raise UserError(self.problems, title=title)
