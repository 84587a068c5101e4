"""The cost model: time and memory of one pipeline stage, and the step-time objective of a plan.

    cm = CostModel(profile, cluster, batch_size=256)
    sc = cm.stage_cost(0, 12, replicas=4, microbatches=8, link_in=None, allreduce="intra",
                       in_flight=3, checkpoint=False)
    sc.forward, sc.backward, sc.allreduce, sc.memory     # seconds per microbatch, bytes per GPU
    objective("1f1b", 8, [sc, ...])                      # predicted step seconds (see below)

Per stage covering blocks ``start..end-1`` with ``r`` replicas, ``M`` microbatches, batch ``B``:
- each replica computes a shard of ``ceil(ceil(B / M) / r)`` samples of every microbatch;
- compute: sums of the profile's block costs at that shard (checkpointing: recompute backward);
- p2p, charged to the receiving stage: a replica receives every value its blocks consume from
  earlier stages (values skipping stages are sent directly, priced on this stage's input link),
  then after its backward sends their gradients back: ``latency + bytes / bandwidth`` each way;
  the link is intra-node when this stage and the previous one sit on one node, else inter-node;
- all-reduce of the stage's trainable parameter gradients over its r replicas (ring):
  ``2 (r-1)/r * bytes / bandwidth + 2 (r-1) * latency``, intra-node bandwidth when the replicas
  share a node; without overlap it runs after the pipeline flush, all stages at once; with
  ``overlap`` (plan ``allreduce_overlap``) only its exposed part is charged
  (``exposed_allreduce``: what is left after hiding behind the stage's last backward op, at least
  the last bucket's share); ZeRO-1 (``zero``) divides the optimizer state by r and adds the
  all-gather of the updated parameters after the step (half an all-reduce, never hidden; the
  gradients are still all-reduced in full, see ``exposed_allreduce``);
- 'zb' splits the backward into B (input gradients) and W (weight gradients), per block
  (``split_arrays``): the profile's measured (or estimated) ``backward_input_seconds`` and
  ``backward_weight_seconds`` where it has them (format version 2; B + W may exceed the plain
  backward: the runtime's split walks the graph and runs one backward call per parameter group),
  else the plain backward split by ``weight_share``: W_SHARE = 1/2 of it for blocks with
  trainable parameters, none for parameter-free blocks. The runtime's B computes only the
  gradients of the stage's inputs, so blocks not on a gradient path from them (all of a first
  stage's) have B = 0 and their whole plain backward in W (``stage_split``). A zb stage's
  backward is then B + W (checkpointed: forward + B + W, the recompute runs at B), its W op W;
- memory per GPU: parameters and buffers + gradients + optimizer state (trainable bytes x
  ``optimizer_state_factor``) + in-flight microbatches x (saved activations + received inputs)
  + the largest block's working peak; with checkpointing only the received inputs stay per
  in-flight microbatch, plus one microbatch's activations during its recompute. In flight:
  GPipe keeps all M; 1F1B keeps min(M, S - s) at stage s of S. Usable memory is the GPU's
  memory x (1 - memory_margin).

Objective (what the search minimises; the exhaustive search uses the same), F = forward + p2p in,
Bw = backward + gradient send, U = F + Bw:
- 1F1B: ``sum_s U_s + max_s [(M - 1) U_s - w_s F_s] + max_s allreduce_s``, ``w_s = min(S - s - 1, M - 1)``
- GPipe: ``sum_s U_s + (M - 1) (max_s F_s + max_s Bw_s) + max_s allreduce_s``
The GPipe formula is exactly the event simulation of its schedule (simulate.py). For 1F1B the
usual bubble formula ``sum_s U_s + (M - 1) max_s U_s`` is exact only for balanced stages and
over-charges a pipeline whose slowest stage s comes early: the round trip of the first microbatch
through the stages after s overlaps the w_s warm-up forwards s runs meanwhile, and the bubble
formula charges that round trip in full. Subtracting ``w_s F_s`` inside the max credits that
overlap (a per-stage term, so the DP stays exact: ``w_s`` depends only on the stages left, which
the DP state carries). On 3000 random pipelines (1-16 stages, M 1-64, backward 1.5-3x forward)
the bubble formula is 0 to +23% off the simulation (mean +3.4%), this one -9% to 0 (mean -0.3%);
both are exact for balanced stages. The simulation still ranks the final candidates.

With one microbatch the stages run one after another, so the max terms vanish and every cut
costs the same compute; the objective then keeps ``TIE_WEIGHT`` (1%) of the bottleneck term
(``max_weight``), so that between cuts the model otherwise finds (nearly) equally fast the
time-balanced one wins. With a forced stage count the weight is ``FORCED_TIE_WEIGHT`` (25%): such
a count is asked for memory or layout, and a cut that saves one small transfer by leaving a stage
nearly empty honours it only in name. The final ranking adds the same term, at every M, to the
simulated step (``rank_seconds``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from rannc_cli.errors import RanncError
from rannc_cli.planner.cluster import ClusterSpec
from rannc_cli.profiler.format import Profile

SCHEDULES = ("1f1b", "gpipe")  # what the DP searches; 'interleaved' and 'zb' are priced by simulation (planner.py)
W_SHARE = 0.5  # zb: share of a block's backward that is weight gradients, for blocks with trainable parameters
BUCKET_MB = 25.0  # all-reduce bucket size when the setting allreduce_bucket_mb is not known
_FLOAT_DTYPES = ("float", "bfloat", "half", "double", "complex")


@dataclass(frozen=True)
class StageCost:
    forward: float  # seconds per microbatch: compute + receiving inputs
    backward: float  # seconds per microbatch: (re)compute + sending input gradients
    allreduce: float  # seconds per step
    memory: float  # peak bytes per GPU
    compute_forward: float
    compute_backward: float
    p2p_forward: float
    p2p_backward: float
    shard: int  # samples per replica per microbatch
    checkpoint: bool
    feasible: bool  # memory fits
    weight: float = 0.0  # 'zb': the weight-gradient (W) seconds included in ``backward``; else 0
    allreduce_total: float = 0.0  # full all-reduce seconds (``allreduce`` is the part charged to the step)
    grad_seconds: float = 0.0  # compute of the op whose end makes the gradients final (backward, or W with 'zb')
    work_peak: float = 0.0  # the largest block's working peak, included in ``memory``

    @property
    def total(self) -> float:
        return self.forward + self.backward


@dataclass(frozen=True)
class RangeInfo:
    param_bytes: int  # parameters and buffers read, each counted once
    trainable_bytes: int
    in_per_sample: int  # values received from earlier stages
    in_fixed: int
    grad_per_sample: int  # gradients of those values (floating tensors only)
    grad_fixed: int


TIE_WEIGHT = 0.01  # weight of the bottleneck term at one microbatch (see the module doc)
FORCED_TIE_WEIGHT = 0.25  # the same with a forced stage count, which must cut the model for real


def max_weight(microbatches: int, tie: float = TIE_WEIGHT) -> float:
    """Weight of the objective's bottleneck term: ``M - 1``, or ``tie`` at one microbatch."""
    return microbatches - 1.0 if microbatches > 1 else tie


