"""Export a model whose layers repeat by tracing one layer per run and copying its graph.

    program = export_reusing_layers(model, args, kwargs, dynamic_shapes)   # or raises NotReusable

``torch.export`` costs about the same per op however often a layer repeats, so a 48-layer stack
costs twelve times a 4-layer one. Here each run of structurally identical sibling modules
(``rannc_cli.graph.repeats``) is traced once: its first member, the *template*, runs for real
between marker ops, every other member becomes one stub node (``rannc_cli.graph.layer_markers``).
The stitched graph then replaces each stub by a copy of the template's ops, reading the stub's
inputs and the member's own parameters and buffers, with ``nn_module_stack`` paths moved to the
member, in the stub's place. Symbolic sizes (``sym_size``, ``2*s0``) stay shared, as the whole
model's export shares them. The result is the graph exporting the whole model gives (same ops in
the same order, same wiring, same metadata that blocks read); only node names differ.

Preconditions, each checked (``NotReusable`` says which failed; capture then exports the whole
model): members are distinct modules without hooks; each is called exactly once, after the
template, with the template's argument structure, constants, shapes, strides and dtypes; the
template's graph mutates nothing in place, lifts no constants, reads no submodule (higher-order
ops) and makes no data-dependent sizes; every tensor it reads is an input, its own parameter or
buffer, or a value the parent computed before the run.
"""

from __future__ import annotations

import operator
import re
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch import fx, nn
from torch.export import ExportedProgram
from torch.export.graph_signature import ExportGraphSignature, InputKind, InputSpec, OutputSpec, TensorArgument

from rannc_cli.graph.capture import relax_graph_views
from rannc_cli.graph.layer_markers import ENTER, EXIT, STUB, NotReusable, marked_run
from rannc_cli.graph.repeats import Run, find_runs

_SYMBOLIC = (torch.SymInt, torch.SymFloat, torch.SymBool, int, float, bool)


def export_reusing_layers(model: nn.Module, args: tuple, kwargs: dict, dynamic_shapes: Any) -> ExportedProgram:
    """Export ``model`` (non-strict) tracing each run of identical layers once (module docstring).
    In-place ops are functionalised as capture does: decomposed with an empty table when any remain."""
    from rannc_cli.graph.capture import has_mutations

    runs = find_runs(model)
    if not runs:
        raise NotReusable("no run of structurally identical sibling modules")
    with ExitStack() as stack:
        records = [stack.enter_context(marked_run(model.get_submodule(r.members[0]), [
            (model.get_submodule(m.rpartition(".")[0]), m.rpartition(".")[2]) for m in r.members[1:]], i))
            for i, r in enumerate(runs)]
        program = torch.export.export(model, args, kwargs, dynamic_shapes=dynamic_shapes, strict=False)
        for i, (r, rec) in enumerate(zip(runs, records)):
            if rec.calls != 1 or sorted(rec.stub_calls) != list(range(1, len(r.members))):
                raise NotReusable(f"the members of {r.container or '<root>'} are not each called once")
        for i, r in enumerate(runs):
            if any(_is_mutation(n) for n in _template_region(program.graph, i, r).body):
                raise NotReusable(f"the template {r.members[0]} modifies a tensor in place")
        if has_mutations(program):
            program = decompose_collapsing_stubs(program, len(runs))
    return stitch(program, model, runs)


@dataclass
class _Chain:
    """A run's ghost stubs that only feed one another: left out of the decomposition but the first."""

    run: int
    members: int  # number of stubs (members 1..members)
    chain: dict[int, int]  # stub input position -> output index of the previous stub it reads
    last_outputs: list[int]  # output indices of the last stub the parent reads


def _stub_outputs(stub_node: fx.Node) -> dict[int, fx.Node] | None:
    outs: dict[int, fx.Node] = {}
    for u in stub_node.users:
        if u.target is not operator.getitem or not isinstance(u.args[1], int) or u.args[1] in outs:
            return None
        outs[u.args[1]] = u
    return outs


