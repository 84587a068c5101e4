"""The one line a BatchNorm model gets when its plan normalises over less than the whole batch.

    text = slicing_warning(stages, plan, mode="local")   # None, or one line for rank 0's stderr
    if text: print(text, file=sys.stderr)

Training-mode BatchNorm normalises with the statistics of the samples it sees. A stage replica
sees one slice of one microbatch, so with more than one microbatch, or (``batchnorm=local``) more
than one replica of a stage that holds BatchNorm, the statistics (and therefore losses, gradients
and running stats) are those of the slice: close to single-device training, not equal.
``batchnorm=sync`` (runtime/syncbn.py) shares them across a stage's replicas; microbatches stay
separate in a pipeline.
"""

from __future__ import annotations

from typing import Any, Sequence


def slicing_warning(stages: Sequence[Any], plan: Any, mode: str = "local") -> str | None:
    """One line when some stage with training-mode BatchNorm normalises over a slice of the batch."""
    from rannc_cli.runtime.syncbn import batch_norm_nodes

    m = plan.microbatches
    sliced = [(stage.index, st.replicas) for stage, st in zip(stages, plan.stages)
              if batch_norm_nodes(stage.graph_module) and (m > 1 or (st.replicas > 1 and mode == "local"))]
    if not sliced:
        return None
    if mode == "sync":
        return (f"rannc: note: batchnorm=sync shares BatchNorm statistics across replicas; each of the {m} "
                "microbatches is still normalised on its own, so numbers equal one device accumulating over "
                f"{m} chunks of the batch (single-device numbers need --microbatches 1)")
    widest = max(r for _, r in sliced)
    smallest = max(1, plan.batch_size // (m * widest))
    where = ", ".join(f"stage {s} ({r} replica{'s' if r > 1 else ''})" for s, r in sliced)
    return (f"rannc: warning: BatchNorm statistics are computed per microbatch slice in {where} with {m} "
            f"microbatch(es), about {smallest} of the {plan.batch_size} samples each, so losses and parameters "
            "differ from single-device training; RaNNCModule(..., batchnorm='sync') or RANNC_BATCHNORM=sync shares "
            "them across a stage's replicas, and with --microbatches 1 gives single-device numbers")