def rank_seconds(step: float, forward: list[float], backward: list[float], microbatches: int,
                 tie: float = TIE_WEIGHT) -> float:
    """The final ranking key of a plan: its simulated step plus ``tie`` x its slowest stage's time
    per microbatch (at every M, so that plans of different microbatch counts compare fairly)."""
    if not forward:
        return step
    return step + tie * max(f + b for f, b in zip(forward, backward))


def objective(schedule: str, microbatches: int, costs: list[StageCost], tie: float = TIE_WEIGHT) -> float:
    """Predicted step seconds of a plan (formula in the module doc)."""
    if not costs:
        return math.inf
    total = sum(c.forward + c.backward for c in costs)
    ar = max(c.allreduce for c in costs)
    if schedule == "gpipe":
        return total + max_weight(microbatches, tie) * (max(c.forward for c in costs) + max(c.backward for c in costs)) + ar
    n = len(costs)
    return total + max(bottleneck_1f1b(c.forward + c.backward, c.forward, microbatches, n - i, tie)
                       for i, c in enumerate(costs)) + ar


def bucket_bytes() -> float:
    """All-reduce bucket bytes: the setting ``allreduce_bucket_mb`` where known, else 25 MiB."""
    from rannc_cli.config import settings

    try:
        return float(settings.get("allreduce_bucket_mb")) * (1 << 20)
    except RanncError:
        return BUCKET_MB * (1 << 20)


