"""BatchNorm statistics shared by the replicas of a stage (``batchnorm="sync"``), as SyncBatchNorm does.

    n = sync_batch_norm(stage.graph_module, group)   # rewrites the stage's training-mode BatchNorms
    # each forward now normalises with the mean and variance of the whole microbatch, over all
    # replicas of the stage; backward all-reduces the statistics' gradients the same way

The captured graph computes BatchNorm as ``aten._native_batch_norm_legit_functional`` (training
mode). The rewrite swaps that node's target for ``SyncedBatchNorm``, which sums counts and sums,
then centred squares, over the stage's replica group with a differentiable all-reduce (its
backward sums the gradients the same way), and returns the same five values (output, mean, inverse std, new running
mean and variance, the latter from the unbiased variance of the whole microbatch). With one
microbatch the numbers are the single-device ones; with M microbatches each microbatch is
normalised on its own, as gradient accumulation over M steps on one device would.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import fx

_TRAINING_BN = torch.ops.aten._native_batch_norm_legit_functional.default


class _AllReduceSum(torch.autograd.Function):
    """Sum over ``group``; the gradient of every replica's copy is the sum of all replicas' gradients."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group: Any) -> torch.Tensor:  # type: ignore[override]
        import torch.distributed as dist

        ctx.group = group
        out = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        return _AllReduceSum.apply(grad.contiguous(), ctx.group), None


def all_reduce(tensor: torch.Tensor, group: Any) -> torch.Tensor:
    return _AllReduceSum.apply(tensor, group)


class SyncedBatchNorm:
    """A callable graph target: training-mode BatchNorm with statistics over ``group``."""

    __name__ = "synced_batch_norm"

    def __init__(self, group: Any):
        self.group = group

    def __call__(self, x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                 running_mean: torch.Tensor, running_var: torch.Tensor, training: bool, momentum: float,
                 eps: float) -> tuple[torch.Tensor, ...]:
        if not training:
            return _TRAINING_BN(x, weight, bias, running_mean, running_var, training, momentum, eps)
        dims = [0, *range(2, x.dim())]
        shape = [1, -1] + [1] * (x.dim() - 2)
        stat_dtype = torch.promote_types(x.dtype, torch.float32)
        xs = x.to(stat_dtype)
        count = torch.full((1,), float(x.numel() // max(x.shape[1], 1)), dtype=stat_dtype, device=x.device)
        first = all_reduce(torch.cat([xs.sum(dims), count]), group=self.group)
        total = first[-1]
        mean = first[:-1] / total
        centred = xs - mean.view(shape)
        var = all_reduce((centred * centred).sum(dims), group=self.group) / total
        invstd = torch.rsqrt(var + eps)
        out = centred * invstd.view(shape)
        if weight is not None:
            out = out * weight.view(shape)
        if bias is not None:
            out = out + bias.view(shape)
        with torch.no_grad():
            n = float(total)
            unbiased = var * (n / (n - 1)) if n > 1 else var
            new_mean = running_mean * (1 - momentum) + mean.to(running_mean.dtype) * momentum
            new_var = running_var * (1 - momentum) + unbiased.to(running_var.dtype) * momentum
        return out.to(x.dtype), mean, invstd, new_mean, new_var


def batch_norm_nodes(graph_module: fx.GraphModule) -> list[fx.Node]:
    """The training-mode BatchNorm nodes of a graph."""
    return [n for n in graph_module.graph.nodes if n.op == "call_function" and n.target is _TRAINING_BN]


def sync_batch_norm(graph_module: fx.GraphModule, group: Any) -> int:
    """Make every training-mode BatchNorm of ``graph_module`` synchronise over ``group``; returns how many."""
    nodes = batch_norm_nodes(graph_module)
    if not nodes:
        return 0
    target = SyncedBatchNorm(group)
    for node in nodes:
        node.target = target
    graph_module.recompile()
    return len(nodes)
