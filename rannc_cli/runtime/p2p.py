"""Point-to-point transfer of activations and gradients between ranks.

    box = Mailbox(device, rank=1)
    box.send(tensor, dst=3, tag=tag, key=("h", 12, 4, 2))     # asynchronous; box.flush() waits for all
    x = box.recv(src=1, tag=tag, key=("h", 12, 4, 2))         # blocks until the tensor arrived

Shapes and dtypes are not known in advance (autocast changes dtypes), so the first message on a
``key`` (peer, value, direction, slice size, consuming stage, autocast state) is preceded by a
small header with dtype and shape; both sides remember the key and later messages carry only the payload. Tags
keep messages apart on gloo; NCCL matches by order, which the executor keeps identical on both
sides (values in graph order, microbatches in schedule order). A message to the own rank (two
stages of one rank, as interleaved plans have) is handed over locally: ``send`` keeps the detached
tensor under its tag, ``recv`` takes it; nothing goes through the process group.
"""

from __future__ import annotations

from typing import Any, Hashable

import torch
import torch.distributed as dist

_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32, torch.int16,
           torch.int8, torch.uint8, torch.bool, torch.complex64, torch.complex128]
_HEADER = 12  # dtype, ndim, up to 10 dims


class Mailbox:
    """Asynchronous sends and blocking receives with a per-key header cache (see the module docstring)."""

    def __init__(self, device: torch.device, rank: int | None = None):
        self.device = device
        self.rank = dist.get_rank() if rank is None else rank
        self.local: dict[int, torch.Tensor] = {}  # tag -> tensor sent to this rank itself
        self.known: set[Hashable] = set()  # keys whose header this rank has sent
        self.shapes: dict[Hashable, tuple[torch.dtype, tuple[int, ...]]] = {}  # keys whose header it received
        self.pending: list[tuple[Any, torch.Tensor]] = []

    def _amp(self) -> tuple:
        kind = self.device.type
        return (torch.is_autocast_enabled(kind), torch.get_autocast_dtype(kind)) if torch.is_autocast_enabled(kind) \
            else (False,)

    def send(self, tensor: torch.Tensor, dst: int, tag: int, key: Hashable) -> None:
        tensor = tensor.detach()
        if dst == self.rank:
            if tag in self.local:
                raise RuntimeError(f"internal error: a second local message with tag {tag}")
            self.local[tag] = tensor
            return
        if tensor.device != self.device:
            tensor = tensor.to(self.device)
        tensor = tensor.contiguous()
        full_key = (dst, key, self._amp())
        if full_key not in self.known:
            self.known.add(full_key)
            if tensor.dim() > _HEADER - 2:
                raise RuntimeError(f"cannot send a tensor with {tensor.dim()} dimensions between stages")
            header = torch.zeros(_HEADER, dtype=torch.int64)
            header[0] = _DTYPES.index(tensor.dtype)
            header[1] = tensor.dim()
            header[2:2 + tensor.dim()] = torch.tensor(list(tensor.shape), dtype=torch.int64)
            header = header.to(self.device)
            self.pending.append((dist.isend(header, dst, tag=2 * tag + 1), header))
        self.pending.append((dist.isend(tensor, dst, tag=2 * tag), tensor))
        self._prune()

    def recv(self, src: int, tag: int, key: Hashable) -> torch.Tensor:
        if src == self.rank:
            if tag not in self.local:
                raise RuntimeError(f"internal error: no local message with tag {tag} (schedule order broken)")
            return self.local.pop(tag)
        full_key = (src, key, self._amp())
        meta = self.shapes.get(full_key)
        if meta is None:
            header = torch.zeros(_HEADER, dtype=torch.int64, device=self.device)
            dist.recv(header, src, tag=2 * tag + 1)
            values = header.tolist()
            meta = (_DTYPES[values[0]], tuple(values[2:2 + values[1]]))
            self.shapes[full_key] = meta
        out = torch.empty(meta[1], dtype=meta[0], device=self.device)
        dist.recv(out, src, tag=2 * tag)
        return out

    def _prune(self) -> None:
        if len(self.pending) > 64:
            still = []
            for work, buf in self.pending:
                if not work.is_completed():
                    still.append((work, buf))
            self.pending = still

    def flush(self) -> None:
        """Wait until every send has completed; drop local messages nobody took (an aborted step)."""
        for work, _ in self.pending:
            work.wait()
        self.pending = []
        self.local.clear()
