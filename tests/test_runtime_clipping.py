"""clip_grad_norm_ routing and norm arithmetic in one process (the global norm is tested in
tests/test_runtime_idioms.py with real ranks)."""

from __future__ import annotations

import math

import pytest
import torch

from rannc_cli.runtime import clipping


def _grads(seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(5, 3, generator=g), torch.zeros(4), torch.randn(7, generator=g) * 10]


@pytest.mark.parametrize("norm_type", [2.0, 1.0, 3.0, math.inf, -math.inf, 0.0])
@pytest.mark.parametrize("foreach", [None, False])
def test_local_sums_combine_to_torchs_total_norm(norm_type, foreach):
    """Two ranks' contributions, combined as the all-reduce does, give torch's norm of all gradients."""
    grads = _grads()
    parts = [clipping._local_total(grads[:1], norm_type, foreach), clipping._local_total(grads[1:], norm_type, foreach)]
    if norm_type == math.inf:
        combined = max(parts)
    elif norm_type == -math.inf:
        combined = min(parts)
    elif norm_type == 0:
        combined = sum(parts)
    else:
        combined = sum(parts) ** (1 / norm_type)
    expected = float(torch.nn.utils.get_total_norm(grads, norm_type))
    assert combined == pytest.approx(expected, rel=1e-6)


def test_without_a_distributed_model_clip_grad_norm_is_torchs():
    """After the swap, every alias of clip_grad_norm_ still runs torch's code for plain models."""
    from torch.nn.utils import clip_grad_norm_ as imported_before

    clipping._install()
    results = []
    for fn in (imported_before, torch.nn.utils.clip_grad_norm_, clipping._ORIGINAL["clip_grad_norm_"]):
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 3)
        model(torch.randn(6, 4)).pow(2).sum().backward()
        norm = fn(model.parameters(), 0.5)
        results.append((float(norm), [p.grad.clone() for p in model.parameters()]))
    for norm, grads in results[1:]:
        assert norm == results[0][0] and norm > 0.5
        assert all(torch.equal(a, b) for a, b in zip(grads, results[0][1]))
    assert torch.nn.utils.clip_grad_norm_ is imported_before  # the public object is untouched
