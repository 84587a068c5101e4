"""A picture of the simulated schedule: who computes which microbatch when, and the idle time.

    draw_timeline(plan, simulation, "plan.png")

One row per GPU group (a stage's replicas work in step; with interleaving a group runs v chunks,
its ops labelled ``microbatch.chunk``); forward ops light, backward ops dark ('zb': B, the input
gradients), 'zb''s W ops (weight gradients) green, labelled with the microbatch number when wide
enough; gradient all-reduces hatched; gaps are idle time, whose share per group is printed at the
row's right end. matplotlib with the Agg backend, so no
display is needed; the file is written atomically.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from rannc_cli.planner.plan import Plan
from rannc_cli.planner.simulate import Simulation


def draw_timeline(plan: Plan, sim: Simulation, path: Path | str, title: str | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    stages = plan.groups  # rows
    step = sim.step_seconds or 1.0
    unit, scale = ("ms", 1e3) if step < 10 else ("s", 1.0)
    fig, ax = plt.subplots(figsize=(12, 1.0 + 0.45 * stages))
    colors = {"F": "#9ecae1", "B": "#3182bd", "W": "#31a354", "AR": "#bdbdbd"}
    for ev in sim.events:
        group = ev.group if ev.group >= 0 else ev.stage % stages
        y = stages - 1 - group
        width = (ev.end - ev.start) * scale
        ax.barh(y, width, left=ev.start * scale, height=0.8, color=colors[ev.kind], edgecolor="white", linewidth=0.3,
                hatch="//" if ev.kind == "AR" else None)
        if ev.kind != "AR" and width > step * scale / 60:
            label = f"{ev.microbatch}.{ev.stage // stages}" if plan.virtual_stages > 1 else str(ev.microbatch)
            ax.text(ev.start * scale + width / 2, y, label, ha="center", va="center", fontsize=6,
                    color="black" if ev.kind == "F" else "white")
    labels = []
    for i, st in enumerate(plan.stages[:stages]):
        nodes = sorted({n for n, _ in st.devices})
        where = f"node {nodes[0]}" if len(nodes) == 1 else f"nodes {nodes[0]}-{nodes[-1]}"
        chunks = "" if plan.virtual_stages == 1 else f" (+{plan.virtual_stages - 1} chunks)"
        labels.append(f"stage {i}{chunks}: {st.replicas}x, {where}")
        idle = max(0.0, 1.0 - sim.busy[i] / step)
        ax.text(step * scale * 1.005, stages - 1 - i, f"idle {idle:.0%}", va="center", fontsize=7)
    ax.set_yticks(range(stages))
    ax.set_yticklabels(labels[::-1], fontsize=8)
    ax.set_xlim(0, step * scale * 1.08)
    ax.set_xlabel(f"time ({unit})")
    sched = plan.schedule + (f" v={plan.virtual_stages}" if plan.virtual_stages > 1 else "")
    ax.set_title(title or f"{sched}, {plan.microbatches} microbatches: step {step * scale:.4g} {unit} "
                 "(light: forward, dark: backward" + (", green: W" if plan.schedule == "zb" else "")
                 + ", hatched: all-reduce)", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".png", dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=120)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path
