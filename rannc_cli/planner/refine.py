"""Boundary refinement: re-place the stage boundaries of a coarse plan at block (or finer-unit) level.

    better = refine(cost_model, candidate, fine_bounds)     # Candidate (same structure) or None

The main search (search.py) runs over coarsened units (coarsen.py), so its stage boundaries can
only fall between units, while a hand-made split (e.g. torchgpipe's time balance) cuts between any
two blocks. Refinement keeps everything the coarse search decided except the boundaries: schedule,
microbatch count, stage count, each stage's replica count and first device (so links and the
all-reduce groups stay as they were), and searches the boundaries over ``fine_bounds`` exactly.

With the structure fixed a stage's options depend only on its position ``s`` and its range, so
the DP is a chain: ``F[s][e] = min_a F[s-1][a] + cost_s(a, e)``, S x n^2 work per run, a few
milliseconds for 100 blocks and 32 stages. The objective's max terms are handled by the same
best-first branch and bound over threshold levels as the coarse search (search._branch_and_bound),
so the result is the exact optimum of the objective for that structure; the coarse plan itself is
one of the options, so refinement never makes the objective worse. Cuts a value without a batch
dimension crosses are masked between stages of unequal replica counts (redistribution.py), and
the forced parts (forced.Forced) hold: no deeper-pipeline splits under a forced stage count, no
doubled microbatch count under a forced one, forced checkpointing on every stage.
"""

from __future__ import annotations

import math

import numpy as np

from rannc_cli.planner.costmodel import TIE_WEIGHT, CostModel, bucket_bytes, exposed_allreduce, max_weight, rank_seconds, warmup
from rannc_cli.planner.placement import devices, link_in, replica_ok
from rannc_cli.planner.simulate import allreduce_times, makespan
from rannc_cli.planner.search import INF, Candidate, _branch_and_bound, _State, unit_ranges


def _range_arrays(cm: CostModel, bounds: list[int], sh: int, zb: bool) -> tuple[np.ndarray, ...]:
    """(forward, backward, recompute, activation, W share, peak) of every unit range at shard ``sh``,
    arrays (start unit, end unit); memoised on ``cm`` (every chain of a refinement shares them).
    With ``zb`` the backward is B + W of ``cm.stage_split`` (recompute: forward + B + W), as in
    ``CostModel.stage_cost``."""
    cache = cm.__dict__.setdefault("_chain_ranges", {})
    key = (tuple(bounds), sh, zb)
    if key not in cache:
        U = len(bounds) - 1
        fwd, bwd, rec, act, peak = cm.block_arrays(sh)
        bidx = np.array(bounds)

        def rng(x: np.ndarray) -> np.ndarray:
            cs = np.concatenate([[0.0], np.cumsum(x)])[bidx]
            return cs[None, :] - cs[:, None]

        if zb:  # B and W depend on where the stage starts (CostModel.stage_split): one row per start
            b, rc, wt = (np.zeros((U + 1, U + 1)) for _ in range(3))
            for s0 in range(U):
                bs, ws = cm.stage_split(bounds[s0], sh)
                for out, x in ((b, bs + ws), (rc, fwd + bs + ws), (wt, ws)):
                    cs = np.concatenate([[0.0], np.cumsum(x)])[bidx]
                    out[s0] = np.where(np.arange(U + 1) > s0, cs - cs[s0], 0.0)
            f, a = rng(fwd), rng(act)
        else:
            f, b, rc, a = rng(fwd), rng(bwd), rng(rec), rng(act)
            wt = np.zeros_like(b)
        unit_peak = np.array([peak[bounds[u]:bounds[u + 1]].max() for u in range(U)])
        pk = np.zeros((U + 1, U + 1))
        for s0 in range(U):
            pk[s0, s0 + 1:] = np.maximum.accumulate(unit_peak[s0:])
        for x in (f, b, rc, a, wt, pk):
            x.flags.writeable = False
        cache[key] = (f, b, rc, a, wt, pk)
    return cache[key]


