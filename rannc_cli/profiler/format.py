"""The profile file: what `rannc profile` writes and `rannc plan` reads (docs/profile-format.md).

    prof = Profile.load("rannc-profile.yaml")
    cost = prof.block_cost(3, microbatch=4)       # BlockCost at microbatch 4 (interpolated)
    prof.param_bytes([0, 1, 2])                    # tied parameters counted once
    prof.value_bytes("v12", microbatch=4)          # bytes crossing a boundary

Plain dataclasses, YAML on disk, no torch import: the planner and the CLI load
profiles cheaply, and users may read and hand-edit them.
"""

from __future__ import annotations

import hashlib
import json
from bisect import bisect_left
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

from rannc_cli.errors import RanncError
from rannc_cli.fileio import read_yaml, write_data_atomic

FORMAT_NAME = "rannc-profile"
FORMAT_VERSION = 2  # 2: optional backward_input_seconds / backward_weight_seconds (the 'zb' split)
READ_VERSIONS = (1, 2)  # version 1 files load unchanged (no split fields: the cost model's W_SHARE split)


@dataclass
class BlockCost:
    """Costs of one block at one microbatch size (seconds, bytes)."""

    microbatch: int
    forward_seconds: float
    backward_seconds: float
    recompute_backward_seconds: float  # backward with activation checkpointing: forward again + backward
    activation_bytes: int  # saved for backward, kept from forward until backward
    peak_bytes: int  # transient working memory above inputs, params and saved activations
    flops_forward: float = 0.0
    flops_backward: float = 0.0
    # 'zb' split of the backward as the runtime runs it (profiler/split_backward.py); None: not measured
    backward_input_seconds: float | None = None  # B: gradients of the block's inputs
    backward_weight_seconds: float | None = None  # W: then the parameters' gradients

    @property
    def has_split(self) -> bool:
        return self.backward_input_seconds is not None and self.backward_weight_seconds is not None

    def to_dict(self) -> dict[str, Any]:
        """The file form: the split fields only where known (so version 1 content hashes stay)."""
        return {k: v for k, v in asdict(self).items() if v is not None or k not in _SPLIT_FIELDS}


@dataclass
class BlockClass:
    """Structurally identical blocks share one class and one set of measurements."""

    id: int
    signature: str
    blocks: list[int]
    costs: list[BlockCost]

    def cost_at(self, microbatch: int) -> BlockCost:
        """Costs at any microbatch size: exact where measured, else linear in the size
        between (or beyond) the two nearest measured sizes, never below zero."""
        if not self.costs:
            raise RanncError(f"profile class {self.id} has no measurements", hint="re-run `rannc profile`")
        sizes = [c.microbatch for c in self.costs]
        i = bisect_left(sizes, microbatch)
        if i < len(sizes) and sizes[i] == microbatch:
            return self.costs[i]
        if len(self.costs) == 1:  # one measurement: proportional to the microbatch
            only = self.costs[0]
            return _blend(microbatch, only, only, microbatch / only.microbatch, proportional=True)
        lo, hi = (self.costs[0], self.costs[1]) if i == 0 else \
            (self.costs[-2], self.costs[-1]) if i == len(sizes) else (self.costs[i - 1], self.costs[i])
        return _blend(microbatch, lo, hi, (microbatch - lo.microbatch) / (hi.microbatch - lo.microbatch))


def _blend(microbatch: int, lo: BlockCost, hi: BlockCost, t: float, proportional: bool = False) -> BlockCost:
    """Linear inter/extrapolation of every cost field, clamped at zero (the split fields only
    where both sizes have them)."""
    fields: dict[str, Any] = {}
    names = _COST_FIELDS + (_SPLIT_FIELDS if lo.has_split and hi.has_split else [])
    for name in names:
        a, b = float(getattr(lo, name)), float(getattr(hi, name))
        v = max(0.0, a * t if proportional else a + (b - a) * t)
        fields[name] = int(round(v)) if name.endswith("_bytes") else v
    return BlockCost(microbatch=microbatch, **fields)


_COST_FIELDS = ["forward_seconds", "backward_seconds", "recompute_backward_seconds", "activation_bytes",
                "peak_bytes", "flops_forward", "flops_backward"]
_SPLIT_FIELDS = ["backward_input_seconds", "backward_weight_seconds"]


