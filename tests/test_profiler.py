"""Profiling: memory accounting, measured and estimated costs, the cache."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from rannc_cli.errors import RanncError
from rannc_cli.profiler.build import choose_microbatch_sizes, profile_model
from rannc_cli.profiler.estimate import load_device_spec
from rannc_cli.profiler.memory import MemoryTracker, SavedTensorMeter


@pytest.fixture(autouse=True)
def _fast_profiling(monkeypatch):
    monkeypatch.setenv("RANNC_PROFILE_WARMUP", "0")
    monkeypatch.setenv("RANNC_PROFILE_REPEATS", "1")


class TwoLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.first = nn.Linear(64, 32)
        self.second = nn.Linear(32, 8)

    def forward(self, x, y):
        return F.cross_entropy(self.second(torch.relu(self.first(x))), y)


def _batch(b=16):
    g = torch.Generator().manual_seed(0)
    return torch.randn(b, 64, generator=g), torch.randint(0, 8, (b,), generator=g)


def test_saved_tensor_meter_counts_each_storage_once_and_skips_excluded():
    x = torch.randn(100, requires_grad=True)
    w = torch.randn(100, requires_grad=True)
    with SavedTensorMeter(exclude=[w]) as saved:
        y = x.exp()  # saves its output (400 B)
        z = y * w  # saves y (already counted) and w (excluded)
    assert saved.bytes == 400
    z.sum().backward()


def test_memory_tracker_peak_follows_liveness():
    with MemoryTracker() as mem:
        a = torch.ones(1000)  # 4000 B
        b = a * 2  # a's last use: a and b live together -> 8000
        c = b + 1  # b's last use; a is dead -> 8000
        d = c.sum()
    del a, b, c, d
    assert mem.peak_bytes() == 8000


def test_microbatch_size_choice():
    assert choose_microbatch_sizes(16, None, True) == [1, 2, 8, 16]  # 4 of 1, 2, 4, 8, 16, evenly spread
    assert choose_microbatch_sizes(4, None, True) == [1, 2, 4]
    assert choose_microbatch_sizes(12, None, True)[-1] == 12
    assert choose_microbatch_sizes(32, "3,1,3", True) == [1, 3]
    assert choose_microbatch_sizes(32, None, False) == [32]
    with pytest.raises(RanncError):
        choose_microbatch_sizes(32, "0,2", True)


def test_measured_profile_numbers():
    torch.manual_seed(0)
    model = TwoLinear()
    prof, cached = profile_model(model, _batch(), {}, mode="measured", microbatch_sizes="2,8")
    assert not cached and prof.microbatch_sizes == [2, 8]
    first = next(b for b in prof.blocks if b.name == "first")
    for m in (2, 8):
        cost = prof.block_cost(first.id, m)
        assert cost.flops_forward == 2 * m * 64 * 32
        assert cost.flops_backward == 2 * m * 64 * 32  # weight gradient only: x needs no gradient
        assert cost.activation_bytes == m * 64 * 4  # Linear saves its input for the weight gradient
        assert cost.forward_seconds > 0 and cost.backward_seconds > 0 and cost.recompute_backward_seconds > 0
    assert prof.param_bytes([first.id]) == (64 * 32 + 32) * 4
    out_value = prof.values[first.outputs[0]]
    assert out_value.batch_dim == 0 and out_value.bytes_per_sample == 32 * 4 and out_value.fixed_bytes == 0
    assert prof.values[prof.loss_value].bytes_per_sample == 0


def test_estimate_runs_no_kernel_and_matches_the_roofline():
    torch.manual_seed(0)
    spec = load_device_spec("V100-SXM2-16GB")
    prof, _ = profile_model(TwoLinear(), _batch(), {}, mode="estimated", device_spec=spec.name, microbatch_sizes="8")
    assert prof.device["mode"] == "estimated" and prof.device["name"] == "V100-SXM2-16GB"
    first = next(b for b in prof.blocks if b.name == "first")
    cost = prof.block_cost(first.id, 8)
    flops = 2 * 8 * 64 * 32
    nbytes = (8 * 64 + 64 * 32 + 32 + 8 * 32) * 4  # addmm reads x, W, b and writes the output
    expected = max(flops / spec.flops_rate(torch.float32),
                   nbytes / (spec.memory_bandwidth * spec.efficiency_memory)) + spec.op_overhead_seconds
    assert cost.flops_forward == flops
    # the block's other ops (the transposed weight view, no kernel) add nothing
    assert cost.forward_seconds == pytest.approx(expected, rel=1e-9)
    assert cost.activation_bytes == 8 * 64 * 4


def test_profiling_restores_buffers_and_grads():
    from zoo import ZOO

    torch.manual_seed(0)
    model, (args, kwargs) = ZOO["batch_norm"]()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    profile_model(model, args, kwargs, mode="measured", microbatch_sizes="2,4")
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(p.grad is None for p in model.parameters())


def test_cache_hits_only_for_the_same_model_inputs_and_mode():
    torch.manual_seed(0)
    model = TwoLinear()
    first, cached1 = profile_model(model, _batch(), {}, mode="measured", microbatch_sizes="4")
    again, cached2 = profile_model(model, _batch(), {}, mode="measured", microbatch_sizes="4")
    other_shape, cached3 = profile_model(model, _batch(8), {}, mode="measured", microbatch_sizes="4")
    estimated, cached4 = profile_model(model, _batch(), {}, mode="estimated", microbatch_sizes="4")
    assert (cached1, cached2, cached3, cached4) == (False, True, False, False)
    assert again.key == first.key and other_shape.key != first.key and estimated.key != first.key
    model.second = nn.Linear(32, 8, bias=False)  # another graph, same input shapes
    changed, cached5 = profile_model(model, _batch(), {}, mode="measured", microbatch_sizes="4")
    assert not cached5 and changed.model["graph_hash"] != first.model["graph_hash"]


def test_meta_device_model_profiles_from_shapes_in_estimate_mode():
    """A model built on the meta device (deferred init) has no data: estimate works, timing is refused."""
    with torch.device("meta"):
        model = TwoLinear()
    prof, _ = profile_model(model, _batch(), {}, mode="estimated", device_spec="V100-SXM2-16GB", microbatch_sizes="8")
    real, _ = profile_model(TwoLinear(), _batch(), {}, mode="estimated", device_spec="V100-SXM2-16GB",
                            microbatch_sizes="8")
    for a, b in zip(prof.classes, real.classes):
        assert a.costs == b.costs  # same shapes, same estimate, without any data
    assert prof.totals()["parameter_bytes"] == (64 * 32 + 32 + 32 * 8 + 8) * 4
    with pytest.raises(RanncError, match="meta device"):
        profile_model(model, _batch(), {}, mode="measured")


@pytest.mark.parametrize("name", ["fork_join", "tied_weights", "batch_norm", "in_place", "multi_output", "dropout",
                                  "nested_inputs"])
def test_every_zoo_model_profiles_and_round_trips(tmp_path, name):
    from zoo import ZOO

    from rannc_cli.profiler.format import Profile

    torch.manual_seed(0)
    model, (args, kwargs) = ZOO[name]()
    prof, _ = profile_model(model, args, kwargs, mode="measured", microbatch_sizes="1,4")
    path = prof.save(tmp_path / "p.yaml")
    loaded = Profile.load(path)
    assert loaded.to_dict() == prof.to_dict() and loaded.content_hash() == prof.content_hash()
    assert all([c.microbatch for c in k.costs] == [1, 4] for k in loaded.classes)
    trainable = sum(p.numel() * 4 for p in {id(p): p for p in model.parameters()}.values())
    assert loaded.totals()["parameter_bytes"] == trainable  # tied parameters counted once
