"""Stage modules reproduce the original model's loss, gradients and buffers exactly (fp32)."""

from __future__ import annotations

import copy
import random

import pytest
import torch

from rannc_cli.errors import RanncError
from rannc_cli.graph.blocks import build_blocks
from rannc_cli.graph.capture import capture
from rannc_cli.graph.stages import build_stages, check_assignment, run_stages
from zoo import RANDOM, ZOO


def contiguous_split(n_blocks: int, n_stages: int, rng: random.Random) -> list[int]:
    cuts = sorted(rng.sample(range(1, n_blocks), n_stages - 1))
    bounds = [0, *cuts, n_blocks]
    return [s for s in range(n_stages) for _ in range(bounds[s + 1] - bounds[s])]


def dataflow_split(bg, n_stages: int, rng: random.Random) -> list[int]:
    """Any assignment that respects data flow (stages need not be contiguous ranges)."""
    producer = bg.value_producer
    stage = []
    for b in bg.blocks:
        low = max([stage[producer[v]] for v in b.inputs if producer[v] is not None], default=0)
        stage.append(rng.randint(low, n_stages - 1))
    used = sorted(set(stage))
    return [used.index(s) for s in stage]


def assert_equivalent(make, assignment_for, seed: int = 3) -> None:
    """Train one step with the model and with its stage modules; compare every number exactly."""
    torch.manual_seed(0)
    model, (args, kwargs) = make()
    reference = copy.deepcopy(model)
    captured = capture(model, args, kwargs)
    bg = build_blocks(captured)
    stages = build_stages(bg, assignment_for(bg))

    torch.manual_seed(seed)
    expected = reference(*args, **kwargs)
    expected.backward()
    torch.manual_seed(seed)
    loss = run_stages(stages, captured, args, kwargs)
    loss.backward()

    assert torch.equal(loss, expected), f"loss {loss.item()!r} != {expected.item()!r}"
    ref_params = dict(reference.named_parameters())
    for name, p in model.named_parameters():
        assert p.grad is not None, f"no gradient reached {name}"
        assert torch.equal(p.grad, ref_params[name].grad), \
            f"gradient of {name} differs by {(p.grad - ref_params[name].grad).abs().max().item():.3e}"
    ref_buffers = dict(reference.named_buffers())
    for name, b in model.named_buffers():
        assert torch.equal(b, ref_buffers[name]), f"buffer {name} differs"


@pytest.mark.parametrize("name", sorted(ZOO))
@pytest.mark.parametrize("split_seed", [0, 1, 2])
def test_contiguous_random_splits_are_exact(name, split_seed):
    rng = random.Random(split_seed)

    def assignment(bg):
        n = len(bg.blocks)
        return contiguous_split(n, rng.randint(2, min(6, n)), rng)

    assert_equivalent(ZOO[name], assignment)


@pytest.mark.parametrize("name", sorted(set(ZOO) - RANDOM))
@pytest.mark.parametrize("split_seed", [0, 1])
def test_dataflow_random_splits_are_exact(name, split_seed):
    rng = random.Random(100 + split_seed)
    assert_equivalent(ZOO[name], lambda bg: dataflow_split(bg, rng.randint(2, 5), rng))


def test_single_stage_and_one_stage_per_block_are_exact():
    assert_equivalent(ZOO["example_transformer"], lambda bg: [0] * len(bg.blocks))
    assert_equivalent(ZOO["example_cnn"], lambda bg: list(range(len(bg.blocks))))


def test_values_skip_stages():
    torch.manual_seed(0)
    model, (args, kwargs) = ZOO["fork_join"]()
    bg = build_blocks(capture(model, args, kwargs))
    stages = build_stages(bg, list(range(len(bg.blocks))))
    produced_at = {name: s.index for s in stages for name in s.output_names}
    skips = [(produced_at[v], s.index) for s in stages for v in s.input_names
             if v in produced_at and s.index - produced_at[v] > 1]
    assert skips, "the skip connection x -> h2 should cross more than one stage"


