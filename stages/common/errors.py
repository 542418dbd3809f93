"""One exception type for every mistake a user can fix.

Its message is printed as a single line (no traceback) by main.py and by every stage entry file,
so it must name the key, file or line at fault and say how to fix it.
"""


class UserError(Exception):
    """A problem in the user's config, data or environment, reported as one actionable line."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))
