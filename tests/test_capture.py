"""Capture: what the graph records for each kind of model."""

from __future__ import annotations

import torch
import torch.nn as nn
import pytest

from rannc_cli.errors import RanncError
from rannc_cli.graph.blocks import build_blocks
from rannc_cli.graph.capture import capture
from zoo import ZOO


@pytest.fixture(scope="module")
def captured_zoo():
    out = {}
    for name, make in ZOO.items():
        torch.manual_seed(0)
        model, (args, kwargs) = make()
        out[name] = (model, args, kwargs, capture(model, args, kwargs))
    return out


def test_every_zoo_model_captures_with_a_symbolic_batch(captured_zoo):
    for name, (_model, _args, _kwargs, c) in captured_zoo.items():
        assert c.dynamic_batch, name
        tensor_inputs = [i for i in c.inputs if i.is_tensor]
        assert tensor_inputs and all(i.batch_dim == 0 for i in tensor_inputs), (name, c.inputs)


def test_input_paths_cover_kwargs_nesting_and_constants(captured_zoo):
    c = captured_zoo["nested_inputs"][3]
    paths = {i.path: i for i in c.inputs}
    assert set(paths) >= {"args[0]['x']", "args[0]['target']", "args[1][0]", "args[1][1][0]", "kwargs['scale']",
                          "kwargs['use_pair']", "kwargs['steps']"}
    assert paths["kwargs['scale']"].constant == 2.0 and not paths["kwargs['scale']"].is_tensor
    assert paths["kwargs['steps']"].constant == 3


def test_changed_constant_argument_is_refused(captured_zoo):
    model, args, kwargs, c = captured_zoo["nested_inputs"]
    with pytest.raises(RanncError, match="changed from 2.0 at capture to 3.0"):
        c.flatten_inputs(args, {**kwargs, "scale": 3.0})


def test_tied_parameters_resolve_to_one_name_read_by_two_blocks(captured_zoo):
    c = captured_zoo["tied_weights"][3]
    assert c.aliases == {"emb.weight": ["proj.weight"]}
    bg = build_blocks(c)
    readers = [b.id for b in bg.blocks if "emb.weight" in b.params]
    assert len(readers) == 2 and readers[1] - readers[0] > 1


def test_batchnorm_buffer_updates_are_explicit(captured_zoo):
    c = captured_zoo["batch_norm"][3]
    assert sorted(c.buffer_mutations.values()) == sorted(
        f"bn{i}.{b}" for i in (1, 2) for b in ("running_mean", "running_var", "num_batches_tracked"))


def test_in_place_ops_are_functionalised(captured_zoo):
    c = captured_zoo["in_place"][3]
    ops = [n.target for n in c.graph.nodes if n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload)]
    assert ops and not [op for op in ops if op._schema.is_mutable], ops


def test_module_paths_are_recorded(captured_zoo):
    c = captured_zoo["example_transformer"][3]
    paths = {list(n.meta["nn_module_stack"].values())[-1][0] for n in c.graph.nodes
             if n.op == "call_function" and n.meta.get("nn_module_stack")}
    assert "encoder.layers.2.self_attn" in paths and "tok" in paths


def test_forward_must_return_a_scalar_loss():
    class NotALoss(nn.Module):
        def __init__(self):
            super().__init__()
            self.l = nn.Linear(4, 2)

        def forward(self, x):
            return self.l(x)

    with pytest.raises(RanncError, match="must return the loss as a single scalar tensor"):
        capture(NotALoss(), (torch.randn(3, 4),), {})


def test_data_dependent_control_flow_names_module_and_line():
    class Gate(nn.Module):
        def __init__(self):
            super().__init__()
            self.l = nn.Linear(4, 4)

        def forward(self, x):
            h = self.l(x)
            if h.sum() > 0:  # data-dependent branch
                return h * 2
            return h

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.pre = nn.Linear(4, 4)
            self.gate = Gate()

        def forward(self, x):
            return self.gate(self.pre(x)).pow(2).mean()

    with pytest.raises(RanncError) as info:
        capture(Net(), (torch.randn(3, 4),), {})
    line = info.value.one_line()
    assert "in module 'gate' (Gate)" in line
    assert "test_capture.py:" in line and "if h.sum() > 0" in line
    assert "data-dependent control flow" in line and "torch.where" in line
    assert "\n" not in line


def test_inputs_without_a_batch_dimension_are_refused():
    class Scalar(nn.Module):
        def forward(self, x):
            return x * 2

    with pytest.raises(RanncError, match="no tensor with a batch dimension"):
        capture(Scalar(), (torch.tensor(3.0),), {})


def test_batch_sized_input_used_otherwise_is_refused_by_name():
    """dim 0 of every tensor input is the batch: an input the model uses another way is an error, not a guess."""
    class Table(nn.Module):
        def __init__(self):
            super().__init__()
            self.l = nn.Linear(4, 4)

        def forward(self, x, table):
            return (self.l(x) @ table).sum()  # table's dim 0 is a feature dim that happens to equal the batch

    with pytest.raises(RanncError) as info:
        capture(Table(), (torch.randn(4, 4), torch.randn(4, 4)), {})
    line = info.value.one_line()
    assert "input args[1] has the batch size (4)" in line and "buffer" in line and "\n" not in line


def test_forward_with_var_keyword_arguments_keeps_a_symbolic_batch():
    """forward(self, **batch), as Hugging Face wrappers are written: torch.export alone cannot mark its batch."""
    class KwargsOnly(nn.Module):
        def __init__(self):
            super().__init__()
            self.l = nn.Linear(4, 1)

        def forward(self, x, *rest, **batch):
            return ((self.l(x + rest[0]).squeeze(-1) - batch["y"]) ** 2).mean()

    model = KwargsOnly()
    c = capture(model, (torch.randn(6, 4), torch.randn(6, 4)), {"y": torch.randn(6)})
    assert c.dynamic_batch
    assert [(i.path, i.batch_dim) for i in c.inputs] == [("args[0]", 0), ("args[1]", 0), ("kwargs['y']", 0)]
    assert "forward" not in vars(model)  # the temporary signature is gone


def test_views_are_captured_as_reshapes():
    """Export picks view-or-copy from its fake strides, which are not always the real kernels' (T5's
    attention output on CPU: tests/test_zoo.py trains it), and stage inputs change layout when the
    profiler tiles them or the runtime sends them: the graph keeps no aten.view, and still computes
    the same loss."""
    class Attention(nn.Module):
        def __init__(self, d=16, heads=4):
            super().__init__()
            self.qkv, self.heads = nn.Linear(d, 3 * d), heads

        def forward(self, x):
            b, t, d = x.shape
            q, k, v = (z.view(b, t, self.heads, -1).transpose(1, 2) for z in self.qkv(x).chunk(3, dim=-1))
            out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
            return out.transpose(1, 2).reshape(b, t, d).pow(2).mean()

    from rannc_cli.graph.stages import build_stages, run_stages

    model, x = Attention(), torch.randn(4, 8, 16)
    c = capture(model, (x,), {})
    targets = [n.target for n in c.graph.nodes]
    assert torch.ops.aten.view.default not in targets and torch.ops.aten.reshape.default in targets
    bg = build_blocks(c)
    loss = run_stages(build_stages(bg, [0] * len(bg.blocks)), c, (x,), {})
    assert torch.equal(loss, model(x))