def test_equivalence_check_detects_a_perturbed_stage(monkeypatch):
    """The comparison above is strict: a 1e-6 relative change in one stage fails it."""
    from rannc_cli.graph import stages as stages_module

    original = stages_module.StageModule.forward

    def perturbed(self, *inputs):
        outs = original(self, *inputs)
        if self.index == 1:
            outs = tuple(o * (1 + 1e-6) if isinstance(o, torch.Tensor) and o.is_floating_point() else o for o in outs)
        return outs

    monkeypatch.setattr(stages_module.StageModule, "forward", perturbed)
    with pytest.raises(AssertionError):
        assert_equivalent(ZOO["example_mlp"], lambda bg: contiguous_split(len(bg.blocks), 3, random.Random(0)))


def test_assignment_against_data_flow_is_refused():
    torch.manual_seed(0)
    model, (args, kwargs) = ZOO["example_mlp"]()
    bg = build_blocks(capture(model, args, kwargs))
    n = len(bg.blocks)
    backwards = [1] * (n // 2) + [0] * (n - n // 2)
    with pytest.raises(RanncError, match="reads .* from block .* in the later stage"):
        check_assignment(bg, backwards)
    with pytest.raises(RanncError, match="without gaps"):
        check_assignment(bg, [0] * (n - 1) + [2])
    with pytest.raises(RanncError, match="names 2 blocks"):
        check_assignment(bg, [0, 0])


def test_stage_modules_run_other_microbatch_sizes():
    """Captured with a symbolic batch, the stages run a 2-sample microbatch of a 4-sample capture."""
    torch.manual_seed(0)
    model, (args, kwargs) = ZOO["example_transformer"]()
    captured = capture(model, args, kwargs)
    stages = build_stages(build_blocks(captured), contiguous_split(len(build_blocks(captured).blocks), 3,
                                                                    random.Random(5)))
    half = tuple(a[:2] for a in args), {k: v[:2] for k, v in kwargs.items()}
    torch.manual_seed(1)
    got = run_stages(stages, captured, *half)
    torch.manual_seed(1)
    want = model(*half[0], **half[1])
    assert torch.equal(got, want)


def _uses_device_constants(gm) -> list:
    return [n for n in gm.graph.nodes if any(isinstance(a, torch.device) and a.type == "cpu"
                                             for a in [*n.args, *n.kwargs.values()])]


def test_place_retargets_the_graphs_device_constants():
    """The Transformer LM builds positions with torch.arange(n, device=tokens.device): captured on the
    CPU, that constant must follow the stage to its device (meta stands in for a GPU here)."""
    model, (args, kwargs) = ZOO["example_transformer"]()
    bg = build_blocks(capture(model, args, kwargs))
    stages = build_stages(bg, [0] * len(bg.blocks))
    assert _uses_device_constants(stages[0].graph_module), "the example should record a device constant"
    stages[0].place("meta")
    assert not _uses_device_constants(stages[0].graph_module)
    meta_inputs = [torch.empty_like(bg.captured.flatten_inputs(args, kwargs)[n], device="meta")
                   for n in stages[0].input_names]
    (loss,) = stages[0](*meta_inputs)
    assert loss.device.type == "meta"


def test_graph_hash_does_not_depend_on_the_capture_device():
    """A profile captured on a GPU and the runtime's CPU capture must name the same graph."""
    from rannc_cli.graph.blocks import graph_hash

    model, (args, kwargs) = ZOO["example_transformer"]()
    on_cpu = graph_hash(build_blocks(capture(model, args, kwargs)))
    meta_args, meta_kwargs = torch.utils._pytree.tree_map(
        lambda t: t.to("meta") if isinstance(t, torch.Tensor) else t, (args, kwargs))
    on_meta = graph_hash(build_blocks(capture(model.to("meta"), meta_args, meta_kwargs)))
    assert on_cpu == on_meta
