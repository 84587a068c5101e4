"""Turn a failed capture into one line: which module, which source line, why, what to do.

    tracker = module_tracker(model)
    try:
        with tracker:
            torch.export.export(model, args, strict=False)
    except Exception as exc:
        raise diagnose_export_failure(exc, tracker.failure_stack, model)
"""

from __future__ import annotations

import linecache
import os
import traceback
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from torch import nn

from rannc_cli.errors import RanncError

_TORCH_DIR = os.path.dirname(os.path.dirname(nn.__file__))
_RANNC_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_LIB_MARKERS = ("site-packages", "dist-packages", f"{os.sep}lib{os.sep}python")


class module_tracker:
    """Records the stack of nn.Module paths being executed, kept as it was at a failure."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.stack: list[tuple[str, str]] = []
        self.failure_stack: list[tuple[str, str]] = []
        self._handles: list[Any] = []

    def __enter__(self) -> "module_tracker":
        for name, module in self.model.named_modules():
            self._handles.append(module.register_forward_pre_hook(self._pre(name, type(module).__name__)))
            self._handles.append(module.register_forward_hook(self._post()))
        return self

    def _pre(self, name: str, type_name: str):
        def hook(_module: nn.Module, _args: Any) -> None:
            self.stack.append((name, type_name))
        return hook

    def _post(self):
        def hook(_module: nn.Module, _args: Any, _out: Any) -> None:
            if self.stack:
                self.stack.pop()
        return hook

    def __exit__(self, exc_type: Any, exc: Any, tb: TracebackType | None) -> None:
        if exc is not None and not self.failure_stack:
            self.failure_stack = list(self.stack)
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


@dataclass
class Frame:
    filename: str
    lineno: int
    function: str

    @property
    def code(self) -> str:
        return linecache.getline(self.filename, self.lineno).strip()

    def where(self) -> str:
        return f"{_short(self.filename)}:{self.lineno}"


def _short(path: str) -> str:
    try:
        rel = os.path.relpath(path)
    except ValueError:
        return path
    return rel if not rel.startswith("..") else path


def _is_library(path: str) -> bool:
    return path.startswith(_TORCH_DIR) or path.startswith(_RANNC_DIR) or "<" in path or \
        any(m in path for m in _LIB_MARKERS)


def _frames(exc: BaseException) -> list[Frame]:
    """Frames of the exception and of the exceptions it was raised from, oldest first."""
    seen: set[int] = set()
    chain: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        chain.append(current)
        current = current.__cause__ or current.__context__
    frames: list[Frame] = []
    for e in reversed(chain):
        frames.extend(Frame(f.filename, f.lineno or 0, f.name) for f in traceback.extract_tb(e.__traceback__))
    return frames


def _model_frames(frames: list[Frame], model: nn.Module) -> tuple[Frame | None, Frame | None]:
    """(innermost frame in any model code incl. torch.nn modules, innermost frame in the user's code)."""
    model_files = set()
    for m in model.modules():
        try:
            import inspect

            model_files.add(os.path.abspath(inspect.getfile(type(m))))
        except (TypeError, OSError):
            pass
    inner_model = next((f for f in reversed(frames) if os.path.abspath(f.filename) in model_files
                        and f.function not in {"_call_impl", "_wrapped_call_impl"}), None)
    user = next((f for f in reversed(frames) if not _is_library(os.path.abspath(f.filename))), None)
    return inner_model, user


_KINDS = [
    (("GuardOnDataDependentSymNode", "data-dependent", "Could not guard on data-dependent",
      "Could not extract specialized integer from data-dependent"),
     "data-dependent control flow (Python branches on, or converts, a tensor's value)",
     "compute both branches with torch.where or use torch.cond, avoid .item()/.tolist()/bool(tensor) "
     "inside forward, or pass the decision in as a Python argument"),
    (("Unsupported", "not supported", "NotImplementedError", "no fake impl", "does not have a meta"),
     "an operation torch.export cannot trace",
     "replace that operation with a standard torch one, or register a fake/meta kernel for your custom op"),
]


def diagnose_export_failure(exc: BaseException, module_stack: list[tuple[str, str]], model: nn.Module) -> RanncError:
    """Build the one-line RanncError for a failed torch.export."""
    text = f"{type(exc).__name__}: {exc}"
    frames = _frames(exc)
    inner, user = _model_frames(frames, model)
    why, todo = None, None
    first_line = next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
    for markers, reason, advice in _KINDS:
        if any(m in text for m in markers):
            why, todo = f"{reason} [{type(exc).__name__}: {first_line[:160]}]", advice
            break
    if why is None:
        why = f"the model raised {type(exc).__name__}: {first_line[:240]}"
        todo = "check that the model runs eagerly on this batch; if it does, please report the model"
    module = ""
    if module_stack:
        name, type_name = module_stack[-1]
        module = f" in module '{name or '<root>'}' ({type_name})"
    where = ""
    if inner is not None:
        where = f" at {inner.where()}" + (f" `{inner.code}`" if inner.code else "")
    if user is not None and (inner is None or user.filename != inner.filename or user.lineno != inner.lineno):
        where += f" (called from {user.where()}" + (f" `{user.code}`)" if user.code else ")")
    return RanncError(f"cannot capture the model{module}{where}: {why}", hint=f"what to do: {todo}", cause=exc)
