"""One error type for everything a user can get wrong.

    raise RanncError("profile file plan.yaml is not a rannc profile",
                     hint="pass the file written by `rannc profile --out`")

The CLI prints ``error: <message> (<hint>)`` on one line and exits non-zero;
no traceback reaches the user.
"""

from __future__ import annotations


class RanncError(Exception):
    """A user-facing failure: what is wrong and what to do about it."""

    exit_code = 2

    def __init__(self, message: str, hint: str | None = None, cause: BaseException | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.cause = cause  # the underlying exception; `RANNC_DEBUG=1 rannc ...` prints its traceback

    def one_line(self) -> str:
        text = self.message if not self.hint else f"{self.message}; {self.hint}"
        return " ".join(text.split())
