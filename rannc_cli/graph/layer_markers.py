"""Marker ops that let one export trace a run of identical layers only once.

    with marked_run(template, [(parent, "3"), ...], run=0) as calls:
        program = torch.export.export(model, args, kwargs, strict=False)
    # the template traced for real between rannc.enter / rannc.exit markers (one per tensor leaf);
    # every other member became one rannc.stub node: its tensor inputs in, the template's outputs out

While the context is open the template's ``forward`` wraps each tensor input in ``rannc.enter``
and each tensor output in ``rannc.exit`` (identities, so the layer's own ops read the markers and
``rannc_cli.graph.reuse`` can find its inputs and outputs), and each stub's ``forward`` checks
that it is called as the template was (same argument structure and constants, inputs with the
same shapes, strides and dtypes) and returns fresh tensors shaped like the template's outputs.
Anything else raises ``NotReusable``, and capture falls back to exporting the whole model.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
from torch import nn
from torch.utils import _pytree as pytree


class NotReusable(Exception):
    """The fast path's preconditions do not hold; the message says which."""


@dataclass
class TemplateCall:
    """What the template saw and returned (filled while exporting)."""

    in_spec: Any = None
    in_constants: list[Any] = field(default_factory=list)
    in_tensors: list[torch.Tensor] = field(default_factory=list)
    in_metas: list[tuple] | None = None  # _meta of in_tensors, computed at the first stub's call
    out_spec: Any = None
    out_constants: list[Any] = field(default_factory=list)
    out_values: list[torch.Tensor] = field(default_factory=list)  # fake tensors (shape, stride, dtype)
    out_kinds: list[bool] = field(default_factory=list)  # per output leaf: is it a tensor
    calls: int = 0
    stub_calls: dict[int, int] = field(default_factory=dict)


_TEMPLATES: dict[int, TemplateCall] = {}


@torch.library.custom_op("rannc::enter", mutates_args=())
def enter(x: torch.Tensor, run: int, leaf: int) -> torch.Tensor:
    """A template input (identity)."""
    return x.clone()


@enter.register_fake
def _(x: torch.Tensor, run: int, leaf: int) -> torch.Tensor:
    return torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device=x.device)


@torch.library.custom_op("rannc::exit", mutates_args=())
def exit_(x: torch.Tensor, run: int, leaf: int) -> torch.Tensor:
    """A template output (identity)."""
    return x.clone()


@exit_.register_fake
def _(x: torch.Tensor, run: int, leaf: int) -> torch.Tensor:
    return torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device=x.device)


@torch.library.custom_op("rannc::stub", mutates_args=())
def stub(xs: list[torch.Tensor], run: int, member: int) -> list[torch.Tensor]:
    """A member of a run standing in for its copy of the template's graph (never computed)."""
    return [torch.empty_strided(v.shape, v.stride(), dtype=v.dtype, device=v.device) for v in _TEMPLATES[run].out_values]


@stub.register_fake
def _(xs: list[torch.Tensor], run: int, member: int) -> list[torch.Tensor]:
    return [torch.empty_strided(v.shape, v.stride(), dtype=v.dtype, device=v.device) for v in _TEMPLATES[run].out_values]


ENTER = torch.ops.rannc.enter.default
EXIT = torch.ops.rannc.exit.default
STUB = torch.ops.rannc.stub.default


def _size_text(size: Any) -> str:
    if isinstance(size, torch.SymInt):  # symbols unified while tracing compare as the same
        return str(size.node.shape_env.replace(size.node.expr))
    return str(size)


def _meta(t: torch.Tensor) -> tuple:
    return (tuple(map(_size_text, t.shape)), tuple(map(_size_text, t.stride())), t.dtype, t.device.type,
            t.requires_grad)


def _same_metas(tensors: list[torch.Tensor], record: TemplateCall) -> bool:
    """The tensors look like the template's inputs. The template's side is computed once and again
    only on a mismatch (symbols unified since then print differently)."""
    mine = [_meta(x) for x in tensors]
    if record.in_metas is not None and mine == record.in_metas:
        return True
    record.in_metas = [_meta(x) for x in record.in_tensors]
    return mine == record.in_metas


