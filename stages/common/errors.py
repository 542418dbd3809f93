"""One exception type for every mistake a user can fix.

Its message is printed as a single line (no traceback) by main.py and by every stage entry file,
so it must name the key, file or line at fault and say how to fix it. A check that finds several independent
mismatches at once (the multi-node plan) passes one line each: ``UserError(line, line, ...)``, printed as one
``error:`` line each.
"""


class UserError(Exception):
    """A problem in the user's config, data or environment, reported as one actionable line (one per argument)."""

    def __init__(self, message: str, *more: str) -> None:
        super().__init__("\n".join(" ".join(str(m).split()) for m in (message, *more)))

    @property
    def lines(self) -> list[str]:
        return str(self).split("\n")