def _collapse_chain(graph: fx.Graph, run: int) -> _Chain | None:
    """Remove stubs 2.. of a run from ``graph`` when they form a pure chain (each stub's outputs read
    only by the next stub, its other inputs those of stub 1, nothing else between them), rewiring the
    last stub's readers to stub 1; None (graph untouched) otherwise."""
    nodes = list(graph.nodes)
    stubs = [n for n in nodes if n.target is STUB and n.args[1] == run]
    if len(stubs) < 2 or [s.args[2] for s in stubs] != list(range(1, len(stubs) + 1)):
        return None
    outs = [_stub_outputs(s) for s in stubs]
    if any(o is None for o in outs):
        return None
    position = {n: i for i, n in enumerate(nodes)}
    allowed = set(stubs[1:]) | {g for o in outs[:-1] for g in o.values()}  # type: ignore[union-attr]
    if any(n not in allowed for n in nodes[position[stubs[0]] + 1 + len(outs[0]):position[stubs[-1]]]) or \
            any(position[g] != position[stubs[0]] + 1 + i for i, g in enumerate(sorted(outs[0].values(), key=position.get))):
        return None
    first_inputs = list(stubs[0].args[0])
    chain: dict[int, int] | None = None
    for k in range(1, len(stubs)):
        previous = {g: j for j, g in outs[k - 1].items()}  # type: ignore[union-attr]
        inputs = list(stubs[k].args[0])
        if len(inputs) != len(first_inputs):
            return None
        mine = {i: previous[x] for i, x in enumerate(inputs) if x in previous}
        if any(x is not first_inputs[i] for i, x in enumerate(inputs) if i not in mine):
            return None
        if chain is None:
            chain = mine
        if mine != chain or any(set(g.users) != {stubs[k]} for g in outs[k - 1].values()):  # type: ignore[union-attr]
            return None
    last = outs[-1]
    if any(u.op == "output" for g in last.values() for u in g.users):  # type: ignore[union-attr]
        return None
    assert chain is not None
    first = outs[0]
    anchor = max([stubs[0], *first.values()], key=position.get)  # type: ignore[union-attr]
    for j, g in sorted(last.items()):  # type: ignore[union-attr]
        if j not in first:  # type: ignore[operator]
            with graph.inserting_after(anchor):
                first[j] = anchor = graph.call_function(operator.getitem, (stubs[0], j))  # type: ignore[index]
            anchor.meta = dict(g.meta)
    removed = [n for n in nodes[position[stubs[1]]:position[stubs[-1]] + 1]] + \
        sorted(last.values(), key=position.get)  # type: ignore[union-attr]
    for j, g in last.items():  # type: ignore[union-attr]
        g.replace_all_uses_with(first[j])  # type: ignore[index]
    for n in reversed(removed):
        graph.erase_node(n)
    return _Chain(run=run, members=len(stubs), chain=chain, last_outputs=sorted(last))  # type: ignore[arg-type]


def _expand_chain(graph: fx.Graph, c: _Chain) -> None:
    """Put back the stubs ``_collapse_chain`` removed, after stub 1 of the decomposed graph."""
    first = next(n for n in graph.nodes if n.target is STUB and n.args[1] == c.run)
    outs = _stub_outputs(first)
    if outs is None or first.args[2] != 1:
        raise NotReusable("the decomposed graph changed a stub")
    readers = {j: list(g.users) for j, g in outs.items()}
    position = {n: i for i, n in enumerate(graph.nodes)}
    anchor = max([first, *outs.values()], key=position.get)
    values = first.meta.get("val")

    def getitem(of: fx.Node, j: int) -> fx.Node:
        nonlocal anchor
        with graph.inserting_after(anchor):
            anchor = graph.call_function(operator.getitem, (of, j))
        anchor.meta = dict(outs[j].meta) if j in outs else {"val": values[j]} if values is not None else {}
        return anchor

    previous, previous_outs = first, dict(outs)
    for j in sorted(set(c.chain.values()) - set(previous_outs)):
        previous_outs[j] = getitem(first, j)
    for k in range(2, c.members + 1):
        inputs = [previous_outs[c.chain[i]] if i in c.chain else x for i, x in enumerate(first.args[0])]
        with graph.inserting_after(anchor):
            anchor = graph.call_function(STUB, (inputs, c.run, k))
        anchor.meta = dict(first.meta)
        previous = anchor
        wanted = c.last_outputs if k == c.members else sorted(set(c.chain.values()))
        previous_outs = {j: getitem(previous, j) for j in wanted}
    for j, users in readers.items():
        for u in users:
            u.replace_input_with(outs[j], previous_outs[j])


