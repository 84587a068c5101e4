"""The profile file: interpolation, validation of hand edits, versioning."""

from __future__ import annotations

import pytest
import yaml

from rannc_cli.errors import RanncError
from rannc_cli.profiler.format import BlockClass, BlockCost, Profile


def _cost(m: int, scale: float = 1.0) -> BlockCost:
    return BlockCost(m, 1e-3 * m * scale, 2e-3 * m * scale, 3e-3 * m * scale, 100 * m, 10 * m)


def test_cost_interpolation_and_extrapolation():
    cls = BlockClass(0, "sig", [0], [_cost(1), BlockCost(4, 4e-3, 8e-3, 12e-3, 400, 40)])
    mid = cls.cost_at(2)
    assert mid.forward_seconds == pytest.approx(2e-3) and mid.activation_bytes == 200
    beyond = cls.cost_at(8)
    assert beyond.backward_seconds == pytest.approx(16e-3) and beyond.peak_bytes == 80
    single = BlockClass(0, "sig", [0], [BlockCost(2, 1.0, 2.0, 3.0, 100, 10)])
    assert single.cost_at(4).forward_seconds == pytest.approx(2.0) and single.cost_at(4).activation_bytes == 200
    falling = BlockClass(0, "sig", [0], [BlockCost(2, 1.0, 1.0, 1.0, 100, 10), BlockCost(4, 0.1, 0.1, 0.1, 10, 1)])
    assert falling.cost_at(16).forward_seconds == 0.0  # clamped, never negative


@pytest.fixture()
def profile_dict(tmp_path):
    import torch
    import torch.nn as nn

    from rannc_cli.profiler.build import profile_model

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(8, 8)
            self.b = nn.Linear(8, 2)

        def forward(self, x, y):
            return nn.functional.cross_entropy(self.b(torch.relu(self.a(x))), y)

    prof, _ = profile_model(Net(), (torch.randn(4, 8), torch.randint(0, 2, (4,))), {}, mode="estimated",
                            device_spec="CPU-generic", use_cache=False)
    return prof.to_dict()


def _load(tmp_path, data) -> Profile:
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(data))
    return Profile.load(path)


def test_hand_edits_that_keep_references_load(tmp_path, profile_dict):
    profile_dict["classes"][0]["costs"][0]["forward_seconds"] = 0.5
    assert _load(tmp_path, profile_dict).classes[0].costs[0].forward_seconds == 0.5


@pytest.mark.parametrize("edit, message", [
    (lambda d: d.update(version=3), "profile format version 3"),
    (lambda d: d.update(format="something"), "is not a rannc profile"),
    (lambda d: d["blocks"][1].update(cls=99), "names class 99"),
    (lambda d: d["blocks"][1]["inputs"].append("nowhere"), "names value 'nowhere'"),
    (lambda d: d["blocks"][0]["params"].append("ghost.weight"), "reads parameter 'ghost.weight'"),
    (lambda d: d["classes"][0]["costs"][0].update(forward_seconds=-1.0), "negative or invalid cost"),
    (lambda d: d.pop("blocks"), "malformed rannc profile"),
    (lambda d: d.update(loss_value="nope"), "loss value 'nope'"),
])
def test_broken_hand_edits_are_refused_with_one_line(tmp_path, profile_dict, edit, message):
    edit(profile_dict)
    with pytest.raises(RanncError, match=message) as info:
        _load(tmp_path, profile_dict)
    assert "\n" not in info.value.one_line()


def test_missing_and_invalid_yaml_files(tmp_path):
    with pytest.raises(RanncError, match="does not exist"):
        Profile.load(tmp_path / "none.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("format: [unclosed")
    with pytest.raises(RanncError, match="not valid YAML"):
        Profile.load(bad)