@dataclass
class BlockInfo:
    """One atomic block: the smallest unit a stage boundary may cut between."""

    id: int
    name: str  # nn.Module path of its ops ('' is the root module)
    module_type: str
    cls: int
    ops: int
    params: list[str]  # parameter and buffer names the block reads
    inputs: list[str]  # value ids it consumes
    outputs: list[str]  # value ids it produces that others consume


@dataclass
class ValueInfo:
    """A value crossing a block boundary (or a user input)."""

    id: str
    producer: int | None  # block id; None for a user input
    shape: list[int]  # at the captured batch size
    dtype: str
    batch_dim: int | None
    bytes_per_sample: int  # bytes that scale with the microbatch (0 if no batch dimension)
    fixed_bytes: int  # bytes independent of the microbatch
    consumers: list[int] = field(default_factory=list)
    is_tensor: bool = True

    def bytes_at(self, microbatch: int) -> int:
        return self.fixed_bytes + self.bytes_per_sample * microbatch


@dataclass
class ParamInfo:
    name: str
    shape: list[int]
    dtype: str
    bytes: int
    kind: str  # 'parameter' or 'buffer'
    trainable: bool
    blocks: list[int]  # blocks that read it (several: tied)


@dataclass
class Profile:
    model: dict[str, Any]
    device: dict[str, Any]
    microbatch_sizes: list[int]
    blocks: list[BlockInfo]
    classes: list[BlockClass]
    values: dict[str, ValueInfo]
    parameters: dict[str, ParamInfo]
    loss_value: str
    key: str = ""
    created: str = ""
    format: str = FORMAT_NAME
    version: int = FORMAT_VERSION

    # ------------------------------------------------------------------ queries
    def block_cost(self, block_id: int, microbatch: int) -> BlockCost:
        return self.classes[self.blocks[block_id].cls].cost_at(microbatch)

    def param_bytes(self, block_ids: Iterable[int], trainable_only: bool = False) -> int:
        """Bytes of the parameters and buffers read by these blocks, each counted once."""
        names = {p for b in block_ids for p in self.blocks[b].params}
        return sum(self.parameters[n].bytes for n in names
                   if not trainable_only or (self.parameters[n].trainable and self.parameters[n].kind == "parameter"))

    def value_bytes(self, value_id: str, microbatch: int) -> int:
        return self.values[value_id].bytes_at(microbatch)

    def predecessors(self, block_id: int) -> set[int]:
        return {self.values[v].producer for v in self.blocks[block_id].inputs
                if self.values[v].producer is not None}

    @property
    def batch_size(self) -> int:
        return int(self.model["batch_size"])

    def totals(self, microbatch: int | None = None) -> dict[str, float]:
        m = microbatch or self.batch_size
        costs = [self.block_cost(b.id, m) for b in self.blocks]
        return {
            "blocks": len(self.blocks),
            "distinct_blocks": len(self.classes),
            "parameter_bytes": self.param_bytes(range(len(self.blocks)), trainable_only=True),
            "buffer_bytes": sum(p.bytes for p in self.parameters.values() if p.kind == "buffer"),
            "forward_seconds": sum(c.forward_seconds for c in costs),
            "backward_seconds": sum(c.backward_seconds for c in costs),
            "activation_bytes": sum(c.activation_bytes for c in costs),
            "microbatch": m,
        }

    def content_hash(self) -> str:
        """Hash of everything but bookkeeping: plans record it to refuse another model's profile."""
        data = self.to_dict()
        for key in ("created", "key"):
            data.pop(key, None)
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]

    # ------------------------------------------------------------------ file form
    def to_dict(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "version": self.version,
            "key": self.key,
            "created": self.created,
            "model": self.model,
            "device": self.device,
            "microbatch_sizes": list(self.microbatch_sizes),
            "loss_value": self.loss_value,
            "blocks": [asdict(b) for b in self.blocks],
            "classes": [{"id": c.id, "signature": c.signature, "blocks": c.blocks,
                         "costs": [x.to_dict() for x in c.costs]} for c in self.classes],
            "values": {k: {f: v for f, v in asdict(x).items() if f != "id"} for k, x in self.values.items()},
            "parameters": {k: {f: v for f, v in asdict(x).items() if f != "name"} for k, x in self.parameters.items()},
        }

    HEADER = ("# rannc profile (docs/profile-format.md). Times in seconds, sizes in bytes.\n"
              "# Hand edits are allowed; `rannc plan` validates the file when it loads it.\n")

    def dumps(self) -> str:
        import yaml

        return self.HEADER + yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None, width=120)

    def save(self, path: Path | str) -> Path:
        """Write the profile, YAML or JSON by the suffix (.yaml, .yml, .json), atomically."""
        return write_data_atomic(path, self.to_dict(), self.HEADER, what="profile file")

    @classmethod
    def from_dict(cls, data: Any, source: str = "<profile>") -> "Profile":
        if not isinstance(data, dict) or data.get("format") != FORMAT_NAME:
            raise RanncError(f"{source} is not a rannc profile (no 'format: {FORMAT_NAME}')",
                             hint="pass a file written by `rannc profile`")
        if data.get("version") not in READ_VERSIONS:
            raise RanncError(f"{source} has profile format version {data.get('version')}, this rannc reads "
                             f"versions {', '.join(map(str, READ_VERSIONS))}", hint="re-run `rannc profile` with this rannc")
        try:
            prof = cls(
                model=dict(data["model"]),
                device=dict(data["device"]),
                microbatch_sizes=[int(m) for m in data["microbatch_sizes"]],
                blocks=[BlockInfo(**b) for b in data["blocks"]],
                classes=[BlockClass(id=c["id"], signature=c["signature"], blocks=list(c["blocks"]),
                                    costs=sorted((BlockCost(**x) for x in c["costs"]), key=lambda x: x.microbatch))
                         for c in data["classes"]],
                values={k: ValueInfo(id=k, **v) for k, v in data["values"].items()},
                parameters={k: ParamInfo(name=k, **v) for k, v in data["parameters"].items()},
                loss_value=str(data["loss_value"]),
                key=str(data.get("key", "")),
                created=str(data.get("created", "")),
                version=int(data["version"]),  # kept: a version 1 file keeps its content hash
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise RanncError(f"{source} is a malformed rannc profile ({type(exc).__name__}: {exc})",
                             hint="compare it with docs/profile-format.md or re-run `rannc profile`") from None
        prof.validate(source)
        return prof

    @classmethod
    def load(cls, path: Path | str) -> "Profile":
        data = read_yaml(path, "profile file", "create one with `rannc profile SCRIPT --out FILE`")
        return cls.from_dict(data, str(path))

    def validate(self, source: str = "<profile>") -> None:
        """Check the cross references a hand edit could break."""
        def bad(what: str) -> RanncError:
            return RanncError(f"{source}: {what}", hint="fix the file or re-run `rannc profile`")

        for i, b in enumerate(self.blocks):
            if b.id != i:
                raise bad(f"block ids must be 0..{len(self.blocks) - 1} in order; found id {b.id} at position {i}")
            if not 0 <= b.cls < len(self.classes):
                raise bad(f"block {b.id} names class {b.cls}, which does not exist")
            for v in b.inputs + b.outputs:
                if v not in self.values:
                    raise bad(f"block {b.id} names value {v!r}, which is not under 'values'")
            for p in b.params:
                if p not in self.parameters:
                    raise bad(f"block {b.id} reads parameter {p!r}, which is not under 'parameters'")
            for v in b.inputs:
                producer = self.values[v].producer
                if producer is not None and producer >= b.id:
                    raise bad(f"block {b.id} consumes {v!r} from block {producer}: blocks must be in topological order")
        for c in self.classes:
            if not c.costs:
                raise bad(f"class {c.id} has no costs")
            for x in c.costs:
                if x.microbatch < 1 or min(x.forward_seconds, x.backward_seconds, x.recompute_backward_seconds) < 0 \
                        or min(x.activation_bytes, x.peak_bytes) < 0:
                    raise bad(f"class {c.id} has a negative or invalid cost at microbatch {x.microbatch}")
                split = (x.backward_input_seconds, x.backward_weight_seconds)
                if (split[0] is None) != (split[1] is None) or any(v is not None and v < 0 for v in split):
                    raise bad(f"class {c.id} at microbatch {x.microbatch}: backward_input_seconds and "
                              "backward_weight_seconds must both be given (non-negative) or both left out")
        if self.loss_value not in self.values:
            raise bad(f"loss value {self.loss_value!r} is not under 'values'")
