"""ZeRO-1 inside a stage: a stage's replicas share the optimizer's state and its update.

    zero = ZeroSharding(engine, optimizer)   # before trim_optimizer; refuses optimizers it cannot shard
    out = zero.step(base_step, args, kwargs) # what the wrapped optimizer.step() runs

The parameters of a rank set with two or more ranks (a stage's replicas, or the holders of a tied
parameter) form, per optimizer group and dtype, one flat vector; replica k of that rank set owns
the k-th of r nearly equal slices. ``step`` copies this rank's slice of the parameters and of their
(already all-reduced) gradients into a flat shard tensor, lets the user's optimizer step the shards
(the param groups' ``params`` lists are swapped for the duration of the call, so learning rates,
weight decay and every other group setting a scheduler may have changed apply as they are), then
all-gathers the updated slices into the parameters. Only element-wise optimizers are allowed:
their update of an element depends on that element alone, so stepping slices gives the numbers
of stepping whole parameters. The optimizer's state lives with the shards (1/r of it per rank);
``state_dict`` gathers it back into the single-device format (state per parameter, full
tensors), ``load_state_dict`` takes that format and keeps each rank's slices.

Gradients are all-reduced as without ZeRO (not reduce-scattered): ``.grad`` keeps the full
single-device gradient after backward, so clipping, GradScaler's unscale and inf checks and user
code reading ``.grad`` are unchanged (see docs/runtime.md for the cost).
"""

from __future__ import annotations

import types
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from rannc_cli.errors import RanncError

ELEMENTWISE = (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW, torch.optim.RMSprop, torch.optim.Adagrad)


def check_optimizer(opt: torch.optim.Optimizer) -> None:
    """Refuse an optimizer whose update is not element by element (the exact class counts)."""
    if type(opt) not in ELEMENTWISE:
        names = ", ".join(c.__name__ for c in ELEMENTWISE)
        raise RanncError(f"zero=1 shards the optimizer state element by element, which {type(opt).__name__} does not "
                         f"allow (only {names} are sharded)",
                         hint="use one of those optimizers, or run a plan with zero: 0")


