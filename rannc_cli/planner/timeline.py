"""A picture of the simulated schedule: who computes which microbatch when, and the idle time.

    draw_timeline(plan, simulation, "plan.png")

One row per stage (all its replicas work in step); forward ops light, backward ops dark, labelled
with the microbatch number when wide enough; gradient all-reduces hatched; gaps are idle time,
whose share per stage is printed at the row's right end. matplotlib with the Agg backend, so no
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
    stages = len(plan.stages)
    step = sim.step_seconds or 1.0
    unit, scale = ("ms", 1e3) if step < 10 else ("s", 1.0)
    fig, ax = plt.subplots(figsize=(12, 1.0 + 0.45 * stages))
    colors = {"F": "#9ecae1", "B": "#3182bd", "AR": "#bdbdbd"}
    for ev in sim.events:
        y = stages - 1 - ev.stage
        width = (ev.end - ev.start) * scale
        ax.barh(y, width, left=ev.start * scale, height=0.8, color=colors[ev.kind], edgecolor="white", linewidth=0.3,
                hatch="//" if ev.kind == "AR" else None)
        if ev.kind != "AR" and width > step * scale / 60:
            ax.text(ev.start * scale + width / 2, y, str(ev.microbatch), ha="center", va="center", fontsize=6,
                    color="black" if ev.kind == "F" else "white")
    labels = []
    for i, st in enumerate(plan.stages):
        nodes = sorted({n for n, _ in st.devices})
        where = f"node {nodes[0]}" if len(nodes) == 1 else f"nodes {nodes[0]}-{nodes[-1]}"
        labels.append(f"stage {i}: {st.replicas}x, {where}")
        busy = plan.microbatches * (sim.costs[i].forward + sim.costs[i].backward) + sim.costs[i].allreduce
        idle = max(0.0, 1.0 - busy / step)
        ax.text(step * scale * 1.005, stages - 1 - i, f"idle {idle:.0%}", va="center", fontsize=7)
    ax.set_yticks(range(stages))
    ax.set_yticklabels(labels[::-1], fontsize=8)
    ax.set_xlim(0, step * scale * 1.08)
    ax.set_xlabel(f"time ({unit})")
    ax.set_title(title or f"{plan.schedule}, {plan.microbatches} microbatches: step {step * scale:.4g} {unit} "
                 "(light: forward, dark: backward, hatched: all-reduce)", fontsize=9)
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