class _Chain:
    """Stage options of a fixed stage structure over ``bounds``: arrays (stage, start unit, end unit)."""

    def __init__(self, cm: CostModel, cand: Candidate, bounds: list[int], ranges: dict, checkpoint: str | None = None,
                 tie: float = TIE_WEIGHT):
        self.cm, self.bounds, self.tie = cm, bounds, tie
        self.schedule, self.m = cand.schedule, cand.microbatches
        self.virtual, self.zero, self.overlap = cand.virtual, cand.zero, cand.overlap
        cl = cm.cluster
        g = cl.gpus_per_node
        self.S = S = len(cand.stages)
        self.U = U = len(bounds) - 1
        self.reps = [st[2] for st in cand.stages]
        self.starts = [st[3] for st in cand.stages]
        shape = (S, U + 1, U + 1)
        self.FW = np.full(shape, INF)
        self.BW = np.full(shape, INF)
        self.CK = np.zeros(shape, dtype=bool)
        self.AR = np.full(shape, INF)
        P, T, IPS, IFX, GPS, GFX = (ranges[k] for k in ("param", "train", "in_ps", "in_fx", "g_ps", "g_fx"))
        self.WT = np.zeros(shape)  # 'zb': the W share of BW
        self.GR = np.zeros(shape)  # compute of the op that makes the gradients final (costmodel.exposed_allreduce)
        self.TB = ranges["train"]
        held = _held(self.schedule, S, self.m, self.virtual)
        capacity = cm.capacity / self.virtual  # a group's v chunks share its GPUs (each gets 1/v: conservative)
        bucket = bucket_bytes()
        tri = np.triu(np.ones((U + 1, U + 1), dtype=bool), 1)
        links = cl.links
        prev = None
        per: dict[tuple, tuple] = {}
        for s, (r, start) in enumerate(zip(self.reps, self.starts)):
            devs = devices(start, r, g)
            lin = None if prev == devs else link_in(prev, devs)  # chunks on the same GPUs hand over locally
            prev = devs
            if (r, lin) not in per:  # what does not depend on the stage's in-flight count
                static = P + T * (1.0 + (cm.opt_factor / r if self.zero else cm.opt_factor))
                sh = cm.shard(self.m, r)
                f, b, rc, a, wt, pk = _range_arrays(cm, bounds, sh, self.schedule == "zb")
                in_b = IFX + IPS * sh
                g_b = GFX + GPS * sh
                if lin is None:
                    cf = np.zeros_like(in_b)
                    cb = np.zeros_like(g_b)
                else:
                    lk = links["intra_node" if lin == "intra" else "inter_node"]
                    cf = np.where(in_b > 0, lk.latency + in_b / lk.bandwidth, 0.0)
                    cb = np.where(g_b > 0, lk.latency + g_b / lk.bandwidth, 0.0)
                if r > 1:
                    ar_link = links["allreduce_intra"] if r <= g else links["allreduce_inter"]
                    ar = np.where(T > 0, 2.0 * (r - 1) / r * T / ar_link.bandwidth + 2.0 * (r - 1) * ar_link.latency, 0.0)
                else:
                    ar = np.zeros_like(T)
                ar = exposed_allreduce(ar, wt if self.schedule == "zb" else b, T, self.zero, self.overlap, bucket)
                per[(r, lin)] = (static, in_b, a, pk, f + cf, b + cb, rc + cb, wt, ar, b)
            static, in_b, a, pk, fcf, bcb, rccb, wt, ar, b = per[(r, lin)]
            k = held[s]
            plain = (static + k * (a + in_b) + pk <= capacity) & tri
            ck = ~plain & (static + k * in_b + a + pk <= capacity) & tri
            if checkpoint == "on":
                plain, ck = np.zeros_like(plain), (static + k * in_b + a + pk <= capacity) & tri
            elif checkpoint == "off":
                ck = np.zeros_like(ck)
            self.FW[s] = np.where(plain | ck, fcf, INF)
            self.BW[s] = np.where(plain, bcb, np.where(ck, rccb, INF))
            self.CK[s] = ck
            self.WT[s] = np.where(plain | ck, wt, INF)
            self.GR[s] = wt if self.schedule == "zb" else b
            self.AR[s] = np.where(plain | ck, ar, INF)
        blocked = np.array([cm.cut_blocked()[b] for b in bounds], dtype=bool)
        for s in range(1, S):  # no cut that a value without a batch dimension crosses between unequal replicas
            if self.reps[s] != self.reps[s - 1]:
                self.FW[s][blocked, :] = INF
                self.BW[s][blocked, :] = INF
                self.AR[s][blocked, :] = INF
        self.UT = self.FW + self.BW
        self.V = self.UT
        if self.schedule == "1f1b" and self.m > 1:  # costmodel.bottleneck_1f1b / (M - 1)
            w = np.array([warmup(self.m, S - s) for s in range(S)], dtype=float) / (self.m - 1.0)
            with np.errstate(invalid="ignore"):
                self.V = np.where(np.isfinite(self.UT), self.UT - w[:, None, None] * self.FW, INF)

    def max_terms(self) -> tuple[list[np.ndarray], list[float]]:
        w = max_weight(self.m, self.tie)
        if self.schedule == "gpipe":
            return [self.FW, self.BW, self.AR], [w, w, 1.0]
        return [self.V, self.AR], [w, 1.0]

    def dp(self, value: np.ndarray, combine: str = "sum") -> tuple[float, list[tuple[int, int, int]]] | None:
        """Least sum (or max) of ``value`` over the chain; (value, [(stage, start unit, end unit)])."""
        S, U = self.S, self.U
        op = np.add if combine == "sum" else np.maximum
        F = np.full(U + 1, INF)
        F[0] = 0.0
        args = np.zeros((S, U + 1), dtype=np.int64)
        cols = np.arange(U + 1)
        for s in range(S):
            cand = op(F[:, None], value[s])  # (start, end)
            a = cand.argmin(0)
            args[s] = a
            F = cand[a, cols]  # the minima (take_along_axis without its per-call index setup)
        if not np.isfinite(F[U]):
            return None
        out = []
        e = U
        for s in range(S - 1, -1, -1):
            a = int(args[s, e])
            out.append((s, a, e))
            e = a
        out.reverse()
        return float(F[U]), out

    def candidate(self, stages: list[tuple[int, int, int]]) -> tuple[float, Candidate, list[float], float]:
        arrs, w = self.max_terms()
        total = sum(float(self.UT[s, a, e]) for s, a, e in stages)
        maxima = [max(float(arr[s, a, e]) for s, a, e in stages) for arr in arrs]
        obj = total + sum(wk * x for wk, x in zip(w, maxima))
        out = tuple((self.bounds[a], self.bounds[e], self.reps[s], self.starts[s], bool(self.CK[s, a, e]))
                    for s, a, e in stages)
        return total, Candidate(obj, self.schedule, self.m, out, self.virtual, self.zero, self.overlap), maxima[:-1], maxima[-1]