def exposed_allreduce(total, grad_seconds, nbytes, zero: int, overlap: bool, bucket: float):
    """Seconds of a stage's gradient communication the step waits for, given ``total``, the seconds
    of one all-reduce of its gradients (numpy arrays or floats).

    Without overlap all of it (it runs after the drain). With overlap the buckets (reverse
    parameter order, ``bucket`` bytes each) start as the stage's last backward op (``grad_seconds``
    of compute, the W op with 'zb') makes them final, so they run under that op and what sticks
    out is ``max(total - grad_seconds, last bucket's share)``: the last bucket holds the first
    parameters, final only at the op's end. ZeRO-1 as runtime/zero.py runs it keeps the full
    all-reduce (``.grad`` stays the single-device gradient, so clipping and GradScaler work
    unchanged) and adds the all-gather of the updated parameter slices after the optimizer step:
    ``(r-1)/r`` of the bytes, half an all-reduce's time, never hidden."""
    gather = np.multiply(total, 0.5) if zero else 0.0
    if not overlap:
        out = np.add(total, gather)
    else:
        share = np.minimum(1.0, bucket / np.maximum(nbytes, 1.0))
        out = np.maximum(np.subtract(total, grad_seconds), np.multiply(total, share)) + gather
    return float(out) if np.ndim(out) == 0 else out


def warmup(microbatches: int, stages_left: int) -> int:
    """Forwards a 1F1B stage runs before its first backward, less one: min(S - s - 1, M - 1)."""
    return min(stages_left - 1, microbatches - 1)


def bottleneck_1f1b(total: float, forward: float, microbatches: int, stages_left: int,
                    tie: float = TIE_WEIGHT) -> float:
    """A 1F1B stage's term of the objective: ``(M - 1) U_s - min(S - s - 1, M - 1) F_s`` (at M = 1:
    ``tie * U_s``)."""
    return max_weight(microbatches, tie) * total - warmup(microbatches, stages_left) * forward


def in_flight(schedule: str, microbatches: int, stages: int, index: int) -> int:
    """Microbatches whose activations a stage holds at once: GPipe all, 1F1B min(M, S - s)."""
    return microbatches if schedule == "gpipe" else min(microbatches, stages - index)


