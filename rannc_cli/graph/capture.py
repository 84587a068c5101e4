"""Capture a model's forward into an ATen-level graph with torch.export (non-strict).

    captured = capture(model, (x, y), {"padding": mask})
    captured.graph            # functional ATen graph (torch.fx.Graph)
    captured.batch_size       # 32; captured.dynamic_batch tells if the batch dim stayed symbolic
    captured.flatten_inputs((x, y), {"padding": mask})   # {placeholder name: value}

The batch dimension (dim 0 of every tensor input) is marked ``Dim.AUTO``, so the graph stays
valid for any microbatch size where the model allows it; torch.export specialises silently where
it does not. In-place operations are functionalised (the graph is decomposed with an empty table only when it
still mutates tensors, which halves capture time otherwise), buffer updates (BatchNorm running stats)
become explicit outputs, parameters shared between modules resolve to one parameter name.
"""

from __future__ import annotations

import inspect
import io
import logging
import warnings
from contextlib import contextmanager, redirect_stderr
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn
from torch.export import Dim, ExportedProgram
from torch.export.graph_signature import InputKind, OutputKind
from torch.utils import _pytree as pytree

from rannc_cli.errors import RanncError


@dataclass
class UserInput:
    """One leaf of the user's (args, kwargs)."""

    placeholder: str  # graph placeholder name
    path: str  # e.g. "args[0]" or "kwargs['padding']"
    is_tensor: bool
    constant: Any = None  # captured value of a non-tensor leaf
    batch_dim: int | None = None


@dataclass
class CapturedModel:
    model: nn.Module
    program: ExportedProgram
    batch_size: int
    dynamic_batch: bool
    batch_symbol: Any  # sympy symbol of the batch dimension, or None
    inputs: list[UserInput]
    in_spec: Any  # pytree spec of (args, kwargs)
    param_names: dict[str, str]  # placeholder -> canonical parameter/buffer/constant name
    param_kinds: dict[str, str]  # canonical name -> 'parameter' | 'buffer' | 'constant'
    buffer_mutations: dict[str, str]  # output node name -> canonical buffer name
    loss_node: str
    aliases: dict[str, list[str]] = field(default_factory=dict)  # canonical name -> other names (tied)
    training: bool = True
    method: str = "whole model"  # how it was exported: "whole model" or "reused layers" (graph/reuse.py)

    @property
    def graph(self) -> fx.Graph:
        return self.program.graph_module.graph

    def node(self, name: str) -> fx.Node:
        return self._nodes[name]

    @property
    def nodes_by_name(self) -> dict[str, fx.Node]:
        return self._nodes

    def __post_init__(self) -> None:
        self._nodes = {n.name: n for n in self.graph.nodes}

    def tensor_of(self, canonical: str) -> torch.Tensor:
        """The live parameter, buffer or lifted constant behind a canonical name."""
        kind = self.param_kinds[canonical]
        if kind == "parameter":
            return self.model.get_parameter(canonical)
        if kind == "buffer":
            return self.model.get_buffer(canonical)
        return self.program.constants[canonical]

    def flatten_inputs(self, args: tuple, kwargs: dict) -> dict[str, Any]:
        """Map the user's batch onto the graph's input placeholders (checks structure and constants)."""
        ordered = _order_kwargs(kwargs, self.in_spec)
        leaves, spec = pytree.tree_flatten((tuple(args), ordered))
        if spec != self.in_spec:
            raise RanncError(
                "the model was called with a different argument structure than at capture "
                f"(captured {_describe_spec(self.in_spec)}, now {_describe_spec(spec)})",
                hint="call the model with the same positional/keyword arguments every step")
        values: dict[str, Any] = {}
        for leaf, inp in zip(leaves, self.inputs):
            if inp.is_tensor:
                if not isinstance(leaf, torch.Tensor):
                    raise RanncError(f"input {inp.path} was a tensor at capture, now {type(leaf).__name__}")
                leaf = leaf.contiguous()  # the graph was traced on contiguous copies
            elif leaf != inp.constant:
                raise RanncError(f"input {inp.path} changed from {inp.constant!r} at capture to {leaf!r}",
                                 hint="non-tensor arguments are baked into the captured graph; keep them fixed")
            values[inp.placeholder] = leaf
        return values


