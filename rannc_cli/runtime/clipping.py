"""Gradient-norm clipping over a whole pipeline + data-parallel job, as on one device.

    model = RaNNCModule(model, opt)            # distributed: registers its engine here
    loss = model(x, y); loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)   # the global norm, on every rank
    model.clip_grad_norm_(1.0)                  # the same without going through torch

Every rank holds gradients of its stage's parameters only, and every replica of a stage (every
holder of a tied parameter) holds the same all-reduced gradient. The global total norm therefore
counts each parameter once, on its owner (the lowest rank holding it): each rank sums
``norm(g) ** p`` over the gradients it owns, one all-reduce over the world adds the sums (max
for ``inf``, min for ``-inf``), and every rank scales its own gradients, replicas and tie holders
included, by the same coefficient with torch's ``clip_grads_with_norm_``.

``torch.nn.utils.clip_grad_norm_`` is made global by swapping the function its public wrapper
calls (the wrapper object stays the same), so every way a script reaches it works:
``torch.nn.utils.clip_grad_norm_``, ``nn.utils.clip_grad_norm_`` and ``from torch.nn.utils
import clip_grad_norm_`` done before RaNNCModule existed. A call whose parameters belong to no
distributed RaNNCModule runs torch's own code (an empty list counts as the latest model's: see
``engine_of``). ``clip_grad_value_`` is elementwise, so it needs
nothing: each rank clips the gradients it holds, which are the single-device ones.
"""

from __future__ import annotations

import math
import weakref
from typing import Any, Iterable

import torch
import torch.distributed as dist

_ENGINES: list["weakref.ref[Any]"] = []  # registration order
_ORIGINAL: dict[str, Any] = {}


def register(engine: Any) -> None:
    """Route clip_grad_norm_ calls on ``engine``'s parameters through ``global_clip_grad_norm_``."""
    _ENGINES[:] = [r for r in _ENGINES if r() is not None] + [weakref.ref(engine)]
    _install()


def engine_of(parameters: list[torch.Tensor]) -> Any:
    """The planned distributed engine whose model owns any of ``parameters`` (None if none).

    An empty list goes to the latest planned engine: a rank whose stage holds no gradient gets an
    empty list from ``[p for p in model.parameters() if p.grad is not None]`` and must still join
    the other ranks' all-reduce."""
    planned = [e for e in (r() for r in reversed(_ENGINES)) if e is not None and e.plan is not None]
    if not parameters:
        return planned[0] if planned else None
    ids = {id(p) for p in parameters}
    for engine in planned:
        if any(id(p) in ids for p in engine.model.parameters()):
            return engine
    return None


def _local_total(grads: list[torch.Tensor], norm_type: float, foreach: bool | None) -> float:
    """This rank's contribution: sum of norm ** p (p finite), max / min of norms (+-inf), count (p = 0)."""
    if not grads:
        return {math.inf: 0.0, -math.inf: math.inf}.get(norm_type, 0.0)
    if foreach is not False and all(g.device == grads[0].device and g.dtype == grads[0].dtype for g in grads):
        norms = [n.double() for n in torch._foreach_norm(grads, norm_type)]
    else:
        norms = [torch.linalg.vector_norm(g, norm_type).double() for g in grads]
    stacked = torch.stack([n.cpu() for n in norms])
    if norm_type == math.inf:
        return float(stacked.max())
    if norm_type == -math.inf:
        return float(stacked.min())
    if norm_type == 0:
        return float((stacked != 0).sum())
    return float(stacked.pow(norm_type).sum())


def global_total_norm(engine: Any, parameters: Iterable[torch.Tensor], norm_type: float = 2.0,
                      error_if_nonfinite: bool = False, foreach: bool | None = None) -> torch.Tensor:
    """The single-device total gradient norm of ``parameters`` (collective over the world)."""
    norm_type = float(norm_type)
    owned: list[torch.Tensor] = []
    dtype = torch.float32
    seen: set[int] = set()
    for p in parameters:
        if id(p) in seen or p.grad is None:
            continue
        seen.add(id(p))
        if len(seen) == 1:
            dtype = p.grad.dtype
        holders = engine.holders.get(id(p))
        if (holders[0] if holders else 0) == engine.rank:
            owned.append(p.grad)
    local = _local_total(owned, norm_type, foreach)
    op = {math.inf: dist.ReduceOp.MAX, -math.inf: dist.ReduceOp.MIN}.get(norm_type, dist.ReduceOp.SUM)
    total = torch.tensor([local], dtype=torch.float64, device=engine.device)
    dist.all_reduce(total, op=op)
    value = float(total[0])
    if norm_type not in (math.inf, -math.inf, 0.0):
        value = value ** (1.0 / norm_type) if value > 0 or norm_type > 0 else math.inf
    norm = torch.tensor(value, dtype=dtype, device=engine.device)
    if error_if_nonfinite and not math.isfinite(value):
        raise RuntimeError(f"The total norm of order {norm_type} for gradients from `parameters` is non-finite, "
                           "so it cannot be clipped. To disable this error and scale the gradients by the "
                           "non-finite norm anyway, set `error_if_nonfinite=False`")
    return norm


def global_clip_grad_norm_(engine: Any, parameters: Iterable[torch.Tensor], max_norm: float, norm_type: float = 2.0,
                           error_if_nonfinite: bool = False, foreach: bool | None = None) -> torch.Tensor:
    """clip_grad_norm_ with the job-wide norm: every rank scales its gradients by one coefficient."""
    params = [parameters] if isinstance(parameters, torch.Tensor) else list(parameters)
    with torch.no_grad():
        norm = global_total_norm(engine, params, norm_type, error_if_nonfinite, foreach)
        held = [p for p in params if p.grad is not None]
        if held:
            torch.nn.utils.clip_grads_with_norm_(held, max_norm, norm.to(held[0].grad.device), foreach)
    return norm


def _routed(parameters: Any, max_norm: float, norm_type: float = 2.0, error_if_nonfinite: bool = False,
            foreach: bool | None = None) -> torch.Tensor:
    params = [parameters] if isinstance(parameters, torch.Tensor) else list(parameters)
    engine = engine_of(params) if _ENGINES else None
    if engine is None:
        return _ORIGINAL["clip_grad_norm_"](params, max_norm, norm_type, error_if_nonfinite, foreach)
    return global_clip_grad_norm_(engine, params, max_norm, norm_type, error_if_nonfinite, foreach)


def _install() -> None:
    """Point torch's clip_grad_norm_ wrapper at ``_routed`` (once; falls back to rebinding names)."""
    if _ORIGINAL:
        return
    import torch.nn.utils as utils
    import torch.nn.utils.clip_grad as clip_grad

    public = clip_grad.clip_grad_norm_
    raw = getattr(public, "__wrapped__", None)
    cells = [c for c in (public.__closure__ or ()) if raw is not None and c.cell_contents is raw]
    if len(cells) == 1:  # torch's @_no_grad wrapper: swap what it calls, keep the object every alias holds
        _ORIGINAL["clip_grad_norm_"] = raw
        cells[0].cell_contents = _routed
        return
    _ORIGINAL["clip_grad_norm_"] = public

    def clip_grad_norm_(*args: Any, **kwargs: Any) -> torch.Tensor:
        with torch.no_grad():
            return _routed(*args, **kwargs)

    clip_grad.clip_grad_norm_ = clip_grad_norm_
    utils.clip_grad_norm_ = clip_grad_norm_