def decompose_collapsing_stubs(program: ExportedProgram, runs: int) -> ExportedProgram:
    """``program.run_decompositions({})`` (functionalisation) with each run's ghost stubs after the
    first left out of the retrace and put back after it: every stub costs as much to retrace as a
    real op, so on a deep stack most of the decomposition was spent on stubs. The stubs only name
    where each member's copy goes (``stitch`` replaces them), so the result is the same."""
    chains = [c for c in (_collapse_chain(program.graph, r) for r in range(runs)) if c is not None]
    if chains:
        program.graph.lint()
        program.graph_module.recompile()
    decomposed = program.run_decompositions({})
    for c in chains:
        _expand_chain(decomposed.graph, c)
    return decomposed


def _is_mutation(node: fx.Node) -> bool:
    return node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload) and \
        node.target._schema.is_mutable


@dataclass
class _Region:
    enters: dict[int, fx.Node]  # tensor leaf index -> enter marker
    exits: dict[int, fx.Node]  # tensor leaf index -> exit marker
    body: list[fx.Node]  # the template's ops between the markers, graph order


def _template_region(graph: fx.Graph, run: int, r: Run) -> _Region:
    nodes = list(graph.nodes)
    position = {n: i for i, n in enumerate(nodes)}
    enters = {n.args[2]: n for n in nodes if n.target is ENTER and n.args[1] == run}
    exits = {n.args[2]: n for n in nodes if n.target is EXIT and n.args[1] == run}
    if not enters or not exits:
        raise NotReusable(f"the template {r.members[0]} has no tensor input or no tensor output")
    first, last = min(position[n] for n in enters.values()), max(position[n] for n in exits.values())
    if max(position[n] for n in enters.values()) > min(position[n] for n in exits.values()):
        raise NotReusable(f"the markers of {r.members[0]} are out of order")
    body = [n for n in nodes[first:last + 1] if n.target not in (ENTER, EXIT)]
    return _Region(enters, exits, body)


def _input_symbols(graph: fx.Graph) -> set:
    symbols: set = set()
    for n in graph.nodes:
        val = n.meta.get("val")
        if n.op == "placeholder" and isinstance(val, torch.Tensor):
            for s in (*val.shape, *val.stride()):
                if isinstance(s, torch.SymInt):
                    symbols |= s.node.expr.free_symbols
    return symbols


def _is_symbolic(node: fx.Node) -> bool:
    val = node.meta.get("val")
    return isinstance(val, _SYMBOLIC) and not isinstance(val, torch.Tensor)


