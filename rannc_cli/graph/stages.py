"""Executable stage modules for any assignment of blocks to ordered stages.

    bg = build_blocks(capture(model, (x, y)))
    stages = build_stages(bg, [0, 0, 1, 1, 1, 2])     # stage of each block
    loss = run_stages(stages, bg.captured, (x, y), {})  # same loss and gradients as model(x, y)

A ``StageModule`` takes its inputs positionally in ``input_names`` order and returns a tuple in
``output_names`` order. Values may skip stages: stage 2 can read a value made by stage 0.
Stage modules hold the *same* parameter and buffer objects as the original model, so gradients
land in the model's ``.grad`` and buffer updates (BatchNorm running stats) in its buffers.
"""

from __future__ import annotations

import re
from typing import Any, Iterable, Sequence

import torch
from torch import fx, nn

from rannc_cli.errors import RanncError
from rannc_cli.graph.blocks import BlockGraph


def _attr(name: str) -> str:
    return "p_" + re.sub(r"[^0-9a-zA-Z_]", "_", name)


class StageModule(nn.Module):
    """One pipeline stage: a slice of the captured graph with explicit inputs and outputs."""

    def __init__(self, index: int, blocks: list[int], graph_module: fx.GraphModule, input_names: list[str],
                 output_names: list[str], buffer_updates: list[tuple[str, nn.Module, str]]):
        super().__init__()
        self.index = index
        self.blocks = blocks
        self.graph_module = graph_module
        self.input_names = input_names
        self.output_names = output_names
        self._buffer_updates = buffer_updates  # (buffer name, owning module, attribute)

    def forward(self, *inputs: Any) -> tuple:
        if len(inputs) != len(self.input_names):
            raise RanncError(f"stage {self.index} expects {len(self.input_names)} inputs, got {len(inputs)}")
        results = self.graph_module(*inputs)
        n_out = len(self.output_names)
        outputs, updates = tuple(results[:n_out]), results[n_out:]
        if updates:
            with torch.no_grad():
                for (_name, module, attr), value in zip(self._buffer_updates, updates):
                    getattr(module, attr).copy_(value)
        return outputs

    def place(self, device: torch.device | str) -> "StageModule":
        """Move the stage to ``device``, device constants of the graph included.

        The model is captured on the CPU, so factory calls such as ``torch.arange(n, device=x.device)``
        were recorded with ``device=cpu``; on a GPU rank they must make their tensors there."""
        device = torch.device(device)
        self.graph_module.to(device)
        if device.type == "cpu":
            return self

        def retarget(a: Any) -> Any:
            if isinstance(a, torch.device) and a.type == "cpu":
                return device
            if isinstance(a, (list, tuple)):
                return type(a)(retarget(x) for x in a)
            return a

        for node in self.graph_module.graph.nodes:
            node.args = retarget(node.args)
            node.kwargs = {k: retarget(v) for k, v in node.kwargs.items()}
        self.graph_module.recompile()
        return self

    def extra_repr(self) -> str:
        return f"index={self.index}, blocks={self.blocks}, inputs={self.input_names}, outputs={self.output_names}"


def check_assignment(bg: BlockGraph, assignment: Sequence[int]) -> int:
    """Validate a block -> stage assignment; return the number of stages."""
    if len(assignment) != len(bg.blocks):
        raise RanncError(f"the assignment names {len(assignment)} blocks, the model has {len(bg.blocks)}")
    stages = sorted(set(assignment))
    if stages != list(range(len(stages))):
        raise RanncError(f"stages must be numbered 0..S-1 without gaps, got {stages}")
    producer = bg.value_producer
    for b in bg.blocks:
        for v in b.inputs:
            p = producer[v]
            if p is not None and assignment[p] > assignment[b.id]:
                raise RanncError(
                    f"block {b.id} ({b.name or '<root>'}) in stage {assignment[b.id]} reads {v!r} from block {p} "
                    f"in the later stage {assignment[p]}", hint="stages must follow the data flow")
    return len(stages)


def build_stages(bg: BlockGraph, assignment: Sequence[int]) -> list[StageModule]:
    """One StageModule per stage (see the module docstring)."""
    n_stages = check_assignment(bg, assignment)
    captured = bg.captured
    producer = bg.value_producer
    members: list[list[int]] = [[] for _ in range(n_stages)]
    for b, s in enumerate(assignment):
        members[s].append(b)
    stage_of_value = {v: (assignment[p] if p is not None else -1) for v, p in producer.items()}

    # values each stage must emit: consumed by a later stage, or the loss
    needed_later: list[list[str]] = [[] for _ in range(n_stages)]
    for b in bg.blocks:
        for v in b.inputs:
            s_prod = stage_of_value[v]
            if 0 <= s_prod != assignment[b.id] and v not in needed_later[s_prod]:
                needed_later[s_prod].append(v)
    loss_stage = stage_of_value[captured.loss_node]
    if captured.loss_node not in needed_later[loss_stage]:
        needed_later[loss_stage].append(captured.loss_node)

    order = {n.name: i for i, n in enumerate(captured.graph.nodes)}
    stages = []
    for s, block_ids in enumerate(members):
        own = {name for b in block_ids for name in bg.blocks[b].owned}
        body = own | {name for b in block_ids for name in bg.blocks[b].floating}
        inputs: list[str] = []
        for b in block_ids:
            for v in bg.blocks[b].inputs:
                if v not in own and v not in inputs:
                    inputs.append(v)
        inputs.sort(key=order.__getitem__)
        outputs = sorted(needed_later[s], key=order.__getitem__)
        updates = [(v, buf) for b in block_ids for v, buf in bg.blocks[b].buffer_updates]
        stages.append(_make_stage(bg, s, block_ids, sorted(body, key=order.__getitem__), inputs, outputs, updates))
    return stages


