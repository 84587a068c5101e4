"""State of a distributed model: full single-device state dicts and sharded per-rank checkpoints.

    sd = full_state_dict(engine)              # rank 0: every key of model.state_dict(); others: their own
    load_full_state_dict(engine, sd)          # every rank takes what it holds
    save_shards(engine, "ckpt/")              # ckpt/plan.yaml + ckpt/rank-<r>.pt, one file per rank
    load_shards(engine, "ckpt/")              # same plan and world size: exact resume

A state key's owner is the lowest rank holding its tensor (tied parameters: any holder; a
parameter no stage uses stays with every rank and is owned by rank 0). The user's optimizer is
trimmed to this rank's parameters; its ``state_dict``/``load_state_dict`` are wrapped so that they
speak the single-device format (parameter indices of the original optimizer) on rank 0.
"""

from __future__ import annotations

import types
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from rannc_cli.errors import RanncError
from rannc_cli.fileio import atomic_path


def plan_key(plan: Any) -> str:
    """A plan's identity (boundaries, replicas, devices, schedule, microbatches, checkpointing, chunks) as text."""
    schedule, microbatches, stages = plan.key()[:3]
    key = (schedule, int(microbatches), tuple((int(a), int(b), int(r), tuple(tuple(int(x) for x in d) for d in devs),
                                               bool(c)) for a, b, r, devs, c in stages))
    # zero and allreduce_overlap leave the shards' format as it is (single-device optimizer state):
    # not part of the key; interleaving changes which rank holds which stage
    v = int(getattr(plan, "virtual_stages", 1))
    return repr(key if v == 1 else key + (v,))


def _owner(engine: Any, tensor: torch.Tensor) -> int:
    ranks = engine.holders.get(id(tensor))
    return ranks[0] if ranks else 0


def full_state_dict(engine: Any) -> dict[str, torch.Tensor]:
    """The model's single-device state dict on rank 0 (its own entries on other ranks); collective."""
    live = engine.model.state_dict(keep_vars=True)
    mine = {k: v.detach().cpu().clone() for k, v in live.items()
            if isinstance(v, torch.Tensor) and _owner(engine, v) == engine.rank}
    gathered: list[Any] = [None] * engine.world if engine.rank == 0 else None  # type: ignore[assignment]
    dist.gather_object(mine, gathered, dst=0)
    if engine.rank != 0:
        return mine
    merged: dict[str, torch.Tensor] = {}
    for part in gathered:
        merged.update(part)
    out = engine.model.state_dict()  # keeps the key order and _metadata
    by_object: dict[int, torch.Tensor] = {}
    for k, v in live.items():
        if k in merged:
            by_object.setdefault(id(v), merged[k])
    for k, v in live.items():
        out[k] = by_object.get(id(v), merged.get(k, v))
    return out


def load_full_state_dict(engine: Any, state: dict[str, Any], strict: bool = True) -> Any:
    """Load a single-device state dict: each rank copies the entries it holds."""
    live = engine.model.state_dict(keep_vars=True)
    missing = [k for k in live if k not in state]
    unexpected = [k for k in state if k not in live]
    if strict and (missing or unexpected):
        raise RuntimeError(f"Error(s) in loading state_dict: missing keys {missing[:5]}, unexpected keys "
                           f"{unexpected[:5]}")
    with torch.no_grad():
        for k, v in live.items():
            if k not in state or not isinstance(v, torch.Tensor):
                continue
            if id(v) in engine.freed:
                continue
            src = state[k]
            if tuple(src.shape) != tuple(v.shape):
                raise RuntimeError(f"size mismatch for {k}: checkpoint {tuple(src.shape)}, model {tuple(v.shape)}")
            v.copy_(src.to(v.device))
    return torch.nn.modules.module._IncompatibleKeys(missing, unexpected)


