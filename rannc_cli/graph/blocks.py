"""Group a captured graph's ops into atomic blocks and find structurally identical ones.

    bg = build_blocks(captured)              # target from settings.block_target (default 64)
    bg.blocks[3].name, bg.blocks[3].inputs   # 'encoder.layers.0', ['add_4', 'masked_fill', ...]
    bg.classes                               # [[0], [1, 5, 9], ...] blocks sharing one signature

Rules:
- Ops that depend only on parameters, buffers and constants (a weight transpose, ``arange``)
  are *floating*: copied into every block that consumes them, so tied weights never travel.
- Every other op is *owned* by exactly one block. Blocks are maximal runs of consecutive ops
  (in execution order) from the same nn.Module, with module paths cut at one depth for the
  whole model: the smallest depth that gives at least ``target`` blocks, so repeated layers are
  cut the same way and deduplicate.
- Tuple items (``getitem``) stay with their producer; symbolic sizes (``sym_size``) go to their
  first consumer's block and travel as Python ints.
"""

from __future__ import annotations

import functools
import hashlib
import json
import operator
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
from torch import fx

from rannc_cli.errors import RanncError
from rannc_cli.graph.capture import CapturedModel


@dataclass
class Block:
    id: int
    name: str  # module path of its ops, cut at the chosen depth ('' = root)
    module_type: str
    owned: list[str]  # node names, execution order
    floating: list[str] = field(default_factory=list)  # copied param-only nodes it needs
    params: list[str] = field(default_factory=list)  # canonical parameter/buffer/constant names
    inputs: list[str] = field(default_factory=list)  # values consumed from outside
    outputs: list[str] = field(default_factory=list)  # owned values consumed outside (or the loss)
    buffer_updates: list[tuple[str, str]] = field(default_factory=list)  # (value, buffer name)
    signature: str = ""
    cls: int = -1


@dataclass
class BlockGraph:
    captured: CapturedModel
    blocks: list[Block]
    owner: dict[str, int]  # owned node -> block id
    floating: set[str]
    classes: list[list[int]]
    depth: int
    requires_grad: set[str] = field(default_factory=set)  # values that carry gradients

    @property
    def value_producer(self) -> dict[str, int | None]:
        """Value name -> producing block (None for user inputs)."""
        out: dict[str, int | None] = {i.placeholder: None for i in self.captured.inputs}
        out.update(self.owner)
        return out


def _module_entry(node: fx.Node) -> tuple[str, str] | None:
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return None
    path, type_obj = list(stack.values())[-1]
    if not isinstance(path, str) or "nn_module_stack" in path:
        return None
    type_name = type_obj if isinstance(type_obj, str) else getattr(type_obj, "__name__", str(type_obj))
    return path, type_name.rsplit(".", 1)[-1]


def _is_symbolic(node: fx.Node) -> bool:
    val = node.meta.get("val")
    return isinstance(val, (torch.SymInt, torch.SymFloat, torch.SymBool, int, float, bool)) and \
        not isinstance(val, torch.Tensor)


def _cut(path: str, depth: int) -> str:
    return ".".join(path.split(".")[:depth]) if path else ""