class CostModel:
    """Stage costs of one profile on one cluster at one global batch size."""

    def __init__(self, profile: Profile, cluster: ClusterSpec, batch_size: int | None = None,
                 memory_margin: float | None = None, optimizer_state_factor: float | None = None):
        from rannc_cli.config import settings

        self.profile = profile
        self.cluster = cluster
        self.batch_size = int(batch_size or profile.batch_size)
        if self.batch_size < 1:
            raise RanncError(f"batch size must be at least 1 (got {self.batch_size})")
        self.margin = float(settings.get("memory_margin") if memory_margin is None else memory_margin)
        self.opt_factor = float(settings.get("optimizer_state_factor") if optimizer_state_factor is None
                                else optimizer_state_factor)
        if not 0 <= self.margin < 1:
            raise RanncError(f"memory_margin must be in [0, 1) (got {self.margin})", hint="fix RANNC_MEMORY_MARGIN")
        if self.opt_factor < 0:
            raise RanncError(f"optimizer_state_factor must be >= 0 (got {self.opt_factor})")
        self.capacity = cluster.memory_per_gpu * (1.0 - self.margin)
        self.n = len(profile.blocks)
        self._block_arrays: dict[int, tuple[np.ndarray, ...]] = {}
        self._ranges: dict[tuple[int, int], RangeInfo] = {}
        self._shared: bool | None = None
        self._blocked: list[bool] | None = None
        self._float_value = {k: (v.is_tensor and any(t in v.dtype for t in _FLOAT_DTYPES))
                             for k, v in profile.values.items()}

    # ------------------------------------------------------------------ sizes
    def microbatch(self, microbatches: int) -> int:
        return -(-self.batch_size // microbatches)

    def shard(self, microbatches: int, replicas: int) -> int:
        return -(-self.microbatch(microbatches) // replicas)

    # ------------------------------------------------------------------ per-block arrays
    def block_arrays(self, shard: int) -> tuple[np.ndarray, ...]:
        """(forward, backward, recompute_backward, activation, peak) per block at this shard size."""
        if shard not in self._block_arrays:
            per_class = {c.id: c.cost_at(shard) for c in self.profile.classes}
            rows = [per_class[b.cls] for b in self.profile.blocks]
            self._block_arrays[shard] = (
                np.array([c.forward_seconds for c in rows], dtype=float),
                np.array([c.backward_seconds for c in rows], dtype=float),
                np.array([c.recompute_backward_seconds for c in rows], dtype=float),
                np.array([c.activation_bytes for c in rows], dtype=float),
                np.array([c.peak_bytes for c in rows], dtype=float),
            )
        return self._block_arrays[shard]

    def range_info(self, start: int, end: int) -> RangeInfo:
        """Parameters and received values of the blocks ``start..end-1``."""
        key = (start, end)
        info = self._ranges.get(key)
        if info is None:
            prof = self.profile
            names = {p for b in range(start, end) for p in prof.blocks[b].params}
            pbytes = sum(prof.parameters[p].bytes for p in names)
            tbytes = sum(prof.parameters[p].bytes for p in names
                         if prof.parameters[p].trainable and prof.parameters[p].kind == "parameter")
            received = set()
            for b in range(start, end):
                for v in prof.blocks[b].inputs:
                    producer = prof.values[v].producer
                    if producer is not None and producer < start:
                        received.add(v)
            vals = [prof.values[v] for v in sorted(received)]
            grads = [v for v in vals if self._float_value[v.id]]
            info = RangeInfo(pbytes, tbytes, sum(v.bytes_per_sample for v in vals), sum(v.fixed_bytes for v in vals),
                             sum(v.bytes_per_sample for v in grads), sum(v.fixed_bytes for v in grads))
            self._ranges[key] = info
        return info

    # ------------------------------------------------------------------ one stage
    def comm(self, nbytes: float, link: str | None) -> float:
        if link is None or nbytes <= 0:
            return 0.0
        return self.cluster.links["intra_node" if link == "intra" else "inter_node"].seconds(nbytes)

    def allreduce(self, nbytes: float, replicas: int, link: str) -> float:
        if replicas <= 1 or nbytes <= 0:
            return 0.0
        lk = self.cluster.links["allreduce_intra" if link == "intra" else "allreduce_inter"]
        return 2.0 * (replicas - 1) / replicas * nbytes / lk.bandwidth + 2.0 * (replicas - 1) * lk.latency

    def static_memory(self, info: RangeInfo, replicas: int = 1, zero: int = 0) -> float:
        """Parameters + gradients + optimizer state (ZeRO-1: the state is split over the replicas)."""
        opt = self.opt_factor / replicas if zero else self.opt_factor
        return float(info.param_bytes) + float(info.trainable_bytes) * (1.0 + opt)

    def default_weight_share(self) -> np.ndarray:
        """Per block, for profiles without the measured split: ``W_SHARE`` for blocks with trainable
        parameters (the parameter GEMMs' half of the backward), 0 for parameter-free ones."""
        if not hasattr(self, "_wshare"):
            prof = self.profile
            self._wshare = np.array([W_SHARE if any(prof.parameters[p].trainable and prof.parameters[p].kind == "parameter"
                                                    for p in b.params) else 0.0 for b in prof.blocks], dtype=float)
        return self._wshare

    def split_arrays(self, shard: int) -> tuple[np.ndarray, np.ndarray]:
        """(B, W) seconds per block at this shard size, 'zb''s split of the backward: the profile's
        ``backward_input_seconds`` / ``backward_weight_seconds`` where its class has them, else
        the plain backward split by ``default_weight_share``."""
        cache = self.__dict__.setdefault("_split_arrays", {})
        if shard not in cache:
            per_class = {c.id: c.cost_at(shard) for c in self.profile.classes}
            share = self.default_weight_share()
            bs, ws = [], []
            for i, blk in enumerate(self.profile.blocks):
                c = per_class[blk.cls]
                if c.has_split:
                    bs.append(float(c.backward_input_seconds))
                    ws.append(float(c.backward_weight_seconds))
                else:
                    bs.append(c.backward_seconds * (1.0 - share[i]))
                    ws.append(c.backward_seconds * share[i])
            cache[shard] = (np.array(bs, dtype=float), np.array(ws, dtype=float))
        return cache[shard]

    def input_reached(self, start: int) -> np.ndarray:
        """Per block: whether, in a stage that starts at block ``start``, it lies on a gradient path
        from the stage's inputs: it reads a floating value made before ``start`` (received; user
        inputs are taken to want no gradient), or one made by a reached block of the stage. Blocks
        before ``start`` are False. The runtime's 'zb' B computes the input gradients only, so an
        unreached block's whole backward runs in W (runtime/split_backward.py: a first stage's B
        is empty)."""
        cache = self.__dict__.setdefault("_reached", {})
        if start not in cache:
            prof = self.profile
            reached = np.zeros(self.n, dtype=bool)
            for b in range(start, self.n):
                for v in prof.blocks[b].inputs:
                    producer = prof.values[v].producer
                    if producer is not None and self._float_value[v] and (producer < start or reached[producer]):
                        reached[b] = True
                        break
            cache[start] = reached
        return cache[start]

    def stage_split(self, start: int, shard: int) -> tuple[np.ndarray, np.ndarray]:
        """(B, W) seconds per block for a 'zb' stage starting at ``start`` (sum a range of them):
        ``split_arrays`` for blocks on a path from the stage's inputs (``input_reached``), B = 0
        and W = the plain backward for the others."""
        bs, ws = self.split_arrays(shard)
        bwd = self.block_arrays(shard)[1]
        reached = self.input_reached(start)
        return np.where(reached, bs, 0.0), np.where(reached, ws, bwd)

    def weight_share(self, shard: int) -> np.ndarray:
        """Per block at this shard size: W / (B + W) of its split backward (``split_arrays``)."""
        b, w = self.split_arrays(shard)
        total = b + w
        return np.divide(w, total, out=np.zeros_like(w), where=total > 0)

    def stage_cost(self, start: int, end: int, replicas: int, microbatches: int, link_in: str | None,
                   allreduce: str, in_flight: int, checkpoint: bool, zero: int = 0, overlap: bool = False,
                   split_weight: bool = False) -> StageCost:
        """Cost of blocks ``start..end-1`` as one stage (see the module doc for every term);
        ``split_weight``: the 'zb' split of the backward in B and W (``split_arrays``): the
        backward is B + W (checkpointed: forward + B + W), ``weight`` W."""
        m = self.shard(microbatches, replicas)
        fwd, bwd, rec, act, peak = self.block_arrays(m)
        info = self.range_info(start, end)
        f = float(fwd[start:end].sum())
        if split_weight:
            bs, ws = self.stage_split(start, m)
            w = float(ws[start:end].sum())
            plain_b = float(bs[start:end].sum()) + w
            b = f + plain_b if checkpoint else plain_b
        else:
            b = float((rec if checkpoint else bwd)[start:end].sum())
            plain_b = float(bwd[start:end].sum())
            w = 0.0
        a = float(act[start:end].sum())
        pk = float(peak[start:end].max()) if end > start else 0.0
        in_b = float(info.in_fixed + info.in_per_sample * m)
        grad_b = float(info.grad_fixed + info.grad_per_sample * m)
        cf, cb = self.comm(in_b, link_in), self.comm(grad_b, link_in)
        ar = self.allreduce(float(info.trainable_bytes), replicas, allreduce)
        grad = w if split_weight else plain_b
        charged = exposed_allreduce(ar, grad, float(info.trainable_bytes), zero, overlap, bucket_bytes())
        static = self.static_memory(info, replicas, zero)
        if checkpoint:
            mem = static + in_flight * in_b + a + pk
        else:
            mem = static + in_flight * (a + in_b) + pk
        return StageCost(f + cf, b + cb, charged, mem, f, b, cf, cb, m, checkpoint, bool(mem <= self.capacity),
                         w, ar * (1.5 if zero else 1.0), grad, pk)  # ZeRO-1: + the parameter all-gather

    def best_stage_cost(self, start: int, end: int, replicas: int, microbatches: int, link_in: str | None,
                        allreduce: str, in_flight: int, checkpoint: str | None = None, zero: int = 0,
                        overlap: bool = False) -> StageCost:
        """Without checkpointing when it fits, else with it (the search's choice); may be infeasible.
        ``checkpoint`` 'on' or 'off' forces the choice."""
        extra = {"zero": zero, "overlap": overlap}
        if checkpoint is not None:
            return self.stage_cost(start, end, replicas, microbatches, link_in, allreduce, in_flight,
                                   checkpoint == "on", **extra)
        plain = self.stage_cost(start, end, replicas, microbatches, link_in, allreduce, in_flight, False, **extra)
        if plain.feasible:
            return plain
        ck = self.stage_cost(start, end, replicas, microbatches, link_in, allreduce, in_flight, True, **extra)
        return ck if ck.feasible else plain

    def cut_blocked(self) -> list[bool]:
        """Per block boundary: whether stages on either side must have equal replica counts
        (a value without a batch dimension crosses it; planner/redistribution.py)."""
        if self._blocked is None:
            from rannc_cli.planner.redistribution import cut_blocked

            self._blocked = cut_blocked(self.profile)
        return self._blocked

    def has_shared_parameters(self) -> bool:
        """Whether a trainable parameter is used by more than one block (a tied embedding, say)."""
        if self._shared is None:
            users: dict[str, int] = {}
            for b in self.profile.blocks:
                for name in set(b.params):
                    users[name] = users.get(name, 0) + 1
            self._shared = any(n > 1 and self.profile.parameters[name].trainable
                               and self.profile.parameters[name].kind == "parameter" for name, n in users.items())
        return self._shared

    # ------------------------------------------------------------------ diagnostics
    def min_block_memory(self, block: int) -> float:
        """Smallest memory block ``block`` needs alone on one GPU: one sample, checkpointed, one in flight."""
        return self.stage_cost(block, block + 1, 1, self.batch_size, None, "intra", 1, True).memory

    def total_static_memory(self) -> float:
        return self.static_memory(self.range_info(0, self.n))