def build_block_stages(bg: BlockGraph, ids: Iterable[int]) -> dict[int, StageModule]:
    """The stage modules ``build_stages(bg, range(len(bg.blocks)))`` makes for blocks ``ids``, without
    building the others (the profiler needs one block per class)."""
    captured = bg.captured
    order = {n.name: i for i, n in enumerate(captured.graph.nodes)}
    consumed = {v for b in bg.blocks for v in b.inputs}
    out = {}
    for b in ids:
        block = bg.blocks[b]
        own = set(block.owned)
        inputs = sorted(dict.fromkeys(v for v in block.inputs if v not in own), key=order.__getitem__)
        outputs = sorted({v for v in block.owned if v in consumed} | ({captured.loss_node} & own), key=order.__getitem__)
        out[b] = _make_stage(bg, b, [b], sorted(own | set(block.floating), key=order.__getitem__), inputs, outputs,
                             list(block.buffer_updates))
    return out


def _make_stage(bg: BlockGraph, index: int, block_ids: list[int], body: list[str], inputs: list[str],
                outputs: list[str], updates: list[tuple[str, str]]) -> StageModule:
    captured = bg.captured
    source = captured.program.graph_module
    nodes = captured.nodes_by_name  # one dict for all stages: building it per stage was quadratic in depth
    root = nn.Module()
    graph = fx.Graph()
    mutated = set(captured.buffer_mutations.values())
    env: dict[str, fx.Node] = {}
    for name in inputs:
        env[name] = graph.placeholder(name)
        env[name].meta = dict(nodes[name].meta)

    def lookup(n: fx.Node) -> fx.Node:
        if n.name in env:
            return env[n.name]
        canonical = captured.param_names.get(n.name)
        if canonical is None:
            raise RanncError(f"internal error: stage {index} needs {n.name!r}, which it neither computes nor receives",
                             hint="please report this model")
        attr = _attr(canonical)
        if not hasattr(root, attr):
            tensor = captured.tensor_of(canonical)
            if isinstance(tensor, nn.Parameter):
                root.register_parameter(attr, tensor)
            else:
                root.register_buffer(attr, tensor, persistent=False)
        env[n.name] = graph.get_attr(attr)
        env[n.name].meta = dict(n.meta)
        if canonical in mutated:
            # The buffer is overwritten in place after the forward; autograd may have saved the
            # value read here (batch norm's backward does), so read a private copy.
            env[n.name] = graph.call_function(torch.ops.aten.clone.default, (env[n.name],))
            env[n.name].meta = dict(n.meta)
        return env[n.name]

    for name in body:
        node = nodes[name]
        if node.op == "get_attr":  # a submodule or constant of the exported program (e.g. a HOP body)
            obj = source.get_submodule(node.target) if isinstance(_fetch(source, node.target), nn.Module) \
                else _fetch(source, node.target)
            attr = "g_" + re.sub(r"[^0-9a-zA-Z_]", "_", str(node.target))
            if isinstance(obj, nn.Module):
                root.add_module(attr, obj)
            elif isinstance(obj, torch.Tensor) and not hasattr(root, attr):
                root.register_buffer(attr, obj, persistent=False)
            else:
                setattr(root, attr, obj)
            env[name] = graph.get_attr(attr)
            env[name].meta = dict(node.meta)
            continue
        for a in node.all_input_nodes:
            lookup(a)
        env[name] = graph.node_copy(node, lambda n: env[n.name])
    buffer_modules = []
    for value, buf in updates:
        module_path, _, attr = buf.rpartition(".")
        buffer_modules.append((buf, captured.model.get_submodule(module_path), attr))
    graph.output(tuple(env[o] for o in outputs) + tuple(env[v] for v, _ in updates))
    graph.lint()
    gm = fx.GraphModule(root, graph, class_name=f"Stage{index}")
    return StageModule(index, list(block_ids), gm, inputs, outputs, buffer_modules)


def _fetch(module: nn.Module, target: str) -> Any:
    obj: Any = module
    for part in str(target).split("."):
        obj = getattr(obj, part)
    return obj


def run_stages(stages: Iterable[StageModule], captured: Any, args: tuple, kwargs: dict,
               keep: set[str] | None = None) -> Any:
    """Run stages in order in this process; return the loss (and, with ``keep``, the kept values)."""
    env: dict[str, Any] = captured.flatten_inputs(args, kwargs)
    kept: dict[str, Any] = {}
    for stage in stages:
        outs = stage(*(env[name] for name in stage.input_names))
        for name, value in zip(stage.output_names, outs):
            env[name] = value
            if keep is not None and name in keep:
                kept[name] = value
    loss = env[captured.loss_node]
    return (loss, kept) if keep is not None else loss
