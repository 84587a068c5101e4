"""Sum parameter gradients over every rank that holds the parameter.

    reducer = GradReducer({(0, 1): [w1, b1], (0, 1, 3): [tied]}, groups, rank=1)
    reducer.start()     # asynchronous all-reduces, one flat bucket per rank set
    ...                 # other work overlaps here
    reducer.finish()    # wait, write the sums back into .grad

A parameter's rank set is every replica of every stage that uses it: a stage's replica group for
ordinary parameters, the union of several stages' groups for parameters tied across stages
(an embedding reused by the output layer), so tied gradients are summed over all holders.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors


class GradReducer:
    def __init__(self, params_by_ranks: dict[tuple[int, ...], list[torch.nn.Parameter]], groups: dict[tuple, Any],
                 rank: int, bucket_bytes: int = 32 << 20):
        self.buckets: list[tuple[Any, list[torch.nn.Parameter]]] = []
        for ranks, params in sorted(params_by_ranks.items()):
            if rank not in ranks or len(ranks) < 2:
                continue
            group = groups[ranks]
            by_dtype: dict[torch.dtype, list[torch.nn.Parameter]] = {}
            for p in params:
                by_dtype.setdefault(p.dtype, []).append(p)
            for same in by_dtype.values():
                chunk: list[torch.nn.Parameter] = []
                size = 0
                for p in same:
                    chunk.append(p)
                    size += p.numel() * p.element_size()
                    if size >= bucket_bytes:
                        self.buckets.append((group, chunk))
                        chunk, size = [], 0
                if chunk:
                    self.buckets.append((group, chunk))
        self._works: list[tuple[Any, torch.Tensor, list[torch.nn.Parameter]]] = []

    def start(self) -> None:
        for group, params in self.buckets:
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
            flat = _flatten_dense_tensors(grads)
            self._works.append((dist.all_reduce(flat, group=group, async_op=True), flat, params))

    def finish(self) -> None:
        for work, flat, params in self._works:
            work.wait()
            for p, g in zip(params, _unflatten_dense_tensors(flat, [p for p in params])):
                if p.grad is None:
                    p.grad = g.clone()
                else:
                    p.grad.copy_(g)
        self._works = []