# ---------------------------------------------------------------------------- optimizer
def trim_optimizer(engine: Any, opt: torch.optim.Optimizer) -> None:
    """Keep only this rank's parameters in ``opt`` and make its state dicts single-device shaped."""
    local = {id(p) for p in engine.local}
    original = [list(g["params"]) for g in opt.param_groups]
    for g in opt.param_groups:
        g["params"] = [p for p in g["params"] if id(p) in local]
    for p in list(opt.state):
        if id(p) not in local:
            del opt.state[p]
    # original flat index of every parameter, as a single-device optimizer numbers them
    index = {}
    i = 0
    for params in original:
        for p in params:
            index.setdefault(id(p), i)
            i += 1
    owner = {id(p): _owner(engine, p) for params in original for p in params}
    base_state_dict, base_load = opt.state_dict, opt.load_state_dict

    def local_by_index() -> dict[int, Any]:
        sd = base_state_dict()
        flat = [p for g in opt.param_groups for p in g["params"]]
        return {index[id(flat[k])]: v for k, v in sd["state"].items()
                if id(flat[k]) in index and owner[id(flat[k])] == engine.rank}

    def state_dict(self: Any) -> dict[str, Any]:
        mine = {k: _to_cpu(v) for k, v in local_by_index().items()}
        gathered: list[Any] = [None] * engine.world if engine.rank == 0 else None  # type: ignore[assignment]
        dist.gather_object(mine, gathered, dst=0)
        state: dict[int, Any] = {}
        if engine.rank == 0:
            for part in gathered:
                state.update(part)
        else:
            state = mine
        groups = []
        n = 0
        for g, params in zip(opt.param_groups, original):
            item = {k: v for k, v in g.items() if k != "params"}
            item["params"] = list(range(n, n + len(params)))
            n += len(params)
            groups.append(item)
        return {"state": dict(sorted(state.items())), "param_groups": groups}

    def load_state_dict(self: Any, sd: dict[str, Any]) -> None:
        saved_groups = sd["param_groups"]
        if len(saved_groups) != len(original) or any(len(s["params"]) != len(o)
                                                     for s, o in zip(saved_groups, original)):
            raise ValueError("loaded optimizer state dict does not match the optimizer's parameter groups")
        state, groups, k = {}, [], 0
        for saved, params, live in zip(saved_groups, original, opt.param_groups):
            ids = []
            for orig_idx, p in zip(saved["params"], params):
                if id(p) in local:
                    if orig_idx in sd["state"]:
                        state[k] = sd["state"][orig_idx]
                    ids.append(k)
                    k += 1
            if any(q is engine.placeholder for q in live["params"]):
                ids.append(k)
                k += 1
            groups.append({**{a: b for a, b in saved.items() if a != "params"}, "params": ids})
        base_load({"state": state, "param_groups": groups})

    opt.state_dict = types.MethodType(state_dict, opt)  # type: ignore[method-assign]
    opt.load_state_dict = types.MethodType(load_state_dict, opt)  # type: ignore[method-assign]
    def groups_by_index() -> list[dict[str, Any]]:
        out, n = [], 0
        for g, params in zip(opt.param_groups, original):
            out.append({**{k: v for k, v in g.items() if k != "params"}, "params": list(range(n, n + len(params)))})
            n += len(params)
        return out

    opt._rannc_local_state = local_by_index  # type: ignore[attr-defined]
    opt._rannc_groups = groups_by_index  # type: ignore[attr-defined]
    opt._rannc_base = (base_state_dict, base_load)  # type: ignore[attr-defined]