def _order_kwargs(kwargs: dict, in_spec: Any) -> dict:
    try:
        keys = in_spec.child(1).context
    except (AttributeError, IndexError):
        return dict(kwargs)
    if set(keys) != set(kwargs):
        return dict(kwargs)
    return {k: kwargs[k] for k in keys}


def _describe_spec(spec: Any) -> str:
    return " ".join(str(spec).split())[:200]


def _leaf_paths(args: tuple, kwargs: dict) -> list[str]:
    paths, _ = pytree.tree_flatten_with_path((tuple(args), kwargs))
    out = []
    for keypath, _leaf in paths:
        text = pytree.keystr(keypath)  # like "[0][1]['x']"
        head, _, rest = text[1:].partition("]")
        out.append(("args" if head == "0" else "kwargs") + rest)
    return out


def _dynamic_batch_spec(forward: Any, args: tuple, kwargs: dict, batch_size: int, tied: bool) -> Any:
    """dynamic_shapes for export: dim 0 of every tensor input whose dim 0 is ``batch_size`` is one
    shared ``Dim("batch")`` (``tied``), or each tensor's dim 0 is ``Dim.AUTO`` (export decides)."""
    bound = inspect.signature(forward).bind(*args, **kwargs)
    batch = Dim("batch")

    def spec(v: Any) -> Any:
        if not isinstance(v, torch.Tensor) or v.dim() == 0:
            return None
        if tied:
            return {0: batch} if v.shape[0] == batch_size else None
        return {0: Dim.AUTO}
    return {name: pytree.tree_map(spec, value) for name, value in bound.arguments.items()}


