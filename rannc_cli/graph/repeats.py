"""Find runs of structurally identical sibling modules (the layers of a stack).

    runs = find_runs(model)          # [Run(container='encoder.layers', members=['encoder.layers.0', ...])]
    fingerprint(model.encoder.layers[3]) == fingerprint(model.encoder.layers[7])   # True

Two modules are structurally identical when their whole submodule trees have the same classes,
the same plain attributes (ints, strings, flags, shared objects by identity), the same parameter
and buffer shapes, dtypes, devices and ``requires_grad``, the same tying pattern among their own
parameters, and no hooks. The same code then traces them to the same graph, which lets capture
export one member of a run and copy its graph for the others (``rannc_cli.graph.reuse``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

_MODULE_INTERNALS = {
    "_parameters", "_buffers", "_modules", "_non_persistent_buffers_set", "_forward_hooks", "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called", "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_backward_hooks",
    "_backward_pre_hooks", "_state_dict_hooks", "_state_dict_pre_hooks", "_load_state_dict_pre_hooks",
    "_load_state_dict_post_hooks", "_is_full_backward_hook", "_compiled_call_impl",
}
_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
_PLAIN = (int, float, bool, str, bytes, type(None), torch.dtype, torch.device)


@dataclass
class Run:
    """Consecutive children of ``container`` with one fingerprint (at least two)."""

    container: str
    members: list[str]  # module paths, in the container's order


def _attribute_key(value: Any) -> Any:
    if isinstance(value, _PLAIN):
        return ("plain", type(value).__name__, repr(value))
    if isinstance(value, (tuple, list)) and all(isinstance(v, _PLAIN) for v in value):
        return ("seq", type(value).__name__, repr(value))
    if isinstance(value, torch.Tensor):
        return ("tensor", id(value))  # a plain tensor attribute: only the very same tensor matches
    return ("object", id(value))  # functions, configs: shared objects match by identity


def fingerprint(module: nn.Module) -> tuple | None:
    """A hashable description of the module tree, or None when it has hooks (never reused)."""
    parts: list[Any] = []
    for path, sub in module.named_modules(remove_duplicate=False):
        if any(getattr(sub, h, None) for h in _HOOKS):
            return None
        attrs = tuple(sorted((k, _attribute_key(v)) for k, v in vars(sub).items() if k not in _MODULE_INTERNALS))
        parts.append((path, type(sub).__module__, type(sub).__qualname__, attrs,
                      tuple(sorted(sub._non_persistent_buffers_set))))
    first_seen: dict[int, int] = {}
    for i, (name, p) in enumerate(module.named_parameters(remove_duplicate=False)):
        parts.append(("p", name, tuple(p.shape), str(p.dtype), str(p.device), p.requires_grad,
                      first_seen.setdefault(id(p), i)))
    for i, (name, b) in enumerate(module.named_buffers(remove_duplicate=False)):
        parts.append(("b", name, tuple(b.shape), str(b.dtype), str(b.device), first_seen.setdefault(id(b), -1 - i)))
    return tuple(parts)


def _has_global_hooks() -> bool:
    from torch.nn.modules import module as m

    return any(getattr(m, name, None) for name in ("_global_forward_hooks", "_global_forward_pre_hooks",
                                                   "_global_backward_hooks", "_global_backward_pre_hooks"))


def find_runs(model: nn.Module, min_length: int = 2) -> list[Run]:
    """Maximal runs of consecutive structurally identical children, outermost first; members of
    a run are not searched further. Distinct module objects only (a layer used twice is no run)."""
    if _has_global_hooks():
        return []
    runs: list[Run] = []

    def visit(path: str, module: nn.Module) -> None:
        children = list(module.named_children())
        i = 0
        while i < len(children):
            name, child = children[i]
            key = fingerprint(child) if len(list(child.parameters())) else None
            j = i + 1
            if key is not None:
                seen = {id(child)}
                while j < len(children) and id(children[j][1]) not in seen and fingerprint(children[j][1]) == key:
                    seen.add(id(children[j][1]))
                    j += 1
            if j - i >= min_length:
                prefix = f"{path}." if path else ""
                runs.append(Run(container=path, members=[prefix + n for n, _ in children[i:j]]))
            else:
                visit(f"{path}.{name}" if path else name, child)
                j = i + 1
            i = j

    visit("", model)
    return runs
