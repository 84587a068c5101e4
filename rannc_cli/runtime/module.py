"""RaNNCModule: the one line a user adds to a single-device training script.

    model = RaNNCModule(model, optimizer)
    loss = model(x, y)            # forward returns the loss, on every rank
    loss.backward(); optimizer.step(); optimizer.zero_grad()

In a single process with no distributed environment the wrapper runs the model as plain
PyTorch. Under `rannc run`, torchrun, srun or mpiexec (see rannc_cli.runtime.env) the first
forward captures the model, gets a plan (a plan file, or rank 0 profiles and plans and every rank
receives the result), and from then on each forward runs one synchronous pipeline + data parallel
step (rannc_cli.runtime.engine). Under `rannc profile`, the first forward hands the model and the
real first batch to the profiler (rannc_cli.runtime.hooks).

Options: ``local_batches=True`` (each rank passes its own share of the global batch, in rank
order), ``plan=`` (a plan file, Plan, or ``{"replicas": [2, 1], "microbatches": 2, ...}`` for an
even split without profiling), ``stages=``, ``replicas=``, ``microbatches=``, ``schedule=``,
``checkpoint=`` ('auto', 'on', 'off'), ``loss_reduction=`` ('mean', 'sum'), ``batchnorm=``
('local', 'sync': BatchNorm statistics shared by a stage's replicas); each overrides the
RANNC_<NAME> setting of the same name.

The wrapper is transparent for the script: ``named_parameters()``/``named_buffers()`` give the
user's names, ``torch.nn.utils.clip_grad_norm_(model.parameters(), m)`` clips by the global norm
(rannc_cli.runtime.clipping), and so does ``model.clip_grad_norm_(m)``.
"""

from __future__ import annotations

from pathlib import Path
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
        from rannc_cli.runtime.env import detect_env

        env = detect_env()
        self._engine = None
        self._env = env if env is not None and env.world_size > 1 else None
        if self._env is not None:
            from rannc_cli.runtime.preempt import Preemption, checkpoint_root

            if checkpoint_root() is not None:
                Preemption.install()  # from now on SIGUSR1 means: checkpoint at the end of a step
        if self._env is None:
            from rannc_cli.runtime.deferred import materialize_all

            materialize_all(model)

    @property
    def distributed(self) -> bool:
        return self._env is not None

    def _get_engine(self):
        if self._engine is None:
            from rannc_cli.runtime.engine import Engine

            # not an nn.Module attribute: the engine must not appear in children() or state_dict()
            object.__setattr__(self, "_engine", Engine(self.model, self.optimizer, self._env, dict(self.options)))
        return self._engine

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if not self._seen_first_forward:
            self._seen_first_forward = True
            hook = current_hook()
            if hook is not None:
                hook(self.model, args, kwargs)
        if self._env is None:
            return self.model(*args, **kwargs)
        return self._get_engine().forward(args, kwargs)

    # The wrapper is transparent for names: the user's model's, without a "model." prefix.
    def named_parameters(self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True):  # type: ignore[override]
        return self.model.named_parameters(prefix=prefix, recurse=recurse, remove_duplicate=remove_duplicate)

    def named_buffers(self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True):  # type: ignore[override]
        return self.model.named_buffers(prefix=prefix, recurse=recurse, remove_duplicate=remove_duplicate)

    def clip_grad_norm_(self, max_norm: float, norm_type: float = 2.0, error_if_nonfinite: bool = False,
                        foreach: bool | None = None) -> torch.Tensor:
        """``model.clip_grad_norm_(1.0)``: clip every gradient by the single-device total norm; returns it."""
        engine = self._engine
        if engine is not None and engine.plan is not None:
            from rannc_cli.runtime.clipping import global_clip_grad_norm_

            return global_clip_grad_norm_(engine, self.model.parameters(), max_norm, norm_type, error_if_nonfinite,
                                          foreach)
        return torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm, norm_type, error_if_nonfinite, foreach)

    # The wrapper is transparent for state: checkpoints load into the bare model.
    def state_dict(self, *args: Any, **kwargs: Any):  # type: ignore[override]
        """The single-device state dict (on rank 0 of a distributed job; other ranks get their own part)."""
        if self._engine is None or self._engine.plan is None:
            return self.model.state_dict(*args, **kwargs)
        from rannc_cli.runtime.checkpoint import full_state_dict

        return full_state_dict(self._engine)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):  # type: ignore[override]
        if self._engine is None or self._engine.plan is None:
            return self.model.load_state_dict(state_dict, strict=strict, assign=assign)
        from rannc_cli.runtime.checkpoint import load_full_state_dict

        return load_full_state_dict(self._engine, state_dict, strict=strict)

    def save_checkpoint(self, directory: str | Path) -> Path:
        """Sharded checkpoint for fast resume: the plan and one file per rank (collective).

        A single process writes ``model.pt`` and ``optimizer.pt`` in ``directory`` instead."""
        if self._env is None:
            from rannc_cli.runtime.checkpoint import _save_atomic

            directory = Path(directory)
            _save_atomic(self.model.state_dict(), directory / "model.pt")
            if self.optimizer is not None:
                _save_atomic(self.optimizer.state_dict(), directory / "optimizer.pt")
            return directory
        from rannc_cli.runtime.checkpoint import save_shards

        return save_shards(self._get_engine(), directory)

    def load_checkpoint(self, directory: str | Path) -> None:
        """Resume from ``save_checkpoint``: before the first forward it also adopts the saved plan."""
        if self._env is None:
            directory = Path(directory)
            self.model.load_state_dict(torch.load(directory / "model.pt", weights_only=False))
            if self.optimizer is not None and (directory / "optimizer.pt").is_file():
                self.optimizer.load_state_dict(torch.load(directory / "optimizer.pt", weights_only=False))
            return
        engine = self._get_engine()
        if engine.plan is None:
            engine.resume_from = str(directory)  # applied right after the first forward's setup
            return
        from rannc_cli.runtime.checkpoint import load_shards

        load_shards(engine, directory)
