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
import zlib
from typing import Iterable, Iterator

import torch
from torch import nn

_active = 0


@contextlib.contextmanager
def deferred_init() -> Iterator[None]:
    """Build modules with meta-device parameters (see the module docstring)."""
    global _active
    original = nn.Module.register_parameter

    def register_parameter(self: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and not param.is_meta:
            param = nn.Parameter(torch.empty_like(param, device="meta"), requires_grad=param.requires_grad)
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


def reset_modules(model: nn.Module, wanted: set[int], seed: int) -> list[str]:
    """Call reset_parameters() of every module owning a parameter in ``wanted`` (ids); return the
    names of such modules that have none (their parameters are left as they are)."""
    missing = []
    for name, module in model.named_modules():
        own = [p for p in module.parameters(recurse=False) if id(p) in wanted]
        if not own:
            continue
        reset = getattr(module, "reset_parameters", None)
        if reset is None:
            missing.append(name or "<root>")
            continue
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed((seed * 1000003 + zlib.crc32(name.encode())) % (2 ** 62))
            with torch.no_grad():
                reset()
    return missing


def materialize_all(model: nn.Module) -> None:
    """Single process: give every meta parameter storage and initialise it (in module order)."""
    params = meta_parameters(model)
    if not params:
        return
    give_storage(params)
    ids = {id(p) for p in params}
    for name, module in model.named_modules():
        if any(id(p) in ids for p in module.parameters(recurse=False)):
            reset = getattr(module, "reset_parameters", None)
            if reset is not None:
                with torch.no_grad():
                    reset()
