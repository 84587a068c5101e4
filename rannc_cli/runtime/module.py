"""RaNNCModule: the one line a user adds to a single-device training script.

    model = RaNNCModule(model, optimizer)
    loss = model(x, y)            # forward returns the loss
    loss.backward(); optimizer.step(); optimizer.zero_grad()

In a single process with no distributed environment the wrapper runs the model as plain
PyTorch. Under `rannc profile`, its first forward hands the model and the real first batch to
the profiler (see rannc_cli.runtime.hooks). Distributed pipeline execution builds on the stage
modules of rannc_cli.graph.stages.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from rannc_cli.runtime.hooks import current_hook


class RaNNCModule(nn.Module):
    """Wraps a module whose forward returns the loss; see the module docstring."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None, **options: Any):
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"RaNNCModule wraps an nn.Module, got {type(model).__name__}")
        self.model = model
        self.optimizer = optimizer
        self.options = options
        self._seen_first_forward = False

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if not self._seen_first_forward:
            self._seen_first_forward = True
            hook = current_hook()
            if hook is not None:
                hook(self.model, args, kwargs)
        return self.model(*args, **kwargs)

    # The wrapper is transparent for state: checkpoints load into the bare model.
    def state_dict(self, *args: Any, **kwargs: Any):  # type: ignore[override]
        return self.model.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):  # type: ignore[override]
        return self.model.load_state_dict(state_dict, strict=strict, assign=assign)
