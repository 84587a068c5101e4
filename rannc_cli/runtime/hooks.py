"""A process-wide hook that intercepts RaNNCModule's first forward.

    with first_forward_hook(lambda model, args, kwargs: capture(model, args, kwargs)):
        runpy.run_path("train.py", run_name="__main__")

`rannc profile` runs the user's script in-process under such a hook: the hook receives the
wrapped model and the real first batch, does its work, and raises ``StopScript`` to end the
script there.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterator

FirstForwardHook = Callable[[Any, tuple, dict], None]

_hook: FirstForwardHook | None = None


class StopScript(BaseException):
    """Raised by a hook to end the user's script after it has what it needs.

    A BaseException, so a user's broad ``except Exception`` cannot swallow it."""

    def __init__(self, result: Any = None):
        super().__init__("rannc stopped the script at the model's first forward")
        self.result = result


def current_hook() -> FirstForwardHook | None:
    return _hook


@contextmanager
def first_forward_hook(hook: FirstForwardHook) -> Iterator[None]:
    global _hook
    previous, _hook = _hook, hook
    try:
        yield
    finally:
        _hook = previous