@dataclass
class Unit:
    """One flat vector of parameters (one group, one dtype, one rank set) and this rank's slice of it."""

    group: int  # index in optimizer.param_groups
    ranks: tuple[int, ...]
    process_group: Any
    params: list[torch.nn.Parameter]
    offsets: list[int]
    total: int
    chunk: int  # slice length of every replica (the last ones may own fewer real elements)
    lo: int
    hi: int
    shard: torch.Tensor
    state: dict[str, Any] = field(default_factory=dict)

    def my_slice(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        """This rank's elements [lo, hi) of the flat concatenation of ``tensors`` (one per parameter)."""
        parts = []
        for t, off in zip(tensors, self.offsets):
            a, b = max(self.lo, off), min(self.hi, off + t.numel())
            if a < b:
                parts.append(t.detach().reshape(-1)[a - off:b - off])
        if not parts:
            return torch.empty(0, dtype=self.shard.dtype, device=self.shard.device)
        return torch.cat(parts)

    def gather(self, piece: torch.Tensor) -> torch.Tensor:
        """The full flat vector from every replica's slice (collective over the rank set)."""
        padded = torch.zeros(self.chunk, dtype=piece.dtype, device=piece.device)
        padded[:piece.numel()] = piece.reshape(-1)
        full = torch.empty(self.chunk * len(self.ranks), dtype=piece.dtype, device=piece.device)
        # torch >= 2.13 names it all_gather_single (all_gather_into_tensor warns there)
        gather_into = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        gather_into(full, padded, group=self.process_group)
        return full[:self.total]

    def split(self, flat: torch.Tensor) -> list[torch.Tensor]:
        return [flat[off:off + p.numel()].view_as(p) for p, off in zip(self.params, self.offsets)]


class ZeroSharding:
    """See the module docstring."""

    def __init__(self, engine: Any, opt: torch.optim.Optimizer):
        try:
            check_optimizer(opt)
        except RanncError as exc:
            exc.silent = engine.rank != 0  # type: ignore[attr-defined]  # every rank refuses; rank 0 says it
            raise
        self.engine = engine
        self.opt = opt
        self._units: list[Unit] | None = None
        cls = type(opt)
        self._cls_state_dict = types.MethodType(cls.state_dict, opt)
        self._cls_load = types.MethodType(cls.load_state_dict, opt)
        zero = self

        def state_dict(_opt: Any) -> dict[str, Any]:
            return zero.state_dict()

        def load_state_dict(_opt: Any, sd: dict[str, Any]) -> None:
            zero.load_state_dict(sd)

        opt.state_dict = types.MethodType(state_dict, opt)  # type: ignore[method-assign]
        opt.load_state_dict = types.MethodType(load_state_dict, opt)  # type: ignore[method-assign]
        opt._rannc_zero = self  # type: ignore[attr-defined]

    # ------------------------------------------------------------------ layout
    def units(self) -> list[Unit]:
        """The flat units, made at first use from the (trimmed) param groups; the same on every rank."""
        if self._units is not None:
            return self._units
        engine, units = self.engine, []
        for gi, group in enumerate(self.opt.param_groups):
            by_key: dict[tuple, list[torch.nn.Parameter]] = {}
            for p in group["params"]:
                ranks = engine.holders.get(id(p), ())
                if p.requires_grad and len(ranks) > 1 and engine.rank in ranks:
                    by_key.setdefault((ranks, str(p.dtype)), []).append(p)
            for (ranks, _), params in sorted(by_key.items(), key=lambda kv: kv[0]):
                offsets, total = [], 0
                for p in params:
                    offsets.append(total)
                    total += p.numel()
                r, k = len(ranks), ranks.index(engine.rank)
                chunk = -(-total // r)
                lo, hi = min(total, k * chunk), min(total, (k + 1) * chunk)
                shard = torch.zeros(hi - lo, dtype=params[0].dtype, device=params[0].device)
                units.append(Unit(gi, ranks, engine.groups[ranks], params, offsets, total, chunk, lo, hi, shard))
        self._units = units
        existing = {id(p): self.opt.state.pop(p) for u in units for p in u.params if p in self.opt.state}
        if existing:  # state loaded into the optimizer before wrapping: keep this rank's slices of it
            for u in units:
                u.state = self._shard_state(u, existing)
        return units

    def _swapped(self) -> list[list[torch.Tensor]]:
        """Per group: the parameters stepped whole, then this rank's shards (the order state dicts use)."""
        units = self.units()
        sharded = {id(p) for u in units for p in u.params}
        lists = [[p for p in g["params"] if id(p) not in sharded] for g in self.opt.param_groups]
        for u in units:
            lists[u.group].append(u.shard)
        return lists

    def _swap_in(self) -> list[list[torch.Tensor]]:
        real = [g["params"] for g in self.opt.param_groups]
        for g, params in zip(self.opt.param_groups, self._swapped()):
            g["params"] = params
        for u in self.units():
            if u.state:
                self.opt.state[u.shard] = u.state
        return real

    def _swap_out(self, real: list[list[torch.Tensor]]) -> None:
        for u in self.units():
            u.state = self.opt.state.pop(u.shard, None) or {}
        for g, params in zip(self.opt.param_groups, real):
            g["params"] = params

    # ------------------------------------------------------------------ step
    def step(self, base: Any, args: tuple, kwargs: dict) -> Any:
        """Step this rank's shards with the user's optimizer, then all-gather the parameters."""
        closure = kwargs.pop("closure", None)
        if closure is None and args:
            closure, args = args[0], args[1:]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        units = self.units()
        stepped = []
        with torch.no_grad():
            for u in units:
                grads = [p.grad for p in u.params]
                if all(g is None for g in grads):  # the same on every replica: gradients are all-reduced
                    u.shard.grad = None
                    continue
                u.shard.copy_(u.my_slice(list(u.params)))
                u.shard.grad = u.my_slice([g if g is not None else torch.zeros_like(p) for g, p in zip(grads, u.params)])
                stepped.append(u)
        real = self._swap_in()
        try:
            out = base(*args, **kwargs)
        finally:
            self._swap_out(real)
        with torch.no_grad():
            for u in stepped:
                for p, value in zip(u.params, u.split(u.gather(u.shard))):
                    p.copy_(value)
                u.shard.grad = None
        return loss if out is None else out

    # ------------------------------------------------------------------ state dicts
    def _full_state(self, u: Unit) -> dict[int, dict[str, Any]]:
        """Unit ``u``'s state per parameter (index in u.params), full tensors; collective over its ranks."""
        if not u.state:
            return {}
        per: dict[int, dict[str, Any]] = {i: {} for i in range(len(u.params))}
        for key, value in u.state.items():
            if _elementwise(key, value, u.shard.shape):
                for i, part in enumerate(u.split(u.gather(value))):
                    per[i][key] = part.clone()
            else:
                for i in range(len(u.params)):
                    per[i][key] = value.clone() if isinstance(value, torch.Tensor) else value
        return per

    def state_dict(self) -> dict[str, Any]:
        """The optimizer's state dict as if it had stepped its (local) parameters whole."""
        sd = self._cls_state_dict()
        flat = [p for g in self.opt.param_groups for p in g["params"]]
        index = {id(p): i for i, p in enumerate(flat)}
        state = dict(sd["state"])
        for u in self.units():
            for i, st in self._full_state(u).items():
                state[index[id(u.params[i])]] = st
        sd["state"] = dict(sorted(state.items()))
        return sd

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        """Load a state dict in the format ``state_dict`` returns: each rank keeps its slices."""
        saved_groups = sd["param_groups"]
        groups = self.opt.param_groups
        if len(saved_groups) != len(groups) or any(len(s["params"]) != len(g["params"])
                                                   for s, g in zip(saved_groups, groups)):
            raise ValueError("loaded optimizer state dict does not match the optimizer's parameter groups")
        by_param: dict[int, dict[str, Any]] = {}
        for saved, g in zip(saved_groups, groups):
            for idx, p in zip(saved["params"], g["params"]):
                if idx in sd["state"]:
                    by_param[id(p)] = sd["state"][idx]
        lists = self._swapped()
        state: dict[int, Any] = {}
        new_groups = []
        k = 0
        for gi, (saved, params) in enumerate(zip(saved_groups, lists)):
            ids = []
            for t in params:
                unit = next((u for u in self.units() if u.shard is t), None)
                st = by_param.get(id(t)) if unit is None else self._shard_state(unit, by_param)
                if st:
                    state[k] = st
                ids.append(k)
                k += 1
            new_groups.append({**{a: b for a, b in saved.items() if a != "params"}, "params": ids})
        real = [g["params"] for g in groups]
        for g, params in zip(groups, lists):
            g["params"] = params
        try:
            self._cls_load({"state": state, "param_groups": new_groups})
        finally:
            for u in self.units():
                u.state = self.opt.state.pop(u.shard, None) or {}
            for g, params in zip(self.opt.param_groups, real):  # load_state_dict made new group dicts
                g["params"] = params

    @staticmethod
    def _shard_state(u: Unit, by_param: dict[int, dict[str, Any]]) -> dict[str, Any]:
        """This rank's slice of the per-parameter states of ``u`` (a parameter without state: zeros)."""
        states = [by_param.get(id(p)) for p in u.params]
        first = next((s for s in states if s), None)
        if first is None:
            return {}
        ref = u.params[states.index(first)]
        out: dict[str, Any] = {}
        for key, value in first.items():
            if _elementwise(key, value, ref.shape):
                tensors = [(s[key] if s and key in s else torch.zeros_like(p)).to(p.device) for s, p in zip(states, u.params)]
                out[key] = u.my_slice(tensors).clone()
            else:
                out[key] = value.clone() if isinstance(value, torch.Tensor) else value
        return out


def _elementwise(key: str, value: Any, shape: torch.Size) -> bool:
    """A state entry with one value per element (exp_avg, momentum_buffer, ...), not a counter like step."""
    return isinstance(value, torch.Tensor) and key != "step" and value.shape == shape


def optimizer_state_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes of tensors in ``opt``'s state on this rank, ZeRO shards included (for measurements)."""
    def size(state: dict[str, Any]) -> int:
        return sum(v.numel() * v.element_size() for v in state.values() if isinstance(v, torch.Tensor))

    total = sum(size(st) for st in opt.state.values())
    zero = getattr(opt, "_rannc_zero", None)
    if zero is not None:
        total += sum(size(u.state) for u in zero.units())
    return total