@contextmanager
def explicit_forward(model: nn.Module, args: tuple, kwargs: dict):
    """Give ``model.forward`` a signature without ``*args``/``**kwargs`` for this call's arguments.

    torch.export cannot match ``dynamic_shapes`` to a forward taking ``**kwargs`` (it lists the
    keyword arguments both under ``kwargs`` and by name), which is how Hugging Face wrappers are
    often written (``forward(self, **batch)``). The instance attribute is removed afterwards.
    """
    forward = model.forward
    params = list(inspect.signature(forward).parameters.values())
    variadic = {inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD}
    if not any(p.kind in variadic for p in params):
        yield
        return
    inspect.signature(forward).bind(*args, **kwargs)  # TypeError when the call does not fit
    positional = [p.name for p in params if p.kind in (inspect.Parameter.POSITIONAL_ONLY,
                                                        inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    var = next((p.name for p in params if p.kind == inspect.Parameter.VAR_POSITIONAL), "args")
    names = [positional[i] if i < len(positional) else f"_{var}{i - len(positional)}" for i in range(len(args))]
    fixed = [inspect.Parameter(n, inspect.Parameter.POSITIONAL_ONLY) for n in names] + \
        [inspect.Parameter(k, inspect.Parameter.KEYWORD_ONLY) for k in kwargs]

    def call(*a: Any, **k: Any) -> Any:
        return forward(*a, **k)

    call.__signature__ = inspect.Signature(fixed)  # type: ignore[attr-defined]
    model.forward = call  # type: ignore[method-assign]
    try:
        yield
    finally:
        del model.forward


def guess_batch_size(args: tuple, kwargs: dict) -> int:
    """The most common leading size among tensor inputs (ties: the first tensor's)."""
    sizes = [t.shape[0] for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor) and t.dim() > 0]
    if not sizes:
        raise RanncError("the model's inputs contain no tensor with a batch dimension",
                         hint="pass the batch as tensors whose first dimension is the batch")
    return max(sizes, key=lambda s: (sizes.count(s), -sizes.index(s)))


def capture(model: nn.Module, args: tuple, kwargs: dict | None = None, dynamic: bool = True,
            reuse_layers: bool | None = None) -> CapturedModel:
    """Export ``model(*args, **kwargs)`` (which must return a scalar loss) to a functional ATen graph.
    ``reuse_layers`` (default: setting capture_reuse_layers) traces repeated layers once (graph/reuse.py)."""
    from rannc_cli.graph.diagnose import diagnose_export_failure, module_tracker
    from rannc_cli.graph.reuse import try_export_reusing_layers

    if reuse_layers is None:
        from rannc_cli.config import settings

        reuse_layers = bool(settings.get("capture_reuse_layers"))

    kwargs = dict(kwargs or {})
    args = tuple(args)
    batch_size = guess_batch_size(args, kwargs)
    # Export sees private contiguous copies: inputs that are views of one storage (x[:, :-1] and
    # x[:, 1:]) otherwise make torch.export add aliasing guards that break decomposition.
    args, kwargs = pytree.tree_map(
        lambda t: t.detach().clone(memory_format=torch.contiguous_format).requires_grad_(t.requires_grad)
        if isinstance(t, torch.Tensor) else t, (args, kwargs))
    program = None
    method = "whole model"
    with warnings.catch_warnings(), quiet_torch_logs():
        warnings.simplefilter("ignore")
        # "tied": every batch-sized input shares one batch symbol; "auto": export picks per input
        # (only to name the input that broke "tied"); "static": no symbolic batch at all.
        attempts = ["tied", "auto", "static"] if dynamic else ["static"]
        last_error: BaseException | None = None
        tied_error: BaseException | None = None
        for attempt in attempts:
            try:
                with explicit_forward(model, args, kwargs):
                    dyn = None if attempt == "static" else \
                        _dynamic_batch_spec(model.forward, args, kwargs, batch_size, tied=attempt == "tied")
            except TypeError as exc:
                raise RanncError(f"the model's forward does not accept these arguments ({exc})") from None
            if reuse_layers:
                program, method = try_export_reusing_layers(model, args, kwargs, dyn)
                if program is not None:
                    break
            tracker = module_tracker(model)
            try:
                with tracker, explicit_forward(model, args, kwargs):
                    program = torch.export.export(model, args, kwargs, dynamic_shapes=dyn, strict=False)
                if has_mutations(program):
                    program = program.run_decompositions({})  # functionalise in-place ops
                break
            except Exception as exc:  # noqa: BLE001 - every failure becomes a diagnosis
                last_error = exc
                if attempt == "static" or not _is_dynamic_shape_failure(exc):
                    raise diagnose_export_failure(exc, tracker.failure_stack, model) from None
                if attempt == "tied":
                    tied_error = exc
        if program is None:
            assert last_error is not None
            raise diagnose_export_failure(last_error, [], model) from None
    relax_views(program)
    logging.getLogger(__name__).debug("capture of %s: %s", type(model).__name__, method)
    captured = _describe_program(model, program, args, kwargs, batch_size)
    captured.method = "reused layers" if method.startswith("reused") else "whole model"
    if attempt == "auto":
        _refuse_untied_batch_inputs(captured, tied_error)
    return captured


def _refuse_untied_batch_inputs(captured: "CapturedModel", tied_error: BaseException | None) -> None:
    """After the tied export failed: name the batch-sized inputs the model does not treat as batch.

    Splitting such an input by rows would change the numbers, and keeping it whole for every
    replica and microbatch would too, so capture stops instead of guessing.
    """
    values = {n.name: n.meta.get("val") for n in captured.graph.nodes if n.op == "placeholder"}
    untied = [i.path for i in captured.inputs if i.is_tensor and i.batch_dim is None
              and isinstance(values.get(i.placeholder), torch.Tensor) and values[i.placeholder].dim() > 0
              and _hint(values[i.placeholder].shape[0]) == captured.batch_size]
    if not untied:
        return
    reason = next((line.strip() for line in str(tied_error).splitlines() if line.strip()), "")[:200]
    raise RanncError(
        f"input {', '.join(untied)} has the batch size ({captured.batch_size}) as its first dimension, but the "
        f"model does not use that dimension as the batch (torch.export: {reason})",
        hint="rannc splits dim 0 of every tensor input as the batch; if the input is per-sample data, make the "
             "model index it like the other inputs so it works for any batch size; if it is not, make it a "
             "buffer of the model or give it a first dimension other than the batch size")


def relax_views(program: ExportedProgram) -> int:
    """Turn every ``aten.view`` of the graph into ``aten.reshape``; returns how many.

    Export decides view-or-copy from the strides its fake tensors have, which are not always
    the real kernels' (CPU SDPA returns a contiguous output where its fake one is transposed,
    so T5's ``reshape`` is traced as a view that fails on real data), and stage inputs lose
    their capture-time layout when the profiler tiles them or the runtime sends them. The graph
    is functional, so ``reshape`` (a view where the strides allow, a copy otherwise) computes
    the same values on any layout.
    """
    count = relax_graph_views(program.graph)
    if count:
        program.graph_module.recompile()
    return count


def relax_graph_views(graph: fx.Graph) -> int:
    """``relax_views`` on a bare graph (no recompile): graph/reuse.py relaxes the stitched graph
    before the program is built from it, so the program's code is generated once."""
    count = 0
    for node in graph.nodes:
        if node.op == "call_function" and node.target in (torch.ops.aten.view.default,
                                                          torch.ops.aten._unsafe_view.default):
            node.target = torch.ops.aten.reshape.default
            count += 1
    return count


@contextmanager
def quiet_torch_logs():
    """Silence torch's logging and its stderr graph dumps on export failures while capturing."""
    previous = logging.root.manager.disable
    logging.disable(logging.CRITICAL)
    try:
        with redirect_stderr(io.StringIO()):
            yield
    finally:
        logging.disable(previous)


def has_mutations(program: ExportedProgram) -> bool:
    """True when the exported graph still mutates tensors in place (it then needs functionalising)."""
    return any(n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload) and n.target._schema.is_mutable
               for n in program.graph.nodes)


