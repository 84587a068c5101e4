"""Coarsening: merge adjacent blocks into at most ``max_units`` units before the search.

    bounds = coarsen(cost_model, max_units=32)     # [0, 3, 6, ..., n]: unit u = blocks bounds[u]..bounds[u+1]-1

Stage boundaries can then only fall between units. Like RaNNC, the pair of adjacent units with the
smallest combined forward+backward time (at a one-sample shard) is merged first, so expensive
blocks stay alone and cheap ones (norms, reshapes) join their neighbours; a merge whose
parameters and optimizer state would not fit one GPU is skipped while others remain. With
``n_blocks <= max_units`` nothing is merged and the search is exact over all block boundaries.
"""

from __future__ import annotations

from rannc_cli.planner.costmodel import CostModel


def coarsen(cm: CostModel, max_units: int) -> list[int]:
    n = cm.n
    bounds = list(range(n + 1))
    if n <= max_units:
        return bounds
    fwd, bwd, _, _, _ = cm.block_arrays(1)
    weight = [float(f + b) for f, b in zip(fwd, bwd)]
    # a tiny tie-break so that runs of identical blocks merge evenly from both ends
    units = [[i, i + 1, weight[i]] for i in range(n)]
    while len(units) > max_units:
        best = None
        best_fit = None
        for i in range(len(units) - 1):
            w = units[i][2] + units[i + 1][2]
            key = (w, abs(i - (len(units) - 2) / 2))
            fits = cm.static_memory(cm.range_info(units[i][0], units[i + 1][1])) <= cm.capacity
            if fits and (best_fit is None or key < best_fit[0]):
                best_fit = (key, i)
            if best is None or key < best[0]:
                best = (key, i)
        i = (best_fit or best)[1]
        units[i] = [units[i][0], units[i + 1][1], units[i][2] + units[i + 1][2]]
        del units[i + 1]
    return [u[0] for u in units] + [n]
