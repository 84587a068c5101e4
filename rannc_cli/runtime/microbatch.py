"""Microbatches and replica slices: which samples each replica of each stage works on.

    sizes = split_sizes(10, 3)                    # [4, 3, 3], like torch.tensor_split
    r = slice_ranges(batch=10, microbatches=2, replicas=2)
    r[1][0]                                        # (5, 8): microbatch 1, replica 0 -> samples 5..7
    pieces(r[m][i], r2[m][k])                      # overlap of a producer and a consumer slice

A global batch of B samples is cut into M microbatches (sizes differ by at most one); stage s
cuts every microbatch again among its r_s replicas. A value crossing from a stage with r_s
replicas to one with r_t replicas travels as the overlaps of the two cuts, so adjacent stages may
have any replica counts. A value's batch dimension may hold k rows per sample (a [B*T, V]
reshape has k = T): sample range [a, b) is rows [a*k, b*k).
"""

from __future__ import annotations

from typing import Any

import torch

Range = tuple[int, int]


def split_sizes(total: int, parts: int) -> list[int]:
    """``total`` items into ``parts`` contiguous parts, the first ``total % parts`` one larger."""
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


def slice_ranges(batch: int, microbatches: int, replicas: int) -> list[list[Range]]:
    """``[m][j]`` -> global sample range of replica j's share of microbatch m."""
    out: list[list[Range]] = []
    start = 0
    for size in split_sizes(batch, microbatches):
        row = []
        s = start
        for part in split_sizes(size, replicas):
            row.append((s, s + part))
            s += part
        out.append(row)
        start += size
    return out


def overlap(a: Range, b: Range) -> Range | None:
    lo, hi = max(a[0], b[0]), min(a[1], b[1])
    return (lo, hi) if lo < hi else None


def take(value: Any, batch_dim: int | None, rows_per_sample: int, owner: Range, want: Range) -> Any:
    """The part of ``value`` (which holds samples ``owner``) that covers samples ``want``."""
    if not isinstance(value, torch.Tensor) or batch_dim is None:
        return value
    if owner == want:
        return value
    start = (want[0] - owner[0]) * rows_per_sample
    return value.narrow(batch_dim, start, (want[1] - want[0]) * rows_per_sample)


def join(parts: list[torch.Tensor], batch_dim: int | None) -> torch.Tensor:
    if len(parts) == 1:
        return parts[0]
    assert batch_dim is not None
    return torch.cat(parts, dim=batch_dim)


def sym_value(val: Any, batch_symbol: Any, samples: int) -> Any:
    """A symbolic size (SymInt/SymFloat/SymBool) evaluated for a slice of ``samples`` samples."""
    if not isinstance(val, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        return val
    node = val.node
    expr = node.expr
    subs = {s: (samples if s == batch_symbol else node.shape_env.var_to_val.get(s, 1)) for s in expr.free_symbols}
    result = expr.subs(subs)
    if isinstance(val, torch.SymInt):
        return int(result)
    if isinstance(val, torch.SymBool):
        return bool(result)
    return float(result)


def rows_per_sample(val: Any, batch_dim: int | None, batch_symbol: Any) -> int | None:
    """Rows of the batch dimension per sample (``k`` in ``k * B``); None if it is not linear in B."""
    if not isinstance(val, torch.Tensor) or batch_dim is None:
        return 1
    size = val.shape[batch_dim]
    if not isinstance(size, torch.SymInt):
        return 1
    one, two, zero = (sym_value(size, batch_symbol, n) for n in (1, 2, 0))
    if two != 2 * one or zero != 0:
        return None
    return one
