"""Build huge models without allocating their parameters; each rank allocates only its stage's.

    with rannc_cli.deferred_init():
        model = Net()                     # parameters live on the meta device (shapes only)
    opt = torch.optim.Adam(model.parameters())
    model = RaNNCModule(model, opt)       # rank r materialises only the parameters of its stage

Inside the context every parameter a module registers is replaced by a meta-device parameter of
the same shape, dtype and requires_grad (buffers stay real: they are small and often computed,
like a causal mask). Host memory therefore holds one parameter at a time while the model is
built. Capture and planning work from shapes (profiling switches to estimate mode). After
planning, each rank gives its own parameters storage on its device and initialises them by
calling ``reset_parameters()`` of the modules that own them, with a seed fixed per module name, so
ranks that share a tied parameter agree; or a checkpoint loaded after the first forward
(``load_state_dict`` / ``load_checkpoint``) overwrites them. Values therefore match a
single-device run in distribution, not number by number; load a checkpoint for exact values.
Parameter objects keep their identity (``torch.utils.swap_tensors``), so an optimizer built
on the meta parameters keeps working.
"""

from __future__ import annotations

import contextlib
import weakref
import zlib
from typing import Any, Iterable, Iterator

import torch
from torch import nn

_active = 0
_creators: dict[int, Any] = {}  # id(meta parameter) -> weakref to the module that created it


@contextlib.contextmanager
def deferred_init() -> Iterator[None]:
    """Build modules with meta-device parameters (see the module docstring)."""
    global _active
    original = nn.Module.register_parameter

    def register_parameter(self: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and not param.is_meta:
            param = nn.Parameter(torch.empty_like(param, device="meta"), requires_grad=param.requires_grad)
            _creators[id(param)] = weakref.ref(self)
        original(self, name, param)

    _active += 1
    nn.Module.register_parameter = register_parameter  # type: ignore[method-assign]
    try:
        yield
    finally:
        _active -= 1
        nn.Module.register_parameter = original  # type: ignore[method-assign]


def meta_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.is_meta]


def give_storage(params: Iterable[nn.Parameter], device: torch.device | str = "cpu") -> None:
    """Replace meta parameters by uninitialised ones on ``device``, keeping each object's identity."""
    for p in params:
        if p.is_meta:
            real = nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device=device), requires_grad=p.requires_grad)
            torch.utils.swap_tensors(p, real)


def _reset(module: nn.Module, wanted: set[int]) -> bool:
    """Run ``module.reset_parameters()`` if it created one of the ``wanted`` parameters; parameters
    it only borrows (a tied weight another module created) keep their values. False if it has none."""
    params = list(module.parameters(recurse=False))
    created = [p for p in params if id(p) in wanted and (_creators.get(id(p)) or (lambda: module))() is module]
    if not created:
        return True
    reset = getattr(module, "reset_parameters", None)
    if reset is None:
        return False
    mine = {id(p) for p in created}
    borrowed = [(p, p.detach().clone()) for p in params if id(p) not in mine]
    with torch.no_grad():
        reset()
        for p, value in borrowed:
            p.copy_(value)
    return True


def reset_modules(model: nn.Module, wanted: set[int], seed: int) -> list[str]:
    """Initialise the ``wanted`` parameters (ids) with their creating modules' reset_parameters(),
    seeded per module name so that every rank holding a tied parameter agrees; return the names
    of creating modules without reset_parameters (their parameters are left as they are)."""
    missing = []
    for name, module in model.named_modules():
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed((seed * 1000003 + zlib.crc32(name.encode())) % (2 ** 62))
            if not _reset(module, wanted):
                missing.append(name or "<root>")
    return missing


def materialize_all(model: nn.Module) -> None:
    """Single process: give every meta parameter storage and initialise it (in module order)."""
    params = meta_parameters(model)
    if not params:
        return
    give_storage(params)
    ids = {id(p) for p in params}
    for module in model.modules():
        _reset(module, ids)
