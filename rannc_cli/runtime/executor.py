"""Run one rank's share of a training step: its schedule's forwards and backwards, stage by stage.

    ex = Executor(bg, stages, layout, rank, device, "1f1b", microbatches=4, checkpoint=[False, True])
    local = ex.run(values, batch_size=32, train=True, seed_scale=1.0, step=7)
    # parameter gradients of this rank's stages are now accumulated in .grad (not yet all-reduced);
    # ``local`` is this rank's weighted share of the loss (0 on ranks not holding the loss)
    ex.my_stages   # [1] -- or [1, 5] for rank 1 of an interleaved plan with 4 groups and v = 2

The op order comes from rannc_cli.planner.schedules.rank_ops: one list of ``(kind, microbatch,
stage)`` per device group (GPipe, 1F1B, interleaved 1F1B with v stages per rank, ZB-H1). A rank
runs every stage of its group, always as the same replica index; values between two stages of
the same rank are handed over locally (p2p.Mailbox). For ``F(m)`` the
stage replica takes its slice of microbatch m: user inputs are sliced from the batch every rank
holds, values made by earlier stages arrive from the replicas whose slices overlap its own (any
earlier stage, not only the previous one), and its outputs leave the same way. ``B(m)`` receives
the gradients of its outputs (summed over consuming stages), runs autograd, and sends the
gradients of its inputs back; user inputs named in ``input_grads`` (inputs that require grad)
enter as leaves, and each slice's gradient is added into that buffer. The loss of slice (m, j) enters the total with weight n_mj / B
(mean-reduced losses) or 1 (sum-reduced), so the total equals the full-batch loss.

With ``zb`` (runtime/split_backward.py) ``B(m)`` computes only the gradients of the stage's inputs
and sends them at once; ``W(m)`` later computes the parameter gradients from the kept graph and
accumulates them into ``.grad`` (one accumulation per parameter and (stage, microbatch), as a
plain backward does). A checkpointed stage under ``zb`` runs ``F`` without a graph and recomputes
its forward once, at ``B``; the recomputed activations then live until ``W``.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint as _checkpoint

from rannc_cli.errors import RanncError
from rannc_cli.graph.blocks import BlockGraph
from rannc_cli.graph.stages import StageModule
from rannc_cli.planner.schedules import rank_ops
from rannc_cli.runtime.groups import Layout
from rannc_cli.runtime.microbatch import Range, join, overlap, rows_per_sample, slice_ranges, sym_value, take
from rannc_cli.runtime.p2p import Mailbox
from rannc_cli.runtime.split_backward import split_backward

_RANDOM_OPS = ("dropout", "bernoulli", "rand", "normal", "multinomial", "uniform", "exponential", "poisson")


@dataclass
class Value:
    """Static facts about one value a stage reads or emits."""

    name: str
    vid: int
    is_tensor: bool
    batch_dim: int | None
    rows: int  # batch-dim rows per sample
    grad: bool  # a floating tensor that carries gradient
    meta: Any


def _has_random_ops(stage: StageModule) -> bool:
    for node in stage.graph_module.graph.nodes:
        if node.op == "call_function" and any(k in str(node.target) for k in _RANDOM_OPS):
            return True
    return False


class Executor:
    """One rank's runner for a fixed set of stage modules and a plan (see the module docstring)."""

    def __init__(self, bg: BlockGraph, stages: list[StageModule], layout: Layout, rank: int, device: torch.device,
                 schedule: str, microbatches: int, checkpoint: list[bool], loss_weighting: str = "mean",
                 rng_base: int = 0):
        from rannc_cli.graph.capture import batch_dim_of

        self.bg = bg
        self.captured = captured = bg.captured
        self.stages = stages
        self.layout = layout
        self.rank = rank
        self.device = device
        self.schedule = schedule
        self.microbatches = microbatches
        self.checkpoint = checkpoint
        self.loss_weighting = loss_weighting
        self.rng_base = rng_base
        self.mailbox = Mailbox(device, rank)
        self.roles = layout.roles(rank)
        self.my_stages = [s for s, _ in self.roles]  # the stages this rank runs, in model order
        self.replica = dict(self.roles)  # stage -> this rank's replica index in it
        self.role = self.roles[0] if self.roles else None
        self._train_ops: list[tuple[str, int, int]] | None = None
        self.user_inputs = {i.placeholder: i for i in captured.inputs}
        self.producer: dict[str, int] = {}
        self.consumers: dict[str, list[int]] = {}
        for st in stages:
            for v in st.output_names:
                self.producer[v] = st.index
        for st in stages:
            for v in st.input_names:
                if v in self.producer:
                    self.consumers.setdefault(v, []).append(st.index)
        self.loss_stage = self.producer[captured.loss_node]
        names = list(dict.fromkeys([v for st in stages for v in (*st.input_names, *st.output_names)]))
        self.values: dict[str, Value] = {}
        for vid, name in enumerate(names):
            meta = captured.node(name).meta.get("val")
            if name in self.user_inputs:
                inp = self.user_inputs[name]
                bdim = inp.batch_dim if inp.is_tensor else None
            else:
                bdim = batch_dim_of(captured.node(name), captured.batch_symbol, captured.batch_size)
            rows = rows_per_sample(meta, bdim, captured.batch_symbol)
            is_tensor = isinstance(meta, torch.Tensor)
            self.values[name] = Value(name, vid, is_tensor, bdim, rows or 1,
                                      is_tensor and meta.is_floating_point() and name in bg.requires_grad, meta)
            if rows is None:
                raise RanncError(f"value {name} has a batch dimension that is not a multiple of the batch size",
                                 hint="move the stage boundary away from it (a plan with other stage boundaries)")
        self._check_slicing()
        self.random = [_has_random_ops(st) for st in stages]
        self.input_grads: dict[str, torch.Tensor] = {}  # user inputs that want a gradient -> its sum so far

    # ------------------------------------------------------------------ checks
    def _check_slicing(self) -> None:
        """The planner's acceptance rule (planner/redistribution.py), on this rank's stage values."""
        from rannc_cli.planner.redistribution import Crossing, check_crossings

        crossings = [Crossing(name, self.values[name].is_tensor, self.values[name].batch_dim, self.producer[name],
                              tuple(consumers)) for name, consumers in self.consumers.items()]
        check_crossings(crossings, [len(r) for r in self.layout.stage_ranks], self.microbatches,
                        self.captured.batch_symbol is not None)

    def check_batch(self, batch_size: int) -> None:
        for s, ranks in enumerate(self.layout.stage_ranks):
            smallest = min(hi - lo for row in slice_ranges(batch_size, self.microbatches, len(ranks)) for lo, hi in row)
            if smallest < 1:
                raise RanncError(f"a batch of {batch_size} samples in {self.microbatches} microbatches leaves a "
                                 f"replica of stage {s} ({len(ranks)} replicas) without samples",
                                 hint="use a larger batch, fewer microbatches or a plan with fewer replicas")

    # ------------------------------------------------------------------ one step
    def ops(self, train: bool) -> list[tuple[str, int, int]]:
        """This rank's ops ``(kind, microbatch, stage)`` for one step (forwards only without training)."""
        if not self.my_stages:
            return []
        if not train:
            return [("F", m, s) for m in range(self.microbatches) for s in self.my_stages]
        if self._train_ops is None:
            group = self.my_stages[0] % self.layout.groups
            self._train_ops = rank_ops(self.schedule, self.layout.groups, self.microbatches, self.layout.virtual)[group]
        return self._train_ops

    def run(self, values: dict[str, Any], batch_size: int, train: bool, seed_scale: float = 1.0,
            step: int = 0) -> torch.Tensor:
        """Run this rank's ops for one step; return its weighted loss share (float64 scalar)."""
        self.check_batch(batch_size)
        local = torch.zeros((), dtype=torch.float64)
        if not self.roles:
            return local
        ranges = [slice_ranges(batch_size, self.microbatches, len(r)) for r in self.layout.stage_ranks]
        mine = {s: [row[j] for row in ranges[s]] for s, j in self.roles}
        zb = self.schedule == "zb"
        saved: dict[tuple[int, int], tuple[list[Any], tuple | None]] = {}  # (stage, microbatch) -> inputs, outputs
        weights: dict[tuple[int, int], Any] = {}  # zb: (stage, microbatch) -> its pending W
        try:
            for kind, m, s in self.ops(train):
                stage = self.stages[s]
                if kind == "F":
                    inputs = [self._input(name, s, m, mine[s][m], ranges, values, train) for name in stage.input_names]
                    recompute = train and zb and self.checkpoint[s]  # graph-free forward, rebuilt once at B
                    with self._rng(s, m, step), (torch.no_grad() if recompute else contextlib.nullcontext()):
                        outputs = self._forward(stage, inputs, train and self.checkpoint[s] and not zb)
                    for name, out in zip(stage.output_names, outputs):
                        if name == self.captured.loss_node:
                            local += self._weight(mine[s][m], batch_size) * out.detach().to(torch.float64).cpu()
                        else:
                            self._send_forward(name, s, out, m, mine[s][m], ranges)
                    if train:
                        saved[(s, m)] = (inputs, None if recompute else outputs)
                elif kind == "B":
                    inputs, outputs = saved.pop((s, m))
                    if not zb:
                        self._backward(stage, inputs, outputs, m, mine[s][m], ranges, batch_size, seed_scale)
                        continue
                    if outputs is None:  # checkpointed: the forward again, with its graph this time
                        with self._rng(s, m, step):
                            outputs = self._recompute(stage, inputs)
                    weights[(s, m)] = self._backward_input(stage, inputs, outputs, m, mine[s][m], ranges, batch_size,
                                                           seed_scale)
                else:
                    weights.pop((s, m)).run()
        finally:
            self.mailbox.flush()
        return local

    def _weight(self, rng: Range, batch_size: int) -> float:
        return 1.0 if self.loss_weighting == "sum" else (rng[1] - rng[0]) / batch_size

    @contextlib.contextmanager
    def _rng(self, s: int, m: int, step: int):
        """Random ops draw from a stream fixed by (seed, step, microbatch, stage, replica)."""
        if not self.random[s]:
            yield
            return
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices, device_type=self.device.type):
            seed = (self.rng_base * 1000003 + step * 7919 + m * 104729 + s * 131 + self.replica[s]) % (2 ** 62)
            torch.manual_seed(seed)
            yield

    @staticmethod
    def _forward(stage: StageModule, inputs: list[Any], use_checkpoint: bool) -> tuple:
        gm = stage.graph_module
        if use_checkpoint and torch.is_grad_enabled():
            results = _checkpoint(gm, *inputs, use_reentrant=False)
        else:
            results = gm(*inputs)
        n_out = len(stage.output_names)
        outputs, updates = tuple(results[:n_out]), results[n_out:]
        if updates:  # outside the checkpointed region: recomputation must not update buffers twice
            with torch.no_grad():
                for (_name, module, attr), value in zip(stage._buffer_updates, updates):
                    getattr(module, attr).copy_(value)
        return outputs

    @staticmethod
    def _recompute(stage: StageModule, inputs: list[Any]) -> tuple:
        """A checkpointed stage's forward again, with a graph, without updating buffers a second time."""
        with torch.enable_grad():
            return tuple(stage.graph_module(*inputs)[:len(stage.output_names)])

    # ------------------------------------------------------------------ inputs and outputs
    def _tag(self, v: Value, m: int, backward: bool, consumer: int) -> int:
        """Unique per (value, microbatch, consuming stage, direction): two consumers may share a rank."""
        return (((m * len(self.values) + v.vid) * len(self.stages) + consumer) << 1) | int(backward)

    def _input(self, name: str, s: int, m: int, mine: Range, ranges: list, values: dict[str, Any], train: bool) -> Any:
        v = self.values[name]
        if name in self.user_inputs:
            x = values[name]
            if isinstance(x, torch.Tensor) and v.batch_dim is not None:
                x = x.narrow(v.batch_dim, mine[0] * v.rows, (mine[1] - mine[0]) * v.rows)
            if isinstance(x, torch.Tensor) and x.device != self.device:
                x = x.to(self.device, non_blocking=True)
            if train and name in self.input_grads:
                x = x.detach().requires_grad_(True)  # a leaf: its gradient lands in input_grads, not in x
            return x
        if not v.is_tensor:
            return sym_value(v.meta, self.captured.batch_symbol, mine[1] - mine[0])
        src_stage = self.producer[name]
        src_ranks = self.layout.stage_ranks[src_stage]
        parts = []
        for i, their in enumerate(ranges[src_stage][m]):
            piece = self._piece(v, their, mine)
            if piece is not None:
                parts.append(self.mailbox.recv(src_ranks[i], self._tag(v, m, False, s),
                                               (v.vid, False, piece[1] - piece[0], s)))
        x = join(parts, v.batch_dim)
        if train and v.grad:
            x.requires_grad_(True)
        return x

    def _piece(self, v: Value, producer: Range, consumer: Range) -> Range | None:
        """Samples one producer slice gives one consumer slice (whole values without a batch dim go i -> i)."""
        if v.batch_dim is None:
            return consumer if producer == consumer else None
        return overlap(producer, consumer)

    def _send_forward(self, name: str, s: int, out: Any, m: int, mine: Range, ranges: list) -> None:
        v = self.values[name]
        if not v.is_tensor:
            return
        for t in self.consumers.get(name, []):
            for k, theirs in enumerate(ranges[t][m]):
                piece = self._piece(v, mine, theirs)
                if piece is not None:
                    self.mailbox.send(take(out, v.batch_dim, v.rows, mine, piece), self.layout.stage_ranks[t][k],
                                      self._tag(v, m, False, t), (v.vid, False, piece[1] - piece[0], t))

    def _backward(self, stage: StageModule, inputs: list[Any], outputs: tuple, m: int, mine: Range, ranges: list,
                  batch_size: int, seed_scale: float) -> None:
        """1F1B/GPipe 'B': one autograd pass for input and parameter gradients."""
        tensors, grads = self._output_grads(stage, outputs, m, mine, ranges, batch_size, seed_scale)
        if tensors:
            torch.autograd.backward(tensors, grads)
        self._hand_back(stage, inputs, [x.grad if isinstance(x, torch.Tensor) else None for x in inputs], m, mine,
                        ranges)

    def _backward_input(self, stage: StageModule, inputs: list[Any], outputs: tuple, m: int, mine: Range,
                        ranges: list, batch_size: int, seed_scale: float) -> Any:
        """ZB-H1 'B': input gradients only, sent at once; returns the pending 'W' (``.run()``)."""
        tensors, grads = self._output_grads(stage, outputs, m, mine, ranges, batch_size, seed_scale)
        params = [p for p in stage.graph_module.parameters() if p.requires_grad]
        wanted = [x if isinstance(x, torch.Tensor) and x.requires_grad else None for x in inputs]
        input_grads, weight = split_backward(tensors, grads, wanted, params)
        self._hand_back(stage, inputs, input_grads, m, mine, ranges)
        return weight

    def _output_grads(self, stage: StageModule, outputs: tuple, m: int, mine: Range, ranges: list, batch_size: int,
                      seed_scale: float) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The stage outputs that take part in the backward, and their gradients (received, or the loss seed)."""
        tensors, grads = [], []
        for name, out in zip(stage.output_names, outputs):
            v = self.values[name]
            if name == self.captured.loss_node:
                g = torch.full_like(out, self._weight(mine, batch_size) * seed_scale)
            elif v.grad:
                g = None
                for t in self.consumers.get(name, []):
                    parts = []
                    for k, theirs in enumerate(ranges[t][m]):
                        piece = self._piece(v, mine, theirs)
                        if piece is not None:
                            parts.append(self.mailbox.recv(self.layout.stage_ranks[t][k], self._tag(v, m, True, t),
                                                           (v.vid, True, piece[1] - piece[0], t)))
                    if parts:
                        part = join(parts, v.batch_dim)
                        g = part if g is None else g + part
            else:
                continue
            if g is not None and isinstance(out, torch.Tensor) and out.requires_grad:
                tensors.append(out)
                grads.append(g.to(out.dtype) if g.dtype != out.dtype else g)
        return tensors, grads

    def _hand_back(self, stage: StageModule, inputs: list[Any], input_grads: list[torch.Tensor | None], m: int,
                   mine: Range, ranges: list) -> None:
        """Add user inputs' gradients into ``input_grads``; send the other inputs' gradients to their producers."""
        for name, x, xg in zip(stage.input_names, inputs, input_grads):
            v = self.values[name]
            if name in self.input_grads and isinstance(x, torch.Tensor) and xg is not None:
                total = self.input_grads[name]
                part = total if v.batch_dim is None else \
                    total.narrow(v.batch_dim, mine[0] * v.rows, (mine[1] - mine[0]) * v.rows)
                part += xg.to(part.device, part.dtype)
            if name in self.user_inputs or not v.grad:
                continue
            g = xg if xg is not None else torch.zeros_like(x)
            src_stage = self.producer[name]
            for i, their in enumerate(ranges[src_stage][m]):
                piece = self._piece(v, their, mine)
                if piece is not None:
                    self.mailbox.send(take(g, v.batch_dim, v.rows, mine, piece), self.layout.stage_ranks[src_stage][i],
                                      self._tag(v, m, True, stage.index), (v.vid, True, piece[1] - piece[0], stage.index))
