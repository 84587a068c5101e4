"""The one warning a BatchNorm model gets when its plan slices the batch.

    text = slicing_warning(stages, plan)   # None, or one line for rank 0's stderr
    if text: print(text, file=sys.stderr)

Training-mode BatchNorm normalises with the statistics of the samples it sees. A stage replica
sees one slice of one microbatch, so with more than one microbatch, or more than one replica of a
stage that holds BatchNorm, the statistics (and therefore losses, gradients and running stats)
are those of the slice, not of the global batch: close to single-device training but not equal.
"""

from __future__ import annotations

from typing import Any, Sequence


def batch_norm_count(stage: Any) -> int:
    """Training-mode batch-norm ops in a stage module's graph."""
    return sum(1 for n in stage.graph_module.graph.nodes if n.op == "call_function"
               and "batch_norm" in str(n.target) and "no_training" not in str(n.target))


def slicing_warning(stages: Sequence[Any], plan: Any) -> str | None:
    """One line when some stage with BatchNorm normalises over less than the whole batch."""
    sliced = []
    for stage, st in zip(stages, plan.stages):
        if batch_norm_count(stage) and (plan.microbatches > 1 or st.replicas > 1):
            sliced.append((stage.index, st.replicas))
    if not sliced:
        return None
    smallest = max(1, plan.batch_size // (plan.microbatches * max(r for _, r in sliced)))
    where = ", ".join(f"stage {s} ({r} replica{'s' if r > 1 else ''})" for s, r in sliced)
    return (f"rannc: warning: BatchNorm in {where} with {plan.microbatches} microbatch(es) normalises over slices "
            f"of about {smallest} of the {plan.batch_size} samples, so losses and parameters differ from "
            "single-device training; for single-device numbers use --microbatches 1 and one replica for the stages "
            "holding BatchNorm, or a normalisation without batch statistics (GroupNorm, LayerNorm)")