def build_blocks(captured: CapturedModel, target: int | None = None) -> BlockGraph:
    """Partition the captured graph into atomic blocks (see the module docstring)."""
    if target is None:
        from rannc_cli.config import settings

        target = int(settings.get("block_target"))
    graph = captured.graph
    nodes = [n for n in graph.nodes if n.op in ("call_function", "get_attr")]
    user_inputs = {i.placeholder for i in captured.inputs}

    # 1. floating (param-only) vs owned
    depends_on_input: dict[str, bool] = {}
    for node in graph.nodes:
        if node.op == "placeholder":
            depends_on_input[node.name] = node.name in user_inputs
        elif node.op in ("call_function", "get_attr"):
            depends_on_input[node.name] = any(depends_on_input.get(a.name, False) for a in node.all_input_nodes)
    graph_outputs = {captured.loss_node, *captured.buffer_mutations}
    floating = {n.name for n in nodes if not depends_on_input[n.name] and n.name not in graph_outputs}
    owned_nodes = [n for n in nodes if n.name not in floating]

    # 2. module path of each owned op
    paths: dict[str, str] = {}
    module_types: dict[str, str] = {"": type(captured.model).__name__}
    for n in owned_nodes:
        entry = _module_entry(n)
        if entry is not None:
            module_types.setdefault(entry[0], entry[1])
    symbolic = {n.name for n in owned_nodes if _is_symbolic(n) and n.target is not operator.getitem}
    previous = ""
    for n in owned_nodes:
        if n.name in symbolic:
            continue
        if n.target is operator.getitem and n.args and isinstance(n.args[0], fx.Node) and n.args[0].name in paths:
            paths[n.name] = paths[n.args[0].name]
            continue
        entry = _module_entry(n)
        paths[n.name] = entry[0] if entry is not None else previous
        previous = paths[n.name]
    regular = [n for n in owned_nodes if n.name not in symbolic]
    if not regular:
        raise RanncError("the captured graph has no operation that depends on the model's inputs",
                         hint="forward must compute the loss from its inputs")

    # 3. depth: the smallest giving >= target runs
    max_depth = max((len(p.split(".")) for p in paths.values() if p), default=0)

    def runs_at(depth: int) -> list[list[fx.Node]]:
        runs: list[list[fx.Node]] = []
        key = None
        for n in regular:
            k = _cut(paths[n.name], depth)
            if n.target is operator.getitem and runs:
                runs[-1].append(n)
                continue
            if not runs or k != key:
                runs.append([])
                key = k
            runs[-1].append(n)
        return runs

    depth = 0
    runs = runs_at(0)
    for d in range(1, max_depth + 1):
        depth, runs = d, runs_at(d)
        if len(runs) >= target:
            break

    owner: dict[str, int] = {}
    blocks: list[Block] = []
    for i, run in enumerate(runs):
        name = _cut(paths[run[0].name], depth)
        blocks.append(Block(id=i, name=name, module_type=module_types.get(name, _nearest_type(name, module_types)),
                            owned=[n.name for n in run]))
        for n in run:
            owner[n.name] = i

    # 4. symbolic values go to their first consumer's block (consumers first: reverse order)
    order = {n.name: i for i, n in enumerate(graph.nodes)}
    for n in reversed(owned_nodes):
        if n.name not in symbolic:
            continue
        consumers = [owner[u.name] for u in n.users if u.name in owner]
        owner[n.name] = min(consumers) if consumers else len(blocks) - 1
        blocks[owner[n.name]].owned.append(n.name)
    for b in blocks:
        b.owned.sort(key=order.__getitem__)

    _wire(captured, blocks, owner, floating)
    _check_topological(blocks, owner)
    requires_grad = grad_carrying_values(captured)
    classes = _classify(captured, blocks, requires_grad)
    return BlockGraph(captured=captured, blocks=blocks, owner=owner, floating=floating, classes=classes, depth=depth,
                      requires_grad=requires_grad)


def grad_carrying_values(captured: CapturedModel) -> set[str]:
    """Floating-point values computed from trainable parameters (export's metadata does not say)."""
    carrying: set[str] = set()
    for node in captured.graph.nodes:
        val = node.meta.get("val")
        is_float = isinstance(val, torch.Tensor) and val.is_floating_point()
        if node.op == "placeholder":
            name = captured.param_names.get(node.name)
            if name is not None and captured.param_kinds[name] == "parameter" and captured.tensor_of(name).requires_grad:
                carrying.add(node.name)
        elif node.op == "call_function":
            feeds = any(a.name in carrying for a in node.all_input_nodes)
            if feeds and (is_float or isinstance(val, (tuple, list))):
                carrying.add(node.name)
    return carrying


def graph_hash(bg: BlockGraph) -> str:
    """Hash of the blocked graph's structure (block signatures and wiring), names excluded: profiles
    record it, plans carry it, and the runtime refuses a plan made for another graph."""
    producer = bg.value_producer
    parts = [(b.signature, [producer[v] for v in b.inputs]) for b in bg.blocks]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]


def _nearest_type(name: str, module_types: dict[str, str]) -> str:
    while name and name not in module_types:
        name = name.rpartition(".")[0]
    return module_types.get(name, "")


def floating_closure(nodes: Iterable[fx.Node], floating: set[str]) -> set[str]:
    """Names of the floating nodes these nodes need, transitively."""
    needed: set[str] = set()
    stack = [a for n in nodes for a in n.all_input_nodes]
    while stack:
        a = stack.pop()
        if a.name in floating and a.name not in needed:
            needed.add(a.name)
            stack.extend(a.all_input_nodes)
    return needed