def _free_symbols(val: Any) -> set:
    out: set = set()
    if isinstance(val, torch.Tensor):
        for s in (*val.shape, *val.stride()):
            if isinstance(s, torch.SymInt):
                out |= s.node.expr.free_symbols
    elif isinstance(val, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        out |= val.node.expr.free_symbols
    elif isinstance(val, (tuple, list)):
        for v in val:
            out |= _free_symbols(v)
    return out


def _within(path: str, prefix: str) -> bool:
    return path == prefix or path.startswith(prefix + ".")


def _check_body(region: _Region, r: Run, constants: set[str], symbols: set) -> set[fx.Node]:
    """Validate the template's ops; return the symbolic ones (shared, never copied)."""
    template = r.members[0]
    shared: set[fx.Node] = set()
    for n in region.body:
        if n.op != "call_function":
            raise NotReusable(f"the template {template} reads a submodule or constant ({n.op} {n.target})")
        if not _free_symbols(n.meta.get("val")) <= symbols:
            raise NotReusable(f"the template {template} makes a data-dependent size ({n.name})")
        if _is_symbolic(n):
            shared.add(n)
            continue
        stack = n.meta.get("nn_module_stack") or {}
        if not any(_within(path, template) for path, _ in stack.values() if isinstance(path, str)):
            raise NotReusable(f"an op of {template}'s call is not in {template} ({n.name})")
        for a in n.all_input_nodes:
            if a.name in constants:
                raise NotReusable(f"the template {template} reads a lifted constant ({a.name})")
    return shared


def _moved_stack(meta: dict, template: str, member: str) -> dict:
    stack = meta.get("nn_module_stack")
    if not stack:
        return meta
    moved = {}
    for key, (path, type_) in stack.items():
        if isinstance(path, str) and _within(path, template):
            new_path = member + path[len(template):]
            key = key[: len(key) - len(path)] + new_path if isinstance(key, str) and key.endswith(path) else key
            path = new_path
        moved[key] = (path, type_)
    return {**meta, "nn_module_stack": moved}


def _state_specs(program: ExportedProgram, model: nn.Module, runs: list[Run]) -> tuple[list[InputSpec], dict[str, fx.Node]]:
    """The input specs the whole model's export has: every parameter, then every buffer, under
    every name (``remove_duplicate=False``, as export lifts them), then the program's other inputs.
    Members stood in by ghosts were not lifted; their new placeholders (returned: name -> the
    placeholder whose meta they copy, the same tensor's or the template's twin's) are added."""
    sig = program.graph_signature
    old = {n.name: n for n in program.graph.nodes if n.op == "placeholder"}
    existing = {(s.kind, s.target): s for s in sig.input_specs if s.kind in (InputKind.PARAMETER, InputKind.BUFFER)}
    lifted: dict[int, str] = {}
    for s in existing.values():
        t = model.get_parameter(s.target) if s.kind == InputKind.PARAMETER else model.get_buffer(s.target)
        lifted.setdefault(id(t), s.arg.name)
    twin_of = {m: r.members[0] for r in runs for m in r.members[1:]}
    taken = set(old)
    specs: list[InputSpec] = []
    added: dict[str, fx.Node] = {}
    for kind, prefix, items in ((InputKind.PARAMETER, "p_", model.named_parameters(remove_duplicate=False)),
                                (InputKind.BUFFER, "b_", model.named_buffers(remove_duplicate=False))):
        for fqn, t in items:
            spec = existing.pop((kind, fqn), None)
            if spec is None:
                like = lifted.get(id(t)) or _twin_placeholder(model, fqn, kind, twin_of, lifted)
                name = _free_name(prefix + re.sub(r"[^0-9a-zA-Z_]", "_", fqn), taken)
                owner, _, leaf = fqn.rpartition(".")
                persistent = None if kind == InputKind.PARAMETER else \
                    leaf not in model.get_submodule(owner)._non_persistent_buffers_set
                spec = InputSpec(kind=kind, arg=TensorArgument(name=name), target=fqn, persistent=persistent)
                added[name] = old[like]
            specs.append(spec)
    if existing:
        raise NotReusable(f"the export lifted {next(iter(existing))[1]}, which the model does not name")
    return specs + [s for s in sig.input_specs if s.kind not in (InputKind.PARAMETER, InputKind.BUFFER)], added


def _twin_placeholder(model: nn.Module, fqn: str, kind: InputKind, twin_of: dict[str, str],
                      lifted: dict[int, str]) -> str:
    parts = fqn.split(".")
    prefixes = {".".join(parts[:i]) for i in range(1, len(parts))}  # a dict lookup each, not a scan of every member
    order = list(twin_of) if len(prefixes & twin_of.keys()) > 1 else []
    for member in sorted(prefixes & twin_of.keys(), key=order.index if order else None):
        template = twin_of[member]
        if fqn.startswith(member + "."):
            rel = fqn[len(member) + 1:]
            t = model.get_submodule(template)
            twin = t.get_parameter(rel) if kind == InputKind.PARAMETER else t.get_buffer(rel)
            if id(twin) in lifted:
                return lifted[id(twin)]
    raise NotReusable(f"{fqn} was not lifted by the export and has no twin in a template")


def _free_name(candidate: str, taken: set[str]) -> str:
    name, i = candidate, 0
    while name in taken:
        i += 1
        name = f"{candidate}_{i}"
    taken.add(name)
    return name


def _member_state(template: nn.Module, member: nn.Module, reads: list[str], by_id: dict[int, str],
                  tensor_of: dict[str, Any], name: str) -> dict[str, str]:
    """Template placeholder -> the member's placeholder, for the template's own parameters and buffers."""
    relative = {id(t): rel for rel, t in [*template.named_parameters(remove_duplicate=False),
                                           *template.named_buffers(remove_duplicate=False)]}
    member_tensors = dict([*member.named_parameters(remove_duplicate=False),
                           *member.named_buffers(remove_duplicate=False)])
    out = {}
    for ph in reads:
        rel = relative.get(id(tensor_of[ph]))
        if rel is None:
            continue  # a tensor of the parent: shared, as in the whole model's export
        mine = member_tensors.get(rel)
        if mine is None or id(mine) not in by_id:
            raise NotReusable(f"{name}.{rel} is not an input of the exported graph")
        out[ph] = by_id[id(mine)]
    return out


def stitch(program: ExportedProgram, model: nn.Module, runs: list[Run]) -> ExportedProgram:
    """Replace every stub by a copy of its template's ops and drop the markers (module docstring)."""
    graph = program.graph
    specs, added = _state_specs(program, model, runs)
    by_id: dict[int, str] = {}
    tensor_of: dict[str, Any] = {}
    for spec in specs:
        if spec.kind in (InputKind.PARAMETER, InputKind.BUFFER):
            t = model.get_parameter(spec.target) if spec.kind == InputKind.PARAMETER else model.get_buffer(spec.target)
            by_id.setdefault(id(t), spec.arg.name)
            tensor_of[spec.arg.name] = t
    symbols = _input_symbols(graph)
    constants = {s.arg.name for s in specs if s.kind in (InputKind.CONSTANT_TENSOR, InputKind.CUSTOM_OBJ)}
    regions, shared, state = [], [], []
    for i, r in enumerate(runs):
        region = _template_region(graph, i, r)
        shared.append(_check_body(region, r, constants, symbols))
        reads = list(dict.fromkeys(a.name for n in region.body for a in n.all_input_nodes
                                   if a.op == "placeholder" and a.name in tensor_of))
        template = model.get_submodule(r.members[0])
        state.append([_member_state(template, model.get_submodule(m), reads, by_id, tensor_of, m)
                      for m in r.members])
        regions.append(region)

    new = fx.Graph()
    old_by_name = {n.name: n for n in graph.nodes}
    env: dict[fx.Node, fx.Node] = {}
    placeholders: dict[str, fx.Node] = {}
    for spec in specs:
        name = spec.arg.name
        if name in added:
            placeholders[name] = new.placeholder(name)
            placeholders[name].meta = dict(added[name].meta)
        else:
            placeholders[name] = env[old_by_name[name]] = new.node_copy(old_by_name[name])
    stub_outputs: dict[fx.Node, list[fx.Node]] = {}
    for n in graph.nodes:
        if n.op == "placeholder":
            continue
        if n.target in (ENTER, EXIT):
            env[n] = env[n.args[0]]
        elif n.target is STUB:
            stub_outputs[n] = _copy_template(new, env, placeholders, old_by_name, n, runs, regions, shared, state)
        elif n.target is operator.getitem and n.args[0] in stub_outputs:
            env[n] = stub_outputs[n.args[0]][n.args[1]]
        else:
            env[n] = append_copy(new, n, env.__getitem__)
            env[n].meta = dict(n.meta)
    sig = program.graph_signature
    outputs = [OutputSpec(kind=s.kind, arg=TensorArgument(name=env[old_by_name[s.arg.name]].name), target=s.target)
               if isinstance(s.arg, TensorArgument) else s for s in sig.output_specs]
    state_dict, lifted_constants = dict(program.state_dict), dict(program.constants)
    for spec in specs:
        if spec.arg.name in added:
            (state_dict if spec.persistent is not False else lifted_constants)[spec.target] = tensor_of[spec.arg.name]
    relax_graph_views(new)  # capture's relax_views then has nothing left to do: the code is generated once
    with lazy_program_code():
        return ExportedProgram(root=program.graph_module, graph=new,
                               graph_signature=ExportGraphSignature(input_specs=specs, output_specs=outputs),
                               state_dict=state_dict, range_constraints=program.range_constraints,
                               module_call_graph=program.module_call_graph, example_inputs=program.example_inputs,
                               constants=lifted_constants, verifiers=program.verifiers)


@contextmanager
def lazy_program_code() -> Iterator[None]:
    """ExportedPrograms built inside get a graph module whose Python code is generated on first use
    (fx's ``_LazyGraphModule``: ``forward``, ``.code`` and ``print`` compile it), not at
    construction. rannc reads the program's graph and builds its own stage modules, so the
    stitched model's code (a third of stitching's time at 96 layers) is usually never needed.
    Plain construction where torch lacks either hook."""
    import torch.export.exported_program as exported_program

    create = getattr(exported_program, "_create_graph_module_for_export", None)
    try:
        from torch.fx._lazy_graph_module import _LazyGraphModule
    except ImportError:
        create = None
    if create is None:
        yield
        return
    exported_program._create_graph_module_for_export = lambda root, graph: _LazyGraphModule(root, graph)
    try:
        yield
    finally:
        exported_program._create_graph_module_for_export = create


def _copy_template(new: fx.Graph, env: dict[fx.Node, fx.Node], placeholders: dict[str, fx.Node],
                   old_by_name: dict[str, fx.Node], stub_node: fx.Node, runs: list[Run],
                   regions: list[_Region], shared: list[set[fx.Node]], state: list[list[dict[str, str]]]) -> list[fx.Node]:
    run, member = stub_node.args[1], stub_node.args[2]
    region, r = regions[run], runs[run]
    xs = stub_node.args[0]
    local: dict[fx.Node, fx.Node] = {}
    for leaf, marker in region.enters.items():
        local[marker] = env[xs[leaf]]
    for ph, mine in state[run][member].items():
        local[old_by_name[ph]] = placeholders[mine]

    def lookup(a: fx.Node) -> fx.Node:
        return local[a] if a in local else env[a]

    moved: dict[tuple, dict] = {}  # the moved module stack of each distinct template stack
    for t in region.body:
        if t in shared[run]:
            continue
        copy = append_copy(new, t, lookup)
        stack = t.meta.get("nn_module_stack")
        if stack:
            key = tuple(stack.items())
            if key not in moved:
                moved[key] = _moved_stack(t.meta, r.members[0], r.members[member])["nn_module_stack"]
            copy.meta = {**t.meta, "nn_module_stack": dict(moved[key])}
        else:
            copy.meta = dict(t.meta)
        local[t] = copy
    return [lookup(region.exits[i].args[0]) for i in sorted(region.exits)]


def _fast_append_works() -> bool:
    graph = fx.Graph()
    return all(hasattr(graph, a) for a in ("_graph_namespace", "_insert", "_find_nodes_lookup_table", "_len")) and \
        graph.owning_module is None


_FAST_APPEND = _fast_append_works()


def append_copy(graph: fx.Graph, node: fx.Node, lookup: Any) -> fx.Node:
    """``graph.node_copy(node, lookup)`` without re-validating the arguments (the node comes from an
    exported graph, so they are valid): ``Graph.create_node`` walks every argument with pytree to
    warn about raw symbolic values, which was half of stitching's cost. The same steps otherwise
    (fresh name, insertion, find_nodes table); ``node_copy`` itself where fx's internals differ."""
    if not _FAST_APPEND or graph.owning_module is not None:
        return graph.node_copy(node, lookup)
    args, kwargs = fx.node.map_arg(node.args, lookup), fx.node.map_arg(node.kwargs, lookup)
    name = graph._graph_namespace.create_name(node.name, None)
    copy = fx.Node(graph, name, node.op, node.target, args, kwargs, node.type)
    graph._graph_namespace.associate_name_with_obj(name, copy)
    graph._insert(copy)
    graph._find_nodes_lookup_table.insert(copy)
    graph._len += 1
    return copy


def try_export_reusing_layers(model: nn.Module, args: tuple, kwargs: dict,
                              dynamic_shapes: Any) -> tuple[ExportedProgram | None, str]:
    """``export_reusing_layers``, or (None, why not) when it does not apply or fails for any reason."""
    try:
        program = export_reusing_layers(model, args, kwargs, dynamic_shapes)
    except NotReusable as exc:
        return None, f"whole model ({exc})"
    except Exception as exc:  # noqa: BLE001 - the whole model's export diagnoses real failures
        return None, f"whole model (reusing layers failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]})"
    return program, "reused layers"
