"""Profile cache keyed by what determines a profile.

    key = profile_key(graph_hash=..., inputs=..., device=..., mode="measured", sizes=[1, 4, 16])
    cached = lookup(key)          # a Profile, or None
    store(profile)                # under $RANNC_CACHE_DIR/profiles/<key>.yaml

A cached profile is returned only when its recorded key equals the requested key, so another
graph, input shape, device, mode, size list, torch version or measuring method never matches.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from rannc_cli.config import settings
from rannc_cli.errors import RanncError
from rannc_cli.profiler.format import FORMAT_VERSION, Profile

# Bump when the measuring or estimating method changes what a profile holds (2: CUDA timing with
# events behind a GPU sleep instead of synchronised wall time).
METHOD_VERSION = 2


def profile_key(**parts: Any) -> str:
    import torch

    payload = {"format_version": FORMAT_VERSION, "method": METHOD_VERSION, "torch": str(torch.__version__), **parts}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:24]


def cache_dir() -> Path:
    return Path(settings.get("cache_dir")).expanduser() / "profiles"


def lookup(key: str) -> Profile | None:
    path = cache_dir() / f"{key}.yaml"
    if not path.is_file():
        return None
    try:
        prof = Profile.load(path)
    except RanncError:
        return None  # an unreadable cache entry is simply not a hit
    return prof if prof.key == key else None


def store(profile: Profile, model_key: str | None = None) -> Path:
    """Save under the profile key; with ``model_key``, also remember model_key -> profile key."""
    path = profile.save(cache_dir() / f"{profile.key}.yaml")
    if model_key:
        from rannc_cli.fileio import write_text_atomic

        write_text_atomic(cache_dir() / "by-model" / model_key, profile.key + "\n", what="profile cache entry")
    return path


def lookup_by_model(model_key: str) -> Profile | None:
    """The profile remembered for this model key (see ``model_key``), without capturing."""
    index = cache_dir() / "by-model" / model_key
    if not index.is_file():
        return None
    return lookup(index.read_text().strip())


def model_key(model: Any, args: tuple, kwargs: dict, **parts: Any) -> str:
    """A key computed without capturing: module tree, parameter and input shapes, and the source
    files of every non-torch module class (any edit to the model's code changes it)."""
    import inspect

    import torch
    from torch.utils import _pytree as pytree

    sources = {}
    for module in model.modules():
        cls = type(module)
        if cls.__module__.startswith("torch."):
            continue
        try:
            path = inspect.getsourcefile(cls)
        except (TypeError, OSError):
            path = None
        if path and path not in sources:
            try:
                sources[path] = hashlib.sha256(Path(path).read_bytes()).hexdigest()
            except OSError:
                sources[path] = "unreadable"
    leaves = [(tuple(t.shape), str(t.dtype), t.requires_grad) if isinstance(t, torch.Tensor) else repr(t)
              for t in pytree.tree_leaves((args, kwargs))]
    _, spec = pytree.tree_flatten((args, kwargs))
    return profile_key(
        tree=str(model), training=[m.training for m in model.modules()],
        params=[(n, tuple(p.shape), str(p.dtype), p.requires_grad) for n, p in model.named_parameters()],
        buffers=[(n, tuple(b.shape), str(b.dtype)) for n, b in model.named_buffers()],
        inputs=leaves, input_structure=str(spec), sources=sorted(sources.values()), **parts)