def _wire(captured: CapturedModel, blocks: list[Block], owner: dict[str, int], floating: set[str]) -> None:
    """Fill each block's floating nodes, params, inputs, outputs and buffer updates."""
    graph_nodes = {n.name: n for n in captured.graph.nodes}
    order = {n.name: i for i, n in enumerate(captured.graph.nodes)}
    user_inputs = {i.placeholder for i in captured.inputs}
    for b in blocks:
        own = [graph_nodes[name] for name in b.owned]
        b.floating = sorted(floating_closure(own, floating), key=order.__getitem__)
        body = own + [graph_nodes[name] for name in b.floating]
        params: list[str] = []
        inputs: list[str] = []
        for n in sorted(body, key=lambda x: order[x.name]):
            for a in n.all_input_nodes:
                if a.name in captured.param_names:
                    if captured.param_names[a.name] not in params:
                        params.append(captured.param_names[a.name])
                elif (a.name in user_inputs or (a.name in owner and owner[a.name] != b.id)) and a.name not in inputs:
                    inputs.append(a.name)
        b.params, b.inputs = params, inputs
        b.outputs = [n.name for n in own
                     if n.name == captured.loss_node
                     or any(u.name in owner and owner[u.name] != b.id for u in n.users)]
        b.buffer_updates = [(v, buf) for v, buf in captured.buffer_mutations.items() if owner.get(v) == b.id]


def _check_topological(blocks: list[Block], owner: dict[str, int]) -> None:
    for b in blocks:
        for v in b.inputs:
            if owner.get(v, -1) >= b.id:
                raise RanncError(f"internal error: block {b.id} ({b.name}) reads {v} from a later block",
                                 hint="please report this model")


def _shape_text(val: Any, batch_symbol: Any) -> str:
    if isinstance(val, torch.Tensor):
        dims = []
        for s in val.shape:
            # str(SymInt) prints with sympy, as slow as the batch_text it would be replaced by
            dims.append(batch_text(s.node.expr, batch_symbol) if batch_symbol is not None and
                        isinstance(s, torch.SymInt) else str(s))
        return f"{str(val.dtype)}[{','.join(dims)}]{'g' if val.requires_grad else ''}"
    if isinstance(val, (tuple, list)):
        return "(" + ",".join(_shape_text(v, batch_symbol) for v in val) + ")"
    if isinstance(val, torch.SymInt) and batch_symbol is not None:
        return "sym:" + batch_text(val.node.expr, batch_symbol)
    return type(val).__name__


def _batch_placeholder():
    """The symbol that stands for the batch size in signatures."""
    import sympy

    return sympy.Symbol("B", positive=True, integer=True)


_B = _batch_placeholder()


@functools.lru_cache(maxsize=8192)
def batch_text(expr: Any, batch_symbol: Any) -> str:
    """A size expression with the batch symbol written as ``B`` (memoised: sympy's ``subs`` is slow
    and a deep model repeats the same few sizes thousands of times)."""
    return str(expr.subs(batch_symbol, _B))


def _classify(captured: CapturedModel, blocks: list[Block], requires_grad: set[str]) -> list[list[int]]:
    """Group blocks by signature. Whether each input carries a gradient is part of it: a first
    layer (input needs no gradient) costs one matmul less in backward than an identical later one."""
    graph_nodes = {n.name: n for n in captured.graph.nodes}
    sym = captured.batch_symbol
    by_signature: dict[str, int] = {}
    classes: list[list[int]] = []
    order = {n.name: i for i, n in enumerate(captured.graph.nodes)}
    for b in blocks:
        body = sorted(b.owned + b.floating, key=order.__getitem__)
        local = {name: i for i, name in enumerate(body)}
        inputs = {name: i for i, name in enumerate(b.inputs)}

        def canon(a: Any) -> Any:
            if isinstance(a, fx.Node):
                if a.name in local:
                    return ("n", local[a.name])
                if a.name in inputs:
                    return ("in", inputs[a.name])
                if a.name in captured.param_names:
                    return ("p", _shape_text(a.meta.get("val"), sym))
                return ("?", _shape_text(a.meta.get("val"), sym))
            if isinstance(a, (list, tuple)):
                return tuple(canon(x) for x in a)
            if isinstance(a, dict):
                return tuple(sorted((k, canon(v)) for k, v in a.items()))
            if isinstance(a, torch.SymInt):
                return ("sym", batch_text(a.node.expr, sym) if sym is not None else str(a))
            if isinstance(a, torch.device):
                return "device"  # the capture device: a CUDA profile and a CPU runtime capture must agree
            return repr(a)

        parts = [("inputs", tuple((_shape_text(graph_nodes[v].meta.get("val"), sym), v in requires_grad)
                                  for v in b.inputs))]
        for name in body:
            n = graph_nodes[name]
            parts.append((str(n.target), canon(n.args), canon(n.kwargs), _shape_text(n.meta.get("val"), sym)))
        parts.append(("outputs", tuple(local[o] for o in b.outputs)))
        parts.append(("buffers", tuple(local[v] for v, _ in b.buffer_updates)))
        b.signature = hashlib.sha256(repr(parts).encode()).hexdigest()[:16]
        if b.signature not in by_signature:
            by_signature[b.signature] = len(classes)
            classes.append([])
        b.cls = by_signature[b.signature]
        classes[b.cls].append(b.id)
    return classes
