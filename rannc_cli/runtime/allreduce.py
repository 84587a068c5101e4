"""Sum parameter gradients over every rank that holds the parameter.

    reducer = GradReducer({(0, 1): [w1, b1], (0, 1, 3): [tied]}, groups, rank=1)
    reducer.start()     # asynchronous all-reduces, one flat bucket per rank set
    ...                 # other work overlaps here
    reducer.finish()    # wait, write the sums back into .grad

``OverlapReducer`` (plan ``allreduce_overlap``) has the same interface and starts each bucket
while the backward still runs.

A parameter's rank set is every replica of every stage that uses it: a stage's replica group for
ordinary parameters, the union of several stages' groups for parameters tied across stages
(an embedding reused by the output layer), so tied gradients are summed over all holders.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors


def _write_back(works: list[tuple[Any, torch.Tensor, list[torch.nn.Parameter]]]) -> None:
    """Wait for each bucket's all-reduce and write its sums back into the parameters' ``.grad``."""
    for work, flat, params in works:
        work.wait()
        for p, g in zip(params, _unflatten_dense_tensors(flat, params)):
            if p.grad is None:
                p.grad = g.clone()
            else:
                p.grad.copy_(g)


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

    def arm(self, stages: list[torch.nn.Module], microbatches: int) -> None:
        """Nothing to prepare: this reducer starts after the whole backward (see OverlapReducer)."""

    def start(self) -> None:
        for group, params in self.buckets:
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
            flat = _flatten_dense_tensors(grads)
            self._works.append((dist.all_reduce(flat, group=group, async_op=True), flat, params))

    def finish(self) -> None:
        _write_back(self._works)
        self._works = []


class OverlapReducer:
    """Gradient all-reduce in buckets, each launched while the stage's backward still runs.

        reducer = OverlapReducer(params_by_ranks, groups, rank, list(model.parameters()), bucket_bytes=25 << 20)
        reducer.arm([stage_module], microbatches=4)   # before the step's backwards
        ...                                           # backwards: full buckets start their all-reduce
        reducer.start()                               # buckets not launched yet (a parameter got no gradient)
        reducer.finish()                              # wait, write the sums back into .grad

    Buckets are made as DDP makes them: per rank set (a stage's replicas, or the union of the
    holders of a tied parameter) and dtype, about ``bucket_bytes`` each, in reverse parameter order.
    A post-accumulate-grad hook counts each parameter's accumulations; ``arm`` says how many the
    step brings (microbatches x this rank's stage modules that use the parameter), so a bucket is
    final when all its parameters reached their count, whatever order the schedule runs its ops in.
    Buckets launch in one fixed order (by the model position of their first parameter), a ready
    bucket waiting for the earlier ones: every rank issues its collectives in the same order, so no
    two ranks can wait on each other. A gradient computed without accumulating into ``.grad`` (for
    example ``torch.autograd.grad``) is never counted; its bucket launches at ``start``, still exact.
    """

    def __init__(self, params_by_ranks: dict[tuple[int, ...], list[torch.nn.Parameter]], groups: dict[tuple, Any],
                 rank: int, model_params: list[torch.nn.Parameter], bucket_bytes: int = 25 << 20):
        position: dict[int, int] = {}
        for p in model_params:
            position.setdefault(id(p), len(position))
        open_: dict[tuple, list[torch.nn.Parameter]] = {}
        sizes: dict[tuple, int] = {}
        buckets: list[tuple[int, Any, list[torch.nn.Parameter]]] = []
        mine = [(ranks, p) for ranks, params in params_by_ranks.items() if rank in ranks and len(ranks) > 1
                for p in params]
        for ranks, p in sorted(mine, key=lambda rp: -position[id(rp[1])]):  # reverse model order
            key = (ranks, p.dtype)
            open_.setdefault(key, []).append(p)
            sizes[key] = sizes.get(key, 0) + p.numel() * p.element_size()
            if sizes[key] >= bucket_bytes:
                buckets.append((-position[id(open_[key][0])], groups[ranks], open_.pop(key)))
                sizes[key] = 0
        for key, params in open_.items():
            buckets.append((-position[id(params[0])], groups[key[0]], params))
        buckets.sort(key=lambda b: b[0])
        self.buckets = [(group, params) for _, group, params in buckets]
        self.bucket_of = {id(p): i for i, (_, params) in enumerate(self.buckets) for p in params}
        self.expected: dict[int, int] = {}
        self.seen: dict[int, int] = {}
        self.missing: list[int] = []  # per bucket: parameters still short of their count
        self.launched = 0
        self.early = 0  # buckets of the last step launched during the backward (not by start)
        self.armed = False
        self._works: list[tuple[Any, torch.Tensor, list[torch.nn.Parameter]]] = []
        for _, params in self.buckets:
            for p in params:
                p.register_post_accumulate_grad_hook(self._accumulated)

    def arm(self, stages: list[torch.nn.Module], microbatches: int) -> None:
        """Before a training step: each parameter's number of accumulations in this step."""
        uses: dict[int, int] = {}
        for stage in stages:
            for p in {id(q): q for q in stage.parameters()}.values():
                uses[id(p)] = uses.get(id(p), 0) + 1
        self.expected = {id(p): microbatches * uses.get(id(p), 0) for _, params in self.buckets for p in params}
        self.seen = {k: 0 for k in self.expected}
        self.missing = [sum(1 for p in params if self.expected[id(p)] > 0) for _, params in self.buckets]
        self.launched = 0
        self.early = 0
        self.armed = True
        self._launch_ready()

    def _accumulated(self, p: torch.Tensor) -> None:
        if not self.armed or id(p) not in self.bucket_of:
            return
        b = self.bucket_of[id(p)]
        self.seen[id(p)] += 1
        if b < self.launched or self.seen[id(p)] > self.expected[id(p)]:
            from rannc_cli.errors import RanncError

            raise RanncError(f"a parameter's gradient was accumulated {self.seen[id(p)]} times in one step, more than "
                             f"the {self.expected[id(p)]} the schedule brings, after its all-reduce started",
                             hint="please report this model; set allreduce_overlap: false in the plan meanwhile")
        if self.seen[id(p)] == self.expected[id(p)]:
            self.missing[b] -= 1
            if b == self.launched:
                self._launch_ready()

    def _launch_ready(self) -> None:
        while self.launched < len(self.buckets) and self.missing[self.launched] == 0:
            self._launch(self.launched)
            self.early += 1

    def _launch(self, b: int) -> None:
        group, params = self.buckets[b]
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = _flatten_dense_tensors(grads)
        self._works.append((dist.all_reduce(flat, group=group, async_op=True), flat, params))
        self.launched = b + 1

    def start(self) -> None:
        """Launch every bucket not launched yet, in order."""
        while self.launched < len(self.buckets):
            self._launch(self.launched)

    def finish(self) -> None:
        self.start()
        self.armed = False
        _write_back(self._works)
        self._works = []
