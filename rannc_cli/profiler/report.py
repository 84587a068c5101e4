"""Human and machine summaries of a profile.

    print(render_table(prof, top=10))
    summary(prof)   # dict for --json
"""

from __future__ import annotations

from typing import Any

from rannc_cli.profiler.format import Profile


def _mib(n: float) -> str:
    return f"{n / 2**20:.2f}"


def _ms(s: float) -> str:
    return f"{s * 1e3:.3f}"


def block_rows(prof: Profile, microbatch: int | None = None) -> list[dict[str, Any]]:
    m = microbatch or prof.batch_size
    rows = []
    for b in prof.blocks:
        c = prof.block_cost(b.id, m)
        rows.append({"block": b.id, "name": b.name or "<root>", "type": b.module_type, "class": b.cls,
                     "forward_seconds": c.forward_seconds, "backward_seconds": c.backward_seconds,
                     "activation_bytes": c.activation_bytes, "peak_bytes": c.peak_bytes,
                     "parameter_bytes": prof.param_bytes([b.id])})
    return rows


def summary(prof: Profile, path: str | None = None, cached: bool = False, top: int = 10) -> dict[str, Any]:
    totals = prof.totals()
    rows = sorted(block_rows(prof), key=lambda r: r["forward_seconds"] + r["backward_seconds"], reverse=True)
    n_params = sum(1 for p in prof.parameters.values() if p.kind == "parameter")
    return {
        "profile": path,
        "cached": cached,
        "model": prof.model["name"],
        "batch_size": prof.batch_size,
        "device": prof.device.get("name"),
        "mode": prof.device.get("mode"),
        "microbatch_sizes": prof.microbatch_sizes,
        "ops": prof.model.get("ops"),
        "blocks": totals["blocks"],
        "distinct_blocks": totals["distinct_blocks"],
        "dedup_ratio": totals["blocks"] / max(1, totals["distinct_blocks"]),
        "parameters": n_params,
        "parameter_bytes": totals["parameter_bytes"],
        "forward_seconds": totals["forward_seconds"],
        "backward_seconds": totals["backward_seconds"],
        "activation_bytes": totals["activation_bytes"],
        "costliest_blocks": rows[:top],
    }


def render_table(prof: Profile, path: str | None = None, cached: bool = False, top: int = 10) -> str:
    from tabulate import tabulate

    s = summary(prof, path, cached, top)
    rows = [[r["block"], r["name"], r["type"], r["class"], _ms(r["forward_seconds"]), _ms(r["backward_seconds"]),
             _mib(r["activation_bytes"]), _mib(r["parameter_bytes"])] for r in s["costliest_blocks"]]
    table = tabulate(rows, headers=["block", "module", "type", "class", "fwd ms", "bwd ms", "act MiB", "param MiB"],
                     tablefmt="simple")
    lines = [
        f"{s['model']}: {s['ops']} ops -> {s['blocks']} blocks, {s['distinct_blocks']} distinct "
        f"(dedup x{s['dedup_ratio']:.1f}); {s['mode']} on {s['device']}, batch {s['batch_size']}, "
        f"microbatch sizes {s['microbatch_sizes']}",
        f"costliest blocks at microbatch {s['batch_size']}:",
        table,
        f"totals at microbatch {s['batch_size']}: params {_mib(s['parameter_bytes'])} MiB, activations "
        f"{_mib(s['activation_bytes'])} MiB, forward {_ms(s['forward_seconds'])} ms, backward "
        f"{_ms(s['backward_seconds'])} ms",
    ]
    if path:
        lines.append(f"profile {'(from cache) ' if cached else ''}written to {path}")
    return "\n".join(lines)
