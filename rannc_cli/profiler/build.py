"""Capture, block, measure (or estimate) and assemble a Profile.

    prof = profile_model(model, (x, y), {}, mode="measured")
    prof = profile_model(model, (x, y), {}, mode="estimated", device_spec="V100-SXM2-16GB")
    prof.save("rannc-profile.yaml")

Only one block per class (structurally identical blocks) is profiled. The inputs a block sees
at microbatch size m come from running the captured graph once per measured size, op by op (no
grad, values kept only for the blocks profiled), on the first m samples of the user's batch (its
samples repeated when m is larger than the batch). That pass computes only the profiled blocks
(the first of each class): every other block's outputs are its class's first block's outputs
(same shapes, dtypes and wiring, since the signature says so), so it costs one block per class
whatever the depth. Graphs with data-dependent sizes (MoE routing) run every op instead.
Estimate mode makes shape-only fake inputs instead and runs no kernel. Each cost also carries the
'zb' split of the backward, B and W, measured or estimated (profiler/split_backward.py).
"""

from __future__ import annotations

import datetime as _dt
import functools
import os
import platform
import time
from typing import Any, Callable

import torch
from torch import nn

from rannc_cli.config import settings
from rannc_cli.errors import RanncError
from rannc_cli.graph.blocks import BlockGraph, build_blocks, floating_closure, graph_hash
from rannc_cli.graph.capture import CapturedModel, capture
from rannc_cli.graph.stages import StageModule, build_block_stages
from rannc_cli.profiler import cache
from rannc_cli.profiler.format import BlockClass, BlockCost, BlockInfo, ParamInfo, Profile, ValueInfo

Progress = Callable[[str, int], Any]


def choose_microbatch_sizes(batch_size: int, requested: str | list[int] | None, dynamic: bool) -> list[int]:
    """Sizes to measure: requested ones, else up to 4 of the powers of two up to the batch (and the batch)."""
    if not dynamic:
        return [batch_size]
    if requested:
        sizes = [int(s) for s in requested.split(",")] if isinstance(requested, str) else list(requested)
        if any(s < 1 for s in sizes):
            raise RanncError(f"microbatch sizes must be positive, got {sizes}")
        return sorted(set(sizes))
    candidates = sorted({2 ** i for i in range(batch_size.bit_length()) if 2 ** i <= batch_size} | {batch_size})
    if len(candidates) <= 4:
        return candidates
    picks = {candidates[round(i * (len(candidates) - 1) / 3)] for i in range(4)}
    return sorted(picks)


def _concrete(size: Any, captured: CapturedModel, microbatch: int) -> int:
    if isinstance(size, int):
        return size
    expr = size.node.expr
    subs = tuple(sorted(((sym, microbatch if sym == captured.batch_symbol else size.node.shape_env.var_to_val.get(sym, 1))
                         for sym in expr.free_symbols), key=lambda item: str(item[0])))
    return _evaluate(expr, subs)


@functools.lru_cache(maxsize=8192)
def _evaluate(expr: Any, subs: tuple) -> int:
    """``expr`` with the symbols replaced (memoised: deep models repeat the same few sizes)."""
    return int(expr.subs(dict(subs)))


def concrete_shape(val: torch.Tensor, captured: CapturedModel, microbatch: int) -> list[int]:
    return [_concrete(s, captured, microbatch) for s in val.shape]


