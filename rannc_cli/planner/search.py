"""The partition search: dynamic programming over (block prefix, devices, stages left).

    space = SearchSpace.build(cost_model, bounds)              # candidate replicas, microbatches, schedules
    result = search(cost_model, bounds, space)                 # SearchResult: best + runners-up
    result.best.objective, result.best.stages                  # [(start, end, replicas, first_device, ckpt)]

What it decides, for the objective of costmodel.py (exactly; `exhaustive.py` checks it):
stage boundaries (between units of `bounds`), each stage's replica count (candidates: powers of
two up to a node, then whole nodes), placement (placement.py: right after the previous stage or at
the next node), checkpointing per stage (only when the stage does not fit without it), the
microbatch count and the schedule.

The DP state after placing stages on units ``0..b-1`` is ``(b, d, j)``: ``d`` devices taken (in
placement order) and ``j`` stages still to come, counting the next one, which fixes how many
microbatches a 1F1B stage holds (min(M, j)); ``j = J`` stands for "J or more" once that no longer
changes anything (J = min(M, units)). A state's value is the least sum over its stages of
forward+backward time. The objective's max terms (bottleneck term, slowest all-reduce) are handled
by thresholds: a DP restricted to stage options under given threshold levels gives the least sum
for every plan under them, so a box of plans with maxima between lower and upper levels costs at
least that sum plus the weighted lower levels. `_branch_and_bound` explores such boxes best first
and bisects the widest one (the upper half keeps its parent's DP result, only the lower half needs
a new DP), so it needs a few dozen DP runs where walking the levels one at a time needed
thousands. Every DP result is kept as a candidate for refinement (refine.py), the simulator and
`--explain`.

Runtime rules the DP keeps (redistribution.py): a unit boundary crossed by a tensor without a
batch dimension must have equal replica counts on both sides, so where the profile has such a
boundary the state also carries the last stage's replica index; ``SearchSpace.all_devices`` keeps
only plans that end on the last GPU without placement gaps (every GPU busy); a forced checkpoint
setting replaces the "only where it does not fit otherwise" rule.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field

import numpy as np

from rannc_cli.errors import RanncError
from rannc_cli.planner.costmodel import SCHEDULES, TIE_WEIGHT, CostModel, bucket_bytes, exposed_allreduce, max_weight, warmup
from rannc_cli.planner.placement import replica_ok

INF = math.inf


@dataclass(frozen=True)
class Candidate:
    objective: float
    schedule: str
    microbatches: int
    stages: tuple[tuple[int, int, int, int, bool], ...]  # (start_block, end_block, replicas, first_device, checkpoint)
    virtual: int = 1  # chunks per GPU group ('interleaved')
    zero: int = 0  # ZeRO-1 on every stage
    overlap: bool = False  # gradient all-reduce overlapped with the last backward

    def key(self) -> tuple:
        return (self.schedule, self.microbatches, self.stages, self.virtual, self.zero, self.overlap)


@dataclass
class SearchSpace:
    schedules: list[str]
    microbatches: list[int]
    replicas: list[int]
    stages: int | None = None
    forced_replicas: list[int] | None = None
    checkpoint: str | None = None  # forced 'on' / 'off' for every stage; None: only where a stage needs it
    all_devices: bool = False  # only plans that use every GPU (contiguous, no placement gaps)
    tie: float = TIE_WEIGHT  # bottleneck weight at one microbatch (costmodel.max_weight)
    zero: list[int] = field(default_factory=lambda: [0])  # ZeRO-1 settings the DP tries (a job dimension)
    overlap: bool = False  # all-reduce overlapped with the last backward (the exposed part is charged)
    bound: bool = False  # lower-bound mode (benchmarks/plan_optimum.py): only the first stage's all-reduce counts
    zero_if_needed: bool = False  # ZeRO-1 jobs only where the ZeRO-0 job's least-sum plan checkpoints or none fits

    @classmethod
    def from_forced(cls, cm: CostModel, forced) -> "SearchSpace":
        """The space narrowed by a ``forced.Forced`` (the one object every planner step respects).
        A forced 'interleaved' or 'zb' schedule searches 1F1B structures, which the planner turns
        into that schedule (planner.py); ``rannc plan`` overlaps every all-reduce."""
        dp = forced.schedule if forced.schedule in SCHEDULES else ("1f1b" if forced.schedule else None)
        space = cls.build(cm, schedules=[dp] if dp else None,
                          microbatches=[forced.microbatches] if forced.microbatches else None, stages=forced.stages,
                          replicas=list(forced.replicas) if forced.replicas else None, checkpoint=forced.checkpoint,
                          all_devices=forced.all_devices, zero=[forced.zero] if forced.zero is not None else [0, 1],
                          overlap=True)
        space.tie = forced.tie
        space.zero_if_needed = forced.zero is None
        return space

    @classmethod
    def build(cls, cm: CostModel, schedules: list[str] | None = None, microbatches: list[int] | None = None,
              stages: int | None = None, replicas: list[int] | None = None, max_microbatches: int | None = None,
              checkpoint: str | None = None, all_devices: bool = False, zero: list[int] | None = None,
              overlap: bool = False) -> "SearchSpace":
        """Candidates for a cluster and batch; forced values (CLI flags) replace the candidates."""
        from rannc_cli.config import settings
        from rannc_cli.planner.redistribution import dynamic_batch

        g, n = cm.cluster.gpus_per_node, cm.cluster.nodes
        b = cm.batch_size
        limit = int(max_microbatches or settings.get("planner_max_microbatches"))
        fixed = not dynamic_batch(cm.profile)  # captured at a fixed batch size: no slicing at all
        if fixed and ((microbatches and max(microbatches) > 1) or (replicas and max(replicas) > 1)):
            raise RanncError("the model was captured with a fixed batch size, so its batch cannot be split into "
                             "microbatches or among replicas",
                             hint="force one microbatch and one replica per stage, or make the model accept any "
                                  "batch size")
        if fixed and microbatches is None:
            microbatches = [1]
        if microbatches is None:
            ms = sorted({m for m in range(1, b + 1) if b % m == 0 and (m & (m - 1) == 0 or m == b) and m <= limit} or {1})
        else:
            ms = list(microbatches)
            for m in ms:
                if not 1 <= m <= b:
                    raise RanncError(f"--microbatches {m} must be between 1 and the batch size {b}")
        cands = sorted({1 << i for i in range(g.bit_length()) if (1 << i) <= g} | {g}
                       | {k * g for k in _node_counts(n)})
        if fixed:
            cands = [1]
        if replicas is not None:
            if stages is not None and stages != len(replicas):
                raise RanncError(f"--stages {stages} disagrees with --replicas ({len(replicas)} values)",
                                 hint="give one replica count per stage")
            for r in replicas:
                if not replica_ok(r, g):
                    raise RanncError(f"replica count {r} cannot be placed: a stage takes at most one node ({g} GPUs) "
                                     f"or whole nodes (a multiple of {g})")
            if sum(replicas) > g * n:
                raise RanncError(f"--replicas ask for {sum(replicas)} GPUs; the cluster has {g * n}")
            stages = len(replicas)
            cands = sorted(set(replicas))
        if stages is not None and stages < 1:
            raise RanncError("--stages must be at least 1")
        for s in schedules or []:
            if s not in SCHEDULES:
                raise RanncError(f"unknown schedule {s!r}", hint=f"use one of {', '.join(SCHEDULES)}")
        # 1F1B is never slower and never needs more memory than GPipe under this cost model, so an
        # unforced search only tries 1F1B (the exhaustive search tries both and agrees).
        if checkpoint not in (None, "on", "off"):
            raise RanncError(f"checkpoint {checkpoint!r} is not known", hint="use auto, on or off")
        for z in zero or []:
            if z not in (0, 1):
                raise RanncError(f"--zero {z} is not known", hint="use 0 (off) or 1 (ZeRO-1)")
        return cls(list(schedules or ["1f1b"]), ms, [r for r in cands if r <= g * n], stages, replicas, checkpoint,
                   all_devices, zero=list(zero or [0]), overlap=overlap)


def _node_counts(n: int) -> list[int]:
    if n <= 16:
        return list(range(1, n + 1))
    out = {k for i in range(n.bit_length()) for k in (1 << i, 3 << i) if k <= n}
    return sorted(out | {n})


@dataclass
class SearchResult:
    best: Candidate | None
    candidates: list[Candidate] = field(default_factory=list)
    dp_calls: int = 0
    lower_bound: float = INF  # least objective of any plan; equals best.objective when proven optimal

    @property
    def exact(self) -> bool:
        return self.best is None or self.lower_bound >= self.best.objective * (1 - 1e-12)


class _Tables:
    """Stage options for one (schedule, M): arrays over (start unit, end unit, replica index, link, j)."""

    def __init__(self, cm: CostModel, bounds: list[int], space: SearchSpace, schedule: str, m: int, ranges: dict,
                 zero: int = 0):
        self.cm, self.bounds, self.schedule, self.m = cm, bounds, schedule, m
        self.zero, self.overlap = zero, space.overlap
        cl = cm.cluster
        self.G, self.D = cl.gpus_per_node, cl.devices
        U = self.U = len(bounds) - 1
        mb = cm.microbatch(m)
        self.R = [r for r in space.replicas if r <= mb]
        self.forced = space.forced_replicas
        self.S = space.stages
        if schedule == "1f1b":
            self.J = space.stages if space.stages is not None else max(1, min(m, U))
        else:
            self.J = space.stages if space.stages is not None else 1
        self.bucket = space.stages is None
        self.all_devices = space.all_devices
        self.tie = space.tie
        blocked = cm.cut_blocked()
        self.blocked = np.array([blocked[b] for b in bounds], dtype=bool)  # unit boundary a: equal replicas around it
        J, nR = self.J, len(self.R)
        shape = (U + 1, U + 1, nR, 3, J)
        self.FW = np.full(shape, INF)
        self.BW = np.full(shape, INF)
        self.CK = np.zeros(shape, dtype=bool)
        self.AR = np.full((U + 1, U + 1, nR), INF)
        P, T, IPS, IFX, GPS, GFX = ranges["param"], ranges["train"], ranges["in_ps"], ranges["in_fx"], ranges["g_ps"], ranges["g_fx"]
        links = cl.links
        lk = [None, links["intra_node"], links["inter_node"]]
        bucket = bucket_bytes()
        bidx = np.array(bounds)
        tri = np.triu(np.ones((U + 1, U + 1), dtype=bool), 1)
        for ri, r in enumerate(self.R):
            sh = cm.shard(m, r)
            fwd, bwd, rec, act, peak = cm.block_arrays(sh)
            def rng(x: np.ndarray) -> np.ndarray:
                cs = np.concatenate([[0.0], np.cumsum(x)])[bidx]
                return cs[None, :] - cs[:, None]
            f, b, rc, a = rng(fwd), rng(bwd), rng(rec), rng(act)
            static = P + T * (1.0 + (cm.opt_factor / r if zero else cm.opt_factor))
            unit_peak = np.array([peak[bounds[u]:bounds[u + 1]].max() if bounds[u + 1] > bounds[u] else 0.0
                                  for u in range(U)])
            pk = np.zeros((U + 1, U + 1))
            for s0 in range(U):
                pk[s0, s0 + 1:] = np.maximum.accumulate(unit_peak[s0:])
            in_b = IFX + IPS * sh
            g_b = GFX + GPS * sh
            ar_link = links["allreduce_intra"] if r <= self.G else links["allreduce_inter"]
            if r > 1:
                ar = np.where(T > 0, 2.0 * (r - 1) / r * T / ar_link.bandwidth + 2.0 * (r - 1) * ar_link.latency, 0.0)
            else:
                ar = np.zeros_like(T)
            ar = exposed_allreduce(ar, b, T, zero, space.overlap, bucket)  # costmodel: the part the step waits for
            if space.bound:  # stage 0's last backward ends the pipeline, so its exposed part surely adds
                ar = np.where(np.arange(U + 1)[:, None] == 0, ar, 0.0)
            self.AR[:, :, ri] = np.where(tri, ar, INF)
            for li in range(3):
                if lk[li] is None:
                    cf = np.zeros_like(in_b)
                    cb = np.zeros_like(g_b)
                else:
                    cf = np.where(in_b > 0, lk[li].latency + in_b / lk[li].bandwidth, 0.0)
                    cb = np.where(g_b > 0, lk[li].latency + g_b / lk[li].bandwidth, 0.0)
                for j in range(1, J + 1):
                    k = min(m, j) if schedule == "1f1b" else m
                    mem_plain = static + k * (a + in_b) + pk
                    mem_ck = static + k * in_b + a + pk
                    plain = (mem_plain <= cm.capacity) & tri
                    ck = ~plain & (mem_ck <= cm.capacity) & tri
                    if space.checkpoint == "on":
                        plain, ck = np.zeros_like(plain), (mem_ck <= cm.capacity) & tri
                    elif space.checkpoint == "off":
                        ck = np.zeros_like(ck)
                    self.FW[:, :, ri, li, j - 1] = np.where(plain | ck, f + cf, INF)
                    self.BW[:, :, ri, li, j - 1] = np.where(plain, b + cb, np.where(ck, rc + cb, INF))
                    self.CK[:, :, ri, li, j - 1] = ck
        if self.forced is not None:  # stage at position p (j = S - p stages left) must use forced[p] replicas
            for ri, r in enumerate(self.R):
                for j in range(1, J + 1):
                    if self.forced[self.S - j] != r:
                        self.FW[:, :, ri, :, j - 1] = INF
        self.UT = self.FW + self.BW
        if schedule == "1f1b" and m > 1:  # the 1F1B max-coordinate (costmodel.bottleneck_1f1b) / (M - 1)
            w = np.array([warmup(m, j) for j in range(1, J + 1)], dtype=float) / (m - 1.0)
            with np.errstate(invalid="ignore"):
                self.V = np.where(np.isfinite(self.UT), self.UT - w * self.FW, INF)
        else:
            self.V = self.UT
        self._place = [self._placements(r) for r in self.R]

    def _placements(self, r: int) -> tuple:
        G, D = self.G, self.D
        d_all = np.arange(D + 1)
        off = d_all % G
        at = (d_all + r <= D) & ((off == 0) | ((r <= G) & (off + r <= G)))
        d_at = d_all[at]
        link_at = np.where(d_at % G != 0, 1, 2)
        nodes = D // G
        skip_nodes = np.array([n for n in range(nodes) if (n + 1) * G + r <= D], dtype=int)
        return d_at, link_at, skip_nodes

    # ------------------------------------------------------------------ one DP
    def coords(self) -> tuple[list[np.ndarray], list[float]]:
        """The max-coordinates of the objective and their weights."""
        w = max_weight(self.m, self.tie)
        if self.schedule == "gpipe":
            return [self.FW, self.BW], [w, w]
        return [self.V], [w]

    def max_terms(self) -> tuple[list[np.ndarray], list[float]]:
        """Every max-term of the objective (bottleneck coordinates, all-reduce) over UT's shape, with weights."""
        coords, weights = self.coords()
        return [*coords, np.broadcast_to(self.AR[..., None, None], self.UT.shape)], weights + [1.0]

    def dp(self, value: np.ndarray, combine: str = "sum") -> tuple[float, list[tuple]] | None:
        """Least sum (or max) of ``value`` over stage options; returns (value, [(a, e, ri, li, j, start)]).

        When some unit boundary is blocked (a value without a batch dimension crosses it), the state
        also carries the last stage's replica index ``p``, and a stage starting at a blocked
        boundary may only follow a stage of its own replica count; elsewhere the least over ``p``
        is taken. With ``all_devices`` a plan must end on the last GPU with no placement gaps."""
        U, D, J, G = self.U, self.D, self.J, self.G
        blk = self.blocked
        P = len(self.R) if blk[1:U].any() else 1
        F = np.full((U + 1, D + 1, J + 1, P), INF)
        if self.S is not None:
            F[0, 0, self.S] = 0.0
        else:
            F[0, 0, 1:] = 0.0
        # a, prev d, ri, prev j, start device; only entries of finite states are written and read back
        ch = np.empty((U + 1, D + 1, J + 1, P, 5), dtype=np.int32)
        # least over p: what a stage after an open boundary sees; with P = 1 that is F itself (a
        # view: no copy, no per-unit argmin over a length-1 axis)
        Fmin = F[..., 0] if P == 1 else np.full((U + 1, D + 1, J + 1), INF)
        Farg = np.zeros((U + 1, D + 1, J + 1), dtype=np.int32)
        if P > 1:
            Fmin[0] = F[0].min(-1)
        # Pruning that cannot change the result: a start unit a or a device count d whose states are
        # all infinite (or whose stage options are) gives only infinite candidates, which never
        # update F; the kept rows stay in order, so argmin picks the same first minimum.
        alive = np.zeros((U + 1, D + 1), dtype=bool)  # alive[a, d]: some F[a, d, j >= 1, p] is finite
        alive[0] = np.isfinite(Fmin[0, :, 1:]).any(-1)
        op = np.add if combine == "sum" else np.maximum
        for e in range(1, U + 1):
            pinned = P > 1 and bool(blk[:e].any())
            # start units with a finite option of each replica count and some live state: (e, nR)
            use = np.isfinite(value[:e, e]).any((2, 3)) & alive[:e].any(1)[:, None]
            for ri in np.flatnonzero(use.any(0)).tolist():
                r = self.R[ri]
                p = ri if P > 1 else 0
                Fp, cp = F[:, :, :, p], ch[:, :, :, p]
                d_at, link_at, skip_nodes = self._place[ri]
                rows = np.flatnonzero(use[:, ri])
                cost_e = value[rows, e, ri]  # (n_rows, 3, J)
                # Fe(a_idx, d_idx): the states a stage of rows[a_idx] starting after d_idx devices sees,
                # gathered only at the device counts used below (not every row's D + 1 states)
                if pinned:
                    Fr = np.where(blk[rows, None, None], F[rows, :, :, p], Fmin[rows])
                    Fe = lambda ai_, di_: Fr[ai_, di_, 1:]
                else:
                    Fe = lambda ai_, di_: Fmin[rows[ai_], di_, 1:]
                al = alive[rows]
                if d_at.size:
                    keep = al[:, d_at].any(0)
                    dk, lk_ = d_at[keep], link_at[keep]
                    if dk.size:
                        sel = cost_e[:, lk_, :]  # (n_rows, nd, J)
                        if rows[0] == 0:
                            sel[0] = cost_e[0, 0][None, :]
                        cand = op(Fe(np.arange(len(rows))[:, None], dk[None, :]), sel)
                        ai = cand.argmin(0)
                        v_best = _take_first(cand, ai)  # (nd, J); one pass, not argmin + min
                        self._update(Fp, cp, e, dk + r, v_best, rows[ai], dk, ri, dk)
                if skip_nodes.size and e > 1 and not self.all_devices:
                    sub = np.nonzero(rows >= 1)[0]
                    rs = rows[sub]
                    dd = skip_nodes[:, None] * G + np.arange(1, G)[None, :]  # (k, G-1): a gap up to the next node
                    # only nodes where some row has a live state at a gap offset (the others give
                    # only infinite candidates: the same pruning as above)
                    live = al[sub[:, None, None], dd[None]].any((0, 2)) if sub.size else np.zeros(0, dtype=bool)
                    skips, dd = skip_nodes[live], dd[live]
                    base = Fe(sub[:, None, None], dd[None])  # (n, k, G-1, J)
                    if base.size:
                        cand = op(base, cost_e[sub, 2][:, None, None, :])
                        k = len(skips)
                        flat = cand.transpose(1, 3, 0, 2).reshape(k, J, len(rs) * (G - 1))
                        idx = flat.argmin(-1)
                        v_best = _take_last(flat, idx)  # (k, J)
                        a_best = rs[idx // (G - 1)]
                        d_prev = skips[:, None] * G + idx % (G - 1) + 1
                        start = (skips + 1) * G
                        self._update(Fp, cp, e, start + r, v_best, a_best, d_prev, ri, start)
            if P > 1:
                Farg[e] = F[e].argmin(-1)
                Fmin[e] = np.take_along_axis(F[e], Farg[e][..., None], -1)[..., 0]
            alive[e] = np.isfinite(Fmin[e, :, 1:]).any(-1)
        finals = Fmin[U, :, 0]
        if self.all_devices:
            finals = np.where(np.arange(D + 1) == D, finals, INF)
        d_end = int(np.argmin(finals))
        if not np.isfinite(finals[d_end]):
            return None
        stages = []
        e, d, j, p = U, d_end, 0, int(Farg[U, d_end, 0])
        while e > 0:
            a, pd, ri, pj, start = (int(x) for x in ch[e, d, j, p])
            li = 0 if a == 0 else (1 if start == pd and pd % G != 0 else 2)
            stages.append((a, e, ri, li, pj, start))
            p = ri if (P > 1 and blk[a]) else int(Farg[a, pd, pj])
            e, d, j = a, pd, pj
        stages.reverse()
        return float(finals[d_end]), stages

    def _update(self, F, ch, e, d_new, v_best, a_best, d_prev, ri, start) -> None:
        """Keep, per (devices taken, stages left), the better of F[e] and the new options (value
        with j stages left counting this one lands at j - 1; in bucket mode j = J also stays J).
        ``d_new`` holds distinct device counts; ``d_prev`` is per device count or per (count, j)."""
        J = self.J
        Fe, ce = F[e], ch[e]
        cur = Fe[d_new]  # (n, J + 1); its column J is not written by the first part
        dd, jj = np.nonzero(v_best < cur[:, :J])
        if dd.size:
            rows = d_new[dd]
            Fe[rows, jj] = v_best[dd, jj]
            vals = np.empty((dd.size, 5), dtype=np.int32)
            vals[:, 0] = a_best[dd, jj]
            vals[:, 1] = d_prev[dd, jj] if d_prev.ndim == 2 else d_prev[dd]
            vals[:, 2] = ri
            vals[:, 3] = jj + 1
            vals[:, 4] = start[dd]
            ce[rows, jj] = vals
        if self.bucket:
            v = v_best[:, J - 1]
            dd = np.flatnonzero(v < cur[:, J])
            if dd.size:
                rows = d_new[dd]
                Fe[rows, J] = v[dd]
                vals = np.empty((dd.size, 5), dtype=np.int32)
                vals[:, 0] = a_best[dd, J - 1]
                vals[:, 1] = d_prev[dd, J - 1] if d_prev.ndim == 2 else d_prev[dd]
                vals[:, 2] = ri
                vals[:, 3] = J
                vals[:, 4] = start[dd]
                ce[rows, J] = vals

    def candidate(self, stages: list[tuple]) -> tuple[float, Candidate, list[float], float]:
        """(sum, Candidate, maxima per coordinate, max all-reduce) of a DP result."""
        coords, _ = self.coords()
        total = 0.0
        maxima = [0.0] * len(coords)
        ar = 0.0
        out = []
        for a, e, ri, li, j, start in stages:
            total += float(self.UT[a, e, ri, li, j - 1])
            for c, arr in enumerate(coords):
                maxima[c] = max(maxima[c], float(arr[a, e, ri, li, j - 1]))
            ar = max(ar, float(self.AR[a, e, ri]))
            out.append((self.bounds[a], self.bounds[e], self.R[ri], start, bool(self.CK[a, e, ri, li, j - 1])))
        _, weights = self.coords()
        obj = total + sum(w * x for w, x in zip(weights, maxima)) + ar
        return total, Candidate(obj, self.schedule, self.m, tuple(out), 1, self.zero, self.overlap), maxima, ar


def _take_first(x: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """``np.take_along_axis(x, idx[None], 0)[0]`` for a 3-d ``x`` (without its per-call index setup)."""
    n = idx.size
    return x.reshape(x.shape[0], n)[idx.ravel(), np.arange(n)].reshape(idx.shape)


def _take_last(x: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """``np.take_along_axis(x, idx[..., None], -1)[..., 0]``."""
    n = idx.size
    return x.reshape(n, x.shape[-1])[np.arange(n), idx.ravel()].reshape(idx.shape)


def unit_ranges(cm: CostModel, bounds: list[int]) -> dict[str, np.ndarray]:
    U = len(bounds) - 1
    keys = ("param", "train", "in_ps", "in_fx", "g_ps", "g_fx")
    out = {k: np.zeros((U + 1, U + 1)) for k in keys}
    for a in range(U):
        for e in range(a + 1, U + 1):
            info = cm.range_info(bounds[a], bounds[e])
            vals = (info.param_bytes, info.trainable_bytes, info.in_per_sample, info.in_fixed,
                    info.grad_per_sample, info.grad_fixed)
            for k, v in zip(keys, vals):
                out[k][a, e] = v
    return out


def search(cm: CostModel, bounds: list[int], space: SearchSpace, keep: int = 64, budget: int | None = -1) -> SearchResult:
    """Exact optimum of the objective over the search space (see the module doc).

    ``budget`` caps the DP runs per (schedule, M) (-1: the ``planner_dp_budget`` setting, None: no
    cap). When a cap stops the search, ``SearchResult.lower_bound`` is the least objective any
    unexplored plan could have, so the best plan is within ``best / lower_bound - 1`` of optimal.
    """
    if budget == -1:
        from rannc_cli.config import settings

        budget = int(settings.get("planner_dp_budget")) or None
    ranges = unit_ranges(cm, bounds)
    state = _State()
    jobs = []
    needed: dict[tuple[str, int], bool] = {}  # (schedule, M): the ZeRO-0 job checkpoints or finds nothing
    for schedule, m, zero, t in _jobs(cm, bounds, space, ranges):
            if zero and space.zero_if_needed and not needed.get((schedule, m), True):
                continue
            coords, weights = t.coords()
            res = t.dp(t.UT)
            state.calls += 1
            if not zero:
                needed[(schedule, m)] = res is None or any(t.CK[a, e, ri, li, j - 1] for a, e, ri, li, j, _ in res[1])
            if res is None:
                continue
            ok = np.isfinite(t.UT)
            lows = []
            for arr in [*coords, np.broadcast_to(t.AR[..., None, None], t.UT.shape)]:
                mm = t.dp(np.where(ok, arr, INF), "max")  # least possible max of this coordinate
                state.calls += 1
                lows.append(mm[0] if mm else 0.0)
            lb = res[0] + sum(w * x for w, x in zip(weights + [1.0], lows))
            state.offer(*t.candidate(res[1]))
            jobs.append((lb, schedule, m, zero, res, lows))
            del t  # tables are rebuilt below for the (schedule, M, zero) jobs that survive pruning
    jobs.sort(key=lambda x: x[0])
    for lb, schedule, m, zero, res0, lows in jobs:
        if state.beaten(lb):
            continue
        t = _Tables(cm, bounds, space, schedule, m, ranges, zero)
        _branch_and_bound(t, res0, lows, state, budget)
    best = state.best
    cands = sorted(state.seen.values(), key=lambda c: c.objective)[:keep]
    lower = best.objective if best is not None and state.open_bound >= best.objective else state.open_bound
    return SearchResult(best, cands, state.calls, lower if best is not None else INF)


def _jobs(cm: CostModel, bounds: list[int], space: SearchSpace, ranges: dict):
    """(schedule, M, zero, tables) for every job worth a DP. ZeRO-1 moves the same bytes as the all-reduce and
    hides less of it, so it can only win where it lets an option fit (or fit unchecked) that does
    not without it; a ZeRO-1 job whose tables are no wider than ZeRO-0's is skipped (exact). With
    ``space.zero_if_needed`` (the planner's default, not exact) search() also skips a ZeRO-1 job
    where the ZeRO-0 job's least-sum plan at that M needs no checkpointing; variants.py still
    tries ZeRO-1 on the best structures."""
    for schedule in space.schedules:
        for m in space.microbatches:
            base = None
            for zero in sorted(space.zero):
                t = _Tables(cm, bounds, space, schedule, m, ranges, zero)
                if not t.R:
                    break
                ok, ck = np.isfinite(t.UT), t.CK
                if base is not None and not ((ok & ~base[0]).any() or (base[1] & ~ck & ok).any()):
                    continue
                base = (ok, ck) if base is None else base
                yield schedule, m, zero, t


class _State:
    """The best plan so far, every distinct DP result, DP-run count, least bound left unexplored."""

    def __init__(self) -> None:
        self.best: Candidate | None = None
        self.seen: dict[tuple, Candidate] = {}
        self.calls = 0
        self.open_bound = INF

    def beaten(self, bound: float) -> bool:
        return self.best is not None and bound >= self.best.objective * (1 - 1e-12)

    def offer(self, total: float, cand: Candidate, maxima: list[float], ar: float) -> None:
        self.seen.setdefault(cand.key(), cand)
        if self.best is None or cand.objective < self.best.objective:
            self.best = cand


def _branch_and_bound(t: _Tables, res0: tuple, lows: list[float], state: _State, budget: int | None) -> None:
    """Best-first branch and bound over boxes of threshold levels, one box per set of plans whose
    maxima (bottleneck time(s), all-reduce) lie between the box's lower and upper levels.

    A box's plans cost at least ``S(top) + sum_k w_k * low_k``, where ``S(top)`` is the least sum of
    stage times with every maximum at most the box's upper levels (one DP; memoised by levels) and
    ``low_k`` its lower levels. A box that cannot beat the best plan is dropped; otherwise it is
    cut in two along the coordinate with the widest weighted range, at the geometric middle of
    its values: the upper half keeps the parent's DP result (same top), only the lower half needs
    a new DP. So the search bisects the levels (a few dozen DP runs) instead of walking them.
    """
    arrs, w = t.max_terms()
    n = len(w)
    ok = np.isfinite(t.UT)
    levels = [np.unique(a[ok]) for a in arrs]
    memo: dict[tuple[int, ...], tuple | None] = {}
    top0 = tuple(len(lv) - 1 for lv in levels)
    memo[top0] = res0
    lo0 = tuple(min(int(np.searchsorted(lv, x * (1 - 1e-12), side="left")), len(lv) - 1) for lv, x in zip(levels, lows))

    def bound(s: float, lo: tuple[int, ...]) -> float:
        return s + sum(wk * float(levels[k][lo[k]]) for k, wk in enumerate(w))

    def solve(hi: tuple[int, ...]) -> tuple | None:
        if hi not in memo:
            mask = ok.copy()
            for k, a in enumerate(arrs):
                if hi[k] < len(levels[k]) - 1:
                    mask &= a <= levels[k][hi[k]]
            memo[hi] = t.dp(np.where(mask, t.UT, INF))
            state.calls += 1
            runs[0] += 1
            if memo[hi] is not None:
                state.offer(*t.candidate(memo[hi][1]))
        return memo[hi]

    runs = [0]
    heap = [(bound(res0[0], lo0), 0, lo0, top0)]
    tick = 1
    while heap:
        lb, _, lo, hi = heapq.heappop(heap)
        if state.beaten(lb):
            break  # best first: every box left is bounded by at least this
        if budget is not None and hi not in memo and runs[0] >= budget:
            state.open_bound = min(state.open_bound, lb)
            for item in heap:
                state.open_bound = min(state.open_bound, item[0])
            return
        res = solve(hi)
        if res is None:
            continue
        s = res[0]
        lb = bound(s, lo)
        if state.beaten(lb):
            continue
        # coordinate whose range costs the most; a box with all ranges single levels is settled by its DP
        spans = [w[k] * float(levels[k][hi[k]] - levels[k][lo[k]]) for k in range(n)]
        k = int(np.argmax(spans))
        if spans[k] <= 0:
            continue
        a, b = float(levels[k][lo[k]]), float(levels[k][hi[k]])
        mid_v = math.sqrt(a * b) if a > 0 else 0.5 * (a + b)
        mid = int(np.searchsorted(levels[k], mid_v, side="right")) - 1
        mid = min(max(mid, lo[k]), hi[k] - 1)
        lower_hi = hi[:k] + (mid,) + hi[k + 1:]
        upper_lo = lo[:k] + (mid + 1,) + lo[k + 1:]
        heapq.heappush(heap, (bound(s, upper_lo), tick, upper_lo, hi))
        heapq.heappush(heap, (lb, tick + 1, lo, lower_hi))
        tick += 2


def min_devices(cm: CostModel, bounds: list[int], space: SearchSpace) -> int | None:
    """Fewest GPUs any plan of ``space`` needs on ``cm``'s kind of GPU, ignoring placement gaps
    (a lower bound used to name the smallest cluster that fits); None if no plan fits at all."""
    ranges = unit_ranges(cm, bounds)
    best: float = INF
    for schedule in space.schedules:
        for m in space.microbatches:
            t = _Tables(cm, bounds, space, schedule, m, ranges, max(space.zero))
            if not t.R:
                continue
            U, J = t.U, t.J
            feas = np.isfinite(t.UT[:, :, :, 2, :])
            feas[0] = np.isfinite(t.UT[0, :, :, 0, :])
            F = np.full((U + 1, J + 1), INF)
            if t.S is not None:
                F[0, t.S] = 0.0
            else:
                F[0, 1:] = 0.0
            for e in range(1, U + 1):
                for ri, r in enumerate(t.R):
                    cost = np.where(feas[:e, e, ri, :], float(r), INF)  # (e, J)
                    v = (F[:e, 1:] + cost).min(0)  # (J,)
                    F[e, :J] = np.minimum(F[e, :J], v)
                    if t.bucket:
                        F[e, J] = min(F[e, J], v[J - 1])
            best = min(best, F[U, 0])
    return None if not np.isfinite(best) else int(best)


def feasible(cm: CostModel, bounds: list[int], space: SearchSpace) -> bool:
    """Whether any plan of ``space`` fits in memory (one DP per schedule and microbatch count, largest M first)."""
    ranges = unit_ranges(cm, bounds)
    for schedule in space.schedules:
        for m in sorted(space.microbatches, reverse=True):
            t = _Tables(cm, bounds, space, schedule, m, ranges, max(space.zero))
            if t.R and t.dp(t.UT) is not None:
                return True
    return False