def _split(tree: Any, where: str) -> tuple[list[Any], Any, list[Any]]:
    leaves, spec = pytree.tree_flatten(tree)
    constants = []
    for leaf in leaves:
        if isinstance(leaf, (torch.SymInt, torch.SymFloat, torch.SymBool)):
            raise NotReusable(f"a symbolic size crosses a layer's {where}")
        if not isinstance(leaf, torch.Tensor):
            constants.append(leaf)
    return leaves, spec, constants


def _template_forward(cls: type, run: int, record: TemplateCall) -> Any:
    def forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        record.calls += 1
        if record.calls > 1:
            raise NotReusable(f"the template layer of run {run} is called more than once")
        leaves, spec, constants = _split((args, kwargs), "input")
        record.in_spec, record.in_constants = spec, constants
        record.in_tensors = [x for x in leaves if isinstance(x, torch.Tensor)]
        tensors = iter(range(len(record.in_tensors)))
        marked = [ENTER(x, run, next(tensors)) if isinstance(x, torch.Tensor) else x for x in leaves]
        a, kw = pytree.tree_unflatten(marked, spec)
        out = cls.forward(self, *a, **kw)
        out_leaves, record.out_spec, record.out_constants = _split(out, "output")
        record.out_values = [x for x in out_leaves if isinstance(x, torch.Tensor)]
        record.out_kinds = [isinstance(x, torch.Tensor) for x in out_leaves]
        outs = iter(range(len(record.out_values)))
        return pytree.tree_unflatten(
            [EXIT(x, run, next(outs)) if isinstance(x, torch.Tensor) else x for x in out_leaves], record.out_spec)

    return forward


def _stub_forward(run: int, member: int, record: TemplateCall) -> Any:
    def forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        record.stub_calls[member] = record.stub_calls.get(member, 0) + 1
        if record.calls != 1 or record.stub_calls[member] > 1:
            raise NotReusable(f"member {member} of run {run} is called before its template or more than once")
        leaves, spec, constants = _split((args, kwargs), "input")
        tensors = [x for x in leaves if isinstance(x, torch.Tensor)]
        if spec != record.in_spec or constants != record.in_constants or not _same_metas(tensors, record):
            raise NotReusable(f"member {member} of run {run} is called with other arguments than its template")
        outs = iter(STUB(tensors, run, member))
        consts = iter(record.out_constants)
        return pytree.tree_unflatten([next(outs) if is_tensor else next(consts) for is_tensor in record.out_kinds],
                                     record.out_spec)

    return forward


@contextmanager
def marked_run(template: nn.Module, stubs: list[tuple[nn.Module, str]], run: int) -> Iterator[TemplateCall]:
    """Patch the template's forward and put ghosts with a stub forward in the other members'
    places (``stubs``: (parent, attribute name)) for one export; always restored."""
    record = TemplateCall()
    _TEMPLATES[run] = record
    cls = type(template)
    try:
        _set_forward(template, _template_forward(cls, run, record))
        for i, (parent, name) in enumerate(stubs, start=1):
            parent._modules[name] = _ghost(parent._modules[name], _stub_forward(run, i, record))
        yield record
    finally:
        template.__class__ = cls
        for parent, name in stubs:
            original = getattr(parent._modules[name], "__dict__", {}).get("_rannc_original")
            if original is not None:
                parent._modules[name] = original
        _TEMPLATES.pop(run, None)


def _ghost(module: nn.Module, forward: Any = None) -> nn.Module:
    """A stand-in with the module's attributes and submodules (ghosts too) but no parameters or
    buffers, so export neither lifts nor fakes them; with ``forward``, it is the stub."""
    cls = type(module)
    if forward is not None:
        cls = type(cls.__name__, (cls,), {"forward": forward, "__module__": cls.__module__,
                                           "__qualname__": cls.__qualname__})
    ghost = object.__new__(cls)
    ghost.__dict__.update(module.__dict__)
    ghost.__dict__.update(_parameters={}, _buffers={}, _non_persistent_buffers_set=set(), _rannc_original=module,
                          _modules={k: _ghost(v) if v is not None else None for k, v in module._modules.items()})
    return ghost


def _set_forward(module: nn.Module, forward: Any) -> None:
    """Give one module another forward through a look-alike subclass: export's module proxies
    (shared submodules) share the module's __dict__ and class, so they see it too, and calls keep
    ``self`` (the proxy), which the module paths in ``nn_module_stack`` depend on."""
    cls = type(module)
    module.__class__ = type(cls.__name__, (cls,), {"forward": forward, "__module__": cls.__module__,
                                                   "__qualname__": cls.__qualname__})