def _to_cpu(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().clone()
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    return value


# ---------------------------------------------------------------------------- sharded checkpoints
def _save_atomic(obj: Any, path: Path) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def save_shards(engine: Any, directory: str | Path) -> Path:
    """Every rank writes its own parameters, buffers, optimizer state and counters; rank 0 the plan."""
    from rannc_cli.planner.planfile import save_plan

    directory = Path(directory)
    if engine.plan is None:
        raise RanncError("save_checkpoint was called before the first forward", hint="train at least one step first")
    local = {id(t) for t in engine.local}
    live = engine.model.state_dict(keep_vars=True)
    tensors = {k: v.detach().cpu().clone() for k, v in live.items()
               if isinstance(v, torch.Tensor) and (id(v) in local or engine.rank in engine.holders.get(id(v), ()))}
    shard: dict[str, Any] = {"format": "rannc-shard", "rank": engine.rank, "world_size": engine.world,
                             "plan_key": plan_key(engine.plan), "tensors": tensors, "step": engine.step,
                             "seed_scale": engine.seed_scale, "scaled": engine.scaled, "rng_base": engine.rng_base,
                             "losses": list(engine.losses)}
    opt = engine.optimizer
    if opt is not None and hasattr(opt, "_rannc_base"):
        shard["optimizer"] = _to_cpu(opt._rannc_base[0]())
        # the same state in the single-device numbering, for loading into another plan
        shard["optimizer_by_index"] = _to_cpu(opt._rannc_local_state())
        shard["optimizer_groups"] = opt._rannc_groups()
    for stale in directory.glob(f".rank-{engine.rank}.pt.*.tmp"):  # left by a save that was killed
        stale.unlink(missing_ok=True)
    if engine.rank == 0:
        save_plan(engine.plan, directory / "plan.yaml")
    _save_atomic(shard, directory / f"rank-{engine.rank}.pt")
    dist.barrier()
    return directory


def read_shard(path: Path) -> dict[str, Any]:
    """torch.load of one shard; a truncated or corrupt file is one RanncError line."""
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - torch raises RuntimeError, EOFError, UnpicklingError, ...
        text = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
        raise RanncError(f"checkpoint shard {path} is truncated or corrupt ({text})",
                         hint="restore the checkpoint folder, or start without it") from None


def load_shards(engine: Any, directory: str | Path) -> None:
    """Load this rank's shard; the plan and world size must be those it was saved with."""
    directory = Path(directory)
    path = directory / f"rank-{engine.rank}.pt"
    if not path.is_file():
        raise RanncError(f"checkpoint {directory} has no shard for rank {engine.rank}",
                         hint="resume with as many processes as the checkpoint was saved with")
    shard = read_shard(path)
    if shard.get("format") != "rannc-shard" or shard.get("world_size") != engine.world:
        raise RanncError(f"{path} was saved by {shard.get('world_size')} processes, this job has {engine.world}",
                         hint="resume with the same number of processes, or load a full state_dict instead")
    if shard.get("plan_key") != plan_key(engine.plan):
        raise RanncError(f"{path} was saved with another plan", hint="resume with the plan in the checkpoint folder")
    live = engine.model.state_dict(keep_vars=True)
    with torch.no_grad():
        for k, v in shard["tensors"].items():
            live[k].copy_(v.to(live[k].device))
    _counters(engine, shard)
    opt = engine.optimizer
    if opt is not None and "optimizer" in shard and hasattr(opt, "_rannc_base"):
        opt._rannc_base[1](shard["optimizer"])
    dist.barrier()


def _counters(engine: Any, shard: dict[str, Any]) -> None:
    engine.step = int(shard["step"])
    engine.seed_scale = float(shard["seed_scale"])
    engine.scaled = bool(shard["scaled"])
    engine.rng_base = int(shard["rng_base"])
    engine.losses = [float(x) for x in shard.get("losses", [])]
    for mode in engine.modes.values():
        mode.executor.rng_base = engine.rng_base


def load_gathered(engine: Any, directory: str | Path) -> None:
    """Load a sharded checkpoint saved with another plan or world size: every rank assembles the full
    single-device state from all shards (one file at a time) and keeps what its new stage holds."""
    directory = Path(directory)
    paths = sorted(directory.glob("rank-*.pt"), key=lambda p: int(p.stem.split("-")[1]))
    if not paths:
        raise RanncError(f"checkpoint {directory} has no rank-*.pt shards")
    model_state: dict[str, torch.Tensor] = {}
    opt_state: dict[int, Any] = {}
    groups = None
    first: dict[str, Any] | None = None
    for path in paths:
        shard = read_shard(path)
        if shard.get("format") != "rannc-shard":
            raise RanncError(f"{path} is not a rannc checkpoint shard")
        first = first or shard
        for k, v in shard["tensors"].items():
            model_state.setdefault(k, v)
        opt_state.update(shard.get("optimizer_by_index", {}))
        groups = groups or shard.get("optimizer_groups")
        del shard
    assert first is not None
    if len(paths) != int(first.get("world_size", len(paths))):
        raise RanncError(f"checkpoint {directory} has {len(paths)} shards but was saved by {first.get('world_size')} "
                         "processes", hint="the checkpoint is incomplete; restore it or start afresh")
    load_full_state_dict(engine, model_state, strict=False)
    opt = engine.optimizer
    if opt is not None and groups is not None and hasattr(opt, "_rannc_base"):
        opt.load_state_dict({"state": opt_state, "param_groups": groups})
    _counters(engine, first)
    dist.barrier()
