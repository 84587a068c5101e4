"""Pipeline schedules as pure functions: the order in which each stage runs its work.

    ops = stage_ops("1f1b", stages=3, microbatches=4)
    ops[0]   # [('F', 0), ('F', 1), ('F', 2), ('B', 0), ('F', 3), ('B', 1), ('B', 2), ('B', 3)]

An op is ``('F', m)`` (forward of microbatch m) or ``('B', m)`` (its backward). A stage runs its
ops strictly in this order; an op also waits for its data: F(s, m) for F(s-1, m), B(s, m) for
B(s+1, m), and the last stage's B(m) for its own F(m). The runtime consumes the same lists.

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
"""

from __future__ import annotations

Op = tuple[str, int]


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


def peak_in_flight(ops: list[Op]) -> int:
    """Most microbatches forwarded but not yet backwarded at any point of one stage's op list."""
    live = peak = 0
    for kind, _ in ops:
        live += 1 if kind == "F" else -1
        peak = max(peak, live)
    return peak