def refine(cm: CostModel, cand: Candidate, bounds: list[int], ranges: dict | None = None,
           state: _State | None = None, chain: "_Chain | None" = None) -> Candidate | None:
    """Exact best boundaries over ``bounds`` for ``cand``'s structure (None if none fits).

    Every plan the branch and bound meets is offered to ``state`` (when given), so the caller can
    rank runners-up too; ``state.best`` is then the best over all refinements sharing it.
    """
    if chain is None:
        chain = _Chain(cm, cand, bounds, ranges if ranges is not None else unit_ranges(cm, bounds))
    own = _State()
    res0 = chain.dp(chain.UT)
    own.calls += 1
    if res0 is None:
        return None
    own.offer(*chain.candidate(res0[1]))
    ok = np.isfinite(chain.UT)
    arrs, _ = chain.max_terms()
    lows = []
    for arr in arrs:
        mm = chain.dp(np.where(ok, arr, INF), "max")
        lows.append(mm[0] if mm else 0.0)
    _branch_and_bound(chain, res0, lows, own, None)
    if state is not None:
        state.calls += own.calls
        for c in own.seen.values():
            state.offer(0.0, c, [], 0.0)
    best = own.best
    return best if best is not None and math.isfinite(best.objective) else None


def _held(schedule: str, stages: int, microbatches: int, virtual: int) -> list[int]:
    """Microbatches each stage holds at once (closed forms for 1F1B and GPipe, else from rank_ops)."""
    if schedule == "1f1b":
        return [min(microbatches, stages - s) for s in range(stages)]
    if schedule == "gpipe":
        return [microbatches] * stages
    from rannc_cli.planner.plan import held_counts

    return held_counts(schedule, stages // virtual, microbatches, virtual)


def structure(c: Candidate) -> tuple:
    """What refinement keeps: schedule, microbatches, each stage's replicas and first device, and
    the chunks per group, ZeRO and overlap settings."""
    return (c.schedule, c.microbatches, tuple((st[2], st[3]) for st in c.stages), c.virtual, c.zero, c.overlap)


class Refiner:
    """Refinement and simulator-guided polishing over one set of fine bounds, chains kept per structure.

        rf = Refiner(cost_model, fine_bounds)
        cands = rf.refine_all(coarse_candidates)          # coarse + refined, best objective first
        cand, step = rf.polish(cand)                       # boundaries moved while the simulation improves
    """

    def __init__(self, cm: CostModel, bounds: list[int], forced=None):
        from rannc_cli.planner.forced import Forced

        self.cm, self.bounds = cm, bounds
        self.forced = forced if forced is not None else Forced()
        self.ranges = unit_ranges(cm, bounds)
        self.chains: dict[tuple, _Chain] = {}
        self.calls = 0
        self.simulations = 0

    def chain(self, c: Candidate) -> _Chain:
        key = structure(c)
        if key not in self.chains:
            self.chains[key] = _Chain(self.cm, c, self.bounds, self.ranges, self.forced.checkpoint, self.forced.tie)
        return self.chains[key]

    def refine_all(self, cands: list[Candidate], structures: int = 8) -> list[Candidate]:
        """Refine the ``structures`` best distinct structures among ``cands``; every candidate
        (coarse and refined, best objective first, one per plan)."""
        state = _State()
        for c in cands:
            state.offer(0.0, c, [], 0.0)
        done: set[tuple] = set()
        for c in sorted(cands, key=lambda c: c.objective):
            key = structure(c)
            if key in done:
                continue
            done.add(key)
            refine(self.cm, c, self.bounds, state=state, chain=self.chain(c))
            if len(done) >= structures:
                break
        # the coarse search has at most one stage per unit; deeper pipelines (each stage split in
        # two halves of its replicas, same or doubled microbatch count) are refined the same way
        for c in [c for c in sorted(state.seen.values(), key=lambda c: c.objective)]:
            for split in self.splits(c):
                key = structure(split)
                if key not in done:
                    done.add(key)
                    refine(self.cm, split, self.bounds, state=state, chain=self.chain(split))
            if len(done) >= 3 * structures:
                break
        self.calls += state.calls
        return sorted(state.seen.values(), key=lambda c: c.objective)

    def splits(self, c: Candidate) -> list[Candidate]:
        """``c``'s structure with every stage split into two stages of half its replicas (when the
        halves can be placed and there are enough units), at M and at 2M microbatches; none when the
        stage count is forced, only M when the microbatch count is."""
        g = self.cm.cluster.gpus_per_node
        if self.forced.stages is not None or c.virtual > 1:
            return []
        stages = []
        for _, _, r, start, _ in c.stages:
            if r < 2 or r % 2 or not replica_ok(r // 2, g):
                return []
            stages += [(0, 0, r // 2, start, False), (0, 0, r // 2, start + r // 2, False)]
        if len(stages) > len(self.bounds) - 1:
            return []
        out = []
        for m in (c.microbatches,) if self.forced.microbatches is not None else (c.microbatches, 2 * c.microbatches):
            if m <= self.cm.batch_size and self.cm.batch_size % m == 0 and max(st[2] for st in stages) <= self.cm.microbatch(m):
                out.append(Candidate(INF, c.schedule, m, tuple(stages), 1, c.zero, c.overlap))
        return out

    def polish(self, cand: Candidate, max_sims: int = 400) -> tuple[Candidate, float] | None:
        """Local search on the boundaries of ``cand`` (which must start and end on ``self.bounds``)
        under the event simulation: move one boundary by one fine unit at a time, keep a move when
        the simulated step gets shorter, until no move helps or ``max_sims`` simulations ran.

        The DP's 1F1B objective is the bubble formula, which over-charges a pipeline whose slowest
        stage comes early (its downstream round trip overlaps the warm-up forwards, see
        costmodel.py); the simulation is the finer model, so its last word on the boundaries
        recovers what the formula misranks. Returns (candidate, its ranking key: the simulated
        step, plus the tie-break term at one microbatch, costmodel.rank_seconds) or None."""
        ch = self.chain(cand)
        index = {b: i for i, b in enumerate(self.bounds)}
        if any(st[0] not in index or st[1] not in index for st in cand.stages):
            return None
        pos = [index[st[0]] for st in cand.stages] + [self.bounds.index(cand.stages[-1][1])]
        S = ch.S
        sched, m = ch.schedule, ch.m

        g = self.cm.cluster.gpus_per_node
        tied = self.cm.has_shared_parameters()
        bucket = bucket_bytes()

        def step(p: list[int]) -> float:
            fw = [float(ch.FW[s, p[s], p[s + 1]]) for s in range(S)]
            if not all(np.isfinite(fw)):
                return INF
            bw = [float(ch.BW[s, p[s], p[s + 1]]) for s in range(S)]
            wt = [float(ch.WT[s, p[s], p[s + 1]]) for s in range(S)] if sched == "zb" else None
            self.simulations += 1
            if tied:  # the simulator's all-reduce: shared parameters over the union of their holders
                full = allreduce_times(self.cm, [(self.bounds[p[s]], self.bounds[p[s + 1]], st[2], devices(st[3], st[2], g))
                                                 for s, st in enumerate(cand.stages)])
                ar = [exposed_allreduce(a, float(ch.GR[s, p[s], p[s + 1]]), float(ch.TB[p[s], p[s + 1]]), ch.zero,
                                        ch.overlap, bucket) for s, a in enumerate(full)]
            else:
                ar = [float(ch.AR[s, p[s], p[s + 1]]) for s in range(S)]
            return rank_seconds(makespan(fw, bw, sched, m, ch.virtual, wt) + max(ar), fw, bw, m, self.forced.tie)

        best = step(pos)
        if not np.isfinite(best):
            return None
        sims = 1
        improved = True
        while improved and sims < max_sims:
            improved = False
            for i in range(1, S):
                for d in (-1, 1):
                    q = pos[i] + d
                    if not pos[i - 1] < q < pos[i + 1] or sims >= max_sims:
                        continue
                    trial = pos[:i] + [q] + pos[i + 1:]
                    t = step(trial)
                    sims += 1
                    if t < best * (1 - 1e-12):
                        best, pos, improved = t, trial, True
                        break
        _, out, _, _ = ch.candidate([(s, pos[s], pos[s + 1]) for s in range(S)])
        return out, best


def refine_all(cm: CostModel, cands: list[Candidate], bounds: list[int], structures: int = 8) -> tuple[list[Candidate], int]:
    """Refine the ``structures`` best distinct structures among ``cands``; returns every candidate
    (coarse and refined, best objective first, one per plan) and the number of chain DP runs."""
    rf = Refiner(cm, bounds)
    out = rf.refine_all(cands, structures)
    return out, rf.calls
