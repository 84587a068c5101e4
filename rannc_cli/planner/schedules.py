"""Pipeline schedules as pure functions: the order in which each GPU group runs its work.

    ops = stage_ops("1f1b", stages=3, microbatches=4)
    ops[0]   # [('F', 0), ('F', 1), ('F', 2), ('B', 0), ('F', 3), ('B', 1), ('B', 2), ('B', 3)]
    rank_ops("interleaved", groups=2, microbatches=4, virtual=2)[0][:3]   # [('F', 0, 0), ('F', 1, 0), ('F', 0, 2)]

``stage_ops`` gives one list per stage of ``(kind, microbatch)`` ops for the one-chunk schedules.
``rank_ops`` is the general form the simulator and the runtime share: one list per *device group*
g = 0..p-1 (the replicas of a stage run the same list), each op ``(kind, microbatch, stage)``.
With ``virtual = v > 1`` a group holds v chunks, the stages g, g + p, ..., g + (v-1) p, so the
model has S = p v stages. Kinds: 'F' forward, 'B' backward ('zb': the input-gradient part only),
'W' the weight-gradient part ('zb' only). A group runs its ops strictly in list order; an op also
waits for its data: F(s, m) for F(s-1, m), B(s, m) for B(s+1, m) (the last stage's B(m) for its own
F(m)), W(s, m) for B(s, m).

GPipe (all forwards, then all backwards), S = 3, M = 4, one column per op slot::

    stage 0: F0 F1 F2 F3 B0 B1 B2 B3
    stage 1: F0 F1 F2 F3 B0 B1 B2 B3
    stage 2: F0 F1 F2 F3 B0 B1 B2 B3

1F1B (PipeDream-Flush): stage s first runs ``min(S - s - 1, M)`` warm-up forwards, then
alternates one forward and one backward, then drains the remaining backwards::

    stage 0: F0 F1 F2 B0 F3 B1 B2 B3
    stage 1: F0 F1 B0 F2 B1 F3 B2 B3
    stage 2: F0 B0 F1 B1 F2 B2 F3 B3

So stage s holds at most min(M, S - s) microbatches' activations, GPipe's hold M.

Interleaved 1F1B (Megatron-LM, Narayanan et al. SC'21): microbatches go through a group's chunks
in rounds of p: forwards F(m, chunk 0) for the p microbatches of a round, then chunk 1, ...;
backwards visit the chunks in reverse. Group g runs ``min(M v, 2 (p - g - 1) + (v - 1) p)`` warm-up
forwards (with M not a multiple of p a short last round can stall that order; the groups that
would wait forever warm up by one more forward until none does), then alternates, then drains. The bubble shrinks from (p-1)/M to about (p-1)/(v M) of a step.

ZB-H1 (Qi et al., ICLR'24): 1F1B's order with every backward split in B (input gradients, which the
previous stage waits for) and W (weight gradients, which nobody waits for). Stage s defers its W
ops while at most ``s`` are pending, so they fill the drain bubble; the microbatches it holds
(forwarded, W not yet run) never exceed p, 1F1B's peak on stage 0.
"""

from __future__ import annotations

Op = tuple[str, int]
RankOp = tuple[str, int, int]  # (kind, microbatch, stage)

SCHEDULE_NAMES = ("1f1b", "gpipe", "interleaved", "zb")


def gpipe(stages: int, microbatches: int) -> list[list[Op]]:
    return [[("F", m) for m in range(microbatches)] + [("B", m) for m in range(microbatches)]
            for _ in range(stages)]


def one_f_one_b(stages: int, microbatches: int) -> list[list[Op]]:
    out = []
    for s in range(stages):
        warm = min(stages - s - 1, microbatches)
        ops: list[Op] = [("F", m) for m in range(warm)]
        for i in range(microbatches - warm):
            ops += [("F", warm + i), ("B", i)]
        ops += [("B", m) for m in range(microbatches - warm, microbatches)]
        out.append(ops)
    return out


def stage_ops(schedule: str, stages: int, microbatches: int) -> list[list[Op]]:
    """Per-stage op order of ``schedule`` ('1f1b' or 'gpipe')."""
    if schedule == "gpipe":
        return gpipe(stages, microbatches)
    if schedule == "1f1b":
        return one_f_one_b(stages, microbatches)
    raise ValueError(f"unknown schedule {schedule!r}")


def _interleaved_sequence(groups: int, microbatches: int, virtual: int, backward: bool) -> list[tuple[int, int]]:
    """(microbatch, chunk) in the order one group visits them: rounds of p microbatches per chunk."""
    out = []
    for lo in range(0, microbatches, groups):
        round_ = range(lo, min(lo + groups, microbatches))
        chunks = range(virtual - 1, -1, -1) if backward else range(virtual)
        out += [(m, c) for c in chunks for m in round_]
    return out


