"""This node's GPUs through NVML (the `pynvml` module of nvidia-ml-py).

    gpus, pairs, status = probe()
    # gpus:  [{"index": 0, "name": "NVIDIA H100 80GB HBM3", "memory_bytes": ..., "compute_capability": "9.0",
    #          "pci_bus_id": "00000000:1B:00.0", "numa_node": 0, "nvlinks": {1: 18}}, ...]
    # pairs: {"0-1": "NV18", ...}   (nvidia-smi topo -m names)
    # status: "ok" or "unavailable: <why>"

No driver, no library or no GPU is the normal case of a CPU-only node: ([], {}, "unavailable: ...").
"""

from __future__ import annotations

from typing import Any

# nvmlDeviceGetTopologyCommonAncestor levels -> nvidia-smi topo -m names.
_ANCESTOR = {0: "X", 10: "PIX", 20: "PXB", 30: "PHB", 40: "NODE", 50: "SYS"}


def probe() -> tuple[list[dict[str, Any]], dict[str, str], str]:
    """GPUs, GPU-pair connections and a status line; never raises."""
    try:
        import pynvml
    except ImportError as exc:
        return [], {}, f"unavailable: pynvml not importable ({exc})"
    try:
        pynvml.nvmlInit()
    except Exception as exc:  # NVMLError_LibraryNotFound, _DriverNotLoaded, ...
        return [], {}, f"unavailable: {_why(exc)}"
    try:
        return _probe(pynvml)
    except Exception as exc:
        return [], {}, f"unavailable: NVML query failed ({_why(exc)})"
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:
            pass


def _why(exc: BaseException) -> str:
    return " ".join((str(exc) or type(exc).__name__).split())


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _probe(nv: Any) -> tuple[list[dict[str, Any]], dict[str, str], str]:
    count = nv.nvmlDeviceGetCount()
    handles = [nv.nvmlDeviceGetHandleByIndex(i) for i in range(count)]
    gpus: list[dict[str, Any]] = []
    bus_to_index: dict[str, int] = {}
    for i, h in enumerate(handles):
        gpu: dict[str, Any] = {"index": i, "name": _text(nv.nvmlDeviceGetName(h)),
                               "memory_bytes": int(nv.nvmlDeviceGetMemoryInfo(h).total)}
        try:
            major, minor = nv.nvmlDeviceGetCudaComputeCapability(h)
            gpu["compute_capability"] = f"{major}.{minor}"
        except Exception:
            pass
        try:
            bus = _text(nv.nvmlDeviceGetPciInfo(h).busId)
            gpu["pci_bus_id"] = bus
            bus_to_index[_norm_bus(bus)] = i
            gpu["numa_node"] = _numa_of(bus)
        except Exception:
            pass
        gpus.append(gpu)
    switch_links: dict[int, int] = {}    # active links whose far end is not a GPU: an NVSwitch
    for i, h in enumerate(handles):
        links: dict[int, int] = {}
        for link in range(getattr(nv, "NVML_NVLINK_MAX_LINKS", 18)):
            try:
                if nv.nvmlDeviceGetNvLinkState(h, link) != getattr(nv, "NVML_FEATURE_ENABLED", 1):
                    continue
                remote = _norm_bus(_text(nv.nvmlDeviceGetNvLinkRemotePciInfo(h, link).busId))
            except Exception:   # link not supported / GPU without NVLink
                continue
            peer = bus_to_index.get(remote)
            if peer is None:
                switch_links[i] = switch_links.get(i, 0) + 1
            else:
                links[peer] = links.get(peer, 0) + 1
        if links:
            gpus[i]["nvlinks"] = links
        if switch_links.get(i):
            gpus[i]["nvswitch_links"] = switch_links[i]
    pairs: dict[str, str] = {}
    for i in range(count):
        for j in range(i + 1, count):
            nvl = gpus[i].get("nvlinks", {}).get(j) or min(switch_links.get(i, 0), switch_links.get(j, 0))
            if nvl:
                pairs[f"{i}-{j}"] = f"NV{nvl}"
                continue
            try:
                pairs[f"{i}-{j}"] = _ANCESTOR.get(int(nv.nvmlDeviceGetTopologyCommonAncestor(handles[i], handles[j])), "SYS")
            except Exception:
                pass
    return gpus, pairs, "ok" if count else "ok: no GPU"


def _norm_bus(bus: str) -> str:
    """'00000000:1B:00.0' and '0000:1b:00.0' name the same device."""
    domain, _, rest = bus.lower().partition(":")
    return f"{int(domain, 16):04x}:{rest}" if rest else bus.lower()


def _numa_of(bus: str) -> int | None:
    try:
        with open(f"/sys/bus/pci/devices/{_norm_bus(bus)}/numa_node") as handle:
            node = int(handle.read().strip())
        return node if node >= 0 else None
    except (OSError, ValueError):
        return None