def slice_inputs(captured: CapturedModel, values: dict[str, Any], microbatch: int) -> dict[str, Any]:
    """The user's batch cut (or tiled) to ``microbatch`` samples along each input's batch dimension."""
    out = dict(values)
    for inp in captured.inputs:
        if inp.batch_dim is None:
            continue
        t = values[inp.placeholder]
        n = t.shape[inp.batch_dim]
        if microbatch <= n:
            out[inp.placeholder] = t.narrow(inp.batch_dim, 0, microbatch)
        else:
            reps = -(-microbatch // n)
            out[inp.placeholder] = torch.cat([t] * reps, dim=inp.batch_dim).narrow(inp.batch_dim, 0, microbatch)
    return out


def record_block_inputs(bg: BlockGraph, stages: dict[int, StageModule], values: dict[str, Any],
                        wanted: set[int], stand_in: dict[str, str] | None | str = "find") -> dict[int, list[Any]]:
    """Run the captured graph once, op by op (values freed after their last use); return the
    inputs of the ``wanted`` blocks' stage modules (detached leaves).

    When ``wanted`` holds the first block of every class and no size is data-dependent, only
    those blocks' ops (and the parameter-only ops they read) run; any other block's outputs are
    taken from its class's first block (``stand_ins``, found here unless given: a caller running
    several sizes finds them once). Otherwise (or should that pass fail) every op runs."""
    if isinstance(stand_in, str):
        stand_in = stand_ins(bg, wanted)
    if stand_in is not None:
        try:
            return _record(bg, stages, values, wanted, stand_in)
        except Exception:  # noqa: BLE001 - the full pass below computes the same inputs or raises the real error
            pass
    return _record(bg, stages, values, wanted, None)


class _NotYet(Exception):
    """A stand-in's source has not been computed yet (a value moved ahead of its block)."""


def _record(bg: BlockGraph, stages: dict[int, StageModule], values: dict[str, Any], wanted: set[int],
            stand_in: dict[str, str] | None) -> dict[int, list[Any]]:
    from torch import fx

    captured = bg.captured
    needed = {name for b in wanted for name in stages[b].input_names}
    kept: dict[str, Any] = {}
    skipped: set[str] = set()
    sources: set[str] = set()
    if stand_in is not None:
        graph_nodes = captured.nodes_by_name
        computed = [graph_nodes[n] for b in wanted for n in bg.blocks[b].owned]
        run = {n.name for n in computed} | floating_closure(computed, bg.floating)
        skipped = {n.name for n in captured.graph.nodes if n.op in ("call_function", "get_attr") and n.name not in run}
        sources = set(stand_in.values())
    source_values: dict[str, Any] = {}

    class Recorder(fx.Interpreter):
        def run_node(self, n: fx.Node) -> Any:
            if n.name in skipped:
                if n.name not in stand_in:
                    return None
                if stand_in[n.name] not in source_values:
                    raise _NotYet(n.name)
                result = source_values[stand_in[n.name]]
            elif n.op == "output" and skipped:
                return None
            else:
                result = super().run_node(n)
            if n.name in needed:
                kept[n.name] = result
            if n.name in sources:
                source_values[n.name] = result
            return result

    feed = [values[n.name] if n.name in values else captured.tensor_of(captured.param_names[n.name])
            for n in captured.graph.nodes if n.op == "placeholder"]
    with torch.no_grad():
        Recorder(captured.program.graph_module).run(*feed)
    return {b: [_leaf_like(kept[name], bg, name) for name in stages[b].input_names] for b in wanted}


def stand_ins(bg: BlockGraph, computed: set[int]) -> dict[str, str] | None:
    """Output of a block not computed -> the same output of its class's first block, when every
    class's first block is computed and the graph makes no data-dependent size; else None."""
    if any(members[0] not in computed for members in bg.classes) or _has_data_dependent_sizes(bg.captured):
        return None
    out: dict[str, str] = {}
    for b in bg.blocks:
        first = bg.blocks[bg.classes[b.cls][0]]
        if b.id not in computed:
            if len(b.outputs) != len(first.outputs):
                return None
            out.update(zip(b.outputs, first.outputs))
    return out


def _has_data_dependent_sizes(captured: CapturedModel) -> bool:
    """True when some value's size is an unbacked symbol (``nonzero``, MoE token counts)."""
    from torch.fx.experimental.symbolic_shapes import SymT, symbol_is_type

    def sizes(val: Any) -> list[Any]:
        if isinstance(val, torch.Tensor):
            return [*val.shape, *val.stride()]
        if isinstance(val, (tuple, list)):
            return [s for v in val for s in sizes(v)]
        return [val]

    for n in captured.graph.nodes:
        for size in sizes(n.meta.get("val")):
            if isinstance(size, (torch.SymInt, torch.SymFloat, torch.SymBool)) and any(
                    symbol_is_type(sym, (SymT.UNBACKED_INT, SymT.UNBACKED_FLOAT)) for sym in size.node.expr.free_symbols):
                return True
    return False


def _leaf_like(x: Any, bg: BlockGraph, name: str) -> Any:
    if not isinstance(x, torch.Tensor):
        return x
    wants_grad = name in bg.requires_grad and x.is_floating_point()
    return x.detach().clone().requires_grad_(wants_grad)


def fake_block_inputs(bg: BlockGraph, stage: StageModule, microbatch: int, fake_mode: Any) -> list[Any]:
    """Shape-only inputs of a stage at ``microbatch`` (estimate mode)."""
    captured = bg.captured
    out = []
    for name in stage.input_names:
        val = captured.node(name).meta.get("val")
        if isinstance(val, torch.Tensor):
            shape = concrete_shape(val, captured, microbatch)
            with fake_mode:
                t = torch.empty(shape, dtype=val.dtype, device=val.device)
                if name in bg.requires_grad and val.is_floating_point():
                    t.requires_grad_(True)
            out.append(t)
        elif isinstance(val, torch.SymInt):
            out.append(_concrete(val, captured, microbatch))
        else:
            inp = next((i for i in captured.inputs if i.placeholder == name), None)
            out.append(inp.constant if inp is not None else val)
    return out


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _value_info(bg: BlockGraph, name: str, producer: int | None, consumers: list[int]) -> ValueInfo:
    captured = bg.captured
    val = captured.node(name).meta.get("val")
    if not isinstance(val, torch.Tensor):
        inp = next((i for i in captured.inputs if i.placeholder == name), None)
        return ValueInfo(id=name, producer=producer, shape=[], dtype=type(val).__name__ if inp is None
                         else type(inp.constant).__name__, batch_dim=None, bytes_per_sample=0, fixed_bytes=8,
                         consumers=consumers, is_tensor=False)
    from rannc_cli.graph.capture import batch_dim_of

    itemsize = val.element_size()
    size_at = [int(torch.Size(concrete_shape(val, captured, m)).numel()) * itemsize for m in (1, 2)]
    per_sample = size_at[1] - size_at[0]
    batch_dim = batch_dim_of(captured.node(name), captured.batch_symbol, captured.batch_size)
    if captured.batch_symbol is None:
        inp = next((i for i in captured.inputs if i.placeholder == name), None)
        batch_dim = inp.batch_dim if inp is not None else None
    return ValueInfo(id=name, producer=producer, shape=concrete_shape(val, captured, captured.batch_size),
                     dtype=_dtype_name(val.dtype), batch_dim=batch_dim, bytes_per_sample=per_sample,
                     fixed_bytes=size_at[0] - per_sample, consumers=consumers, is_tensor=True)


def device_description(device: torch.device) -> dict[str, Any]:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return {"type": "cuda", "name": props.name, "memory_bytes": int(props.total_memory)}
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        memory = 0
    return {"type": "cpu", "name": name, "memory_bytes": int(memory), "threads": torch.get_num_threads()}


def _model_device(model: nn.Module, args: tuple, kwargs: dict) -> torch.device:
    for t in list(model.parameters()) + [x for x in torch.utils._pytree.tree_leaves((args, kwargs))
                                         if isinstance(x, torch.Tensor)]:
        return t.device
    return torch.device("cpu")


def profile_model(model: nn.Module, args: tuple, kwargs: dict | None = None, *, mode: str = "measured",
                  device_spec: str | None = None, microbatch_sizes: str | list[int] | None = None,
                  use_cache: bool = True, script: str | None = None,
                  progress: Progress | None = None) -> tuple[Profile, bool]:
    """Profile ``model`` on its first batch; return (profile, came_from_cache)."""
    if mode not in ("measured", "estimated"):
        raise RanncError(f"unknown profiling mode {mode!r}", hint="use measured or estimated")
    kwargs = dict(kwargs or {})
    note = progress or (lambda _msg, _n: None)
    warmup, repeats = int(settings.get("profile_warmup")), int(settings.get("profile_repeats"))
    requested_sizes = microbatch_sizes or settings.get("profile_microbatch_sizes")
    spec_name = (device_spec or settings.get("device_spec")) if mode == "estimated" else None
    quick_key = cache.model_key(model, args, kwargs, mode=mode, spec=spec_name, sizes=str(requested_sizes),
                                repeats=[warmup, repeats], device=str(_model_device(model, args, kwargs)))
    if use_cache:
        hit = cache.lookup_by_model(quick_key)
        if hit is not None:
            note("profile found in cache", 0)
            return hit, True
    deferred = any(t.device.type == "meta" for t in list(model.parameters()) + list(model.buffers()))
    if deferred:
        if mode != "estimated":
            raise RanncError("the model's parameters are on the meta device (deferred initialisation), so its "
                             "blocks cannot be timed", hint="profile it with --estimate (shapes only)")
        # shapes are all capture needs: the batch goes to the meta device with the model
        args, kwargs = torch.utils._pytree.tree_map(
            lambda t: t.to("meta") if isinstance(t, torch.Tensor) else t, (tuple(args), kwargs))
    note("capturing the model", 0)
    started = time.perf_counter()
    captured = capture(model, args, kwargs)
    bg = build_blocks(captured)
    device = _model_device(model, args, kwargs)
    spec = None
    if mode == "estimated":
        from rannc_cli.profiler.estimate import load_device_spec

        spec = load_device_spec(device_spec or settings.get("device_spec") or
                                ("H100-SXM5-80GB" if device.type == "cuda" else "CPU-generic"))
    sizes = choose_microbatch_sizes(captured.batch_size, requested_sizes, captured.dynamic_batch)
    inputs_desc = [
        {"path": i.path, "kind": "tensor",
         "shape": concrete_shape(captured.node(i.placeholder).meta["val"], captured, captured.batch_size),
         "dtype": _dtype_name(captured.node(i.placeholder).meta["val"].dtype), "batch_dim": i.batch_dim}
        if i.is_tensor else {"path": i.path, "kind": "constant", "value": i.constant}
        for i in captured.inputs]
    ghash = graph_hash(bg)
    devinfo = device_description(device) if mode == "measured" else \
        {"type": "cpu" if spec.name.startswith("CPU") else "cuda", "name": spec.name, "memory_bytes": spec.memory_bytes}
    key = cache.profile_key(graph_hash=ghash, inputs=inputs_desc, device=devinfo.get("name"), device_type=device.type,
                            mode=mode, spec=spec.to_dict() if spec else None, sizes=sizes,
                            repeats=None if spec else [warmup, repeats], training=captured.training)
    if use_cache:
        hit = cache.lookup(key)
        if hit is not None:
            cache.store(hit, quick_key)
            note("profile found in cache", 0)
            return hit, True

    capture_seconds = time.perf_counter() - started
    started = time.perf_counter()
    representatives = {members[0]: cls for cls, members in enumerate(bg.classes)}
    stages = build_block_stages(bg, representatives)  # one block per class: cost independent of depth
    costs: dict[int, list[BlockCost]] = {cls: [] for cls in range(len(bg.classes))}
    saved_buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    rng_state = torch.get_rng_state()
    try:
        if mode == "measured":
            from rannc_cli.profiler.measure import measure_block
            from rannc_cli.profiler.split_backward import with_measured_split

            full = captured.flatten_inputs(tuple(args), kwargs)
            budget = float(settings.get("profile_budget_seconds"))
            stand_in = stand_ins(bg, set(representatives))
            for m in sizes:
                # Block inputs at each size come from running the model on m samples: values that
                # index the whole microbatch (MoE routing permutations, per-expert token counts)
                # are only right when computed at that size, never when tiled from another.
                note(f"running {'one block per class' if stand_in is not None else 'the model'} op by op at microbatch {m}", 0)
                recorded = record_block_inputs(bg, stages, slice_inputs(captured, full, m), set(representatives),
                                               stand_in)
                for b, cls in representatives.items():
                    note(f"measuring block {b} ({bg.blocks[b].name or '<root>'}) at microbatch {m}", 1)
                    cost = measure_block(stages[b], recorded[b], m, warmup, repeats, budget)
                    costs[cls].append(with_measured_split(cost, stages[b], recorded[b], warmup, repeats, budget))
                del recorded
        else:
            from torch._subclasses.fake_tensor import FakeTensorMode

            from rannc_cli.profiler.estimate import estimate_block
            from rannc_cli.profiler.split_backward import with_estimated_split

            for m in sizes:
                for b, cls in representatives.items():
                    note(f"estimating block {b} ({bg.blocks[b].name or '<root>'}) at microbatch {m}", 1)
                    fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
                    fake = fake_block_inputs(bg, stages[b], m, fake_mode)
                    cost = estimate_block(stages[b], fake, m, spec, fake_mode)
                    costs[cls].append(with_estimated_split(cost, stages[b], fake, spec, fake_mode))
    finally:
        with torch.no_grad():
            for name, value in saved_buffers.items():
                model.get_buffer(name).copy_(value)
        torch.set_rng_state(rng_state)

    prof = _assemble(bg, costs, sizes, inputs_desc, ghash, devinfo, mode, spec, warmup, repeats, script)
    prof.model["capture_seconds"] = round(capture_seconds, 3)
    prof.device["profiling_seconds"] = round(time.perf_counter() - started, 3)
    prof.key = key
    if use_cache:
        cache.store(prof, quick_key)
    return prof, False


def _assemble(bg: BlockGraph, costs: dict[int, list[BlockCost]], sizes: list[int], inputs_desc: list[dict],
              ghash: str, devinfo: dict, mode: str, spec: Any, warmup: int, repeats: int,
              script: str | None) -> Profile:
    captured = bg.captured
    producer = bg.value_producer
    consumers: dict[str, list[int]] = {}
    for b in bg.blocks:
        for v in b.inputs:
            consumers.setdefault(v, []).append(b.id)
    value_names = [i.placeholder for i in captured.inputs if i.placeholder in consumers] + \
        [v for b in bg.blocks for v in b.outputs]
    values = {v: _value_info(bg, v, producer[v], consumers.get(v, [])) for v in dict.fromkeys(value_names)}
    readers: dict[str, list[int]] = {}
    for b in bg.blocks:
        for p in b.params:
            readers.setdefault(p, []).append(b.id)
    parameters = {}
    for name, kind in captured.param_kinds.items():
        t = captured.tensor_of(name)
        parameters[name] = ParamInfo(name=name, shape=list(t.shape), dtype=_dtype_name(t.dtype),
                                     bytes=int(t.numel() * t.element_size()), kind=kind if kind != "constant" else "buffer",
                                     trainable=bool(kind == "parameter" and t.requires_grad),
                                     blocks=readers.get(name, []))
    blocks = [BlockInfo(id=b.id, name=b.name, module_type=b.module_type, cls=b.cls, ops=len(b.owned),
                        params=list(b.params), inputs=list(b.inputs), outputs=list(b.outputs)) for b in bg.blocks]
    classes = [BlockClass(id=c, signature=bg.blocks[members[0]].signature, blocks=list(members),
                          costs=sorted(costs[c], key=lambda x: x.microbatch)) for c, members in enumerate(bg.classes)]
    device = dict(devinfo, mode=mode)
    if spec is not None:
        device["spec"] = spec.to_dict()
    else:
        device.update(warmup=warmup, repeats=repeats)
    model_info = {
        "name": type(captured.model).__name__,
        "script": script or "",
        "graph_hash": ghash,
        "batch_size": captured.batch_size,
        "dynamic_batch": captured.dynamic_batch,
        "training": captured.training,
        "inputs": inputs_desc,
        "ops": sum(1 for n in captured.graph.nodes if n.op == "call_function"),
        "block_depth": bg.depth,
        "aliases": {k: v for k, v in captured.aliases.items()},
        "torch_version": str(torch.__version__),
    }
    return Profile(model=model_info, device=device, microbatch_sizes=list(sizes), blocks=blocks, classes=classes,
                   values=values, parameters=parameters, loss_value=captured.loss_node,
                   created=_dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"))