def _interleaved_order(fwd: list, bwd: list, group: int, groups: int, warm: int) -> list[RankOp]:
    total = len(fwd)
    ops: list[RankOp] = [("F", m, c * groups + group) for m, c in fwd[:warm]]
    for i in range(total - warm):
        m, c = fwd[warm + i]
        ops.append(("F", m, c * groups + group))
        m, c = bwd[i]
        ops.append(("B", m, c * groups + group))
    return ops + [("B", m, c * groups + group) for m, c in bwd[total - warm:]]


def _stuck_groups(orders: list[list[RankOp]], stages: int) -> list[int]:
    """Groups whose next op can never run (empty when the orders run to the end)."""
    mbs = 1 + max((op[1] for ops in orders for op in ops), default=0)
    done = {"F": [[False] * mbs for _ in range(stages)], "B": [[False] * mbs for _ in range(stages)],
            "W": [[False] * mbs for _ in range(stages)]}
    fd, bd = done["F"], done["B"]
    ptr = [0] * len(orders)
    progressed = True
    while progressed:
        progressed = False
        for g, ops in enumerate(orders):
            q = ptr[g]
            while q < len(ops):
                k, m, s = ops[q]
                if k == "F":
                    ready = s == 0 or fd[s - 1][m]
                elif k == "B":
                    ready = fd[s][m] and (s == stages - 1 or bd[s + 1][m])
                else:
                    ready = bd[s][m]
                if not ready:
                    break
                done[k][s][m] = True
                q += 1
            if q != ptr[g]:
                ptr[g] = q
                progressed = True
    return [g for g, ops in enumerate(orders) if ptr[g] < len(ops) and ops[ptr[g]][0] == "B"]


def interleaved(groups: int, microbatches: int, virtual: int) -> list[list[RankOp]]:
    p, M, v = groups, microbatches, virtual
    fwd = _interleaved_sequence(p, M, v, backward=False)
    bwd = _interleaved_sequence(p, M, v, backward=True)
    warm = [min(M * v, 2 * (p - g - 1) + (v - 1) * p) for g in range(p)]
    while True:  # M not a multiple of p: a short last round can stall a group; it warms up further
        orders = [_interleaved_order(fwd, bwd, g, p, warm[g]) for g in range(p)]
        stuck = _stuck_groups(orders, p * v)
        if not stuck:
            return orders
        for g in stuck:
            warm[g] = min(M * v, warm[g] + 1)


def zero_bubble_h1(stages: int, microbatches: int) -> list[list[RankOp]]:
    out = []
    for s, ops1 in enumerate(one_f_one_b(stages, microbatches)):
        ops: list[RankOp] = []
        pending: list[int] = []
        for kind, m in ops1:
            ops.append((kind, m, s))
            if kind == "B":
                pending.append(m)
                if len(pending) > s:
                    ops.append(("W", pending.pop(0), s))
        ops += [("W", m, s) for m in pending]
        out.append(ops)
    return out


_RANK_OPS: dict[tuple[str, int, int, int], tuple[tuple[RankOp, ...], ...]] = {}


def rank_ops(schedule: str, groups: int, microbatches: int, virtual: int = 1) -> list[list[RankOp]]:
    """Per-group op order of ``schedule``; see the module docstring. ``virtual`` > 1 needs 'interleaved'.
    Cached (the simulator and the held-microbatch counts ask for the same orders); each call gets
    its own lists."""
    key = (schedule, groups, microbatches, virtual)
    if key not in _RANK_OPS:
        _RANK_OPS[key] = tuple(tuple(ops) for ops in _rank_ops(schedule, groups, microbatches, virtual))
    return [list(ops) for ops in _RANK_OPS[key]]


def _rank_ops(schedule: str, groups: int, microbatches: int, virtual: int) -> list[list[RankOp]]:
    if schedule == "interleaved" and virtual > 1:
        return interleaved(groups, microbatches, virtual)
    if virtual != 1:
        raise ValueError(f"schedule {schedule!r} has one chunk per GPU group, not {virtual}")
    if schedule == "interleaved":  # one chunk per group: plain 1F1B (Megatron's formula warms up twice as far)
        schedule = "1f1b"
    if schedule == "zb":
        return zero_bubble_h1(groups, microbatches)
    return [[(k, m, s) for k, m in ops] for s, ops in enumerate(stage_ops(schedule, groups, microbatches))]


def peak_in_flight(ops: list) -> int:
    """Most microbatches forwarded but not yet finished (backward, or W for 'zb') at any point of one
    op list; with several chunks per list, each (microbatch, chunk) counts once."""
    has_w = any(op[0] == "W" for op in ops)
    live = peak = 0
    for op in ops:
        kind = op[0]
        if kind == "F":
            live += 1
        elif kind == ("W" if has_w else "B"):
            live -= 1
        peak = max(peak, live)
    return peak


def peak_in_flight_per_stage(ops: list[RankOp]) -> dict[int, int]:
    """For one group's op list: the most microbatches each of its stages holds at once."""
    stages = sorted({op[2] for op in ops})
    return {s: peak_in_flight([op for op in ops if op[2] == s]) for s in stages}
