"""Tensor-size accounting: saved activations and peak live memory of a piece of work.

    with MemoryTracker(preexisting) as mem, SavedTensorMeter(exclude) as saved:
        outs = block(*inputs); torch.autograd.grad(outs, targets, grads)
    saved.bytes        # bytes the forward saved for the backward (shared storage counted once)
    mem.peak_bytes()   # peak bytes of storages created inside, alive at the same time

Works on real tensors (CPU; on CUDA the allocator's peak stats are used instead) and on fake
tensors (estimate mode), because it only looks at storages' sizes and identities.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode


def storage_key(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata


def storage_bytes(t: torch.Tensor) -> int:
    return int(t.untyped_storage().nbytes())


def aliases_inputs(func: Any) -> bool:
    """True for ops whose outputs alias an input (views, in-place ops): they allocate nothing."""
    schema = getattr(func, "_schema", None)
    return bool(schema is not None and schema.returns and all(r.alias_info is not None for r in schema.returns))


def tensors_in(tree: Any) -> list[torch.Tensor]:
    return [t for t in pytree.tree_leaves(tree) if isinstance(t, torch.Tensor)]


class MemoryTracker(TorchDispatchMode):
    """Records which storages every op reads and creates, then computes peak live bytes.

    A storage lives from the op that creates it to its last use; storages in ``keep_alive_from``
    (e.g. the forward's outputs) live at least until the mark ``end_of_forward``; ``final`` ones
    (e.g. returned gradients) until the end."""

    def __init__(self) -> None:
        super().__init__()
        self._current: dict[int, int] = {}  # storage key -> generation id
        self._size: list[int] = []  # generation -> bytes
        self._first: list[int] = []
        self._last: list[int] = []
        self._step = 0
        self._extend: dict[int, int] = {}  # generation -> at least alive until this step

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        self._step += 1
        in_keys = {storage_key(t) for t in tensors_in((args, kwargs))}
        for key in in_keys:
            gen = self._current.get(key)
            if gen is not None:
                self._last[gen] = self._step
        for t in tensors_in(out):
            key = storage_key(t)
            if key in in_keys or aliases_inputs(func):
                continue  # a view or an in-place result: no new storage
            gen = len(self._size)
            self._current[key] = gen
            self._size.append(storage_bytes(t))
            self._first.append(self._step)
            self._last.append(self._step)
        return out

    def keep_alive(self, tensors: Iterable[torch.Tensor], until_end: bool = False) -> None:
        """Mark these tensors' storages alive until now (or until the very end)."""
        for t in tensors:
            gen = self._current.get(storage_key(t))
            if gen is not None:
                self._extend[gen] = -1 if until_end else max(self._extend.get(gen, 0), self._step)

    def peak_bytes(self) -> int:
        end = self._step + 1
        deltas = [0] * (end + 2)
        for gen, size in enumerate(self._size):
            last = self._last[gen]
            extra = self._extend.get(gen)
            if extra == -1:
                last = end
            elif extra is not None:
                last = max(last, extra)
            deltas[self._first[gen]] += size
            deltas[last + 1] -= size
        peak = live = 0
        for d in deltas:
            live += d
            peak = max(peak, live)
        return peak


class SavedTensorMeter:
    """Sums the bytes of tensors autograd saves for backward, each storage once."""

    def __init__(self, exclude: Iterable[torch.Tensor] = ()):
        self._exclude = {storage_key(t) for t in exclude}
        self._seen: set[int] = set()
        self.bytes = 0
        self._ctx = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda x: x)

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        key = storage_key(t)
        if key not in self._exclude and key not in self._seen:
            self._seen.add(key)
            self.bytes += storage_bytes(t)
        return t

    def __enter__(self) -> "SavedTensorMeter":
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._ctx.__exit__(*exc)
