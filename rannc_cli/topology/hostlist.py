"""Slurm host lists: ``n[01-03,7],gpu1`` <-> ``["n01", "n02", "n03", "n7", "gpu1"]``.

    expand("n[01-03,7],gpu1")      # ['n01', 'n02', 'n03', 'n7', 'gpu1']
    compress(["n1", "n2", "n3"])   # 'n[1-3]'

The same expansion as `scontrol show hostnames`, without needing Slurm on this machine.
"""

from __future__ import annotations

import re
from itertools import product

from rannc_cli.errors import RanncError


def _split_top(text: str) -> list[str]:
    """Split on commas outside brackets."""
    parts, depth, cur = [], 0, ""
    for ch in text:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    if depth != 0:
        raise RanncError(f"host list {text!r} has unbalanced brackets")
    parts.append(cur)
    return [p.strip() for p in parts if p.strip()]


def _range(spec: str, whole: str) -> list[str]:
    out = []
    for item in spec.split(","):
        lo, _, hi = item.partition("-")
        if not lo.isdigit() or (hi and not hi.isdigit()):
            raise RanncError(f"host list {whole!r} has a bad range {item!r}")
        if not hi:
            out.append(lo)
            continue
        width = len(lo) if lo.startswith("0") else 0
        out.extend(str(k).zfill(width) for k in range(int(lo), int(hi) + 1))
    return out


def expand(hostlist: str) -> list[str]:
    """Every host name of a Slurm host list, in order."""
    hosts: list[str] = []
    for part in _split_top(hostlist):
        pieces = re.split(r"(\[[^\]]*\])", part)
        choices = [_range(p[1:-1], hostlist) if p.startswith("[") else [p] for p in pieces if p]
        hosts.extend("".join(c) for c in product(*choices))
    return hosts


def compress(hosts: list[str]) -> str:
    """A short host list for display: runs of numbered names with one prefix become ``p[a-b]``."""
    groups: dict[tuple[str, int], list[int]] = {}
    order: list[tuple[str, int] | str] = []
    for h in hosts:
        m = re.fullmatch(r"(.*?)(\d+)", h)
        if not m:
            order.append(h)
            continue
        key = (m.group(1), len(m.group(2)) if m.group(2).startswith("0") else 0)
        if key not in groups:
            groups[key] = []
            order.append(key)
        groups[key].append(int(m.group(2)))
    out = []
    for key in order:
        if isinstance(key, str):
            out.append(key)
            continue
        prefix, width = key
        nums = sorted(set(groups[key]))
        if len(nums) == 1:
            out.append(f"{prefix}{str(nums[0]).zfill(width)}")
            continue
        spans, start, prev = [], nums[0], nums[0]
        for n in nums[1:] + [None]:
            if n is not None and n == prev + 1:
                prev = n
                continue
            a, b = str(start).zfill(width), str(prev).zfill(width)
            spans.append(a if start == prev else f"{a}-{b}")
            if n is not None:
                start = prev = n
        out.append(f"{prefix}[{','.join(spans)}]")
    return ",".join(out)