def _is_dynamic_shape_failure(exc: BaseException) -> bool:
    text = f"{type(exc).__name__}: {exc}"
    return any(s in text for s in ("Constraint", "constraint", "specializ", "dynamic", "Dim"))


def _describe_program(model: nn.Module, program: ExportedProgram, args: tuple, kwargs: dict,
                      batch_size: int) -> CapturedModel:
    sig = program.graph_signature
    canonical: dict[int, str] = {}
    aliases: dict[str, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in canonical:
            aliases.setdefault(canonical[id(p)], []).append(name)
        else:
            canonical[id(p)] = name
    for name, b in model.named_buffers(remove_duplicate=False):
        canonical.setdefault(id(b), name)

    param_names: dict[str, str] = {}
    param_kinds: dict[str, str] = {}
    user_placeholders: list[str] = []
    for spec in sig.input_specs:
        ph = spec.arg.name
        if spec.kind == InputKind.PARAMETER:
            name = canonical[id(model.get_parameter(spec.target))]
            kind = "parameter"
        elif spec.kind == InputKind.BUFFER:
            name = canonical[id(model.get_buffer(spec.target))]
            kind = "buffer"
        elif spec.kind in (InputKind.CONSTANT_TENSOR, InputKind.CUSTOM_OBJ):
            name, kind = spec.target, "constant"
        elif spec.kind == InputKind.USER_INPUT:
            user_placeholders.append(ph)
            continue
        else:
            raise RanncError(f"unsupported graph input kind {spec.kind}", hint="please report this model")
        param_names[ph] = name
        param_kinds[name] = kind

    buffer_mutations: dict[str, str] = {}
    user_outputs: list[str] = []
    for spec in sig.output_specs:
        if spec.kind == OutputKind.BUFFER_MUTATION:
            buffer_mutations[spec.arg.name] = canonical[id(model.get_buffer(spec.target))]
        elif spec.kind == OutputKind.USER_OUTPUT:
            user_outputs.append(spec.arg.name)
        elif spec.kind == OutputKind.USER_INPUT_MUTATION:
            raise RanncError("the model's forward modifies one of its inputs in place",
                             hint="clone the input inside forward before modifying it")
        else:
            raise RanncError(f"the model's forward produces an unsupported output kind ({spec.kind.name})",
                             hint="forward must return only the loss")
    nodes = {n.name: n for n in program.graph.nodes}
    if len(user_outputs) != 1 or not _is_scalar_tensor(nodes.get(user_outputs[0])):
        raise RanncError("the model's forward must return the loss as a single scalar tensor "
                         f"(it returned {len(user_outputs)} value(s))",
                         hint="compute the loss inside forward and return only it")

    leaves, in_spec = pytree.tree_flatten((args, _order_kwargs(kwargs, program.call_spec.in_spec)))
    paths = _leaf_paths(args, _order_kwargs(kwargs, program.call_spec.in_spec))
    if len(leaves) != len(user_placeholders):
        raise RanncError("could not match the model's inputs to the captured graph", hint="please report this model")
    batch_symbol = _batch_symbol([nodes[p] for p in user_placeholders], batch_size)
    inputs = []
    for leaf, ph, path in zip(leaves, user_placeholders, paths):
        is_tensor = isinstance(leaf, torch.Tensor)
        inputs.append(UserInput(
            placeholder=ph, path=path, is_tensor=is_tensor, constant=None if is_tensor else leaf,
            batch_dim=(batch_dim_of(nodes[ph], batch_symbol, batch_size) if batch_symbol is not None
                       else 0 if leaf.dim() > 0 and leaf.shape[0] == batch_size else None) if is_tensor else None))
    return CapturedModel(
        model=model, program=program, batch_size=batch_size, dynamic_batch=batch_symbol is not None,
        batch_symbol=batch_symbol, inputs=inputs, in_spec=in_spec, param_names=param_names,
        param_kinds=param_kinds, buffer_mutations=buffer_mutations, loss_node=user_outputs[0],
        aliases=aliases, training=model.training)


def _is_scalar_tensor(node: fx.Node | None) -> bool:
    val = node.meta.get("val") if node is not None else None
    return isinstance(val, torch.Tensor) and val.dim() == 0


def _batch_symbol(placeholders: list[fx.Node], batch_size: int) -> Any:
    """The symbol of the batch dimension: dim 0 of the tensor inputs, if it stayed symbolic."""
    counts: dict[Any, int] = {}
    for node in placeholders:
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor) and val.dim() > 0 and isinstance(val.shape[0], torch.SymInt):
            expr = val.shape[0].node.expr
            if getattr(expr, "is_Symbol", False) and _hint(val.shape[0]) == batch_size:
                counts[expr] = counts.get(expr, 0) + 1
    return max(counts, key=counts.get) if counts else None


def _hint(size: Any) -> int | None:
    if isinstance(size, int):
        return size
    try:
        return int(size.node.hint)
    except (TypeError, AttributeError):
        return None


def batch_dim_of(node: fx.Node, batch_symbol: Any, batch_size: int) -> int | None:
    """First dimension of a node's tensor value that depends on the batch symbol."""
    val = node.meta.get("val")
    if not isinstance(val, torch.Tensor) or batch_symbol is None:
        return None
    for i, size in enumerate(val.shape):
        if isinstance(size, torch.SymInt) and batch_symbol in size.node.expr.free_symbols:
            return i
    return None
